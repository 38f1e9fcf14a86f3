#!/usr/bin/env bash
# Everything a short GPU lease should measure, in one go (the project's packages must be importable):
#   1. training-step cost of flow / dts / selfflow (bench_train.py) on `small`, bf16, with achieved
#      TFLOP/s against the card's peak (and `base` near the end);
#   2. a short `small` training run on dmc/reacher-easy with the default objective (flow, every
#      target at t = 1, as the shipped models), then a stage on its own predictions
#      (`imagined_history` 8, from the first run's EMA weights, as the shipped models' last stage),
#      together sized to TRAIN_SECONDS from the measured step time (IH_SHARE of it for the stage),
#      and `sfw eval` of the result with the action-following bar's protocol (20 held-out episodes
#      collected with another seed, the probe fitted on the training episodes, 1-step sampling),
#      then the first run's figures beside it;
#   3. the imagination table (bench_imagine.py) of that checkpoint against the simulator.
# The most wanted figures come first, so a lease that runs out still returns them.
# Usage: bash bench/gpu_report.sh OUTDIR [TRAIN_SECONDS]
# Env: PEAK_TFLOPS (989: H100 SXM bf16 dense), EPISODES (200), WORKERS (nproc - 2), BATCH (64),
#      DEVICE (auto), TRAIN_MODEL (small), BENCH_MODELS (base: benchmarked
#      besides TRAIN_MODEL), EVAL_EPISODES (20), IH_SHARE (0.3: the share of TRAIN_SECONDS for the
#      stage on the model's own predictions; 0 = none).
set -u
out=${1:?usage: bench/gpu_report.sh OUTDIR [TRAIN_SECONDS]}
budget=${2:-180}
peak=${PEAK_TFLOPS:-989}
episodes=${EPISODES:-200}
workers=${WORKERS:-$(($(nproc) > 3 ? $(nproc) - 2 : 1))}
batch=${BATCH:-64}
device=${DEVICE:-auto}
model=${TRAIN_MODEL:-small}
eval_episodes=${EVAL_EPISODES:-20}
ih_share=${IH_SHARE:-0.3}
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
stamp() { echo "== $(date +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, mujoco; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mujoco', mujoco.__version__)"

stamp "collect $episodes episodes x 100 steps, $workers workers"
sfw collect env=dmc/reacher-easy episodes="$episodes" steps=100 out="$work/data" workers="$workers" seed=0 \
    || exit 1
sfw collect env=dmc/reacher-easy episodes="$eval_episodes" steps=100 out="$work/test" workers="$workers" seed=1 \
    || exit 1

bench_train() {
    stamp "bench_train $1 batch $batch"
    python3 bench/bench_train.py --model "$1" --batch "$batch" --steps 20 --warmup 5 --rounds 1 \
        --device "$device" --peak-tflops "$peak" | tee "$work/bench_train_$1.txt"
}
bench_train "$model"  # also sizes the training run below

# training steps that fit the budget, from the measured flow step (validation/checkpoints ~15 %);
# a step of the stage on the model's own predictions costs about 1.8 flow steps (2-core CPU figure)
s_step=$(awk '$1 == "flow" && $2 + 0 > 0 {print $2; exit}' "$work/bench_train_$model.txt" 2>/dev/null)
base_budget=$(python3 -c "print(int($budget * (1 - $ih_share)))")
ih_budget=$((budget - base_budget))
steps=$(python3 -c "print(max(200, int(0.85 * $base_budget / float('${s_step:-1}')) // 100 * 100))")
ih_steps=$(python3 -c "print(int(0.85 * $ih_budget / (1.8 * float('${s_step:-1}'))) // 100 * 100)")
train() {  # OUT SECONDS STEPS [overrides...]
    local run=$1 seconds=$2 n=$3
    shift 3
    # checkpoints every fifth of the run, so a run the timeout stops still leaves one to evaluate
    local every=$(((n / 5) > 100 ? n / 5 : 100))
    timeout $((seconds + 120)) sfw train data="$work/data" model="$model" objective=flow steps="$n" \
        batch_size="$batch" num_workers=4 device="$device" out="$run" val_every="$every" ckpt_every="$every" \
        sample_every=1000000 tensorboard=false "$@" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -n 40
}
stamp "train $model flow $steps steps (measured ${s_step:-?} s/step)"
train "$work/run" "$base_budget" "$steps" lr=0.0004 warmup=300
cp "$work/run/metrics.csv" "$out/train_metrics.csv" 2>/dev/null
final="$work/run"
if [ "$ih_steps" -ge 100 ]; then
    stamp "train $model on its own predictions: $ih_steps steps at imagined_history 8"
    train "$work/run-ih" "$ih_budget" "$ih_steps" init="$work/run" lr=0.0001 warmup=100 \
        imagined_history=8 imagined_share=0.5
    cp "$work/run-ih/metrics.csv" "$out/train_ih_metrics.csv" 2>/dev/null
    [ -d "$work/run-ih/checkpoints" ] && final="$work/run-ih"
fi

evaluate() {  # NAME CKPT SAMPLER_STEPS: the action-following bar's protocol on the held-out episodes
    stamp "eval $1 steps=$3"
    sfw eval ckpt="$2" data="$work/test" split=all probe_data="$work/data" out="$work/eval_$1_s$3" \
        horizon=16 episodes="$eval_episodes" steps="$3" device="$device" \
        && cp "$work/eval_$1_s$3/report.json" "$out/eval_$1_s$3.json" && cat "$work/eval_$1_s$3/report.md"
}
evaluate final "$final" 1

stamp "bench_imagine"
python3 bench/bench_imagine.py --ckpt "$final" --batches 1,64,1024,4096 --steps 1,2,4 --precision bf16 \
    --device "$device" --compile

# the EMA weights in bf16 (a checkpoint WorldModel.load reads), small enough to copy back
python3 - "$final" "$out/ckpt" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from selfflow_world.checkpoint import resolve_checkpoint
src, dst = resolve_checkpoint(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
w = load_file(str(src / "weights.safetensors"))
save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in w.items() if k.startswith("ema.")},
          str(dst / "weights.safetensors"))
shutil.copy(src / "meta.json", dst / "meta.json")
print("exported", src.name, "EMA weights (bf16) to", dst)
EOF
[ "$final" != "$work/run" ] && evaluate base "$work/run" 1
for m in ${BENCH_MODELS:-base}; do bench_train "$m"; done
stamp "done"
