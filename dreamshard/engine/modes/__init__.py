"""Generation modes, one object each (`base.Mode` says what a mode provides), chosen once by name from
REGISTRY. Adding a mode is one module here plus one line below (and its name in config.MODES, which the
config schema validates against; tests/test_modes.py checks the two lists agree)."""

from __future__ import annotations

from dreamshard.engine.modes.base import Mode
from dreamshard.engine.modes.controlnet_seg import ControlNetSeg
from dreamshard.engine.modes.depth2img import Depth2Img
from dreamshard.engine.modes.img2img import Img2Img
from dreamshard.engine.modes.txt2img import Txt2Img
from dreamshard.errors import UserError

REGISTRY: dict[str, Mode] = {mode.name: mode for mode in (Txt2Img(), Img2Img(), ControlNetSeg(), Depth2Img())}


def mode_for(name: str) -> Mode:
    """The mode called `name`; an unknown name is one UserError line listing the known ones."""
    if name not in REGISTRY:
        raise UserError(f"unknown generation mode {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def conditioned_names() -> str:
    """The names of the modes that take a labelled source, for messages."""
    return ", ".join(name for name, mode in REGISTRY.items() if mode.keeps_label)


__all__ = ["REGISTRY", "Mode", "conditioned_names", "mode_for"]
