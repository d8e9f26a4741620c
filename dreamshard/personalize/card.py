"""The model card (README.md) of a personalised output, as diffusers' DreamBooth scripts write one: what the
Hub shows for a pushed model (`dreamshard push OUT org/name`), and what a reader of OUT needs to use it."""

from __future__ import annotations

from pathlib import Path

import yaml

from dreamshard.config import PersonalizeConfig

CARD = "README.md"


def hub_id(base: str) -> str | None:
    """`base` when it names a Hub repository (org/name, not a local path), else None: the card's base_model
    must be a Hub id for the Hub to link it."""
    parts = base.split("/")
    return base if len(parts) == 2 and all(parts) and not Path(base).expanduser().exists() and not base.startswith((".", "~")) else None


def model_card(config: PersonalizeConfig, base: str, step: int) -> str:
    train, lora = config.train, config.train.method == "lora"
    metadata: dict = {"license": config.output.license, "library_name": "diffusers"}
    if hub_id(base):
        metadata["base_model"] = base
    metadata["instance_prompt"] = config.instance.prompt
    metadata["tags"] = ["dreamshard", "dreambooth", "text-to-image", "stable-diffusion", "diffusers", *(["lora"] if lora else [])]
    use = (
        f'pipe = DiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("THIS_REPO_OR_DIR")'
        if lora
        else 'pipe = DiffusionPipeline.from_pretrained("THIS_REPO_OR_DIR")'
    )
    rows = [
        ("method", f"DreamBooth, {'LoRA rank ' + str(train.lora_rank) if lora else 'full fine-tuning'}"),
        ("base model", f"`{base}`"),
        ("instance prompt", f"`{config.instance.prompt}`"),
        (
            "prior preservation",
            f"`{config.prior.class_prompt}`, {config.prior.num_images} images, weight {config.prior.loss_weight}" if config.prior.enabled else "off",
        ),
        ("steps", f"{step} of {train.max_steps}"),
        ("learning rate", str(train.lr or (1e-4 if lora else 5e-6))),
        ("batch", f"{train.batch_size} x {train.gradient_accumulation} accumulation"),
        ("resolution", str(train.resolution)),
        ("text encoder trained", str(train.train_text_encoder)),
        ("mixed precision", train.mixed_precision),
    ]
    table = "\n".join(["| setting | value |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)])
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n\n"
        f"# DreamBooth {'LoRA ' if lora else ''}of `{base}` on {config.instance.prompt!r}\n\n"
        "Personalised with `dreamshard personalize` on the target image(s) the prompt names, for generating a "
        "target-domain dataset (DATUM's recipe). `train_log.jsonl` beside this card has the loss per step and "
        "the fixed-noise `eval_loss` at each checkpoint.\n\n"
        f"## Use\n\n```bash\ndreamshard generate CONFIG --set model.path=THIS_REPO_OR_DIR\n```\n\n"
        f"```python\nfrom diffusers import DiffusionPipeline\n\n{use}\nimage = pipe({config.instance.prompt!r}).images[0]\n```\n\n"
        f"## Training\n\n{table}\n\n"
        f"## Licence\n\n`{config.output.license}` (`output.license` of the config): the base model's licence applies to "
        "these weights and to what they generate.\n"
    )
