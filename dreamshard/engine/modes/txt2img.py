"""txt2img (DATUM, CLOUDS): prompts only, no source."""

from __future__ import annotations

from dreamshard.engine.modes.base import Mode


class Txt2Img(Mode):
    name = "txt2img"
