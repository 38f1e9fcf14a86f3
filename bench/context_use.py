"""What a world model reads from its context: the one-step prediction with one input changed at a time.

From held-out starts, the clean-frame prediction at ``t = 1`` (what one-step imagination outputs)
for the frame after the context, with the context as recorded, then with

- **still frames**: every context frame replaced by the last one (same picture, no motion),
- **context actions zeroed**: the actions that led into the context frames set to the middle of
  the action range (the frames unchanged),
- **next action zeroed**: the action that produces the predicted frame set to the middle.

Each change of the prediction is reported over the mean true frame change (last context frame to
the next frame), with the MSE of each prediction against the recorded next frame. A model that
reads motion from its frames changes its prediction when they are made still; one that reads it
from the actions that led there does not.

    python bench/context_use.py --ckpt reacher-easy --data data/reacher-easy_test
"""

from __future__ import annotations

import argparse
import json

import torch

from selfflow_world.action_following import one_step_prediction
from selfflow_world.evaluate import one_step_inputs
from selfflow_world.imagine import load_segments
from selfflow_world.runtime import autocast
from selfflow_world.video import to_float
from selfflow_world.world_model import WorldModel


@torch.no_grad()
def context_use(wm, data: str, episodes: int, per_episode: int, seed: int) -> dict:
    seg = load_segments(wm, data, "all", episodes * per_episode, wm.history, 2, per_episode=per_episode)
    device = wm.device
    context, ctx_a, action, noise = one_step_inputs(wm, seg.context, seg.context_actions, seg.actions, seed)
    target = to_float(seg.real[:, 0]).to(device).float()
    last = context[:, -1].float()
    inputs = {
        "as_recorded": (context, ctx_a, action),
        "still_frames": (context[:, -1:].expand_as(context).contiguous(), ctx_a, action),
        "context_actions_zeroed": (context, torch.zeros_like(ctx_a), action),
        "next_action_zeroed": (context, ctx_a, torch.zeros_like(action)),
    }
    preds = {}
    with autocast(device, wm.bf16 and not wm.bf16_weights):
        for name, (c, ca, a) in inputs.items():
            preds[name] = one_step_prediction(wm.model, c, ca, a, noise)
    truth = float((target - last).abs().mean())
    out = {
        "rollouts": int(context.shape[0]),
        "true_frame_change": truth,
        "mse_copy_last": float((last - target).pow(2).mean()),
    }
    for name, pred in preds.items():
        out[f"mse_{name}"] = float((pred - target).pow(2).mean())
        if name != "as_recorded":
            out[f"change_{name}"] = float((pred - preds["as_recorded"]).abs().mean()) / truth
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a run directory, checkpoint or shipped model name")
    parser.add_argument("--data", required=True, help="a dataset directory (held-out episodes)")
    parser.add_argument("--episodes", type=int, default=5, help="episodes to take starts from")
    parser.add_argument("--per-episode", type=int, default=4, help="non-overlapping starts per episode")
    parser.add_argument("--seed", type=int, default=0, help="the noise the predictions start from")
    args = parser.parse_args()
    wm = WorldModel.load(args.ckpt, device="cpu")
    result = context_use(wm, args.data, args.episodes, args.per_episode, args.seed)
    print(json.dumps({"ckpt": args.ckpt, "data": args.data, **result}, indent=1))
    print(
        "change / true frame change: still frames {:.2f}, context actions zeroed {:.2f}, next action "
        "zeroed {:.2f}; MSE as recorded {:.5f}, still frames {:.5f}, context actions zeroed {:.5f}".format(
            result["change_still_frames"],
            result["change_context_actions_zeroed"],
            result["change_next_action_zeroed"],
            result["mse_as_recorded"],
            result["mse_still_frames"],
            result["mse_context_actions_zeroed"],
        )
    )


if __name__ == "__main__":
    main()
