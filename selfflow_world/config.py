"""Hydra configs with dataclass schemas.

YAML under ``configs/`` holds the values, a dataclass is the schema: :func:`load_config` composes
``configs/<name>.yaml`` with command-line style ``key=value`` overrides, merges it into the schema
(a typo in a key or a wrong type fails loudly) and returns the dataclass instance.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TypeVar

from selfflow_world.errors import UserError

T = TypeVar("T")


def load_config(name: str, overrides: list[str], schema: type[T]) -> T:
    """Compose ``configs/<name>.yaml`` with ``overrides`` into an instance of ``schema``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r} (example: steps=100)")
    # a group's YAML (e.g. configs/model/small.yaml) need not list every field of its schema: an
    # override of a field it leaves out is added, and the schema merge below still refuses a key
    # the schema lacks and a value of the wrong type
    groups = {f.name for f in dataclasses.fields(schema) if dataclasses.is_dataclass(f.default_factory)}
    overrides = [
        "++" + item
        if item.split("=", 1)[0].split(".", 1)[0] in groups and "." in item.split("=", 1)[0]
        else item
        for item in overrides
    ]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("selfflow_world.configs", version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides))
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (OmegaConfBaseException, Exception) as err:  # hydra raises several unrelated types
        if isinstance(err, UserError):
            raise
        text = str(err).split("full_key:")[0].split("Config search path")[0]  # drop context blocks
        text = re.sub(r"To append to your config use \S+", f"no such key in the {name} config", text)
        message = " ".join(text.split())
        key = getattr(err, "full_key", None)  # OmegaConf type errors name the key only here
        if key and f"'{key}'" not in message:
            message = f"{key}: {message}"
        raise UserError(f"bad {name} config: {message}") from err
    finally:
        GlobalHydra.instance().clear()


def to_dict(cfg) -> dict:
    """A dataclass config as a plain dict (for JSON)."""
    from dataclasses import asdict

    return asdict(cfg)
