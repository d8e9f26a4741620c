"""Personalisation: DreamBooth (full or LoRA) on one or a few target images."""

from dreamshard.personalize.dreambooth import personalize

__all__ = ["personalize"]
