"""dreamshard: personalised Stable Diffusion data generation at scale and streaming UDA training."""

__version__ = "0.1.0"
