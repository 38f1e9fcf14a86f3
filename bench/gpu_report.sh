#!/usr/bin/env bash
# Everything a short GPU lease should measure, in one go (the project's packages must be importable):
#   1. training-step cost of flow / dts / selfflow (bench_train.py) on `small`, bf16, with achieved
#      TFLOP/s against the card's peak (and `base` near the end);
#   2. a short `small` training run on dmc/reacher-easy with the default objective (flow, every
#      target at t = 1, as the shipped models), sized to TRAIN_SECONDS from the measured step time,
#      and `sfw eval` of it (1-step sampling; 4-step at the end) against copy-last;
#   3. the imagination table (bench_imagine.py) of that checkpoint against the simulator.
# The most wanted figures come first, so a lease that runs out still returns them.
# Usage: bash bench/gpu_report.sh OUTDIR [TRAIN_SECONDS]
# Env: PEAK_TFLOPS (989: H100 SXM bf16 dense), EPISODES (200), WORKERS (nproc - 2), BATCH (64),
#      DEVICE (auto), TRAIN_MODEL (small), BENCH_MODELS (base: benchmarked
#      besides TRAIN_MODEL), EVAL_EPISODES (20).
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

bench_train() {
    stamp "bench_train $1 batch $batch"
    python3 bench/bench_train.py --model "$1" --batch "$batch" --steps 20 --warmup 5 --rounds 1 \
        --device "$device" --peak-tflops "$peak" | tee "$work/bench_train_$1.txt"
}
bench_train "$model"  # also sizes the training run below

# training steps that fit the budget, from the measured flow step (validation/checkpoints ~15 %)
s_step=$(awk '$1 == "flow" && $2 + 0 > 0 {print $2; exit}' "$work/bench_train_$model.txt" 2>/dev/null)
steps=$(python3 -c "print(max(200, int(0.85 * $budget / float('${s_step:-1}')) // 100 * 100))")
stamp "train $model flow $steps steps (measured ${s_step:-?} s/step)"
timeout $((budget + 120)) sfw train data="$work/data" model="$model" objective=flow steps="$steps" \
    batch_size="$batch" lr=0.0004 warmup=300 num_workers=4 device="$device" out="$work/run" \
    val_every=500 ckpt_every=500 sample_every=1000000 tensorboard=false 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -n 40
cp "$work/run/metrics.csv" "$out/train_metrics.csv" 2>/dev/null

evaluate() {
    stamp "eval steps=$1"
    sfw eval ckpt="$work/run" data="$work/data" out="$work/eval_s$1" horizon=16 episodes="$eval_episodes" \
        steps="$1" device="$device" && cp "$work/eval_s$1/report.json" "$out/eval_s$1.json" \
        && cat "$work/eval_s$1/report.md"
}
evaluate 1

stamp "bench_imagine"
python3 bench/bench_imagine.py --ckpt "$work/run" --batches 1,64,1024,4096 --steps 1,2,4 --precision bf16 \
    --device "$device" --compile

# the EMA weights in bf16 (a checkpoint WorldModel.load reads), small enough to copy back
python3 - "$work/run" "$out/ckpt" <<'EOF'
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
for m in ${BENCH_MODELS:-base}; do bench_train "$m"; done
evaluate 4
stamp "done"
