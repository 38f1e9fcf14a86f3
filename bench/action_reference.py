"""What the simulator itself scores on the training-validation action-sensitivity figure, and how
checkpoints compare with it where it matters: against the simulator's own counterfactual frames.

Training validation logs ``val_action_sensitivity``: the model's one-step prediction under each
clip's recorded action vs a uniformly random one, mean |difference| over the mean true frame change
(``selfflow_world.action_following``). This script computes the same figure with the simulator in
the model's place: for validation clips of a dataset, it restores the physics state of the last
context frame, steps once with the recorded action (checking it reproduces the recorded frame) and
once with a uniform random action, and reports

    mean |frame(random) - frame(recorded)| / mean |x_{k+1} - x_k|

so a model's figure can be read against what following the actions perfectly would give. A high
sensitivity alone does not mean the model follows its actions correctly (a model that reacts to
actions at random scores high too), so with ``--ckpt`` each checkpoint's one-step prediction at
``t = 1`` under the random action is also scored against the simulator's frame under that action
(MSE; copy-last alongside), and under the recorded action against the recorded frame.

    python bench/action_reference.py --data data/reacher --clips 128 [--ckpt RUN ...]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


def main(argv: list[str] | None = None) -> int:
    from selfflow_world.clips import ClipDataset, ClipSpec
    from selfflow_world.envs import make_like
    from selfflow_world.episodes import load_episode, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset directory made by sfw collect")
    parser.add_argument("--clips", type=int, default=128, help="validation clips to score")
    parser.add_argument("--history", type=int, default=2, help="context frames per clip (as in training)")
    parser.add_argument("--split", default="val", choices=("train", "val", "all"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", nargs="*", default=[], help="run or checkpoint directories to score")
    args = parser.parse_args(argv)

    spec = ClipSpec(history=args.history, future=1, val_fraction=0.1, split_seed=args.seed)
    dataset = ClipDataset(args.data, spec, args.split)
    manifest = read_manifest(dataset.root)
    low = np.asarray(manifest["action_low"], np.float64)
    high = np.asarray(manifest["action_high"], np.float64)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(dataset), size=min(args.clips, len(dataset)), replace=False)
    env = make_like(manifest)
    changes, truths, reproduced = [], [], 0
    contexts, context_actions, actions, others, sim_others, nexts = [], [], [], [], [], []
    try:
        for i in picks:
            pos, start = dataset.index[int(i)]
            info = dataset.episodes[pos]
            arr = load_episode(info.path)
            k = start + args.history - 1  # last context frame; actions[k] produces frame k + 1
            recorded_action = np.asarray(arr["actions"][k])
            other_action = rng.uniform(low, high).astype(recorded_action.dtype)
            outcomes = []
            for action in (recorded_action, other_action):
                env.restore(np.asarray(arr["states"][k]), seed=info.meta["env_seed"])
                obs, *_ = env.step(action)
                outcomes.append(obs.astype(np.float64) / 127.5 - 1.0)
            item = dataset[int(i)]
            contexts.append(item["frames"][: args.history])
            context_actions.append(item["actions"][: args.history])
            actions.append(item["actions"][args.history])
            others.append(dataset.normalize_actions(other_action.astype(np.float32)))
            sim_others.append(outcomes[1])
            truth_next = np.asarray(arr["frames"][k + 1], np.float64) / 127.5 - 1.0
            nexts.append(truth_next)
            last = np.asarray(arr["frames"][k], np.float64) / 127.5 - 1.0
            reproduced += int(
                np.array_equal(np.asarray(arr["frames"][k + 1]), ((outcomes[0] + 1) * 127.5).round())
            )
            changes.append(np.abs(outcomes[1] - outcomes[0]).mean())
            truths.append(np.abs(truth_next - last).mean())
    finally:
        env.close()
    ratio = float(np.mean(changes)) / float(np.mean(truths))
    print(f"env {manifest['env']}, {len(picks)} {args.split} clips of {args.data}")
    print(f"recorded action reproduces the recorded frame: {reproduced}/{len(picks)}")
    print(f"mean |frame(random action) - frame(recorded action)|: {np.mean(changes):.5f}")
    print(f"mean |x_(k+1) - x_k| (true frame change):            {np.mean(truths):.5f}")
    print(f"simulator action sensitivity: {ratio:.3f}")
    if args.ckpt:
        score_checkpoints(args, contexts, context_actions, actions, others, sim_others, nexts, truths)
    return 0


def score_checkpoints(args, contexts, context_actions, actions, others, sim_others, nexts, truths) -> None:
    import torch

    from selfflow_world.action_following import one_step_prediction
    from selfflow_world.world_model import WorldModel

    context = torch.stack(contexts).float() / 127.5 - 1.0  # (B, H, 3, h, w)
    ctx_a, act = torch.stack(context_actions), torch.stack(actions)
    other = torch.from_numpy(np.stack(others)).float()
    sim_other = torch.from_numpy(np.stack(sim_others)).float().permute(0, 3, 1, 2)
    # the simulator's own frame under the recorded action is the recorded next frame
    nxt = torch.from_numpy(np.stack(nexts)).float().permute(0, 3, 1, 2)
    last = context[:, -1]
    copy_alt = float((last - sim_other).pow(2).mean())
    copy_true = float((last - nxt).pow(2).mean())
    print(f"copy-last MSE: recorded {copy_true:.5f}, under the random action {copy_alt:.5f}")
    sim_gap = float((sim_other - nxt).pow(2).mean()) / copy_true
    print(
        f"simulator action gap (MSE of its random-action frame to the recorded one / copy-last MSE): {sim_gap:.3f}"
    )
    sim_effect = sim_other - nxt  # what changing the action does to the next frame
    print(
        "checkpoint | sensitivity | MSE recorded (vs copy-last) | MSE random action vs simulator (vs copy-last) "
        "| effect error (0 = the action's effect exactly, 1 = no effect, > 1 = a wrong one) | action gap"
    )
    for ckpt in args.ckpt:
        wm = WorldModel.load(ckpt, bf16=False)
        noise = torch.randn(last.shape, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            own = one_step_prediction(wm.model, context, ctx_a, act, noise)
            alt = one_step_prediction(wm.model, context, ctx_a, other, noise)
        sens = float((own - alt).abs().mean()) / float(np.mean(truths))
        mse_true = float((own - nxt).pow(2).mean())
        mse_alt = float((alt - sim_other).pow(2).mean())
        effect = float(((alt - own) - sim_effect).pow(2).mean()) / float(sim_effect.pow(2).mean())
        gap = (float((alt - nxt).pow(2).mean()) - mse_true) / copy_true
        print(
            f"{ckpt} | {sens:.3f} | {mse_true:.5f} ({mse_true / copy_true:.2f}x) | "
            f"{mse_alt:.5f} ({mse_alt / copy_alt:.2f}x) | {effect:.3f} | {gap:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
