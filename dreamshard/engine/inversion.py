"""ZoDi's stochastic inversion: the start latent of an image-to-image run (Azuma et al., "ZoDi: Zero-Shot
Domain Adaptation with Diffusion-Based Image Transfer", arXiv 2403.13652; github.com/azuma164/ZoDi,
`zero_shot_image_transfer/image_transfer.py`).

diffusers' img2img (SDEdit) starts denoising at timestep t from x_t = √ᾱ_t x_0 + √(1-ᾱ_t) n, n random noise.
ZoDi replaces n by the UNet's own noise prediction: it noises x_0 with random n to x̃_t, asks the UNet (with
the ControlNet, conditional prompt only, no classifier-free guidance) for ε = ε_θ(x̃_t, t, c) and starts from
x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε. Its ablation shows this keeps the source's content better than random noise. As
in ZoDi's code this is one UNet call per sample, at the start timestep (not a walk through every timestep).

Where ZoDi's code inverts: at t = int(strength x 1000) on the 1000-step training scale (900 for strength
0.9), and then runs DDIM from the schedule's step below it (851 with 20 steps), treating the latent noised to
900 as the 851 one. `at="zodi"` does exactly that; `at="first_step"` (the option's default) inverts at the
first of the scheduler's int(steps x strength) steps (851), as diffusers' own img2img noising does. The
scheduler's `add_noise` and `scale_model_input` do the arithmetic, so any epsilon-predicting scheduler works
(ZoDi: DDIM). The random draws (the VAE's latent sample, then n) come from each sample's own generator in the
order diffusers' img2img draws them, so the denoising that follows draws its DDIM noise (eta > 0) from the
same generators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from dreamshard.errors import UserError


@torch.no_grad()
def stochastic_inversion(
    pipe,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    generators: Sequence[torch.Generator],
    steps: int,
    strength: float,
    control: Sequence[Image.Image] | None = None,
    controlnet_scale: float = 1.0,
    at: str = "first_step",
) -> torch.Tensor:
    """The inverted start latents x_t of `images` for an img2img pipeline (`pipe`: StableDiffusionImg2Img or,
    with `control`, StableDiffusionControlNetImg2Img) called with the same steps, strength and generators;
    inverted at the first denoising step (`at="first_step"`) or at int(strength x 1000) (`"zodi"`)."""
    if hasattr(pipe, "text_encoder_2"):  # SDXL encodes prompts with two encoders and extra time ids
        raise UserError(
            f"condition.init_noise stochastic_inversion is built for SD 1.x/2.x pipelines (ZoDi's SD 1.5); {type(pipe).__name__} is not one: "
            "use condition.init_noise: random with this model"
        )
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(
            f"condition.init_noise stochastic_inversion needs a model that predicts noise (epsilon); this one predicts {pipe.scheduler.config.prediction_type}"
        )
    device, dtype = pipe._execution_device, pipe.unet.dtype
    clean = encode_images(pipe, images, generators)
    timestep = start_timestep(pipe, steps, strength)
    if at == "zodi":
        last = pipe.scheduler.config.num_train_timesteps - 1
        timestep = torch.full_like(timestep, min(int(strength * (last + 1)), last))
    batch = timestep.repeat(len(images))
    noise = randn_like_pipeline(clean.shape, generators, device, dtype)
    predicted = predict_noise(pipe, pipe.scheduler.add_noise(clean, noise, batch), timestep[0], prompts, control, controlnet_scale)
    return pipe.scheduler.add_noise(clean, predicted, batch)


def encode_images(pipe, images: Sequence[Image.Image], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """x_0: each image's VAE latent, sampled with its own generator and scaled (as diffusers' img2img does)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    width, height = images[0].size
    pixels = pipe.image_processor.preprocess(list(images), height=height, width=width)
    pixels = pixels.to(device=pipe._execution_device, dtype=pipe.unet.dtype)
    latents = [retrieve_latents(pipe.vae.encode(pixels[i : i + 1]), generator=generator) for i, generator in enumerate(generators)]
    return pipe.vae.config.scaling_factor * torch.cat(latents)


def start_timestep(pipe, steps: int, strength: float) -> torch.Tensor:
    """The first denoising timestep of an img2img call with `steps` and `strength`, as a 1-element tensor."""
    pipe.scheduler.set_timesteps(steps, device=pipe._execution_device)
    timesteps, _ = pipe.get_timesteps(steps, strength, pipe._execution_device)
    return timesteps[:1]


def randn_like_pipeline(shape, generators: Sequence[torch.Generator], device, dtype) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=list(generators), device=device, dtype=dtype)


def predict_noise(pipe, noisy: torch.Tensor, timestep: torch.Tensor, prompts: Sequence[str], control, controlnet_scale: float) -> torch.Tensor:
    """ε_θ(x_t, t, c): the UNet's conditional noise prediction, with the ControlNet's residuals when `control`
    is given (ZoDi's `apply_model(x_noisy, t, cond)`)."""
    device = pipe._execution_device
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    model_input = pipe.scheduler.scale_model_input(noisy, timestep)
    residuals = {}
    if control is not None:
        width, height = control[0].size
        control_image = pipe.prepare_control_image(
            image=list(control), width=width, height=height, batch_size=len(control), num_images_per_prompt=1,
            device=device, dtype=pipe.controlnet.dtype, do_classifier_free_guidance=False, guess_mode=False,
        )  # fmt: skip
        down, mid = pipe.controlnet(
            model_input, timestep, encoder_hidden_states=embeds, controlnet_cond=control_image, conditioning_scale=controlnet_scale, return_dict=False
        )
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return pipe.unet(model_input, timestep, encoder_hidden_states=embeds, return_dict=False, **residuals)[0]


def img2img_from_latents(pipe):
    """A StableDiffusionImg2ImgPipeline on `pipe`'s components whose call takes `latents=`: the start latent
    x_t (from `stochastic_inversion`) used instead of noising the image (the ControlNet img2img pipeline takes
    `latents` itself; plain img2img would silently ignore it)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    class Img2ImgFromLatents(StableDiffusionImg2ImgPipeline):
        _start_latents: torch.Tensor | None = None

        def __call__(self, *args, latents: torch.Tensor | None = None, **kwargs):
            self._start_latents = latents
            try:
                return super().__call__(*args, **kwargs)
            finally:
                self._start_latents = None

        def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
            if self._start_latents is None:
                return super().prepare_latents(image, timestep, batch_size, num_images_per_prompt, dtype, device, generator)
            return self._start_latents.to(device=device, dtype=dtype)

    components = {name: value for name, value in pipe.components.items() if name != "controlnet"}
    variant = Img2ImgFromLatents(**components, requires_safety_checker=False)
    variant.set_progress_bar_config(disable=True)
    return variant
