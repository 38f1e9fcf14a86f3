# One command to set up and run the demo, one to run the tests. Both set up what they need:
# a virtual environment in .venv, the pinned CPU torch wheel unless the venv already has a torch
# (install your CUDA build into .venv first to keep it), and this package in editable mode.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
MODEL ?= reacher-easy
STEPS ?= 5000
SFW := $(VENV)/bin/sfw
export MUJOCO_GL ?= egl

.PHONY: setup demo reproduce test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

# The main job on a built-in default (a few minutes on 2 CPU cores, nothing trained or downloaded):
# the shipped reacher-easy world model imagines fresh simulator episodes under their real and
# under alternative actions; videos, the consistency report and a summary go to $(DEMO_DIR)/.
demo: setup
	$(SFW) demo out=$(DEMO_DIR)

# Reproduce a shipped model from scratch with its recipe (its MODEL_CARD.md): collect, train
# (flow, every target at t = 1), fine-tune (3000 more steps at a lower learning rate), train in
# stages on its own predictions (reacher-easy: imagined histories of up to 6 and 8 frames, 1200
# steps each; cartpole-swingup: 6, 8, 12 and 12 frames, 1200, 1600, 1200 and 1600 of a 2000-step
# schedule, then 1200 steps at 12 with a 4-frame context, 1200 at 8 and 600 of an 800-step
# schedule at 8 with moving pixels weighted 4x, both at half the learning rate), heads, probes,
# evaluate, export.
# Resumable: rerun to continue. About 3.5 hours on 2 CPU cores with AVX512-BF16 for reacher-easy, 6 for
# cartpole-swingup (CPUs without native bf16 train in float32, about 1.8x slower).
#   make reproduce                                  # reacher-easy
#   make reproduce MODEL=cartpole-swingup
# IH / IH_STEPS / IH_HISTORY / IH_LR / IH_WARMUP / IH_EXTRA (the stages' imagined histories, steps,
# context frames, learning rates, warmups and further overrides) default to the shipped model's recipe.
FINETUNE ?= 3000
IH_reacher-easy := 6,8
IH_STEPS_reacher-easy := 1200
IH_cartpole-swingup := 6,8,12,12,12,8,8
IH_STEPS_cartpole-swingup := 1200,1600,1200,2000@1600,1200,1200,800@600
IH_HISTORY_cartpole-swingup := 2,2,2,2,4,4,4
IH_LR_cartpole-swingup := 1e-4,1e-4,1e-4,1e-4,1e-4,5e-5,5e-5
IH_WARMUP_cartpole-swingup := 100,100,100,100,100,50,50
IH_EXTRA_cartpole-swingup := ;;;;;;objective.motion_weight=3
IH ?= $(or $(IH_$(MODEL)),0)
# $(call stage_setting,NAME,DEFAULT): the model's recipe value of NAME; DEFAULT when IH is given
# alone (e.g. 1200 steps per stage) or the model's recipe has none
stage_setting = $(if $(filter command line environment,$(origin IH)),$(2),$(or $($(1)_$(MODEL)),$(2)))
IH_STEPS ?= $(call stage_setting,IH_STEPS,1200)
IH_HISTORY ?= $(call stage_setting,IH_HISTORY,2)
IH_LR ?= $(call stage_setting,IH_LR,1e-4)
IH_WARMUP ?= $(call stage_setting,IH_WARMUP,100)
IH_EXTRA ?= $(call stage_setting,IH_EXTRA,)
reproduce: setup
	OBJECTIVE=flow EXTRA="objective.t_one=1.0" FINETUNE=$(FINETUNE) IH=$(IH) IH_STEPS=$(IH_STEPS) IH_HISTORY=$(IH_HISTORY) IH_LR=$(IH_LR) IH_WARMUP=$(IH_WARMUP) IH_EXTRA="$(IH_EXTRA)" bash bench/train_default.sh $(MODEL) $(STEPS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
