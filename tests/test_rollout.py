"""The stateful rollout API: start/advance/repeat/select/restart give what separate rollouts give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow_world.errors import UserError
from selfflow_world.model import WorldDiT, model_config, shift_frames
from selfflow_world.rollout import advance, restart, start
from selfflow_world.sampler import rollout
from selfflow_world.world_model import WorldModel


def _model(max_frames: int = 4) -> WorldDiT:
    model = WorldDiT(model_config("tiny", action_dim=2, max_frames=max_frames)).eval()
    with torch.no_grad():  # leave zero-init so outputs depend on history and actions
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _data(batch: int, horizon: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.rand(batch, 2, 3, 16, 16, generator=g) * 2 - 1
    ctx_actions = torch.rand(batch, 2, 2, generator=g) * 2 - 1
    actions = torch.rand(batch, horizon, 2, generator=g) * 2 - 1
    noise = torch.randn(horizon, batch, 3, 16, 16, generator=g)
    return context, ctx_actions, actions, noise


def _separate(model, context, ctx_actions, actions, noise, window=None):
    """Each row rolled out on its own, with the given noise per frame."""
    rows = []
    for b in range(context.shape[0]):
        state = start(model, context[b : b + 1], ctx_actions[b : b + 1], window=window)
        rows.append(
            torch.stack(
                [
                    advance(model, state, actions[b : b + 1, j], steps=2, noise=noise[j, b : b + 1])[0]
                    for j in range(actions.shape[1])
                ]
            )
        )
    return torch.stack(rows)  # (B, T, C, H, W)


@torch.no_grad()
def test_batched_rows_equal_separate_rollouts():
    model = _model()
    context, ctx_actions, actions, noise = _data(3, 4)
    state = start(model, context, ctx_actions)
    batched = torch.stack(
        [advance(model, state, actions[:, j], steps=2, noise=noise[j]) for j in range(4)], 1
    )
    assert torch.allclose(batched, _separate(model, context, ctx_actions, actions, noise), atol=1e-5)
    assert state.imagined.tolist() == [4, 4, 4]


@torch.no_grad()
def test_repeat_gives_each_row_as_candidates_and_select_keeps_rows():
    model = _model()
    context, ctx_actions, _, _ = _data(2, 1)
    _, _, actions, noise = _data(6, 3, seed=1)  # 3 candidates per context
    state = start(model, context, ctx_actions)
    advance(model, state, torch.zeros(2, 2), steps=2, noise=torch.zeros(2, 3, 16, 16))
    many = state.repeat(3)
    assert many.batch == 6 and state.batch == 2  # the original is unchanged
    got = torch.stack([advance(model, many, actions[:, j], steps=2, noise=noise[j]) for j in range(3)], 1)
    for b in range(6):  # candidate b continues context b // 3 after the shared first frame
        single = start(model, context[b // 3 : b // 3 + 1], ctx_actions[b // 3 : b // 3 + 1])
        advance(model, single, torch.zeros(1, 2), steps=2, noise=torch.zeros(1, 3, 16, 16))
        ref = torch.stack(
            [
                advance(model, single, actions[b : b + 1, j], steps=2, noise=noise[j, b : b + 1])
                for j in range(3)
            ],
            1,
        )
        assert torch.allclose(got[b], ref[0], atol=1e-5), b
    kept = many.select([5, 0])
    a = torch.rand(2, 2) * 2 - 1
    n = torch.randn(2, 3, 16, 16)
    out = advance(model, kept, a, steps=2, noise=n)
    full_a, full_n = torch.zeros(6, 2), torch.zeros(6, 3, 16, 16)
    full_a[[5, 0]], full_n[[5, 0]] = a, n
    full = advance(model, many, full_a, steps=2, noise=full_n)
    assert torch.allclose(out[0], full[5], atol=1e-5) and torch.allclose(out[1], full[0], atol=1e-5)


@pytest.mark.parametrize("window,length", [(None, 2), (3, 2), (3, 1)])
@torch.no_grad()
def test_restarted_rows_equal_fresh_rollouts_and_others_continue(window, length):
    model = _model(max_frames=4)
    context, ctx_actions, actions, noise = _data(3, 5)
    fresh_ctx, fresh_acts, _, _ = _data(1, 1, seed=7)
    fresh_ctx, fresh_acts = fresh_ctx[:, -length:], fresh_acts[:, -length:]
    state = start(model, context, ctx_actions, window=window)
    frames = [advance(model, state, actions[:, j], steps=2, noise=noise[j]) for j in range(3)]
    restart(model, state, [1], fresh_ctx, fresh_acts)
    assert state.imagined.tolist() == [3, 0, 3]
    frames += [advance(model, state, actions[:, j], steps=2, noise=noise[j]) for j in range(3, 5)]
    got = torch.stack(frames, 1)
    untouched = _separate(model, context, ctx_actions, actions, noise, window=window)
    assert torch.allclose(got[[0, 2]], untouched[[0, 2]], atol=1e-5)  # the others never noticed
    again = _separate(model, fresh_ctx, fresh_acts, actions[1:2, 3:], noise[3:, 1:2], window=window)
    assert torch.allclose(got[1, 3:], again[0], atol=1e-5)  # as if started afresh
    assert not torch.allclose(got[1, 3:], untouched[1, 3:], atol=1e-3)


@torch.no_grad()
def test_features_are_the_clean_clip_hidden_state():
    model = _model()
    context, ctx_actions, actions, noise = _data(2, 1)
    state = start(model, context, ctx_actions)
    frame, feats = advance(model, state, actions[:, 0], steps=2, noise=noise[0], features=2)
    clip = torch.cat([context, frame[:, None]], 1)
    acts = torch.cat([ctx_actions, actions], 1)
    _, hidden = model(clip, torch.zeros(2), acts, shift_frames(clip), return_hidden=(2,))
    assert feats.shape == (2, model.tokens_per_frame, model.config.width)
    assert torch.allclose(feats, hidden[2][:, -model.tokens_per_frame :], atol=1e-5)
    # and the frame is in the history now: the next step is what a plain rollout gives
    nxt = advance(model, state, actions[:, 0], steps=2, noise=noise[0])
    plain = start(model, context, ctx_actions)
    advance(model, plain, actions[:, 0], steps=2, noise=noise[0])
    assert torch.allclose(nxt, advance(model, plain, actions[:, 0], steps=2, noise=noise[0]), atol=1e-5)


@torch.no_grad()
def test_rollout_function_is_the_loop_over_the_api():
    model = _model()
    context, ctx_actions, actions, _ = _data(2, 3)
    a = rollout(model, context, ctx_actions, actions, steps=2, generator=torch.Generator().manual_seed(3))
    state, g = start(model, context, ctx_actions), torch.Generator().manual_seed(3)
    b = torch.stack([advance(model, state, actions[:, j], steps=2, generator=g) for j in range(3)], 1)
    assert torch.equal(a, b)


def test_bad_rows_and_shapes_are_refused():
    model = _model()
    context, ctx_actions, actions, _ = _data(2, 1)
    state = start(model, context, ctx_actions)
    with pytest.raises(UserError, match="action must be"):
        advance(model, state, actions[:1, 0])
    with pytest.raises(UserError, match="row indices"):
        state.select([2])
    with pytest.raises(UserError, match="distinct"):
        restart(model, state, [0, 0], context, ctx_actions)
    with pytest.raises(UserError, match="history holds"):
        restart(model, state, [0], torch.cat([context, context], 1)[:1], torch.cat([ctx_actions] * 2, 1)[:1])
    with pytest.raises(UserError, match="repeat count"):
        state.repeat(0)


def test_world_model_start_step_matches_imagine(tiny_run):
    wm = WorldModel.load(tiny_run)
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 256, (2, 2, 16, 16, 3), dtype=np.uint8)
    acts = rng.uniform(-1, 1, (2, 3, 2)).astype(np.float32)
    imagined = wm.imagine(ctx, acts, steps=2, generator=torch.Generator().manual_seed(0))
    state, g = wm.start(ctx), torch.Generator().manual_seed(0)
    stepped = np.stack([wm.step(state, acts[:, j], steps=2, generator=g) for j in range(3)], 1)
    assert stepped.dtype == np.uint8 and np.array_equal(stepped, imagined)
    out = wm.step(state.repeat(2), np.zeros((4, 2), np.float32), features=True)
    frame, feats = out.frames, out.features
    assert frame.shape == (4, 16, 16, 3) and feats.shape == (4, wm.config.tokens_per_frame, wm.config.width)
    assert np.allclose(wm.denormalize_actions(wm.normalize_actions(torch.ones(2))).numpy(), 1.0)
    with pytest.raises(UserError, match=r"\(B=2, A=2\) in env units"):
        wm.step(state, np.zeros((2, 3, 2)))
