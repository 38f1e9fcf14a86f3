"""Trainer: end-to-end smoke, determinism, exact resume, crash safety, bad input, DDP."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfflow_world.checkpoint import list_checkpoints, load_weights, read_meta, resolve_checkpoint
from selfflow_world.config import load_config
from selfflow_world.errors import UserError
from selfflow_world.model import WorldDiT, model_config
from selfflow_world.train import TrainConfig, Trainer, TrainingError

FAST = [
    "model=tiny",
    "batch_size=4",
    "val_every=5",
    "sample_every=1000",
    "sample_frames=2",
    "ckpt_every=5",
    "log_every=1",
    "tensorboard=false",
    "warmup=100",
    "val_batches=1",
]


def make_cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config("train", [f"data={data}", f"out={out}", *FAST, *extra], TrainConfig)


def train(data: Path, out: Path, *extra: str) -> dict:
    return Trainer(make_cfg(data, out, *extra)).fit()


def losses(run: Path) -> dict[int, str]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r.get("loss")}


def test_training_smoke_writes_checkpoint_logs_and_samples(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    last = train(tiny_dataset, out, "steps=6", "sample_every=6", "tensorboard=true", "objective=selfflow")
    assert {"loss", "flow_loss", "rep_loss", "val_flow_loss", "val_psnr", "val_psnr_copy_last"} <= set(last)
    assert [s for s, _ in list_checkpoints(out)] == [5, 6]
    ckpt = resolve_checkpoint(out)
    meta = read_meta(ckpt)
    assert meta["step"] == 6 and meta["config"]["objective"]["mode"] == "selfflow"
    assert meta["model_config"]["image_size"] == 16 and len(meta["dataset_fingerprint"]) == 16
    model = WorldDiT(
        model_config(
            "tiny", **{k: meta["model_config"][k] for k in ("image_size", "action_dim", "max_frames")}
        )
    )
    load_weights(ckpt, "ema", model)  # loads with safetensors, no pickle
    assert list((out / "samples").glob("*.gif")) and list((out / "tb").iterdir())
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("objective", ["flow", "dts", "selfflow"])
def test_two_runs_with_one_seed_are_identical(tiny_dataset, tmp_path, objective):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_dataset, a, "steps=4", f"objective={objective}")
    train(tiny_dataset, b, "steps=4", f"objective={objective}")
    assert losses(a) == losses(b)
    c = tmp_path / "c"
    train(tiny_dataset, c, "steps=4", f"objective={objective}", "seed=1")
    assert losses(c) != losses(a)


def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    # warm-up longer than the run: the schedule does not depend on the total, so a run of 6 steps
    # resumed to 10 must match a run of 10 steps exactly
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_dataset, full, "steps=10", "objective=selfflow")
    train(tiny_dataset, part, "steps=6", "objective=selfflow")
    train(tiny_dataset, part, "steps=10", "objective=selfflow", "resume=true")
    assert losses(part) == losses(full)
    wa = torch.load(resolve_checkpoint(full) / "train_state.pt", weights_only=True)
    wb = torch.load(resolve_checkpoint(part) / "train_state.pt", weights_only=True)
    assert torch.equal(wa["generators"][0], wb["generators"][0])


def test_existing_run_needs_resume_flag(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5")
    with pytest.raises(UserError, match="resume=true"):
        train(tiny_dataset, out, "steps=5")


def test_init_starts_a_new_run_from_another_models_ema_weights(tiny_dataset, tmp_path):
    src, tuned = tmp_path / "src", tmp_path / "tuned"
    train(tiny_dataset, src, "steps=5", "objective=flow")
    trainer = Trainer(make_cfg(tiny_dataset, tuned, "steps=5", "objective=flow", f"init={src}"))
    source = WorldDiT(trainer.model_cfg)
    load_weights(resolve_checkpoint(src), "ema", source)
    for model in (trainer.model, trainer.ema):  # student and teacher both start from the source EMA
        for (name, a), b in zip(model.state_dict().items(), source.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert trainer.step == 0
    trainer.fit()
    assert [s for s, _ in list_checkpoints(tuned)] == [5]
    assert read_meta(resolve_checkpoint(tuned))["config"]["init"] == str(src)
    # rerunning the same command continues the fine-tuned run, not the source
    train(tiny_dataset, tuned, "steps=7", "objective=flow", f"init={src}", "resume=true")
    assert sorted(losses(tuned)) == list(range(1, 8))
    # another architecture than the source's is refused with the setting named
    with pytest.raises(UserError, match=r"width.*init="):
        train(tiny_dataset, tmp_path / "wide", "steps=1", f"init={src}", "model.width=96")


def test_init_may_train_the_source_for_a_longer_context(tiny_dataset, tmp_path):
    src, longer = tmp_path / "src", tmp_path / "longer"
    train(tiny_dataset, src, "steps=2", "objective=flow")
    source_frames = read_meta(resolve_checkpoint(src))["model_config"]["max_frames"]
    trainer = Trainer(make_cfg(tiny_dataset, longer, "steps=2", "objective=flow", f"init={src}", "history=3"))
    assert trainer.model_cfg.max_frames == source_frames + 1  # one more history frame
    source = WorldDiT(model_config("tiny", action_dim=trainer.model_cfg.action_dim, max_frames=source_frames))
    load_weights(resolve_checkpoint(src), "ema", source)
    for (name, a), b in zip(trainer.model.state_dict().items(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    trainer.fit()
    assert read_meta(resolve_checkpoint(longer))["model_config"]["max_frames"] == source_frames + 1
    # a resumed run keeps its own context: asking for another one is refused, naming it
    with pytest.raises(UserError, match=r"max_frames.*resume=true"):
        train(tiny_dataset, longer, "steps=3", "objective=flow", "history=4", "resume=true")


def test_killed_checkpoint_write_keeps_last_good_one(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5")
    import selfflow_world.checkpoint as ckpt_mod

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed between writing the files and renaming them

    monkeypatch.setattr(ckpt_mod.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, out, "steps=10", "resume=true")
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)] == [5]  # the partial step_10 is not a checkpoint
    train(tiny_dataset, out, "steps=10", "resume=true")
    assert [s for s, _ in list_checkpoints(out)] == [5, 10]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import selfflow_world.train as train_mod

    out = tmp_path / "run"
    real = train_mod.compute_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 7 else loss), metrics

    monkeypatch.setattr(train_mod, "compute_loss", flaky)
    with pytest.raises(TrainingError, match="at step 7.*step_00000005"):
        train(tiny_dataset, out, "steps=10", "val_every=100")
    assert [s for s, _ in list_checkpoints(out)] == [5]
    weights = resolve_checkpoint(out) / "weights.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(weights)).values())


def test_checkpoint_of_another_model_config_is_refused_with_keys(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5")
    with pytest.raises(UserError, match=r"another model config \(width: checkpoint 32, this run 64\)"):
        train(tiny_dataset, out, "steps=6", "resume=true", "model.width=64")


def test_resume_keeps_the_activation_of_a_checkpoint_that_predates_the_setting(tiny_dataset, tmp_path):
    import json

    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5", "model.mlp_act=gelu_tanh")
    meta_path = resolve_checkpoint(out) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"]["mlp_act"]  # as written before the setting existed
    meta_path.write_text(json.dumps(meta))
    trainer = Trainer(make_cfg(tiny_dataset, out, "steps=6", "resume=true"))  # the preset says "gelu"
    assert trainer.model_cfg.mlp_act == "gelu_tanh"
    assert trainer.model.blocks[0].mlp[1].approximate == "tanh"
    trainer.fit()


def test_dataset_that_does_not_match_checkpoint_is_refused(tiny_dataset, tmp_path, collect_config):
    from selfflow_world.envs.collect import collect

    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5")
    other = tmp_path / "bigger"
    collect(collect_config(other, size=32, episodes=2), progress=False)
    with pytest.raises(UserError, match="do not match checkpoint"):
        train(other, out, "steps=6", "resume=true")


@pytest.mark.parametrize(
    "bad, match",
    [
        ("steps=0", "steps must be a positive integer"),
        ("objective.mask_ratio=0.7", r"mask_ratio must be in \[0, 0.5\]"),
        # the layers matter to selfflow only (flow, the default, has no teacher)
        ("objective=selfflow objective.student_layer=2", "student_layer < teacher_layer"),
        ("objective=selfflow objective.teacher_layer=3", "<= depth 2"),
        ("model=huge", "Could not find 'model/huge'"),
        ("lr=-1", "lr > 0"),
    ],
)
def test_nonsense_settings_fail_clearly(tiny_dataset, tmp_path, bad, match):
    with pytest.raises(UserError, match=match):
        train(tiny_dataset, tmp_path / "run", "steps=5", *bad.split())
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(tmp_path / "nope", tmp_path / "run", "steps=5")


def test_cli_train_and_resume_commands(tiny_dataset, tmp_path):
    from selfflow_world.cli import main

    out = tmp_path / "run"
    args = [f"data={tiny_dataset}", f"out={out}", "model=tiny", "objective=selfflow", "tensorboard=false"]
    assert main(["train", *args, "steps=3"]) == 0
    assert main(["train", *args, "steps=5", "resume=true"]) == 0
    assert read_meta(resolve_checkpoint(out))["step"] == 5
    assert main(["train", *args, "steps=0"]) == 2


@pytest.mark.slow
def test_ddp_two_processes_on_gloo(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "selfflow_world.train",
        f"data={tiny_dataset}",
        f"out={out}",
        *FAST,
        "steps=4",
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = read_meta(resolve_checkpoint(out))
    assert meta["step"] == 4
    assert sorted(losses(out)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_compiled_teacher_follows_the_ema_weights(tiny_dataset, tmp_path):
    # compile=true compiles the teacher too; its graph must read the EMA weights as they are updated
    # in place after each step, not a copy frozen at compile time
    trainer = Trainer(make_cfg(tiny_dataset, tmp_path / "run", "compile=true", "bf16=false"))
    assert trainer.teacher_model is not trainer.ema
    x = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    actions = torch.zeros(2, 2, trainer.model_cfg.action_dim)
    args = (x, 0.5, actions, x)
    with torch.no_grad():
        compiled = trainer.teacher_model(*args, stop_at=1)[1]
        eager = trainer.ema(*args, stop_at=1)[1]
        before = trainer.ema.blocks[0].mlp[0].weight.clone()
        for p in trainer.ema.parameters():
            p.add_(0.01)  # an EMA update happens in place, like this
        assert not torch.equal(before, trainer.ema.blocks[0].mlp[0].weight)
        compiled_after = trainer.teacher_model(*args, stop_at=1)[1]
        eager_after = trainer.ema(*args, stop_at=1)[1]
    assert torch.allclose(compiled, eager, atol=1e-4)
    assert torch.allclose(compiled_after, eager_after, atol=1e-4)
    assert not torch.allclose(eager, eager_after, atol=1e-4)


def test_checkpoint_from_before_the_conditioning_module_loads_with_its_saved_settings(tiny_dataset, tmp_path):
    """A checkpoint written before ``action_embedding`` existed: weights named ``time_embed.*`` /
    ``action_embed.*``, and no ``action_embedding`` in its config. It loads as the linear action
    embedding it was built with, and resumes."""
    import json

    from safetensors.torch import load_file, save_file

    from selfflow_world.world_model import WorldModel

    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5", "model.action_embedding=linear")
    ckpt = resolve_checkpoint(out)
    before = WorldModel.load(out, bf16=False)
    tensors = load_file(str(ckpt / "weights.safetensors"))
    save_file(
        {k.replace(".conditioning.", "."): v for k, v in tensors.items()}, str(ckpt / "weights.safetensors")
    )
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["model_config"]["action_embedding"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    after = WorldModel.load(out, bf16=False)
    assert after.config.action_embedding == "linear"
    for p, q in zip(before.model.parameters(), after.model.parameters(), strict=True):
        assert torch.equal(p, q)
    trainer = Trainer(make_cfg(tiny_dataset, out, "steps=6", "resume=true"))  # today's default: fourier
    assert trainer.model_cfg.action_embedding == "linear"
    trainer.fit()


def test_tampered_training_state_is_refused_in_one_line(tiny_dataset, tmp_path):
    import pickle

    out = tmp_path / "run"
    train(tiny_dataset, out, "steps=5")
    state = resolve_checkpoint(out) / "train_state.pt"

    class Payload:  # what a tampered file could carry: an object that runs code when unpickled
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"optimizer": Payload()}, state, pickle_module=pickle)
    with pytest.raises(UserError) as err:
        train(tiny_dataset, out, "steps=6", "resume=true")
    message = str(err.value)
    assert str(state) in message and "\n" not in message and "weights_only" not in message


def test_joint_heads_train_save_load_and_resume_exactly(tiny_dataset, tmp_path):
    # heads_weight > 0: the heads train with the model, their EMA copy lands in every checkpoint as
    # heads.safetensors (WorldModel.load attaches it), validation reports their reward error, and
    # resume continues the loss curve exactly, heads included
    from selfflow_world.world_model import WorldModel

    full, part = tmp_path / "full", tmp_path / "part"
    args = ("objective=flow", "objective.heads_weight=0.5")
    last = train(tiny_dataset, full, "steps=10", *args)
    assert {"heads_loss", "val_reward_mae", "val_reward_mae_predict_mean"} <= set(last)
    train(tiny_dataset, part, "steps=6", *args)
    train(tiny_dataset, part, "steps=10", *args, "resume=true")
    assert losses(part) == losses(full)
    ckpt = resolve_checkpoint(full)
    assert (ckpt / "heads.safetensors").is_file()
    wm = WorldModel.load(str(full), device="cpu")
    assert wm.heads is not None and wm.heads_meta["layer"] == wm.feature_layer
    assert "jointly" in wm.heads_meta["trained"]
    state = wm.start(torch.zeros(2, wm.history, 16, 16, 3, dtype=torch.uint8))
    out = wm.step(state, torch.zeros(2, 2), rewards=True, steps=1)
    assert out.reward.shape == (2,) and out.termination.shape == (2,)
    # the heads' loss reaches the model: with another weight the model's weights differ
    other = tmp_path / "other"
    train(tiny_dataset, other, "steps=2", "objective=flow", "objective.heads_weight=5.0")
    base = tmp_path / "base"
    train(tiny_dataset, base, "steps=2", "objective=flow", "objective.heads_weight=0.5")
    a, b = WorldDiT(wm.config), WorldDiT(wm.config)
    load_weights(resolve_checkpoint(other), "model", a)
    load_weights(resolve_checkpoint(base), "model", b)
    assert any(
        not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_joint_heads_settings_are_checked(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_dataset, run, "steps=2", "objective=flow")
    with pytest.raises(UserError, match="heads_weight"):
        train(tiny_dataset, run, "steps=4", "objective=flow", "objective.heads_weight=1.0", "resume=true")
    with pytest.raises(UserError, match="history >= 2"):
        train(tiny_dataset, tmp_path / "h1", "steps=1", "history=1", "objective.heads_weight=1.0")
    with pytest.raises(UserError, match="heads_weight must be >= 0"):
        train(tiny_dataset, tmp_path / "neg", "steps=1", "objective.heads_weight=-1")


def test_validation_samples_a_t_one_model_in_one_step(tiny_dataset, tmp_path, monkeypatch):
    import selfflow_world.rollout as rollouts

    seen = []
    advance = rollouts.advance

    def spy(*args, **kwargs):
        seen.append(kwargs["steps"])
        return advance(*args, **kwargs)

    monkeypatch.setattr(rollouts, "advance", spy)
    for t_one, expected in ((1.0, 1), (0.25, 4)):
        seen.clear()
        trainer = Trainer(
            make_cfg(tiny_dataset, tmp_path / f"t{t_one}", "steps=1", f"objective.t_one={t_one}")
        )
        assert trainer.sample_steps == expected
        trainer.validate()
        assert seen and set(seen) == {expected}


def test_imagined_history_trains_resumes_exactly_and_keeps_the_model_window(tiny_dataset, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("objective=flow", "imagined_history=3", "imagined_share=0.5")
    last = train(tiny_dataset, full, "steps=6", *extra)
    assert 0 <= last["imagined_share"] <= 1 and "val_psnr" in last
    with open(full / "metrics.csv") as f:
        shares = [float(r["imagined_share"]) for r in csv.DictReader(f) if r.get("imagined_share")]
    assert len(shares) == 6 and 0 < sum(shares) < 6  # some clips imagined, not all
    # the model is built for history + future frames, not for the longer training clips
    assert read_meta(resolve_checkpoint(full))["model_config"]["max_frames"] == 3
    train(tiny_dataset, part, "steps=3", *extra)
    train(tiny_dataset, part, "steps=6", *extra, "resume=true")
    assert losses(part) == losses(full)


def test_imagined_history_settings_fail_clearly(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="imagined_share must be in"):
        train(tiny_dataset, tmp_path / "a", "steps=2", "imagined_history=2", "imagined_share=2")
    with pytest.raises(UserError, match="imagined_history must be an integer >= 0"):
        train(tiny_dataset, tmp_path / "b", "steps=2", "imagined_history=-1")
    with pytest.raises(UserError, match=r"clips of 23 frames.*imagined_history=20 frames"):
        train(tiny_dataset, tmp_path / "c", "steps=2", "imagined_history=20")


def test_stop_at_stops_mid_schedule_and_resume_continues_it_exactly(tiny_dataset, tmp_path):
    # a short warm-up, so the cosine decay depends on `steps`: stopping at 6 of 10 must follow the
    # 10-step schedule (not a 6-step one) and continue to the uninterrupted run's losses
    full, part, short = tmp_path / "full", tmp_path / "part", tmp_path / "short"
    train(tiny_dataset, full, "steps=10", "warmup=2")
    train(tiny_dataset, part, "steps=10", "stop_at=6", "warmup=2")
    assert [s for s, _ in list_checkpoints(part)] == [5, 6]
    assert read_meta(resolve_checkpoint(part))["step"] == 6
    train(tiny_dataset, short, "steps=6", "warmup=2")
    assert losses(short) != losses(part)  # the schedules differ by step 6
    assert losses(part) == {s: v for s, v in losses(full).items() if s <= 6}
    train(tiny_dataset, part, "steps=10", "warmup=2", "resume=true")
    assert losses(part) == losses(full)


def test_stop_at_beyond_steps_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="stop_at must be at most steps=4"):
        train(tiny_dataset, tmp_path / "run", "steps=4", "stop_at=5")
