"""Behaviour of the video DiT: zero init, causality, conditioning paths, hidden states, KV cache."""

from __future__ import annotations

import pytest
import torch

from selfflow_world.errors import UserError
from selfflow_world.layers import apply_rope, rope_cos_sin
from selfflow_world.model import (
    PRESETS,
    WorldDiT,
    count_parameters,
    expand_t,
    model_config,
    shift_frames,
    to_clean,
    to_velocity,
    tokens_t,
)

B, T, A = 2, 4, 3


def tiny(**overrides) -> WorldDiT:
    """The tiny preset with a plain output head unless ``residual=True`` is asked for."""
    return WorldDiT(
        model_config("tiny", **{"action_dim": A, "max_frames": T, "residual": False, **overrides})
    )


def perturbed(**overrides) -> WorldDiT:
    """A tiny model whose zero-initialised layers are randomised, so every path is live."""
    model = tiny(**overrides)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def clip(seed: int = 0, frames: int = T):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, frames, 3, 16, 16, generator=g) * 2 - 1
    actions = torch.rand(B, frames, A, generator=g) * 2 - 1
    t = torch.rand(B, frames, generator=g)
    return x, t, actions


def test_shift_frames_puts_zeros_first_and_the_previous_frame_after():
    x, _, _ = clip()
    prev = shift_frames(x)
    assert torch.equal(prev[:, 0], torch.zeros_like(x[:, 0]))
    assert torch.equal(prev[:, 1:], x[:, :-1])


def test_fresh_model_outputs_zeros_and_every_block_is_the_identity():
    model = tiny()
    x, t, actions = clip()
    out, hidden = model(x, t, actions, shift_frames(x), return_hidden=(0, 1, 2))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))
    assert torch.equal(hidden[1], hidden[0]) and torch.equal(hidden[2], hidden[0])
    assert hidden[0].abs().sum() > 0


def test_fresh_residual_model_copies_the_previous_frame():
    model = tiny(residual=True)
    x, t, actions = clip()
    prev = shift_frames(x)
    assert torch.equal(model(x, t, actions, prev), prev)  # the copy-last baseline, exactly
    cache = model.init_cache(B)
    model.append(cache, x[:, :2], actions[:, :2])
    assert torch.equal(model.step(cache, torch.randn_like(x[:, 0]), 1.0, actions[:, 2]), x[:, 1])
    with pytest.raises(UserError, match="residual=true needs prediction=x"):
        tiny(residual=True, prediction="v")


def test_changing_a_later_frame_never_changes_earlier_outputs():
    model = perturbed()
    x, t, actions = clip()
    prev = shift_frames(x)
    base = model(x, t, actions, prev)
    changes = {
        "x": (x.clone().index_fill_(1, torch.tensor([2]), 0.3), t, actions, prev),
        "prev": (x, t, actions, prev.clone().index_fill_(1, torch.tensor([2]), -0.7)),
        "action": (x, t, actions.clone().index_fill_(1, torch.tensor([2]), 0.9), prev),
        "t": (x, t.clone().index_fill_(1, torch.tensor([2]), 0.01), actions, prev),
    }
    for name, args in changes.items():
        out = model(*args)
        assert torch.allclose(out[:, :2], base[:, :2], atol=1e-6), name
        assert not torch.allclose(out[:, 2], base[:, 2], atol=1e-4), name


def test_per_example_per_frame_and_per_token_t_agree_when_equal():
    model = perturbed()
    x, _, actions = clip()
    prev = shift_frames(x)
    t_ex = torch.tensor([0.3, 0.8])
    n = T * model.tokens_per_frame
    outs = [
        model(x, t_ex, actions, prev),
        model(x, t_ex[:, None].expand(B, T), actions, prev),
        model(x, t_ex[:, None].expand(B, n).clone(), actions, prev),
    ]
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])
    # and the level is actually used
    assert not torch.allclose(outs[0], model(x, t_ex.flip(0), actions, prev), atol=1e-4)


def test_token_levels_map_to_their_own_patch_in_frame_major_order():
    t_tok = torch.zeros(1, 2 * 16)
    t_tok[0, 16 + 4 + 1] = 1.0  # frame 1, patch row 1, patch column 1
    pix = expand_t(t_tok, (1, 2, 3, 16, 16), patch=4)
    assert pix.shape == (1, 2, 1, 16, 16)
    assert pix[0, 1, 0, 4:8, 4:8].eq(1).all() and pix.sum() == 16
    assert torch.equal(tokens_t(torch.tensor([0.5]), 1, 2, 16), torch.full((1, 32), 0.5))
    with pytest.raises(ValueError):
        tokens_t(torch.zeros(1, 5), 1, 2, 16)


def test_velocity_and_clean_conversions_follow_the_time_convention():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 3, 4, 4, generator=g), torch.randn(2, 1, 3, 4, 4, generator=g)
    t = torch.tensor([0.25, 0.9]).view(2, 1, 1, 1, 1)
    x_t = (1 - t) * x + t * eps
    v = eps - x
    assert torch.allclose(to_velocity(x, x_t, t, "x", 0.05), v, atol=1e-5)
    assert torch.equal(to_velocity(v, x_t, t, "v", 0.05), v)
    assert torch.allclose(to_clean(v, x_t, t, "v"), x, atol=1e-5)
    assert torch.equal(to_clean(x, x_t, t, "x"), x)
    # near t = 0 the x -> v conversion divides by t_min, not by t
    small = torch.full_like(t, 1e-4)
    assert torch.allclose(to_velocity(torch.zeros_like(x), x, small, "x", 0.05), x / 0.05)


def test_previous_frame_path_feeds_the_same_patch_of_the_previous_frame():
    x, t, actions = clip(frames=1)
    prev_a, prev_b = clip(seed=1, frames=1)[0], clip(seed=2, frames=1)[0]
    model = perturbed()
    assert not torch.allclose(model(x, t, actions, prev_a), model(x, t, actions, prev_b), atol=1e-4)
    without = perturbed(prev_frame_path=False)
    assert torch.equal(without(x, t, actions, prev_a), without(x, t, actions, prev_b))


def test_output_for_a_pure_noise_target_depends_on_the_history():
    model = perturbed()
    x, _, actions = clip()
    other = clip(seed=9)[0]
    t = torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(B, T)
    swapped = torch.cat([other[:, :3], x[:, 3:]], dim=1)
    a = model(x, t, actions, shift_frames(x))[:, 3]
    b = model(swapped, t, actions, shift_frames(swapped))[:, 3]
    assert (a - b).abs().mean() > 1e-2


def test_actions_condition_their_own_frame():
    model = perturbed(action_input_path=False)  # the adaLN path alone must carry the action
    x, t, actions = clip()
    moved = actions.clone()
    moved[:, 1] = -moved[:, 1]
    base, out = model(x, t, actions, shift_frames(x)), model(x, t, moved, shift_frames(x))
    assert torch.allclose(out[:, 0], base[:, 0], atol=1e-6)
    assert not torch.allclose(out[:, 1], base[:, 1], atol=1e-4)


def test_hidden_states_are_numbered_after_blocks_and_stop_at_matches_the_full_forward():
    model = perturbed()
    x, t, actions = clip()
    prev = shift_frames(x)
    _, hidden = model(x, t, actions, prev, return_hidden=(1, 2))
    stopped = model(x, t, actions, prev, stop_at=1)
    assert set(stopped) == {1} and torch.allclose(stopped[1], hidden[1])
    assert hidden[1].shape == (B, T * model.tokens_per_frame, 32)
    assert not torch.allclose(hidden[1], hidden[2])
    with pytest.raises(UserError):
        model(x, t, actions, prev, stop_at=3)


def test_only_relative_frame_offsets_matter():
    model = perturbed()
    x, t, actions = clip()
    prev = shift_frames(x)
    a = model(x, t, actions, prev)
    b = model(x, t, actions, prev, frame_offset=37)
    assert torch.allclose(a, b, atol=1e-4)


def test_temporal_rope_scores_depend_on_the_frame_offset_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i: int, j: int) -> torch.Tensor:
        cos_i, sin_i = rope_cos_sin(torch.tensor([i]), 16, base=100.0)
        cos_j, sin_j = rope_cos_sin(torch.tensor([j]), 16, base=100.0)
        return (apply_rope(q, cos_i, sin_i) * apply_rope(k, cos_j, sin_j)).sum()

    assert torch.allclose(score(3, 1), score(40, 38), atol=1e-4)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_kv_cache_step_matches_the_full_forward():
    model = perturbed()
    x, t, actions = clip()
    prev = shift_frames(x)
    levels = torch.cat([torch.zeros(B, T - 1), t[:, -1:]], dim=1)  # clean history, noisy last frame
    with torch.no_grad():
        full = model(x, levels, actions, prev)[:, -1]
        one_by_one = model.init_cache(B)
        for j in range(T - 1):
            model.append(one_by_one, x[:, j], actions[:, j])
        prefilled = model.init_cache(B)
        model.append(prefilled, x[:, : T - 1], actions[:, : T - 1])
        for cache in (one_by_one, prefilled):
            assert cache.frames == T - 1 and cache.next_index == T - 1
            stepped = model.step(cache, x[:, -1], t[:, -1], actions[:, -1])
            assert torch.allclose(stepped, full, atol=1e-5)
        assert cache.frames == T - 1  # step does not write


def test_cache_window_slides_and_prefill_matches_appending_one_by_one():
    model = perturbed(max_frames=8)
    x, _, actions = clip(frames=6)
    with torch.no_grad():
        one_by_one = model.init_cache(B, window=2)
        for j in range(6):
            model.append(one_by_one, x[:, j], actions[:, j])
        prefilled = model.init_cache(B, window=2)
        model.append(prefilled, x, actions)
    for cache in (one_by_one, prefilled):
        assert (cache.start, cache.frames, cache.next_index) == (4, 2, 6)
        assert cache.history(0)[0].shape == (B, 2, 2 * model.tokens_per_frame, 16)
        assert torch.equal(cache.last, x[:, -1])
    for layer in range(model.config.depth):
        for a, b in zip(one_by_one.history(layer), prefilled.history(layer), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    # the ring holds the last two frames oldest first: the same keys as encoding frames 4, 5 after 0..3
    fresh = model.init_cache(B, window=2)
    with torch.no_grad():
        model.append(fresh, x[:, :4], actions[:, :4])
        model.append(fresh, x[:, 4], actions[:, 4])
        model.append(fresh, x[:, 5], actions[:, 5])
    assert torch.allclose(fresh.history(0)[0], prefilled.history(0)[0], atol=1e-5)


def test_sampling_with_the_ring_cache_equals_attending_to_the_window_in_time_order():
    # one block: cached keys depend on their own frame only, so the full forward over the last
    # window + 1 frames is an exact reference for a step after the ring has wrapped
    model = perturbed(max_frames=8, depth=1)
    x, t, actions = clip(frames=7)
    with torch.no_grad():
        cache = model.init_cache(B, window=3)
        for j in range(6):  # the ring wraps: 6 frames through 4 slots
            model.append(cache, x[:, j], actions[:, j])
        stepped = model.step(cache, x[:, 6], t[:, 6], actions[:, 6])
        # reference: the full forward over the last window + 1 frames (absolute indices 3..6)
        clip_x = x[:, 3:7]
        levels = torch.cat([torch.zeros(B, 3), t[:, 6:7]], dim=1)
        full = model(clip_x, levels, actions[:, 3:7], shift_frames(x)[:, 3:7], frame_offset=3)[:, -1]
    assert torch.allclose(stepped, full, atol=1e-5)


def test_invalid_model_settings_raise_user_errors():
    with pytest.raises(UserError, match="unknown model preset"):
        model_config("huge", action_dim=2, max_frames=4)
    with pytest.raises(UserError, match="divisible by patch"):
        model_config("tiny", image_size=18, action_dim=2, max_frames=4)
    with pytest.raises(UserError, match="heads"):
        model_config("tiny", heads=3, action_dim=2, max_frames=4)
    with pytest.raises(UserError, match="prediction"):
        model_config("tiny", prediction="eps", action_dim=2, max_frames=4)
    with pytest.raises(UserError, match="needs"):
        model_config("tiny")
    with pytest.raises(UserError, match="unknown model setting"):
        model_config("tiny", action_dim=2, max_frames=4, widht=64)
    with pytest.raises(UserError, match="max_frames"):
        video = torch.zeros(1, T + 1, 3, 16, 16)
        tiny()(video, 0.5, torch.zeros(1, T + 1, A), video)


def test_same_seed_same_weights():
    cfg = model_config("tiny", action_dim=A, max_frames=T)
    a, b = WorldDiT(cfg), WorldDiT(cfg)
    c = WorldDiT(cfg, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.patch_embed.weight, c.patch_embed.weight)


def test_preset_parameter_counts():
    counts = {}
    with torch.device("meta"):
        for name in PRESETS:
            counts[name] = count_parameters(WorldDiT(model_config(name, action_dim=6, max_frames=8)))
    assert counts["tiny"] < 100_000
    assert 4e6 < counts["small"] < 7e6
    assert 40e6 < counts["base"] < 80e6
