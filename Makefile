# One command to set up and run the demo, one to run the tests. Both set up what they need:
# a virtual environment in .venv, the pinned CPU torch wheel unless the venv already has a torch
# (install your CUDA build into .venv first to keep it), and this package in editable mode.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
export MUJOCO_GL ?= egl

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/sfw collect env=dmc/reacher-easy episodes=8 steps=50 workers=2 out=$(DEMO_DIR)/data
	$(VENV)/bin/sfw data check $(DEMO_DIR)/data

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
