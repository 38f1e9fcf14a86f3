"""Shipped models by name, their export, and the demo end to end (on a tiny model)."""

from __future__ import annotations

import pytest
import torch

from selfflow_world import pretrained
from selfflow_world.cli import main
from selfflow_world.errors import UserError
from selfflow_world.world_model import WorldModel


@pytest.fixture
def shipped(tiny_run, tmp_path, monkeypatch):
    """``tiny_run`` exported as a shipped model named ``tiny-test`` in a private models dir."""
    monkeypatch.setattr(pretrained, "MODELS_DIR", tmp_path / "models")
    pretrained.export(tiny_run, tmp_path / "models" / "tiny-test", card="# tiny-test\n")
    return "tiny-test"


def test_export_writes_bf16_ema_weights_that_load_by_name(shipped, tiny_run):
    from safetensors.torch import load_file

    folder = pretrained.MODELS_DIR / shipped
    tensors = load_file(str(folder / "weights.safetensors"))
    assert tensors and all(k.startswith("ema.") for k in tensors)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values() if v.is_floating_point())
    assert (folder / "MODEL_CARD.md").read_text().startswith("# tiny-test")
    assert pretrained.available() == [shipped]
    by_name, by_path = WorldModel.load(shipped, bf16=False), WorldModel.load(tiny_run, bf16=False)
    assert by_name.config == by_path.config
    for p, q in zip(by_name.model.parameters(), by_path.model.parameters(), strict=True):
        assert torch.allclose(p.detach(), q.detach(), atol=1e-2 * max(1.0, float(q.detach().abs().max())))


def test_unknown_name_says_what_is_shipped_and_how_to_make_it(shipped):
    with pytest.raises(UserError, match=r"shipped: tiny-test.*bench/train_default.sh walker-walk"):
        WorldModel.load("walker-walk")


def test_demo_end_to_end_on_a_tiny_model(shipped, tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        f"ckpt={shipped}",
        f"out={out}",
        "episodes=3",
        "steps=12",
        "horizon=4",
        "probe_epochs=2",
        "workers=1",
        "plan_budget=4",
    ]
    assert main(["demo", *args]) == 0
    printed = capsys.readouterr().out
    assert "goal planning in dmc/reacher-easy" in printed
    assert (out / "plan" / "episode_0000.mp4").stat().st_size > 1000 and (
        out / "plan" / "report.md"
    ).is_file()
    assert "action-following ratio" in printed and str(out / "eval" / "report.md") in printed
    assert len(list((out / "imagine").glob("ep_*.mp4"))) == 3
    assert (out / "imagine" / "actions.mp4").stat().st_size > 1000
    assert (out / "eval" / "action_following_vs_horizon.png").stat().st_size > 1000
    assert "Following actions" in (out / "eval" / "report.md").read_text()
    assert "representation" not in printed  # not meaningful on a few short episodes
    # a rerun continues: the collected episodes are kept, nothing is lost
    assert main(["demo", *args]) == 0


def test_demo_bad_input_is_refused(shipped, tmp_path, capsys):
    base = [f"ckpt={shipped}", f"out={tmp_path / 'd'}"]
    for extra, match in [
        (["episodes=1"], "episodes must be at least 2"),
        (["env=dmc/cartpole-swingup"], "trained on dmc/reacher-easy"),
        (["steps=3", "horizon=4"], "raise steps or lower horizon"),
        (["plan_episodes=-1"], "plan_episodes must be an integer >= 0"),
    ]:
        assert main(["demo", *base, *extra]) == 2
        assert match in capsys.readouterr().err
    assert main(["demo", "ckpt=no-such-model", f"out={tmp_path / 'd'}"]) == 2
    assert "train_default.sh no-such-model" in capsys.readouterr().err


def test_shipped_models_are_small_and_carry_their_heads():
    for name in pretrained.available():
        folder = pretrained.model_dir(name)
        assert (folder / "weights.safetensors").stat().st_size <= 12 * 2**20, name
        assert (folder / "MODEL_CARD.md").is_file(), name
        wm = WorldModel.load(name)
        assert wm.heads is not None, f"{name} ships without reward heads (sfw heads)"


def _recipe(tmp_path, **env):
    """Run bench/train_default.sh with stand-ins for sfw and python that log their arguments;
    returns (exit code, logged commands as lists of words, stderr)."""
    import os
    import stat
    import subprocess
    from pathlib import Path

    log = tmp_path / "calls.log"
    stub = tmp_path / "stub"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    script = Path(__file__).parents[1] / "bench" / "train_default.sh"
    proc = subprocess.run(
        ["bash", str(script), "cartpole-swingup", "10"],
        env={**os.environ, "SFW": str(stub), "PY": str(stub), **env},
        capture_output=True,
        text=True,
    )
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, calls, proc.stderr


def _train_calls(calls):
    """{out: {key: value}} of the logged `sfw train` calls, in order."""
    trains = [dict(w.split("=", 1) for w in c[1:] if "=" in w) for c in calls if c[0] == "train"]
    return [(t["out"], t) for t in trains]


def test_recipe_chains_its_imagined_history_stages(tmp_path):
    code, calls, err = _recipe(tmp_path, FINETUNE="5", IH="6,8,12", IH_STEPS="3,4,5")
    assert code == 0, err
    trains = _train_calls(calls)
    assert [out for out, _ in trains] == [
        "runs/cartpole-swingup",
        "runs/cartpole-swingup-ft",
        "runs/cartpole-swingup-ih",
        "runs/cartpole-swingup-ih2",
        "runs/cartpole-swingup-ih3",
    ]
    stages = [t for _, t in trains[2:]]
    assert [s["imagined_history"] for s in stages] == ["6", "8", "12"]
    assert [s["steps"] for s in stages] == ["3", "4", "5"]
    assert [s["history"] for s in stages] == ["2", "2", "2"]  # IH_HISTORY's default
    # each stage starts from the one before; heads, eval and export use the last
    assert [s["init"] for s in stages] == [
        "runs/cartpole-swingup-ft",
        "runs/cartpole-swingup-ih",
        "runs/cartpole-swingup-ih2",
    ]
    last = [c for c in calls if c[0] in ("heads", "eval")]
    assert all("ckpt=runs/cartpole-swingup-ih3" in c for c in last) and len(last) == 2
    assert calls[-1][:3] == ["-m", "selfflow_world.pretrained", "runs/cartpole-swingup-ih3"]


def test_recipe_with_one_stage_and_without(tmp_path):
    code, calls, err = _recipe(tmp_path, IH="6")
    assert code == 0, err
    assert [(o, t.get("imagined_history"), t["steps"]) for o, t in _train_calls(calls)][-1] == (
        "runs/cartpole-swingup-ih",
        "6",
        "1200",
    )
    (tmp_path / "calls.log").unlink()
    code, calls, err = _recipe(tmp_path)
    assert code == 0, err
    assert [o for o, _ in _train_calls(calls)] == ["runs/cartpole-swingup"]


def test_recipe_refuses_stage_steps_that_do_not_match(tmp_path):
    code, calls, err = _recipe(tmp_path, IH="6,8", IH_STEPS="1,2,3")
    assert code == 2
    assert "IH_STEPS=1,2,3" in err and "IH=6,8" in err
    assert not [o for o, t in _train_calls(calls) if "imagined_history" in t]
    (tmp_path / "calls.log").unlink(missing_ok=True)
    code, calls, err = _recipe(tmp_path, IH="6,8", IH_HISTORY="2,4,4")
    assert code == 2
    assert "IH_HISTORY=2,4,4" in err and "IH=6,8" in err


def test_recipe_gives_each_stage_its_context(tmp_path):
    code, calls, err = _recipe(tmp_path, IH="6,12", IH_STEPS="3,4", IH_HISTORY="2,4")
    assert code == 0, err
    stages = [t for _, t in _train_calls(calls) if "imagined_history" in t]
    assert [(s["imagined_history"], s["history"]) for s in stages] == [("6", "2"), ("12", "4")]
    assert [(s["lr"], s["warmup"]) for s in stages] == [("0.0001", "100")] * 2  # the defaults


def test_recipe_gives_each_stage_its_schedule_and_overrides(tmp_path):
    code, calls, err = _recipe(
        tmp_path,
        IH="6,8,8",
        IH_STEPS="3,4,8@6",
        IH_LR="1e-4,5e-5,5e-5",
        IH_WARMUP="100,50,50",
        IH_EXTRA=";;objective.motion_weight=3",
    )
    assert code == 0, err
    stages = [t for _, t in _train_calls(calls) if "imagined_history" in t]
    assert [(s["lr"], s["warmup"]) for s in stages] == [("1e-4", "100"), ("5e-5", "50"), ("5e-5", "50")]
    assert [s.get("objective.motion_weight") for s in stages] == [None, None, "3"]
    assert (stages[2]["steps"], stages[2]["stop_at"]) == ("8", "6")
    (tmp_path / "calls.log").unlink()
    code, calls, err = _recipe(tmp_path, IH="6,8", IH_LR="1e-4,5e-5,5e-5")
    assert code == 2
    assert "IH_LR=1e-4,5e-5,5e-5 must give one learning rate" in err


def test_demo_picks_the_shipped_model_of_the_env_asked_for(shipped, tmp_path, capsys):
    from selfflow_world.demo import DemoConfig, _resolved_ckpt

    assert pretrained.for_env("dmc/reacher-easy") == "tiny-test"  # what the tiny run was trained on
    assert _resolved_ckpt(DemoConfig(env="dmc/reacher-easy")) == "tiny-test"
    assert _resolved_ckpt(DemoConfig()) == "reacher-easy"
    assert _resolved_ckpt(DemoConfig(ckpt="mine", env="dmc/reacher-easy")) == "mine"
    assert main(["demo", "env=dmc/walker-walk", f"out={tmp_path / 'd'}"]) == 2
    err = capsys.readouterr().err
    assert "no shipped model is trained on env=dmc/walker-walk" in err
    assert "tiny-test (dmc/reacher-easy)" in err
    assert not (tmp_path / "d").exists()
