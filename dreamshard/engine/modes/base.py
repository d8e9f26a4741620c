"""What a generation mode is: the pipeline it builds from the loaded text-to-image pipeline, how it conditions
one pipeline call, whether it keeps a source label, its strength rule and the settings it needs. The
defaults are those of a mode without a source (txt2img); conditioned modes override what differs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from dreamshard.config import ConditionConfig, GenerateConfig, ModelConfig


class Mode:
    name: str = ""
    keeps_label = False  # conditioned on a labelled source item, whose label each sample keeps as seg.png
    needs_strength = False  # condition.strength (or a per-style one) is required: how far the source is noised
    supports_inversion = False  # condition.init_noise: stochastic_inversion (ZoDi) applies
    loads_depth = False  # the base pipeline is loaded as SD-2-depth's depth-to-image pipeline
    shows_label_map = False  # the label is shown to the model as a colour map (condition.palette applies)

    def check(self, config: GenerateConfig) -> None:
        """Settings this mode needs beyond the shared ones, checked before any work (UserError)."""

    def build(self, pipe, model: ModelConfig, dtype) -> Any:
        """The pipeline this mode calls, built on the loaded (text-to-image) pipeline's components."""
        return pipe

    def variant(self, pipe, strength: float | None, inverting: bool) -> Any | None:
        """Another pipeline on the same components for calls with this strength / start latent (built once,
        cached by the caller), or None to call `pipe` itself."""
        return None

    def control_image(self, label_colours: Image.Image) -> Image.Image | None:
        """What the model is shown of the source label (the colour-coded map), or None."""
        return None

    def pipeline_kwargs(
        self, images: Sequence[Image.Image], controls: Sequence[Image.Image | None], strength: float | None, condition: ConditionConfig
    ) -> dict:
        """The conditioning arguments of one pipeline call over samples sharing a strength."""
        return {}

    def describe(self) -> str:
        return self.name
