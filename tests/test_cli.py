"""The `sfw` command line: envs, collect, data info, data check, and its error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from selfflow_world.cli import main
from selfflow_world.envs import list_envs
from selfflow_world.episodes import EPISODES


def sfw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfflow_world.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_envs_lists_both_families(capsys):
    assert main(["envs"]) == 0
    names = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "action_repeat=4" in names["dmc/reacher-easy"] and "gym/Reacher-v5" in names
    assert list(names) == list_envs()


def test_readme_collect_info_check(tmp_path, capsys):
    out = tmp_path / "reacher"
    command = f"collect env=dmc/reacher-easy episodes=3 steps=20 out={out} seed=0 workers=1"
    assert main(command.split()) == 0
    text = capsys.readouterr().out
    assert "collected 3 episodes (0 already there), 60 frames" in text and "64x64x3" in text

    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["env"] == "dmc/reacher-easy" and info["episodes"] == 3 and info["frames"] == 3 * 21
    assert info["frame_shape"] == [64, 64, 3] and info["action_repeat"] == 4 and info["policy"] == "noise"
    assert main(["data", "info", str(out)]) == 0
    assert "episodes  3" in capsys.readouterr().out

    assert main(["data", "check", str(out)]) == 0
    assert "3 episodes ok, 0 corrupt" in capsys.readouterr().out

    assert main(command.split()) == 0  # a rerun continues: nothing left to do
    assert "collected 0 episodes (3 already there)" in capsys.readouterr().out


def test_data_check_names_corrupt_files_and_fails(tiny_dataset_copy):
    frames = tiny_dataset_copy / EPISODES / "ep_000002" / "frames.npy"
    frames.write_bytes(frames.read_bytes()[:-10])
    (tiny_dataset_copy / EPISODES / "ep_000004" / "meta.json").unlink()
    result = sfw("data", "check", str(tiny_dataset_copy))
    assert result.returncode == 1
    corrupt = [line for line in result.stdout.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 2
    assert "ep_000002/frames.npy" in corrupt[0] and "ep_000004/meta.json" in corrupt[1]
    assert "3 episodes ok, 2 corrupt" in result.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    result = sfw("collect", "episodes=0", f"out={tmp_path / 'd'}")
    assert result.returncode == 2
    assert result.stderr.startswith("sfw: error: ") and result.stderr.count("\n") == 1
    assert "episodes must be a positive integer" in result.stderr and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["collect", "steps=-1"], "steps must be a positive integer"),
        (["collect", "workers=0"], "workers must be a positive integer"),
        (["collect", "env=dmc/nope-nope"], "sfw envs"),
        (["collect", "stepz=3"], "no such key"),
        (["collect", "policy=sb3"], "sb3_path"),
        (["data", "info", "{missing}"], "does not exist"),
        (["data", "check", "{empty}"], "no manifest.json"),
    ],
)
def test_user_errors(args, match, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    args += [f"out={tmp_path / 'd'}"] if args[0] == "collect" else []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfw: error: ") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "d").exists()
