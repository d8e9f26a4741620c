"""img2img (SDEdit): each sample starts from its source image noised to `strength`, or with
condition.init_noise stochastic_inversion from ZoDi's inverted latent (see engine/inversion.py)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from dreamshard.config import ConditionConfig, ModelConfig
from dreamshard.engine.modes.base import Mode


class Img2Img(Mode):
    name = "img2img"
    keeps_label = True
    needs_strength = True
    supports_inversion = True

    def build(self, pipe, model: ModelConfig, dtype):
        from diffusers import AutoPipelineForImage2Image

        return AutoPipelineForImage2Image.from_pipe(pipe)

    def variant(self, pipe, strength: float | None, inverting: bool):
        if not inverting:
            return None
        from dreamshard.engine.inversion import img2img_from_latents

        return img2img_from_latents(pipe)  # takes the inverted start latent (plain img2img would ignore it)

    def pipeline_kwargs(self, images: Sequence[Image.Image], controls, strength: float | None, condition: ConditionConfig) -> dict:
        return {"image": list(images), "strength": strength}
