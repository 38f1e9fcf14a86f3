#!/usr/bin/env bash
# Reproduce a default world model end to end: collect training and held-out data, train, evaluate.
#
#   bash bench/train_default.sh reacher-easy [STEPS]     # dmc/reacher-easy
#   bash bench/train_default.sh cartpole-swingup [STEPS] # dmc/cartpole-swingup
#
# Every stage continues where it stopped when the script is run again (collection continues up to
# the episode count, training with resume=true), so an interrupted run is resumed by rerunning the
# same command. Outputs: data/<name> (200 training episodes, seed 0), data/<name>_test (20 held-out
# episodes, seed 1), runs/<name> (checkpoints, metrics.csv, tb/; reward heads and probes in the
# newest checkpoint), <last stage's run>/eval_test (the report on the held-out episodes).
# Environment: SFW (default .venv/bin/sfw), PY (default .venv/bin/python), WORKERS (collection
# processes, default 2), OBJECTIVE (default flow), BATCH (default 16), EXTRA (more sfw train
# overrides, space-separated, e.g. "objective.t_one=1.0"), FINETUNE (steps of a second schedule,
# lr 1e-4, started from the first run's EMA weights in runs/<name>-ft with `sfw train init=`;
# default 0 = none), IH (imagined_history of the last stages, which train on the model's own
# predictions, each started from the previous stage's EMA weights: one value or a comma-separated
# list, one per stage; default 0 = none), IH_STEPS (their steps, one value or one per stage,
# default 1200; STEPS@STOP: a STEPS-step schedule stopped at step STOP, `sfw train stop_at=`),
# IH_HISTORY (context frames of those stages, one value or one per stage, default 2; a stage may
# lengthen the context of the model it starts from), IH_LR and IH_WARMUP (their peak learning rate
# and warmup steps, one value or one per stage, default 0.0001 and 100), IH_EXTRA (more sfw train
# overrides per stage, `;`-separated, e.g. ";objective.motion_weight=3": none in the first stage,
# a motion weight in the second),
# EVAL_STEPS (sampler steps per imagined frame in the evaluation, default 1). Heads, evaluation and
# export use the last stage's run. The shipped models:
#   OBJECTIVE=flow EXTRA="objective.t_one=1.0" FINETUNE=3000 IH=6,8 IH_STEPS=1200,1200 bash bench/train_default.sh reacher-easy 5000
#   OBJECTIVE=flow EXTRA="objective.t_one=1.0" FINETUNE=3000 IH=6,8,12,12,12,8,8 IH_STEPS=1200,1600,1200,2000@1600,1200,1200,800@600 IH_HISTORY=2,2,2,2,4,4,4 IH_LR=1e-4,1e-4,1e-4,1e-4,1e-4,5e-5,5e-5 IH_WARMUP=100,100,100,100,100,50,50 IH_EXTRA=";;;;;;objective.motion_weight=3" bash bench/train_default.sh cartpole-swingup 5000
set -euo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL="${MUJOCO_GL:-egl}"
NAME="${1:?usage: bench/train_default.sh reacher-easy|cartpole-swingup [STEPS]}"
STEPS="${2:-5000}"
SFW="${SFW:-.venv/bin/sfw}"
PY="${PY:-.venv/bin/python}"
WORKERS="${WORKERS:-2}"
OBJECTIVE="${OBJECTIVE:-flow}"
BATCH="${BATCH:-16}"
FINETUNE="${FINETUNE:-0}"
RUN="runs/$NAME"

$SFW collect env="dmc/$NAME" episodes=200 steps=100 seed=0 workers="$WORKERS" out="data/$NAME"
$SFW collect env="dmc/$NAME" episodes=20 steps=100 seed=1 workers="$WORKERS" out="data/${NAME}_test"
$SFW train data="data/$NAME" out="$RUN" model=small objective="$OBJECTIVE" steps="$STEPS" \
    batch_size="$BATCH" resume=true val_every=500 ckpt_every=250 sample_every=2500 ${EXTRA:-}
if [ "$FINETUNE" -gt 0 ]; then
    # a second cosine schedule from the first run's EMA weights (rerun: continues it, init= is then unused)
    $SFW train data="data/$NAME" out="$RUN-ft" init="$RUN" model=small objective="$OBJECTIVE" \
        steps="$FINETUNE" lr=0.0001 warmup=100 batch_size="$BATCH" resume=true val_every=500 \
        ckpt_every=250 sample_every=2500 ${EXTRA:-}
    RUN="$RUN-ft"
fi
# training on its own predictions, in stages: half the clips get a history the EMA model imagined
# over up to IH steps from recorded frames, so the model learns to continue from its own frames.
# IH and IH_STEPS are comma-separated lists, one entry per stage (IH=6,8 IH_STEPS=1200,1600: 1200
# steps at 6, then 1600 at 8 from the first stage's EMA weights); the stages train in runs/<name>-ih,
# runs/<name>-ih2, ...
IFS=, read -r -a IH_LIST <<< "${IH:-0}"
IFS=, read -r -a IH_STEP_LIST <<< "${IH_STEPS:-1200}"
IFS=, read -r -a IH_HISTORY_LIST <<< "${IH_HISTORY:-2}"
IFS=, read -r -a IH_LR_LIST <<< "${IH_LR:-0.0001}"
IFS=, read -r -a IH_WARMUP_LIST <<< "${IH_WARMUP:-100}"
IFS=';' read -r -a IH_EXTRA_LIST <<< "${IH_EXTRA:-}"
per_stage() {  # NAME COUNT VALUE WHAT: the list must give one value or one per stage
    if [ "$2" -ne 1 ] && [ "$2" -ne "${#IH_LIST[@]}" ]; then
        echo "$1=$3 must give one $4, or one per stage of IH=${IH}" >&2
        exit 2
    fi
}
if [ "${IH_LIST[0]}" -gt 0 ]; then
    per_stage IH_STEPS "${#IH_STEP_LIST[@]}" "${IH_STEPS:-}" "step count"
    per_stage IH_HISTORY "${#IH_HISTORY_LIST[@]}" "${IH_HISTORY:-}" "context length"
    per_stage IH_LR "${#IH_LR_LIST[@]}" "${IH_LR:-}" "learning rate"
    per_stage IH_WARMUP "${#IH_WARMUP_LIST[@]}" "${IH_WARMUP:-}" "warmup"
    for i in "${!IH_LIST[@]}"; do
        STAGE_STEPS="${IH_STEP_LIST[$i]:-${IH_STEP_LIST[0]}}"
        STAGE_HISTORY="${IH_HISTORY_LIST[$i]:-${IH_HISTORY_LIST[0]}}"
        STAGE_LR="${IH_LR_LIST[$i]:-${IH_LR_LIST[0]}}"
        STAGE_WARMUP="${IH_WARMUP_LIST[$i]:-${IH_WARMUP_LIST[0]}}"
        STAGE_EXTRA="${IH_EXTRA_LIST[$i]:-}"
        STOP="null"
        if [[ "$STAGE_STEPS" == *@* ]]; then STOP="${STAGE_STEPS#*@}"; STAGE_STEPS="${STAGE_STEPS%@*}"; fi
        OUT="runs/$NAME-ih"
        if [ "$i" -gt 0 ]; then OUT="runs/$NAME-ih$((i + 1))"; fi
        $SFW train data="data/$NAME" out="$OUT" init="$RUN" model=small objective="$OBJECTIVE" \
            steps="$STAGE_STEPS" stop_at="$STOP" history="$STAGE_HISTORY" lr="$STAGE_LR" warmup="$STAGE_WARMUP" \
            batch_size="$BATCH" imagined_history="${IH_LIST[$i]}" imagined_share=0.5 resume=true \
            val_every=500 ckpt_every=250 sample_every=2500 ${EXTRA:-} $STAGE_EXTRA
        RUN="$OUT"
    done
fi
# reward/termination heads on the frozen model (stored in its newest checkpoint; the eval reports them)
$SFW heads ckpt="$RUN" data="data/$NAME" eval_data="data/${NAME}_test"
# the state probe (and reacher's target probe) that sfw rl observation=probes and sfw plan read
# frames with, fitted on real and imagined frames and stored beside the heads
$SFW probe ckpt="$RUN" data="data/$NAME" score=state seed=1
if [[ "$NAME" == reacher-* ]]; then $SFW probe ckpt="$RUN" data="data/$NAME" score=target seed=1; fi
$SFW eval ckpt="$RUN" data="data/${NAME}_test" split=all probe_data="data/$NAME" \
    out="$RUN/eval_test" horizon=16 episodes=20 steps="${EVAL_STEPS:-1}"
# the shipped-model directory (bf16 EMA weights, the heads, meta.json, MODEL_CARD.md with the figures above);
# copy it to selfflow_world/models/$NAME when it measures better than the shipped one
$PY -m selfflow_world.pretrained "$RUN" "$RUN/shipped/$NAME" \
    --report "$RUN/eval_test/report.json" --hardware "${HARDWARE:-$(nproc) CPU cores, $(uname -m)}"
