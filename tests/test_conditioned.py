"""The conditioned modes (img2img, controlnet_seg): source items, conditioning, strengths, and whole runs
through the real engine (local Ray) whose shards carry seg.png equal to the mapped source labels."""

import glob
import io
import json

import numpy as np
import pytest
import sourcedata
import webdataset as wds
from PIL import Image

from dreamshard.config import ConditionConfig, GenerateConfig, ModelConfig, PromptsConfig, SamplingConfig, SourceConfig
from dreamshard.datasets.labels import PALETTE
from dreamshard.engine.conditioned import Conditioner, open_checked_source, seg_png
from dreamshard.engine.models import load_pipeline
from dreamshard.engine.plan import build_plan
from dreamshard.engine.run import generate
from dreamshard.engine.tiny import build_tiny_model
from dreamshard.errors import UserError
from dreamshard.format.reader import read_manifest

DOMAINS = {"driving at night": 0.9, "driving in snow": 0.65}


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """The shared `tiny` pipeline and a ControlNet that matches its UNet."""
    return tiny_model, build_tiny_model(tmp_path_factory.mktemp("models") / "cn", "tiny-controlnet")


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    expected = sourcedata.write_cityscapes(root, n=3, size=(96, 48))
    return root, expected


def _plan(n=5):
    prompts = PromptsConfig(templates=[{"text": "{domain}, best quality"}], styles={"domain": [*DOMAINS, "driving in fog"]})
    return build_plan(prompts, SamplingConfig(width=64, height=64, steps=3, guidance_scale=2.0), seed=7).specs(0, n)


def _decode_seg(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "L" and image.format == "PNG"
    return np.asarray(image)


def test_seg_png_is_8bit_train_ids():
    ids = np.array([[0, 18], [255, 13]], dtype=np.uint8)
    np.testing.assert_array_equal(_decode_seg(seg_png(ids)), ids)


def test_strengths_group_calls_and_pick_the_pipeline(models, cityscapes):
    sd, cn = models
    root, _ = cityscapes
    source = open_checked_source(SourceConfig(layout="cityscapes", root=str(root)), "controlnet_seg")
    conditioner = Conditioner("controlnet_seg", source, ConditionConfig(strength_by_style=DOMAINS), num_classes=19)
    specs = _plan(12)
    strengths = {conditioner.strength(spec) for spec in specs}
    assert strengths == {0.9, 0.65, None}  # fog has no strength: it starts from pure noise
    for spec in specs:
        assert conditioner.strength(spec) == DOMAINS.get(spec.style["domain"])
    pipe = load_pipeline(ModelConfig(path=str(sd), controlnet=str(cn)), "controlnet_seg")
    noised = [conditioner.prepare(s) for s in specs if s.style["domain"] == "driving at night"][:1]
    plain = [conditioner.prepare(s) for s in specs if s.style["domain"] == "driving in fog"][:1]
    assert type(conditioner.pipeline_for(pipe, plain)).__name__ == "StableDiffusionControlNetPipeline"
    assert type(conditioner.pipeline_for(pipe, noised)).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    kwargs = conditioner.pipeline_kwargs(noised)
    assert kwargs["strength"] == 0.9 and kwargs["control_image"][0].size == (64, 64)
    # The ControlNet sees the label map in palette colours, resized without interpolation.
    colours = {tuple(c) for c in np.asarray(kwargs["control_image"][0]).reshape(-1, 3).tolist()}
    assert colours <= set(PALETTE) | {(0, 0, 0)} and len(colours) > 3
    assert plain[0].image.size == (64, 64) and set(conditioner.pipeline_kwargs(plain)) == {"image", "controlnet_conditioning_scale"}


def test_prompt_file_strength_column_wins(cityscapes, tmp_path):
    root, _ = cityscapes
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"prompt": "a", "strength": 0.3}\n{"prompt": "b"}\n')
    specs = build_plan(PromptsConfig(recipe="file", file=str(prompts_file)), SamplingConfig(width=64, height=64), 0).specs(0, 2)
    source = open_checked_source(SourceConfig(layout="cityscapes", root=str(root)), "img2img")
    conditioner = Conditioner("img2img", source, ConditionConfig(strength=0.8), num_classes=19)
    assert [conditioner.strength(s) for s in specs] == [0.3, 0.8]


def test_bad_conditioning_settings_are_user_errors(cityscapes):
    root, _ = cityscapes
    source = open_checked_source(SourceConfig(layout="cityscapes", root=str(root)), "img2img")
    with pytest.raises(UserError, match="img2img needs condition.strength"):
        Conditioner("img2img", source, ConditionConfig(), num_classes=19)
    with pytest.raises(UserError, match=r"condition.strength = 1.5"):
        Conditioner("img2img", source, ConditionConfig(strength=1.5), num_classes=19)
    with pytest.raises(UserError, match="strength_by_style"):
        Conditioner("controlnet_seg", source, ConditionConfig(strength_by_style={"x": 0}), num_classes=19)
    with pytest.raises(UserError, match="palette has 2 colours"):
        Conditioner("controlnet_seg", source, ConditionConfig(palette=["#000000", "#ffffff"]), num_classes=19)
    with pytest.raises(UserError, match="needs a labelled source"):
        open_checked_source(None, "controlnet_seg")


# ------------------------------------------------------------------------------- through the real engine


def _config(mode, models, source_root, layout, out, num_samples, condition) -> GenerateConfig:
    sd, cn = models
    return GenerateConfig.model_validate(
        {
            "mode": mode,
            "model": {"path": str(sd), "controlnet": str(cn), "device": "cpu"},
            "source": {"layout": layout, "root": str(source_root)},
            "condition": condition,
            "prompts": {"templates": [{"text": "{domain}, best quality"}], "styles": {"domain": [*DOMAINS, "driving in fog"]}},
            "sampling": {"width": 64, "height": 64, "steps": 3, "guidance_scale": 2.0},
            "output": {"path": str(out), "samples_per_shard": 3, "image_format": "png"},
            "run": {"num_samples": num_samples, "batch_size": 2, "workers": 1, "seed": 5},
        }
    )


def _samples(out) -> list[dict]:
    return list(wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False))


def _check_labelled_shards(config, expected: dict, keys: list[str], size: tuple[int, int]) -> list[dict]:
    from dreamshard.config import DomainConfig, ShardsConfig, TrainDataConfig
    from dreamshard.trainer.data import batch_stream
    from dreamshard.trainer.order import ReadPlan

    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    samples = _samples(config.output.path)
    # The trainer's reader, one epoch in manifest order: the labelled samples with the same train ids.
    domain = DomainConfig(shards=ShardsConfig(path=str(config.output.path)))
    data = TrainDataConfig(crop_size=(size[1], size[0]), flip=False, workers=0)
    trainer_labels = {
        key: label for batch in batch_stream("target", domain, data, True, 0, ReadPlan(len(samples), 1)) for key, label in zip(batch["keys"], batch["label"])
    }
    for sample in samples:
        meta = json.loads(sample["json"])
        key = keys[meta["index"] % len(keys)]  # sample i takes source item i mod len(source)
        assert meta["source_key"] == key and meta["mode"] == config.mode
        spec = plan.spec(meta["index"]).metadata()
        assert {k: meta[k] for k in spec} == spec  # prompt, seed, style, generation size... as planned
        np.testing.assert_array_equal(_decode_seg(sample["seg.png"]), expected[key])
        assert Image.open(io.BytesIO(sample["png"])).size == size  # the label's size
        np.testing.assert_array_equal(trainer_labels[sample["__key__"]].numpy(), expected[key])  # the trainer reads the same train ids
    return samples


@pytest.mark.slow
def test_controlnet_run_keeps_labels_and_resumes_deterministically(ray_cluster, models, cityscapes, tmp_path):
    root, expected = cityscapes
    keys = sorted(expected)
    condition = {"strength_by_style": DOMAINS}
    config_a = _config("controlnet_seg", models, root, "cityscapes", tmp_path / "a", 5, condition)
    summary = generate(config_a, show_progress=False)
    assert summary.ok and summary.images_generated == 5
    samples = _check_labelled_shards(config_a, expected, keys, (96, 48))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    assert read_manifest(str(tmp_path / "a"))["source_key"].to_pylist() == [keys[i % 3] for i in range(5)]

    # Same config, 3 samples, then extended to 5: the same images, shard 0 untouched by the extension.
    config = _config("controlnet_seg", models, root, "cityscapes", tmp_path / "b", 3, condition)
    assert generate(config, show_progress=False).ok
    shard0 = (tmp_path / "b" / "shards" / "000000.tar").stat().st_mtime_ns
    extended = generate(config, num_samples=5, show_progress=False)
    assert extended.ok and extended.shards_skipped == 1 and extended.images_generated == 2
    assert (tmp_path / "b" / "shards" / "000000.tar").stat().st_mtime_ns == shard0
    assert [(s["__key__"], s["png"], s["seg.png"]) for s in _samples(tmp_path / "b")] == [(s["__key__"], s["png"], s["seg.png"]) for s in samples]
    with pytest.raises(UserError, match="different source"):  # another source config never mixes in
        generate(config.model_copy(update={"condition": ConditionConfig(strength=0.5)}), show_progress=False)


@pytest.mark.slow
def test_img2img_run_from_gta5(ray_cluster, models, tmp_path):
    expected = sourcedata.write_gta5(tmp_path / "gta", n=2, size=(40, 24))
    config = _config("img2img", models, tmp_path / "gta", "gta5", tmp_path / "out", 3, {"strength": 0.7})
    assert generate(config, show_progress=False).ok
    samples = _check_labelled_shards(config, expected, sorted(expected), (40, 24))
    assert len(samples) == 3 and len({s["png"] for s in samples}) == 3


@pytest.mark.parametrize("what", ["missing", "values", "size"])
def test_bad_source_fails_before_generation_starts(models, tmp_path, what):
    sourcedata.write_generic(tmp_path / "src", n=3)
    named = sourcedata.break_generic_item(tmp_path / "src", what)
    config = _config("controlnet_seg", models, tmp_path / "src", "generic", tmp_path / "out", 3, {})
    with pytest.raises(UserError, match="skip_bad") as err:
        generate(config, show_progress=False)
    assert named in str(err.value) and not (tmp_path / "out").exists()


def test_conditioned_run_settings_are_checked_up_front(models, cityscapes, tmp_path):
    root, _ = cityscapes
    config = _config("img2img", models, root, "cityscapes", tmp_path / "out", 3, {"strength": 0.5})
    with pytest.raises(UserError, match="needs a labelled source"):
        generate(config.model_copy(update={"source": None}), show_progress=False)
    typo = ConditionConfig(strength=0.5, strength_by_style={"driving at nigth": 0.9})
    with pytest.raises(UserError, match="'driving at nigth' is not a value of any prompts.styles axis"):
        generate(config.model_copy(update={"condition": typo}), show_progress=False)
    with pytest.raises(UserError, match="below one denoising step"):
        generate(config.model_copy(update={"condition": ConditionConfig(strength=0.2)}), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_source_fingerprint_follows_the_items_not_the_path(tmp_path):
    import shutil

    sourcedata.write_generic(tmp_path / "a", n=3)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")

    def fingerprint(root, **condition):
        source = open_checked_source(SourceConfig(layout="generic", root=str(root)), "controlnet_seg")
        return Conditioner("controlnet_seg", source, ConditionConfig(**condition), num_classes=19).fingerprint

    first = fingerprint(tmp_path / "a")
    assert fingerprint(tmp_path / "moved") == first
    assert fingerprint(tmp_path / "a", controlnet_scale=0.5) != first
    sourcedata.write_generic(tmp_path / "a", n=4)  # one more item: sample i may take another item now
    assert fingerprint(tmp_path / "a") != first
