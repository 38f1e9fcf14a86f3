"""The shipped models' recipes are written in four places that users read or run: ``RECIPES`` (the
model card's "reproduce" row), the model cards themselves, the header of ``bench/train_default.sh``
and the Makefile's ``reproduce`` defaults. They must describe the same training."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from selfflow_world.pretrained import MODELS_DIR, RECIPES, available

ROOT = Path(__file__).resolve().parents[1]
# train_default.sh's defaults for the variables a recipe may leave out
SCRIPT_DEFAULTS = {
    "OBJECTIVE": "flow",
    "EXTRA": "",
    "FINETUNE": "0",
    "IH": "0",
    "IH_STEPS": "1200",
    "IH_HISTORY": "2",
    "IH_LR": "0.0001",
    "IH_WARMUP": "100",
    "IH_EXTRA": "",
}
PER_STAGE = ("IH_STEPS", "IH_HISTORY", "IH_LR", "IH_WARMUP")


def parse(command: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=value ... bash bench/train_default.sh NAME STEPS`` -> (variables, [NAME, STEPS])."""
    words = shlex.split(command)
    at = words.index("bash")
    assert words[at + 1] == "bench/train_default.sh", command
    env = dict(w.split("=", 1) for w in words[:at])
    return env, words[at + 2 :]


def normalised(env: dict[str, str]) -> dict[str, object]:
    """The training the variables describe: defaults filled in, numbers compared as numbers, a
    per-stage setting given once expanded to every stage."""
    full = {**SCRIPT_DEFAULTS, **env}
    stages = full["IH"].split(",")
    out: dict[str, object] = {k: full[k] for k in ("OBJECTIVE", "EXTRA", "FINETUNE", "IH")}
    for key in PER_STAGE:
        values = full[key].split(",")
        if len(values) == 1:
            values = values * len(stages)
        out[key] = [v if "@" in v else float(v) for v in values]
    extra = full["IH_EXTRA"].split(";")
    out["IH_EXTRA"] = extra + [""] * (len(stages) - len(extra))
    return out


def test_the_recipes_name_the_shipped_models():
    assert sorted(RECIPES) == available()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_the_script_header_and_the_model_card(name):
    header = (ROOT / "bench" / "train_default.sh").read_text()
    assert f"#   {RECIPES[name]}\n" in header, f"train_default.sh's header lacks {name}'s recipe"
    card = (MODELS_DIR / name / "MODEL_CARD.md").read_text()
    assert f"`{RECIPES[name]}`" in card, f"{name}'s MODEL_CARD.md names another recipe"
    assert parse(RECIPES[name])[1][0] == name


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_make_reproduce_runs_the_recipe(name):
    dry = subprocess.run(
        ["make", "-n", "reproduce", f"MODEL={name}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    line = next(ln for ln in dry.splitlines() if "bench/train_default.sh" in ln)
    make_env, make_args = parse(line)
    recipe_env, recipe_args = parse(RECIPES[name])
    assert make_args == recipe_args
    assert normalised(make_env) == normalised(recipe_env)


def test_normalised_sees_a_changed_stage():
    """The comparison above is not blind: one stage's learning rate or steps differing shows."""
    base = parse(RECIPES["cartpole-swingup"])[0]
    for key, old, new in (("IH_LR", "5e-5,5e-5", "5e-5,1e-4"), ("IH_STEPS", "800@600", "800@700")):
        changed = {**base, key: re.sub(re.escape(old) + "$", new, base[key])}
        assert changed[key] != base[key]
        assert normalised(changed) != normalised(base)
    assert normalised({"IH": "6,8", "IH_STEPS": "1200"}) == normalised({"IH": "6,8", "IH_STEPS": "1200,1200"})
    assert normalised({"IH": "6,8", "IH_LR": "1e-4"}) == normalised({"IH": "6,8"})
