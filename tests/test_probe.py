"""State probe: learns where a bright square is, reports its floor in physical units, is
deterministic with a seed, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

from selfflow_world.errors import UserError
from selfflow_world.probe import StateProbe, fit_probe, probe_error

SQUARE = 3


def squares(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``(n, 3, size, size)`` in [-1, 1], black with one white 3x3 square, and the state
    ``(n, 2)``: the square's centre (row, column) in pixels, plus 100 (a physical offset)."""
    pos = torch.randint(0, size - SQUARE + 1, (n, 2), generator=generator)
    frames = torch.full((n, 3, size, size), -1.0)
    for i, (r, c) in enumerate(pos.tolist()):
        frames[i, :, r : r + SQUARE, c : c + SQUARE] = 1.0
    return frames, pos.float() + (SQUARE - 1) / 2 + 100


FIT = {"epochs": 6, "batch_size": 64, "width": 16}


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    train_frames, train_states = squares(256, 16, g)
    val_frames, val_states = squares(128, 16, g)
    return {
        "frames": train_frames,
        "states": train_states,
        "val_frames": val_frames,
        "val_states": val_states,
    }


@pytest.fixture(scope="module")
def fitted(data) -> tuple[StateProbe, dict]:
    return fit_probe(**data, **FIT, generator=torch.Generator().manual_seed(0))


def test_probe_learns_the_square_position(fitted, data):
    probe, floor = fitted
    std = data["val_states"].std(0)
    assert len(floor["rmse"]) == 2 and len(floor["nrmse"]) == 2
    assert floor["rmse_overall"] < 0.25 * float(std.mean())  # well below predicting the mean (~4 px)
    assert floor["nrmse_overall"] < 0.25
    assert floor["state_std"] == pytest.approx(data["states"].std(0).tolist(), rel=1e-5)


def test_probe_predicts_in_physical_units(fitted, data):
    probe, floor = fitted
    with torch.no_grad():
        pred = probe(data["val_frames"])  # (N, 2), centred near 100 + 6.5, not near 0
    assert (pred.mean(0) - data["val_states"].mean(0)).abs().max() < 1.0
    assert torch.equal(probe.state_mean, data["states"].double().mean(0).float())


def test_probe_error_matches_the_floor_and_takes_videos_and_uint8(fitted, data):
    probe, floor = fitted
    err = probe_error(probe, data["val_frames"], data["val_states"])  # (N, 2)
    assert err.shape == (128, 2)
    assert float(err.pow(2).mean().sqrt()) == pytest.approx(floor["rmse_overall"], rel=1e-5)
    video, video_states = data["val_frames"].view(8, 16, 3, 16, 16), data["val_states"].view(8, 16, 2)
    err_video = probe_error(probe, video, video_states, batch_size=10)  # (B, T, S), chunked
    assert err_video.shape == (8, 16, 2) and torch.allclose(err_video.view(128, 2), err, atol=1e-5)
    as_uint8 = ((data["val_frames"] + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(probe_error(probe, as_uint8, data["val_states"]), err, atol=1e-4)


def test_probe_on_wrong_frames_is_worse_than_the_floor(fitted, data):
    """Frames that do not match the states (another example's) score far above the floor."""
    probe, floor = fitted
    err = probe_error(probe, data["val_frames"].roll(1, 0), data["val_states"])
    assert float(err.pow(2).mean().sqrt()) > 5 * floor["rmse_overall"]


def test_fit_is_deterministic_with_a_seed_and_leaves_the_global_rng_alone(data):
    small = {k: v[:64] for k, v in data.items()}
    kwargs = {**small, "epochs": 1, "batch_size": 32, "width": 8}
    before = torch.random.get_rng_state()
    a, ma = fit_probe(**kwargs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):  # a different global RNG state must not matter
        torch.manual_seed(12345)
        b, mb = fit_probe(**kwargs, generator=torch.Generator().manual_seed(3))
    c, _ = fit_probe(**kwargs, generator=torch.Generator().manual_seed(4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and ma == mb
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("size, width", [(16, 32), (64, 32), (4, 8), (20, 8)])
def test_probe_shapes(size, width):
    probe = StateProbe(size, state_dim=5, width=width)
    assert probe(torch.zeros(2, 3, size, size)).shape == (2, 5)


def test_bad_input_raises_user_error(data):
    probe = StateProbe(16, 2, width=8)
    frames, states = data["frames"][:8], data["states"][:8]
    with pytest.raises(UserError, match="frames must be"):
        probe(torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError, match="states"):
        probe_error(probe, frames, states[:7])
    with pytest.raises(UserError, match="probe predicts"):
        probe_error(probe, frames, torch.zeros(8, 3))
    with pytest.raises(UserError, match="empty"):
        fit_probe(frames[:0], states[:0], val_frames=frames, val_states=states)
    with pytest.raises(UserError, match="empty"):
        fit_probe(frames, states, val_frames=frames[:0], val_states=states[:0])
    with pytest.raises(UserError, match="validation"):
        fit_probe(frames, states, val_frames=torch.zeros(4, 3, 8, 8), val_states=states[:4])
    with pytest.raises(UserError, match="epochs"):
        fit_probe(frames, states, val_frames=frames, val_states=states, epochs=0)
    with pytest.raises(UserError, match="state_dim"):
        StateProbe(16, 0)
