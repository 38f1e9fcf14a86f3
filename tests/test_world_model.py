"""WorldModel: loading, layouts, determinism, KV-cached rollout vs full recomputation, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from selfflow_world import WorldModel
from selfflow_world.errors import UserError
from selfflow_world.model import WorldDiT, model_config, shift_frames
from selfflow_world.runtime import bf16_supported
from selfflow_world.sampler import rollout


def test_load_from_run_and_checkpoint_dirs(tiny_run):
    a = WorldModel.load(tiny_run)
    ckpt = next((tiny_run / "checkpoints").iterdir())
    b = WorldModel.load(ckpt, weights="model")
    assert a.config == b.config and a.config.image_size == 16 and a.history == 2


def test_missing_or_foreign_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        WorldModel.load(tmp_path / "nope")
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "meta.json").write_text('{"step": 1}')
    (fake / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="not a selfflow-world checkpoint"):
        WorldModel.load(fake)


def test_layouts_round_trip(tiny_run):
    wm = WorldModel.load(tiny_run)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)
    acts = torch.zeros(3, 4, 2)
    out = wm.imagine(ctx, acts, steps=2, generator=g)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 16, 16, 3)
    out_np = wm.imagine(ctx.numpy(), acts.numpy(), steps=2, generator=g)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (3, 4, 16, 16, 3)
    ctx_f = ctx.permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    out_f = wm.imagine(ctx_f, acts, steps=2, generator=g)
    assert out_f.dtype == torch.float32 and out_f.shape == (3, 4, 3, 16, 16)
    assert out_f.min() >= -1 and out_f.max() <= 1


def test_deterministic_with_a_generator(tiny_run):
    wm = WorldModel.load(tiny_run)
    for p in wm.model.final.parameters():  # a barely trained residual model is nearly noise-free
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    ctx = torch.randint(0, 256, (2, 2, 16, 16, 3), dtype=torch.uint8)
    acts = torch.rand(2, 5, 2) * 2 - 1
    run = lambda seed, method="euler": wm.imagine(  # noqa: E731
        ctx, acts, steps=3, method=method, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(0), run(0))
    assert torch.equal(run(0, "heun"), run(0, "heun"))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize(
    "ctx_shape, ctx_dtype, act_shape, match",
    [
        ((1, 2, 32, 32, 3), torch.uint8, (1, 3, 2), "must be \\(B, T, 16, 16, 3\\)"),
        ((1, 2, 16, 16, 4), torch.uint8, (1, 3, 2), "must be \\(B, T, 16, 16, 3\\)"),
        ((1, 2, 4, 16, 16), torch.float32, (1, 3, 2), "must be \\(B, T, 3, 16, 16\\)"),
        ((1, 2, 16, 16, 3), torch.uint8, (1, 3, 5), "A=2"),
        ((1, 2, 16, 16, 3), torch.uint8, (1, 0, 2), "horizon >= 1"),
        ((2, 2, 16, 16, 3), torch.uint8, (1, 3, 2), "B=2"),
    ],
)
def test_bad_input_is_refused(tiny_run, ctx_shape, ctx_dtype, act_shape, match):
    wm = WorldModel.load(tiny_run)
    ctx = torch.zeros(ctx_shape, dtype=ctx_dtype)
    with pytest.raises(UserError, match=match):
        wm.imagine(ctx, torch.zeros(act_shape))


def test_non_finite_actions_and_bad_settings_are_refused(tiny_run):
    wm = WorldModel.load(tiny_run)
    ctx = torch.zeros(1, 2, 16, 16, 3, dtype=torch.uint8)
    acts = torch.zeros(1, 3, 2)
    bad = acts.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite"):
        wm.imagine(ctx, bad)
    with pytest.raises(UserError, match="steps must be in \\[1, 50\\]"):
        wm.imagine(ctx, acts, steps=0)
    with pytest.raises(UserError, match="method"):
        wm.imagine(ctx, acts, method="rk4")


def _reference_rollout(model, context, ctx_actions, actions, steps, generator):
    """Full recomputation: every new frame re-runs the whole clip (no cache), same noise draws."""
    clean, acts = context, ctx_actions
    out = []
    for j in range(actions.shape[1]):
        x = torch.randn(context[:, 0].shape, generator=generator)
        grid = torch.linspace(1, 0, steps + 1)
        acts_j = torch.cat([acts, actions[:, j : j + 1]], 1)
        for i in range(steps):
            clip = torch.cat([clean, x[:, None]], 1)
            prev = shift_frames(torch.cat([clean, torch.zeros_like(x[:, None])], 1))
            t = torch.zeros(clip.shape[:2])
            t[:, -1] = grid[i]
            pred = model(clip, t, acts_j, prev)
            v = model.velocity(pred, clip, t)[:, -1]
            x = x + (grid[i + 1] - grid[i]) * v
        x = x.clamp(-1, 1)
        out.append(x)
        clean, acts = torch.cat([clean, x[:, None]], 1), acts_j
    return torch.stack(out, 1)


@torch.no_grad()
def test_kv_cached_rollout_equals_full_recomputation():
    cfg = model_config("tiny", action_dim=2, max_frames=6)
    model = WorldDiT(cfg, generator=torch.Generator().manual_seed(0)).eval()
    for p in model.parameters():  # leave zero-init so outputs depend on everything
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    context = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    ctx_actions, actions = torch.rand(2, 2, 2) * 2 - 1, torch.rand(2, 3, 2) * 2 - 1
    cached = rollout(
        model, context, ctx_actions, actions, steps=3, generator=torch.Generator().manual_seed(5), window=5
    )
    reference = _reference_rollout(model, context, ctx_actions, actions, 3, torch.Generator().manual_seed(5))
    assert torch.allclose(cached, reference, atol=1e-5)
    assert cached.std() > 0.05  # a real prediction, not a constant


def test_imagine_depends_on_actions_when_the_model_does(tiny_run):
    wm = WorldModel.load(tiny_run)
    for p in wm.model.final.parameters():
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    ctx = torch.randint(0, 256, (1, 2, 16, 16, 3), dtype=torch.uint8)
    a = wm.imagine(ctx, -torch.ones(1, 3, 2), generator=torch.Generator().manual_seed(0))
    b = wm.imagine(ctx, torch.ones(1, 3, 2), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_rollouts_match_eager_and_use_later_weights(tiny_run):
    cfg = model_config("tiny", action_dim=2, max_frames=3)
    eager = WorldDiT(cfg, generator=torch.Generator().manual_seed(0)).eval()
    for p in eager.parameters():  # live modulation and head, so every stage shapes the output
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    compiled = copy.deepcopy(eager)
    compiled.compile_rollouts()
    compiled.compile_rollouts()  # a second call changes nothing
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints stay compatible
    context = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    ctx_actions, actions = torch.rand(2, 2, 2) * 2 - 1, torch.rand(2, 4, 2) * 2 - 1

    def both():
        return [
            rollout(m, context, ctx_actions, actions, steps=2, generator=torch.Generator().manual_seed(5))
            for m in (eager, compiled)
        ]

    reference, result = both()
    assert torch.allclose(result, reference, atol=1e-4)
    # the graphs take the parameters as inputs: weights changed in place later are the ones used
    for model in (eager, compiled):
        for p in model.parameters():
            p.mul_(1.5)
    reference_after, result_after = both()
    assert not torch.allclose(reference_after, reference, atol=1e-3)
    assert torch.allclose(result_after, reference_after, atol=1e-4)
    wm = WorldModel.load(tiny_run, compile=True)
    assert wm.compiled and WorldModel.untrained(wm).compiled
    assert not WorldModel.untrained(wm, compile=False).compiled  # sfw eval's baseline


@pytest.mark.slow
@torch.no_grad()
def test_frozen_compiled_rollouts_match_eager_for_each_model():
    # frozen graphs fold each block's weights in as constants: two models (and the blocks within
    # one) must each get their own, never another's weights
    cfg = model_config("tiny", action_dim=2, max_frames=3)
    eager = []
    for seed in (1, 2):
        model = WorldDiT(cfg, generator=torch.Generator().manual_seed(seed)).eval()
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * p.numel())))
        eager.append(model)
    frozen = [copy.deepcopy(model) for model in eager]
    for model in frozen:
        model.compile_rollouts(freeze=True)
    # batch 3: a shape no shared-graph test compiles, so these calls trace frozen graphs of their
    # own instead of matching shared ones (dynamo caches graphs per function)
    context = torch.rand(3, 2, 3, 16, 16) * 2 - 1
    ctx_actions, actions = torch.rand(3, 2, 2) * 2 - 1, torch.rand(3, 3, 2) * 2 - 1
    outs = [
        rollout(m, context, ctx_actions, actions, steps=2, generator=torch.Generator().manual_seed(5))
        for m in eager + frozen
    ]
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)  # the two models differ
    assert torch.allclose(outs[2], outs[0], atol=1e-4)
    assert torch.allclose(outs[3], outs[1], atol=1e-4)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_on_cpu_casts_the_weights_and_stays_close_to_float32(tiny_run):
    fast, exact = WorldModel.load(tiny_run), WorldModel.load(tiny_run, bf16=False)
    assert fast.bf16_weights and next(fast.model.parameters()).dtype == torch.bfloat16
    assert not exact.bf16_weights and next(exact.model.parameters()).dtype == torch.float32
    for wm in (fast, exact):  # the same live head in both, so the outputs depend on the weights
        for p in wm.model.final.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    ctx = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    acts = torch.rand(2, 3, 2) * 2 - 1
    a, b = (wm.imagine(ctx, acts, generator=torch.Generator().manual_seed(0)) for wm in (fast, exact))
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.02 and (b - ctx[:, -1:]).abs().mean() > 0.05


def args(wm):
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 256, (2, wm.history, 16, 16, 3), dtype=torch.uint8, generator=gen)
    return ctx, torch.rand(2, 3, 2, generator=gen) * 2 - 1


def test_default_sampler_steps_follow_how_the_model_was_trained(tiny_run):
    # a model trained only at t = 1 (objective.t_one=1) never saw a partly noisy target: its
    # default is one sampler step; others default to 4
    wm = WorldModel.load(tiny_run, device="cpu")
    assert wm.sampler_steps == 4
    for p in wm.model.final.parameters():  # a barely trained residual model is nearly noise-free
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        wm.imagine(*args(wm), generator=torch.Generator().manual_seed(0)),
        wm.imagine(*args(wm), steps=4, generator=torch.Generator().manual_seed(0)),
    )
    wm.meta["config"]["objective"]["t_one"] = 1.0
    assert wm.sampler_steps == 1

    def run(**kw):
        return wm.imagine(*args(wm), generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(run(), run(steps=1))
    assert not torch.equal(run(), run(steps=4))
