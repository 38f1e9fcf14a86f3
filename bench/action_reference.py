"""What the simulator itself scores on the training-validation action-sensitivity figure.

Training validation logs ``val_action_sensitivity``: the model's one-step prediction under each
clip's recorded action vs a uniformly random one, mean |difference| over the mean true frame change
(``selfflow_world.action_following``). This script computes the same figure with the simulator in
the model's place: for validation clips of a dataset, it restores the physics state of the last
context frame, steps once with the recorded action (checking it reproduces the recorded frame) and
once with a uniform random action, and reports

    mean |frame(random) - frame(recorded)| / mean |x_{k+1} - x_k|

so a model's figure can be read against what following the actions perfectly would give.

    python bench/action_reference.py --data data/reacher --clips 128
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


def main(argv: list[str] | None = None) -> int:
    from selfflow_world.clips import ClipDataset, ClipSpec
    from selfflow_world.envs import make
    from selfflow_world.episodes import load_episode, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset directory made by sfw collect")
    parser.add_argument("--clips", type=int, default=128, help="validation clips to score")
    parser.add_argument("--history", type=int, default=2, help="context frames per clip (as in training)")
    parser.add_argument("--split", default="val", choices=("train", "val", "all"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    spec = ClipSpec(history=args.history, future=1, val_fraction=0.1, split_seed=args.seed)
    dataset = ClipDataset(args.data, spec, args.split)
    manifest = read_manifest(dataset.root)
    low = np.asarray(manifest["action_low"], np.float64)
    high = np.asarray(manifest["action_high"], np.float64)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(dataset), size=min(args.clips, len(dataset)), replace=False)
    env = make(
        manifest["env"],
        size=tuple(manifest["size"]),
        camera=manifest["camera"],
        action_repeat=manifest["action_repeat"],
    )
    changes, truths, reproduced = [], [], 0
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
            truth_next = np.asarray(arr["frames"][k + 1], np.float64) / 127.5 - 1.0
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
