# One command to set up and run the demo, one to run the tests. Both set up what they need:
# a virtual environment in .venv, the pinned CPU torch wheel unless the venv already has a torch
# (install your CUDA build into .venv first to keep it), and this package in editable mode.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
DEMO_STEPS ?= 300
SFW := $(VENV)/bin/sfw
export MUJOCO_GL ?= egl

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

# The main job on a built-in default (about 10 minutes on 2 CPU cores): collect dm_control reacher
# pixels, train a `small` Self-Flow world model, write real | imagined videos and an evaluation
# report. Rerunning continues where it stopped (collection and training resume).
demo: setup
	$(SFW) collect env=dmc/reacher-easy episodes=30 steps=60 workers=2 out=$(DEMO_DIR)/data
	$(SFW) data check $(DEMO_DIR)/data
	$(SFW) train data=$(DEMO_DIR)/data out=$(DEMO_DIR)/run model=small objective=selfflow \
		steps=$(DEMO_STEPS) resume=true warmup=50 val_every=100 \
		sample_every=$(DEMO_STEPS) ckpt_every=100
	$(SFW) imagine ckpt=$(DEMO_DIR)/run data=$(DEMO_DIR)/data out=$(DEMO_DIR)/imagine horizon=16 episodes=2
	$(SFW) eval ckpt=$(DEMO_DIR)/run data=$(DEMO_DIR)/data out=$(DEMO_DIR)/eval horizon=8 episodes=8 \
		probe_frames=1500 probe_epochs=10
	@echo "demo done: videos in $(DEMO_DIR)/imagine, report in $(DEMO_DIR)/eval/report.md"

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
