"""controlnet_seg (ZoDi): a segmentation ControlNet is shown the source label as a colour map
(condition.palette). Without a strength each sample starts from pure noise; with one, from the source image
noised to it (the ControlNet img2img pipeline), or from ZoDi's inverted latent."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from dreamshard.config import ConditionConfig, GenerateConfig, ModelConfig
from dreamshard.engine.modes.base import Mode
from dreamshard.errors import UserError


class ControlNetSeg(Mode):
    name = "controlnet_seg"
    keeps_label = True
    supports_inversion = True
    shows_label_map = True

    def check(self, config: GenerateConfig) -> None:
        if not config.model.controlnet:
            raise UserError("mode controlnet_seg needs model.controlnet (a ControlNet directory or hub id)")

    def build(self, pipe, model: ModelConfig, dtype):
        from diffusers import AutoPipelineForText2Image

        from dreamshard.engine.models import load_controlnet

        return AutoPipelineForText2Image.from_pipe(pipe, controlnet=load_controlnet(model, dtype))

    def variant(self, pipe, strength: float | None, inverting: bool):
        if strength is None:
            return None
        from diffusers import AutoPipelineForImage2Image

        variant = AutoPipelineForImage2Image.from_pipe(pipe)  # the family's ControlNet img2img class, same components
        variant.set_progress_bar_config(disable=True)
        return variant

    def control_image(self, label_colours: Image.Image) -> Image.Image:
        return label_colours

    def pipeline_kwargs(self, images: Sequence[Image.Image], controls, strength: float | None, condition: ConditionConfig) -> dict:
        kwargs = {"controlnet_conditioning_scale": condition.controlnet_scale}
        if strength is None:
            return kwargs | {"image": list(controls)}
        return kwargs | {"image": list(images), "control_image": list(controls), "strength": strength}
