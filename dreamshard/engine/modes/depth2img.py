"""depth2img (DIDEX): SD-2-depth's depth-to-image pipeline, with its own DPT depth estimator reading the
source image; the source image noised to `strength` is the start."""

from __future__ import annotations

from dreamshard.engine.modes.img2img import Img2Img


class Depth2Img(Img2Img):
    name = "depth2img"
    supports_inversion = False
    loads_depth = True

    def build(self, pipe, model, dtype):
        return pipe  # loaded as the depth-to-image pipeline (models.load_base_pipeline)

    def variant(self, pipe, strength, inverting):
        return None
