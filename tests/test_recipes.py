"""The ZoDi and DIDEX generation recipes on tiny models: stochastic inversion against a direct computation
with the UNet, DDIM eta, the 34-class Cityscapes colour map, every (item, domain) pair once, depth2img with
its tiny depth estimator, and `{classes}` from each sample's label; the configs that use them."""

import collections
import glob
import io
import json
from pathlib import Path

import numpy as np
import pytest
import sourcedata
import torch
import webdataset as wds
from diffusers import PNDMScheduler, StableDiffusionDepth2ImgPipeline
from PIL import Image

from dreamshard.config import ConditionConfig, GenerateConfig, ModelConfig, PromptsConfig, SamplingConfig, SourceConfig, load_config
from dreamshard.datasets.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_LABEL_COLOURS, CLASSES, PALETTE
from dreamshard.engine.conditioned import Conditioner, check_settings, conditioner_for, open_checked_source
from dreamshard.engine.generation import SampleStamp, check_scheduler_takes_eta, seeded_generators, txt2img
from dreamshard.engine.inversion import stochastic_inversion
from dreamshard.engine.models import load_pipeline
from dreamshard.engine.plan import build_plan
from dreamshard.engine.run import generate
from dreamshard.engine.tiny import build_tiny_model
from dreamshard.errors import UserError
from dreamshard.format.reader import read_manifest

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["driving at night", "driving in snow", "driving in fog"]
SAMPLING = SamplingConfig(width=64, height=64, steps=4, guidance_scale=2.0)
STAMP = SampleStamp({"scheduler": "ddim", "model": {}, "mode": "test"}, ("domain",))
# cityscapesScripts helpers/labels.py: label id -> colour, for the ids the colour-map test writes
CITYSCAPES_SCRIPTS_COLOURS = {
    0: (0, 0, 0), 5: (111, 74, 0), 6: (81, 0, 81), 7: (128, 64, 128), 9: (250, 170, 160), 14: (180, 165, 180),
    26: (0, 0, 142), 29: (0, 0, 90), 33: (119, 11, 32),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-models")
    return {"sd": tiny_model, "controlnet": build_tiny_model(root / "cn", "tiny-controlnet"), "depth": build_tiny_model(root / "depth", "tiny-depth")}


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """3 items whose labels also hold ignored ids with their own colours (dynamic, ground, parking, guard rail, caravan)."""
    root = tmp_path_factory.mktemp("cityscapes")
    expected = sourcedata.write_cityscapes(root, n=3, size=(96, 48), values=tuple(CITYSCAPES_SCRIPTS_COLOURS))
    return root, expected


def _source(root, mode="controlnet_seg", **settings):
    return open_checked_source(SourceConfig(layout="cityscapes", root=str(root), **settings), mode)


def _prompts(**settings) -> PromptsConfig:
    return PromptsConfig(**{"templates": [{"text": "{domain}, best quality"}], "styles": {"domain": DOMAINS}, **settings})


def _classes_of(train_ids: np.ndarray) -> str:
    """DIDEX: np.unique of the train-id label, 255 dropped, Cityscapes names joined by ', '."""
    return ", ".join(CLASSES[i] for i in np.unique(train_ids) if i != 255)


# ------------------------------------------------------------------------------------ stochastic inversion


def _direct_inversion(pipe, samples, specs, timestep: int, control: bool):
    """ZoDi's update written out: x~_t = √ᾱ x0 + √(1-ᾱ) n, ε = ε_θ(x~_t, t, c), x_t = √ᾱ x0 + √(1-ᾱ) ε, with each
    sample's generator drawing the VAE sample and then n. Returns (x_t, x~_t, the generators after that)."""
    generators = seeded_generators(specs)
    pixels = [torch.from_numpy(np.asarray(s.image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None] for s in samples]
    with torch.no_grad():
        x0 = torch.cat([pipe.vae.encode(p).latent_dist.sample(generator=g) for p, g in zip(pixels, generators)]) * pipe.vae.config.scaling_factor
        noise = torch.cat([torch.randn(x0[:1].shape, generator=g) for g in generators])
        abar = pipe.scheduler.alphas_cumprod[timestep]
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        tokens = pipe.tokenizer([s.prompt for s in specs], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(tokens)[0]
        residuals = {}
        if control:
            hint = torch.stack([torch.from_numpy(np.asarray(s.control, dtype=np.float32) / 255).permute(2, 0, 1) for s in samples])
            down, mid = pipe.controlnet(noisy, timestep, encoder_hidden_states=embeds, controlnet_cond=hint, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        eps = pipe.unet(noisy, timestep, encoder_hidden_states=embeds, **residuals).sample
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, noisy, generators


@pytest.mark.parametrize("mode, at", [("controlnet_seg", "first_step"), ("img2img", "first_step"), ("controlnet_seg", "zodi")])
def test_stochastic_inversion_is_zodis_update_and_the_run_starts_from_it(models, cityscapes, mode, at):
    root, _ = cityscapes
    condition = ConditionConfig(strength=0.75, init_noise="stochastic_inversion", palette="cityscapes_color", inversion_timestep=at)
    conditioner = Conditioner(mode, _source(root, mode), condition, 19, _prompts())
    specs = build_plan(_prompts(), SAMPLING, seed=3).specs(0, 2)
    samples = [conditioner.prepare(spec) for spec in specs]
    pipe = conditioner.pipeline_for(load_pipeline(ModelConfig(path=str(models["sd"]), controlnet=str(models["controlnet"]), scheduler="ddim"), mode), samples)
    kwargs = conditioner.pipeline_kwargs(samples)

    inverted = stochastic_inversion(
        pipe, kwargs["image"], [s.prompt for s in specs], seeded_generators(specs), 4, 0.75, control=kwargs.get("control_image"), at=at
    )
    pipe.scheduler.set_timesteps(4)
    first_step = int(pipe.scheduler.timesteps[4 - int(4 * 0.75)])  # the first of int(steps x strength) denoising steps
    timestep = 750 if at == "zodi" else first_step  # ZoDi's code: int(strength x 1000)
    assert first_step != 750
    direct, noisy, generators = _direct_inversion(pipe, samples, specs, timestep, control=mode == "controlnet_seg")
    torch.testing.assert_close(inverted, direct)
    assert (inverted - noisy).abs().mean() > 0.05  # not the random-noise start (SDEdit)

    # The run starts denoising from that latent, its DDIM noise (eta 1) drawn from the same generators.
    made = conditioner.call(pipe, samples, specs, eta=1.0)
    call = dict(kwargs, latents=direct, generator=generators, eta=1.0, num_inference_steps=4, guidance_scale=2.0)
    started_there = pipe(prompt=[s.prompt for s in specs], negative_prompt=[""] * 2, **call).images
    for got, want in zip(made, started_there):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    random_start = Conditioner(mode, _source(root, mode), condition.model_copy(update={"init_noise": "random"}), 19).call(pipe, samples, specs, eta=1.0)
    assert any(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() > 1 for a, b in zip(made, random_start))


def test_eta_reaches_ddim_and_is_refused_where_ignored(models):
    specs = build_plan(_prompts(), SAMPLING, seed=1).specs(0, 2)
    pipe = load_pipeline(ModelConfig(path=str(models["sd"]), scheduler="ddim"))

    def pixels(**sampler):
        return [np.asarray(s.image) for s in txt2img(pipe, specs, STAMP, **sampler).samples]

    default, eta0, eta1 = pixels(), pixels(eta=0.0), pixels(eta=1.0)
    assert all((a == b).all() for a, b in zip(default, eta0))  # eta 0: what the engine always did
    assert not all((a == b).all() for a, b in zip(default, eta1))
    with pytest.raises(UserError, match="PNDMScheduler; set model.scheduler: ddim"):
        check_scheduler_takes_eta(PNDMScheduler(), 1.0)  # the tiny model's own: it has no eta
    check_scheduler_takes_eta(PNDMScheduler(), 0.0)
    with pytest.raises(UserError, match="sampling.eta = 1 is DDIM's eta, but model.scheduler is euler"):
        check_settings(GenerateConfig(model={"scheduler": "euler"}, sampling={"eta": 1.0}))
    plain, with_eta = build_plan(_prompts(), SAMPLING, 0), build_plan(_prompts(), SAMPLING.model_copy(update={"eta": 1.0}), 0)
    assert "eta" not in plain.describe()["sampling"] and with_eta.describe()["sampling"]["eta"] == 1.0
    assert plain.fingerprint != with_eta.fingerprint


# --------------------------------------------------------------------------------------- colour map, pairs


def test_cityscapes_color_palette_colours_the_34_label_ids(cityscapes, tmp_path):
    root, _ = cityscapes
    assert len(CITYSCAPES_LABEL_COLOURS) == 34
    assert all(CITYSCAPES_LABEL_COLOURS[raw] == PALETTE[train] for raw, train in CITYSCAPES_ID_TO_TRAIN_ID.items())
    spec = build_plan(_prompts(), SAMPLING, 0).spec(0)
    source = _source(root)
    item = source.item_for(0)
    raw = np.asarray(Image.open(item.label))
    colours = np.zeros((256, 3), dtype=np.uint8)
    for label_id, colour in CITYSCAPES_SCRIPTS_COLOURS.items():
        colours[label_id] = colour
    expected = np.asarray(Image.fromarray(colours[raw]).resize((64, 64), Image.Resampling.NEAREST))
    control = np.asarray(Conditioner("controlnet_seg", source, ConditionConfig(palette="cityscapes_color"), 19).prepare(spec).control)
    np.testing.assert_array_equal(control, expected)
    default = np.asarray(Conditioner("controlnet_seg", source, ConditionConfig(), 19).prepare(spec).control)
    parking = np.all(expected == (250, 170, 160), axis=-1)
    assert parking.any() and (default[parking] == 0).all()  # the 19-class map shows ignored ids black
    sourcedata.write_generic(tmp_path / "generic", n=2)
    generic = open_checked_source(SourceConfig(layout="generic", root=str(tmp_path / "generic")), "controlnet_seg")
    with pytest.raises(UserError, match="colours Cityscapes label ids, but this source's labels are read as train_ids"):
        Conditioner("controlnet_seg", generic, ConditionConfig(palette="cityscapes_color"), 19)


def test_every_item_meets_every_domain_once_in_a_prefix_stable_order(cityscapes, tmp_path):
    root, _ = cityscapes
    prompts = _prompts(pair_items_with="domain", styles={"domain": DOMAINS, "weather": ["rain", "sun"]})
    conditioner = Conditioner("controlnet_seg", _source(root), ConditionConfig(), 19, prompts)
    specs = build_plan(prompts, SAMPLING, 4).specs(0, 9)
    pairs = [(conditioner.source.item_for(conditioner.item_index(s.index)).key, s.style["domain"]) for s in specs]
    keys = [item.key for item in conditioner.source.items]
    assert collections.Counter(pairs) == collections.Counter((key, domain) for key in keys for domain in DOMAINS)
    assert [key for key, _ in pairs[:3]] == [keys[0]] * 3  # item by item: any prefix of whole items is balanced
    later = build_plan(prompts, SAMPLING, 4)
    assert later.specs(5, 9) == specs[5:] and later.specs(0, 2) == specs[:2]
    assert "pair_items_with" not in build_plan(_prompts(), SAMPLING, 4).describe()  # old plans keep their fingerprint

    config = GenerateConfig(mode="controlnet_seg", prompts=prompts, source={"root": str(root)}, run={"num_samples": 8}, model={"controlnet": "cn"})
    with pytest.raises(UserError, match="set run.num_samples to 9"):
        conditioner_for(config)
    with pytest.raises(UserError, match="'time' is not a prompts.styles axis"):
        build_plan(_prompts(pair_items_with="time"), SAMPLING, 0)
    two = [{"text": "{domain}, best quality"}, {"text": "a street at {weather}"}]
    with pytest.raises(UserError, match=r"templates\[1\] 'a street at \{weather\}' does not print \{domain\}"):
        build_plan(_prompts(pair_items_with="domain", templates=two, styles={"domain": DOMAINS, "weather": ["x"]}), SAMPLING, 0)
    with pytest.raises(UserError, match="needs a conditioned mode"):
        check_settings(GenerateConfig(prompts=prompts))


# ----------------------------------------------------------------------------------- depth2img, {classes}


def test_classes_placeholder_lists_each_labels_classes_in_didex_wording(cityscapes):
    root, expected = cityscapes
    prompts = _prompts(templates=[{"text": "A high quality photo; {domain}, {classes}"}, {"text": "{{classes}} {domain}: {classes}"}])
    conditioner = Conditioner("img2img", _source(root, "img2img"), ConditionConfig(strength=0.5), 19, prompts)
    plan = build_plan(prompts, SAMPLING, 2)
    specs = plan.specs(0, 12)
    assert {s.template for s in specs} == {t.text for t in prompts.templates}
    for spec in specs:
        sample = conditioner.prepare(spec)
        classes = _classes_of(expected[sample.key])
        domain = spec.style["domain"]
        wanted = f"A high quality photo; {domain}, {classes}" if spec.template.startswith("A") else f"{{classes}} {domain}: {classes}"
        assert sample.spec.prompt == wanted
        assert sample.spec == spec.__class__(**{**spec.metadata(), "prompt": wanted})  # only the prompt is filled in
    assert "{classes}" in plan.spec(0).prompt  # the plan leaves it to the label
    with pytest.raises(UserError, match=r"\{classes\} and \{least_class\} name classes .* need a conditioned mode"):
        check_settings(GenerateConfig(prompts=prompts))
    with pytest.raises(UserError, match="source.num_classes is 16"):
        Conditioner("img2img", _source(root, "img2img"), ConditionConfig(strength=0.5), 16, prompts)


def test_least_generated_class_is_didexs_running_count():
    """By hand: counts += the classes present in each label, then the lowest count (ties: lowest id) is named
    and counted once more; excluded classes start at 1e14."""
    from dreamshard.engine.prompts import least_generated_classes

    presence = [np.array(p, dtype=bool) for p in ([1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0])]
    assert least_generated_classes(presence) == [2, 1, 2, 0]
    assert least_generated_classes(presence, excluded=[2]) == [0, 1, 1, 0]


def test_least_class_placeholder_names_the_rarest_class_so_far_from_the_labels(cityscapes):
    root, expected = cityscapes
    prompts = _prompts(templates=[{"text": "{domain}, {least_class}, {classes}"}], least_class_exclude=["terrain"])
    source = _source(root, "img2img")
    conditioner = Conditioner("img2img", source, ConditionConfig(strength=0.5), 19, prompts, num_samples=9)
    counts = np.zeros(19)
    counts[CLASSES.index("terrain")] = 1e14
    for spec in build_plan(prompts, SAMPLING, 2).specs(0, 9):
        sample = conditioner.prepare(spec)
        counts[[i for i in np.unique(expected[sample.key]) if i != 255]] += 1
        least = int(np.argmin(counts))
        counts[least] += 1
        assert sample.spec.prompt == f"{spec.style['domain']}, {CLASSES[least]}, {_classes_of(expected[sample.key])}"
    with pytest.raises(UserError, match="least_class_exclude: unknown class 'trees'"):
        Conditioner("img2img", source, ConditionConfig(strength=0.5), 19, _prompts(templates=[{"text": "{least_class}"}], least_class_exclude=["trees"]), 3)


def test_depth2img_needs_a_depth_model_and_the_tiny_one_loads_from_disk(models, cityscapes):
    with pytest.raises(UserError, match="4 latent \\+ 1 depth channels.*takes 4"):
        load_pipeline(ModelConfig(path=str(models["sd"])), "depth2img")
    with pytest.raises(UserError, match="depth2img needs condition.strength"):
        Conditioner("depth2img", _source(cityscapes[0], "depth2img"), ConditionConfig(), 19)
    with pytest.raises(UserError, match="stochastic_inversion works in modes img2img and controlnet_seg, not depth2img"):
        check_settings(GenerateConfig(mode="depth2img", condition={"init_noise": "stochastic_inversion"}))
    depth = models["depth"]
    assert (depth / "depth_estimator" / "model.safetensors").is_file() and (depth / "feature_extractor" / "preprocessor_config.json").is_file()
    assert not list(depth.rglob("*.bin")) and not list(depth.rglob("*.pt"))
    # Loaded from disk alone (the run test below loads it in Ray worker processes through load_pipeline).
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(depth)
    assert pipe.unet.config.in_channels == 5 and type(pipe.depth_estimator).__name__ == "DPTForDepthEstimation"
    image = pipe("a street", image=Image.new("RGB", (64, 48), "gray"), strength=0.7, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[
        0
    ]
    assert image.size == (64, 48)


def test_transformers_dpt_hybrid_takes_only_square_inputs(models):
    """Why depth2img keeps diffusers' 384x384 depth input instead of DIDEX's aspect-kept one (384x640 for its
    padded 960x576 GTA5 image): transformers' DPTForDepthEstimation (here the tiny ViT one; SD-2-depth's
    DPT-Hybrid takes the same path) reshapes its tokens to a square grid. If this ever passes a non-square
    input, docs/reproduce.md's DIDEX difference can go."""
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(models["depth"])
    with pytest.raises(RuntimeError, match="invalid for input"):
        pipe.depth_estimator(torch.rand(1, 3, 192, 384))


@pytest.mark.slow
def test_depth2img_run_keeps_labels_and_names_their_classes(ray_cluster, models, tmp_path):
    expected = sourcedata.write_gta5(tmp_path / "gta", n=2, size=(40, 24))
    keys = sorted(expected)
    template = "A high quality photo; {location};City, {classes}"
    config = GenerateConfig.model_validate(
        {
            "mode": "depth2img",
            "model": {"path": str(models["depth"]), "device": "cpu", "scheduler": "ddim"},
            "source": {"layout": "gta5", "root": str(tmp_path / "gta")},
            "condition": {"strength": 0.7},
            "prompts": {"templates": [{"text": template}], "styles": {"location": ["europe", "germany"]}, "pair_items_with": "location"},
            "sampling": {"width": 64, "height": 64, "steps": 3, "guidance_scale": 2.0, "eta": 0.5},
            "output": {"path": str(tmp_path / "out"), "samples_per_shard": 3, "image_format": "png"},
            "run": {"num_samples": 4, "batch_size": 2, "workers": 1, "seed": 5},
        }
    )
    summary = generate(config, show_progress=False)
    assert summary.ok and summary.images_generated == 4
    pairs = []
    for sample in wds.WebDataset(sorted(glob.glob(f"{tmp_path}/out/shards/*.tar")), shardshuffle=False):
        meta = json.loads(sample["json"])
        key = keys[meta["index"] // 2]  # pair_items_with: item i // 2 with location i mod 2
        assert meta["source_key"] == key and meta["mode"] == "depth2img" and meta["template"] == template
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["seg.png"]))), expected[key])
        assert meta["prompt"] == f"A high quality photo; {meta['style']['location']};City, {_classes_of(expected[key])}" == sample["txt"].decode()
        assert Image.open(io.BytesIO(sample["png"])).size == (40, 24)
        pairs.append((key, meta["style"]["location"]))
    assert sorted(pairs) == [(key, location) for key in keys for location in ("europe", "germany")]
    assert read_manifest(str(tmp_path / "out"))["prompt"].to_pylist()[0].endswith(_classes_of(expected[keys[0]]))


# ------------------------------------------------------------------------------------------------ configs


def test_zodi_and_didex_configs_use_the_recipes(monkeypatch):
    monkeypatch.chdir(REPO)
    zodi = load_config(REPO / "configs/zodi_controlnet.yaml", GenerateConfig)
    assert (zodi.condition.init_noise, zodi.sampling.eta, zodi.condition.palette, zodi.model.scheduler) == (
        "stochastic_inversion",
        1.0,
        "cityscapes_color",
        "ddim",
    )
    assert zodi.prompts.pair_items_with == "domain" and zodi.run.num_samples == 2975 * len(zodi.prompts.styles["domain"])
    assert set(zodi.condition.strength_by_style) == set(zodi.prompts.styles["domain"])
    check_settings(zodi)
    for path in sorted(REPO.glob("configs/didex_*.yaml")):
        didex = load_config(path, GenerateConfig)
        assert didex.mode == "depth2img" and all("{classes}" in t.text for t in didex.prompts.templates), path.name
        assert (didex.condition.strength, didex.sampling.steps, didex.sampling.guidance_scale, didex.sampling.eta) == (0.9, 25, 9.0, 0.0)
        check_settings(didex)
        specs = build_plan(didex.prompts, didex.sampling, didex.run.seed).specs(0, 20)
        assert all(spec.prompt.startswith("A high quality photo; ") for spec in specs)


def test_paper_configs_as_the_papers_code_runs_them(monkeypatch):
    """Training in fp32 (DAFormer/DATUM/ZoDi), GTA5 read with skip_bad (a few labels do not fit their image),
    PNG where ZoDi, DIDEX and CLOUDS saved PNG, the HF cache only, ZoDi's inversion timestep, DATUM's prompts,
    and every config a config's comments name exists."""
    import re

    from dreamshard.config import TrainConfig

    monkeypatch.chdir(REPO)
    for path in sorted(REPO.glob("configs/train_*.yaml")):
        train = load_config(path, TrainConfig)
        assert train.precision == "fp32" and train.uda.strong_augment == "daformer", path.name
        assert train.model.decoder in ("deeplabv2", "deeplabv3plus") or train.model.head_init == "daformer", path.name  # deeplab heads: their own init
        for domain in (train.data.source, train.data.target):
            if domain is not None and domain.folder is not None and domain.folder.layout == "gta5":
                assert domain.folder.skip_bad, path.name
    for name in ("zodi_controlnet", "didex_depth", "didex_styles", "clouds_prompts"):
        config = load_config(REPO / f"configs/{name}.yaml", GenerateConfig)
        assert config.output.image_format == "png" and config.model.local_files_only, name
    assert load_config(REPO / "configs/zodi_controlnet.yaml", GenerateConfig).condition.inversion_timestep == "zodi"
    datum = load_config(REPO / "configs/datum_gta2cityscapes.yaml", GenerateConfig)
    specs = build_plan(datum.prompts, datum.sampling, datum.run.seed).specs(0, 11)
    plurals = ["traffic lights", "traffic signs", "persons", "riders", "cars", "trucks", "trains", "buses", "motorcycles", "bicycles"]
    assert [spec.prompt for spec in specs] == [f"a photo of sks {p}" for p in plurals + plurals[:1]]  # generate_dreambooth.py: prompt j % 10
    assert specs[7].class_name == "bus" and specs[4].class_name == "car"  # the trainer's class names
    for path in sorted(REPO.glob("configs/*.yaml")):
        for named in re.findall(r"configs/[\w.-]+\.yaml", path.read_text()):
            assert (REPO / named).is_file(), f"{path.name} names {named}"


def test_class_words_are_checked():
    with pytest.raises(UserError, match="class_words: unknown class 'cars'"):
        build_plan(PromptsConfig(classes=["car"], class_words={"cars": "cars"}), SAMPLING, seed=0)


def test_stochastic_inversion_refuses_an_sdxl_pipeline_in_one_line(tiny_sdxl):
    pipe = load_pipeline(ModelConfig(path=str(tiny_sdxl), device="cpu"), "img2img")
    image = Image.new("RGB", (64, 64), "gray")
    with pytest.raises(UserError, match="built for SD 1.x/2.x pipelines .*StableDiffusionXLImg2ImgPipeline"):
        stochastic_inversion(pipe, [image], ["a street"], [torch.Generator().manual_seed(0)], steps=2, strength=0.5)


def test_plan_lists_the_source_and_checks_the_pairing(cityscapes, tmp_path):
    """`dreamshard plan` on the ZoDi recipe, without its model: the source is listed (3 items here), so a
    num_samples that does not pair each item once with each domain is refused as generate would refuse it."""
    from typer.testing import CliRunner

    from dreamshard.cli import app

    root, _ = cityscapes
    config, domains = (
        str(REPO / "configs/zodi_controlnet.yaml"),
        len(load_config(REPO / "configs/zodi_controlnet.yaml", GenerateConfig).prompts.styles["domain"]),
    )

    def plan(*sets):
        result = CliRunner().invoke(app, ["plan", config, "--out", str(tmp_path / "zodi"), "--set", f"source.root={root}", *sets])
        return result.exit_code, result.output

    code, output = plan("--set", f"run.num_samples={3 * domains}")
    assert code == 0 and "generate would: fresh" in output and "source: 3 cityscapes items listed" in output, output
    code, output = plan()  # the shipped 2975 x domains
    assert code == 2 and f"set run.num_samples to {3 * domains}" in output and "Traceback" not in output, output
    code, output = plan("--set", f"source.root={tmp_path / 'elsewhere'}")  # not on this machine: planned, with a note
    assert code == 0 and "the source was not listed" in output, output
    (tmp_path / "empty").mkdir()
    code, output = plan("--set", f"source.root={tmp_path / 'empty'}")  # here, but no cityscapes images
    assert code == 2 and "a cityscapes source needs leftImg8bit/train" in output and "Traceback" not in output, output
