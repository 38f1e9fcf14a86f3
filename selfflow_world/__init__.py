"""selfflow-world: Self-Flow video world models for MuJoCo robotics.

from selfflow_world import WorldModel
wm = WorldModel.load("runs/reacher")
frames = wm.imagine(context_frames, actions, steps=4)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["WorldModel", "__version__"]

if TYPE_CHECKING:
    from selfflow_world.world_model import WorldModel


def __getattr__(name: str):
    # lazy: `import selfflow_world` stays cheap for the CLI and for collection workers (no torch)
    if name == "WorldModel":
        from selfflow_world.world_model import WorldModel

        return WorldModel
    raise AttributeError(f"module 'selfflow_world' has no attribute {name!r}")
