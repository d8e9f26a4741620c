"""DreamBooth personalisation on the tiny model: real accelerate/peft training steps on a generated target
image, outputs loaded by the engine, resume after an interruption, one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.config import GenerateConfig, ModelConfig, PersonalizeConfig, validate
from dreamshard.engine.models import load_pipeline
from dreamshard.engine.tiny import build_tiny_model
from dreamshard.personalize import dreambooth as personalize_module
from dreamshard.personalize.dreambooth import LORA_WEIGHTS, TRAINING_STATE, load_images, personalize, random_crop, read_train_log, resize_shorter_side

RESOLUTION = 64
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny base model and a folder holding one synthetic 'target' image (wider than tall, so it is cropped)."""
    root = tmp_path_factory.mktemp("personalize")
    model = build_tiny_model(root / "tiny", "tiny")
    images = root / "target"
    images.mkdir()
    pixels = np.zeros((80, 96, 3), np.uint8)
    pixels[:, :48] = (200, 40, 40)
    pixels[20:60, 30:70] = (30, 180, 60)
    Image.fromarray(pixels).save(images / "target.png")
    return {"root": root, "model": model, "images": images}


def make_config(assets, out, **train) -> PersonalizeConfig:
    checkpoint_every = train.pop("checkpoint_every", 2)
    prior = train.pop("prior", {})
    return validate(
        PersonalizeConfig,
        {
            "model": {"path": str(assets["model"])},
            "instance": {"images": str(assets["images"])},
            "prior": prior,
            "train": {"resolution": RESOLUTION, "seed": 0, **train},
            "output": {"path": str(out), "checkpoint_every": checkpoint_every},
        },
    )


ACCUMULATION = 2  # micro-batches per step


def lora_config(assets, out) -> PersonalizeConfig:
    """LoRA on UNet + text encoder, with gradient accumulation, gradient checkpointing and random flips on."""
    return make_config(assets, out, method="lora", max_steps=4, lr=1e-2, lora_rank=4, train_text_encoder=True,
                       gradient_accumulation=ACCUMULATION, gradient_checkpointing=True, flip=True)  # fmt: skip


def step_records(out) -> list[dict]:
    return [record for record in read_train_log(out) if "loss" in record]


def eval_losses(out) -> dict[int, float]:
    return {record["step"]: record["eval_loss"] for record in read_train_log(out) if "eval_loss" in record}


def generates_an_image(pipe) -> None:
    image = pipe("a photo of a sks car", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (RESOLUTION, RESOLUTION)
    assert np.asarray(image).std() > 0


def changed_parameters(base, tuned) -> set[str]:
    tuned_params = dict(tuned.named_parameters())
    return {name for name, param in base.named_parameters() if not torch.equal(param, tuned_params[name])}


@pytest.fixture(scope="module")
def lora_out(assets):
    out = assets["root"] / "lora"
    personalize(lora_config(assets, out))
    return out


@pytest.fixture(scope="module")
def base_pipe(assets):
    return load_pipeline(ModelConfig(path=str(assets["model"])))


# ---------------------------------------------------------------------------------------------- full


@pytest.mark.slow
def test_full_finetune_learns_checkpoints_and_loads(assets, base_pipe):
    out = assets["root"] / "full"
    prior = {"enabled": True, "class_prompt": "a photo of a street", "num_images": 2, "steps": 2}
    personalize(make_config(assets, out, method="full", max_steps=12, lr=1e-3, checkpoint_every=5, prior=prior))

    records = step_records(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) and r["steps_per_s"] > 0 for r in records)
    # Learning check: the denoising loss on the instance image at fixed timesteps and noises. Measured:
    # 1.13 at step 0, 0.77 at step 5, 0.54 at step 12 (ratio 0.48); with DATUM's lr (5e-6) it is still
    # 1.12 at step 12, and a broken loss, target or optimizer would leave it there too.
    losses = eval_losses(out)
    assert sorted(losses) == [0, 5, 10, 12]
    assert losses[12] < 0.75 * losses[0], losses
    # Prior preservation: class images generated once by the base model, cached in the output.
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["00000.png", "00001.png"]

    # Checkpoints before the last step, each a full pipeline; the final model is OUT itself.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert not list(out.rglob(TRAINING_STATE))  # resume state is dropped once the run is complete
    tuned = load_pipeline(ModelConfig(path=str(out)))
    assert changed_parameters(base_pipe.unet, tuned.unet) == {name for name, _ in base_pipe.unet.named_parameters()}
    assert changed_parameters(base_pipe.text_encoder, tuned.text_encoder)
    assert not changed_parameters(base_pipe.vae, tuned.vae)
    generates_an_image(tuned)
    checkpoint = load_pipeline(ModelConfig(path=str(out / "checkpoint-5")))
    assert changed_parameters(checkpoint.unet, tuned.unet) and changed_parameters(base_pipe.unet, checkpoint.unet)


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.mark.slow
def test_lora_changes_only_lora_layers_and_loads(assets, lora_out, base_pipe):
    assert [r["step"] for r in step_records(lora_out)] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in step_records(lora_out))
    assert sorted(p.name for p in lora_out.glob("checkpoint-*")) == ["checkpoint-2"]
    manifest = json.loads((lora_out / "dreamshard_lora.json").read_text())
    assert manifest["base_model"] == str(assets["model"].resolve())
    assert manifest["weights"] == LORA_WEIGHTS and manifest["step"] == 4 and manifest["rank"] == 4
    weights = load_file(lora_out / LORA_WEIGHTS)
    assert weights and all("lora" in key for key in weights)
    assert any(key.startswith("text_encoder.") for key in weights) and any(key.startswith("unet.") for key in weights)

    tuned = load_pipeline(ModelConfig(path=str(lora_out)))  # base + LoRA fused by the engine
    unet_changed = changed_parameters(base_pipe.unet, tuned.unet)
    assert unet_changed and all(any(layer in name for layer in LORA_LAYERS) for name in unet_changed)
    text_changed = changed_parameters(base_pipe.text_encoder, tuned.text_encoder)
    assert text_changed and all(any(layer in name for layer in LORA_LAYERS) for name in text_changed)
    assert not changed_parameters(base_pipe.vae, tuned.vae)
    generates_an_image(tuned)
    checkpoint = load_pipeline(ModelConfig(path=str(lora_out / "checkpoint-2")))
    assert changed_parameters(checkpoint.unet, tuned.unet)


@pytest.mark.slow
def test_resume_after_interruption_continues_at_the_checkpoint(assets, lora_out, monkeypatch):
    out = assets["root"] / "interrupted"
    config = lora_config(assets, out)
    real_loss = personalize_module.training_loss
    calls = []

    def interrupted_at_step_3(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # training micro-batches; evaluations run without grad
        if sum(calls) == 2 * ACCUMULATION + 1:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(personalize_module, "training_loss", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        personalize(config)
    assert (out / "checkpoint-2" / TRAINING_STATE).is_dir() and not (out / LORA_WEIGHTS).exists()

    calls.clear()
    monkeypatch.setattr(personalize_module, "training_loss", lambda *a, **k: calls.append(torch.is_grad_enabled()) or real_loss(*a, **k))
    personalize(config)
    assert sum(calls) == 2 * ACCUMULATION  # training steps 3 and 4 only
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4]
    # Weights, optimizer state and per-step randomness all resumed: the same result as the uninterrupted run.
    resumed, uninterrupted = load_file(out / LORA_WEIGHTS), load_file(lora_out / LORA_WEIGHTS)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)

    calls.clear()
    personalize(config)  # a finished output is left as it is
    assert not calls


@pytest.mark.slow
def test_generate_a_shard_from_a_checkpoint_of_the_lora_output(lora_out, tmp_path):
    """An intermediate OUT/checkpoint-STEP/ is a model path for generate (DATUM generates from step 200);
    the final OUT itself is generated from in the test below."""
    from dreamshard.engine.run import generate

    config = validate(
        GenerateConfig,
        {
            "model": {"path": str(lora_out / "checkpoint-2")},
            "sampling": {"width": RESOLUTION, "height": RESOLUTION, "steps": 2},
            "output": {"path": str(tmp_path / "run"), "samples_per_shard": 2, "image_format": "png"},
            "run": {"num_samples": 2, "batch_size": 2, "workers": 1},
        },
    )
    summary = generate(config, show_progress=False)
    assert summary.ok and summary.samples == 2 and summary.shards_generated == 1
    assert (tmp_path / "run" / "shards" / "000000.tar").is_file()


@pytest.mark.slow
def test_retrained_lora_at_the_same_path_is_refused_and_a_copy_is_accepted(lora_out, tmp_path):
    """The dataset fingerprint covers the LoRA by content, however it is given (here: model.path pointing at
    a personalisation output). New weights at the same path must not be mixed into a run made with the old."""
    import shutil

    from safetensors.torch import save_file

    from dreamshard.engine.run import generate

    lora = tmp_path / "lora"
    shutil.copytree(lora_out, lora, ignore=shutil.ignore_patterns("checkpoint-*"))
    data = {
        "model": {"path": str(lora)},
        "sampling": {"width": RESOLUTION, "height": RESOLUTION, "steps": 2},
        "output": {"path": str(tmp_path / "run"), "samples_per_shard": 2},
        "run": {"num_samples": 2, "batch_size": 2, "workers": 1},
    }
    assert generate(validate(GenerateConfig, data), show_progress=False).ok
    record = json.loads((tmp_path / "run" / "dreamshard.json").read_text())
    assert record["model"]["loras"] and record["model"]["loras"] == record["fingerprint_parts"]["model"]["loras"]
    manifest = pq_rows(tmp_path / "run")
    assert all(json.loads(row["model"])["loras"] == record["model"]["loras"] for row in manifest)

    # Retrained into the same folder (new weights, same file names), then generate on the old output: refused.
    weights = load_file(lora / LORA_WEIGHTS)
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, lora / LORA_WEIGHTS)
    config_file = tmp_path / "generate.yaml"
    config_file.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["generate", str(config_file), "--num-samples", "4"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "different model (loras: " in result.output and len(result.output.strip().splitlines()) == 1, result.output

    # The original weights copied to another folder are the same dataset: the run is extended.
    copy = tmp_path / "copy"
    shutil.copytree(lora_out, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = generate(validate(GenerateConfig, {**data, "model": {"path": str(copy)}}), num_samples=4, show_progress=False)
    assert summary.ok and summary.shards_skipped == 1 and summary.shards_generated == 1


def pq_rows(run) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(run / "manifest.parquet").to_pylist()


def test_class_images_are_cropped_at_native_size_instance_images_resized(assets, tmp_path):
    """Prior preservation: class images (generated at the crop size) are not resized to train.resize first,
    so a crop is a window of the image, not a 2x zoom of it (DATUM crops class images at native size);
    instance images still get the shorter-side resize."""
    out = tmp_path / "out"
    (out / "class_images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    natives = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((64, 64, 3), (72, 96, 3), (48, 56, 3))]
    for index, pixels in enumerate(natives):
        Image.fromarray(pixels).save(out / "class_images" / f"{index:05d}.png")
    config = make_config(assets, out, resize=128, prior={"enabled": True, "num_images": 3})
    images = personalize_module.load_class_images(config, out, personalize_module.make_accelerator("no", 1))  # the cached files: nothing generated
    assert [tuple(image.shape) for image in images] == [(3, 64, 64), (3, 72, 96), (3, 64, 75)]  # the last is smaller than the crop: resized up
    as_pixels = [((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy() for image in images]
    assert np.array_equal(as_pixels[0], natives[0]) and np.array_equal(as_pixels[1], natives[1])
    crop = random_crop(images[1], RESOLUTION, False, torch.Generator().manual_seed(1))
    windows = [images[1][:, top : top + RESOLUTION, left : left + RESOLUTION] for top in range(9) for left in range(33)]
    assert any(torch.equal(crop, window) for window in windows)
    instance = resize_shorter_side(load_images(str(assets["images"]))[0], config.train.resize)
    assert min(instance.shape[1:]) == 128  # the 80x96 target image, resized to train.resize


# ------------------------------------------------------------------------------------------ bad input


def run_cli(config_path, *sets):
    result = CliRunner().invoke(app, ["personalize", str(config_path), *[f"--set={s}" for s in sets]])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_folder", "no images"),
        ("unreadable_image", "cannot read image"),
        ("resolution", "multiple of 8"),
        ("missing_model", "does not exist"),
        ("foreign_output", "not a personalisation run"),
    ],
)
def test_bad_input_is_one_line_exit_2(assets, tmp_path, case, expected):
    config = tmp_path / "personalize.yaml"
    config.write_text("train:\n  resolution: 64\n")
    sets = [f"model.path={assets['model']}", f"instance.images={assets['images']}", f"output.path={tmp_path / 'out'}"]
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        sets.append(f"instance.images={tmp_path / 'empty'}")
    elif case == "unreadable_image":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        sets.append(f"instance.images=[{assets['images'] / 'target.png'}, {tmp_path / 'broken.png'}]")
    elif case == "resolution":
        sets.append("train.resolution=100")
    elif case == "missing_model":
        sets.append(f"model.path={tmp_path / 'no-such-model'}")
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("someone else's")
    code, lines = run_cli(config, *sets)
    assert code == 2
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out" / "personalize.yaml").exists()
