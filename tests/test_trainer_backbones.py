"""Backbones and heads: SegFormer's MiT encoders from transformers (sizes, feature strides, weights from a
file, a directory or the Hugging Face cache, never the network), the DeepLabV2 head, and the refusals:
no `model.pretrained`, weights that are not there or do not fit, FD on a random backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from dreamshard.cli import app
from dreamshard.config import TrainConfig, TrainModelConfig, load_config
from dreamshard.errors import ConfigError, UserError
from dreamshard.trainer.backbones import MIT_SIZES, mit_config, require_weights
from dreamshard.trainer.model import Segmenter

ROOT = Path(__file__).resolve().parents[1]


def mit_b0(**model) -> Segmenter:
    return Segmenter(TrainModelConfig(backbone="mit_b0", decoder="daformer", embed_dim=16, num_classes=5, **model))


@pytest.fixture(scope="module")
def released_mit_b0(tmp_path_factory):
    """A MiT-B0 image classifier saved the way the hub's nvidia/mit-b0 is (save_pretrained: config.json +
    model.safetensors with the `segformer.` prefix and transformers' stored key names), random weights."""
    from transformers import SegformerForImageClassification

    torch.manual_seed(3)
    model = SegformerForImageClassification(mit_config("mit_b0"))
    folder = tmp_path_factory.mktemp("mit-b0")
    model.save_pretrained(folder)
    return folder, model.segformer.state_dict()


def assert_encoder_holds(segmenter: Segmenter, expected: dict[str, torch.Tensor]) -> None:
    loaded = segmenter.backbone.encoder.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_mit_sizes_match_segformer():
    from transformers import SegformerModel

    # Encoder parameters in millions, SegFormer (Xie et al. 2021) Table 1; one block more or less in any
    # stage moves a count by 0.3M or more.
    published = {"mit_b0": 3.4, "mit_b1": 13.1, "mit_b2": 24.2, "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4}
    for name, millions in published.items():
        with torch.device("meta"):
            encoder = SegformerModel(mit_config(name))
        assert abs(sum(p.numel() for p in encoder.parameters()) / 1e6 - millions) < 0.1, name
    assert list(mit_config("mit_b0").hidden_sizes) == [32, 64, 160, 256]  # nvidia/mit-b0's config
    assert set(MIT_SIZES) == {f"mit_b{i}" for i in range(6)}


def test_mit_features_at_strides_4_to_32_feed_the_heads():
    model = mit_b0(pretrained="none")
    logits, features = model(torch.rand(2, 3, 64, 96), with_features=True)
    assert [tuple(f.shape[1:]) for f in features] == [(32, 16, 24), (64, 8, 12), (160, 4, 6), (256, 2, 3)]
    assert logits.shape == (2, 5, 16, 24)  # DAFormer head: stride 4
    segformer = Segmenter(TrainModelConfig(backbone="mit_b0", pretrained="none", decoder="segformer", embed_dim=16, num_classes=5))
    assert segformer(torch.rand(1, 3, 64, 64)).shape == (1, 5, 16, 16)


def test_deeplabv2_sums_dilated_convs_on_a_dilated_last_stage():
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="deeplabv2", num_classes=5)).eval()
    images = torch.rand(2, 3, 64, 64)
    logits, features = model(images, with_features=True)
    assert [f.shape[-1] for f in features] == [16, 8, 8, 8]  # output stride 8, as DeepLabV2's ResNet
    assert logits.shape == (2, 5, 8, 8)
    head = model.decode_head.branches
    assert [(conv.kernel_size, conv.dilation) for conv in head] == [((3, 3), (d, d)) for d in (6, 12, 18, 24)]
    by_hand = sum(torch.nn.functional.conv2d(features[-1], c.weight, c.bias, padding=c.dilation, dilation=c.dilation) for c in head)
    assert torch.allclose(logits, by_hand, atol=1e-6)
    # DAFormer's / DATUM's "dlv2red": rates 6 and 12 only; a MiT runs it on its stride-32 stage.
    reduced = Segmenter(TrainModelConfig(backbone="mit_b0", pretrained="none", decoder="deeplabv2", dilations=[6, 12], num_classes=5))
    assert len(reduced.decode_head.branches) == 2 and reduced(images).shape == (2, 5, 2, 2)


def test_deeplabv3plus_fuses_aspp_with_the_stride_4_level_and_exposes_its_embedding():
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="deeplabv3plus", embed_dim=16, num_classes=5)).eval()
    images = torch.rand(2, 3, 64, 64)
    logits, features = model(images, with_features=True)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]  # undilated: output stride 32, as ZoDi's ResNet
    assert logits.shape == (2, 5, 16, 16)  # at the stride-4 level
    head = model.decode_head
    assert [branch[0].dilation for branch in head.aspp] == [(1, 1), (6, 6), (12, 12), (18, 18)] and head.low_level[0].out_channels == 48
    same, embedding = model(images, with_embedding=True)
    assert torch.allclose(same, logits) and embedding.shape == (2, 16, 16, 16)
    assert torch.allclose(head.classifier(embedding), logits, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "dinov2", "tiny-dinov2")


def test_dinov2_from_the_tiny_preset_gives_a_pyramid_of_four_levels(tiny_dinov2):
    from transformers import Dinov2Model

    model = Segmenter(TrainModelConfig(backbone="dinov2", pretrained=str(tiny_dinov2), decoder="daformer", embed_dim=16, num_classes=5)).eval()
    reference = Dinov2Model.from_pretrained(tiny_dinov2)
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.encoder.state_dict().values(), reference.state_dict().values()))  # the files' weights
    logits, features = model(torch.rand(2, 3, 60, 90), with_features=True)  # resized up to 64x96, multiples of the patch (8)
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 48), (32, 16, 24), (64, 8, 12), (64, 4, 6)]  # strides 2/4/8/16 patches of 8
    assert model.backbone.layers == [1, 2, 3, 4] and logits.shape == (2, 5, 32, 48)
    with pytest.raises(UserError, match="width 64, not dinov2_small"):
        Segmenter(TrainModelConfig(backbone="dinov2_small", pretrained=str(tiny_dinov2), num_classes=5))
    require_weights(TrainModelConfig(backbone="dinov2_large", pretrained=str(tiny_dinov2)))  # a directory: fine
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        require_weights(TrainModelConfig(backbone="dinov2_large", pretrained="facebook/dinov2-large"))


def test_mit_weights_from_a_safetensors_file_a_directory_or_the_hf_cache(released_mit_b0, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, expected = released_mit_b0
    assert_encoder_holds(mit_b0(pretrained=str(folder / "model.safetensors")), expected)
    assert_encoder_holds(mit_b0(pretrained=str(folder)), expected)
    # The hub id, found in the Hugging Face cache (its on-disk layout), with no network.
    snapshot = tmp_path / "hub" / "models--nvidia--mit-b0" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "hub" / "models--nvidia--mit-b0" / "refs").mkdir()
    (tmp_path / "hub" / "models--nvidia--mit-b0" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = TrainModelConfig(backbone="mit_b0", pretrained="nvidia/mit-b0", embed_dim=16, num_classes=5)
    require_weights(config)
    assert_encoder_holds(Segmenter(config), expected)
    # Random initialisation differs from them, and only when asked for.
    assert not torch.equal(mit_b0(pretrained="none").backbone.encoder.stages[0].patch_embeddings.proj.weight, expected["stages.0.patch_embeddings.proj.weight"])


def test_weights_that_are_missing_or_do_not_fit_are_one_line(released_mit_b0, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, expected = released_mit_b0
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cases = {
        "unset": (TrainModelConfig(backbone="mit_b5"), "model.pretrained is not set.*nvidia/mit-b5.*model.pretrained: none"),
        "not cached": (TrainModelConfig(backbone="mit_b5", pretrained="nvidia/mit-b5"), "not in the Hugging Face cache.*hf download nvidia/mit-b5"),
        "no file": (TrainModelConfig(backbone="test_resnet", pretrained=str(tmp_path / "w.pth")), "file not found"),
    }
    for case, (config, message) in cases.items():
        with pytest.raises(UserError, match=message) as err:
            require_weights(config)
        assert "\n" not in str(err.value), case
    partial = {name: tensor for name, tensor in expected.items() if not name.startswith("stages.3.")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=r"lacks \d+ of the mit_b0 encoder's tensors"):
        mit_b0(pretrained=str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="does not fit model.backbone mit_b1"):
        Segmenter(TrainModelConfig(backbone="mit_b1", pretrained=str(folder / "model.safetensors"), num_classes=5))


def test_feature_distance_refuses_a_random_backbone():
    with pytest.raises(ConfigError, match=r"uda.fd.enabled needs pretrained backbone weights \(model.pretrained\)"):
        load_config(ROOT / "configs" / "train_dacs.yaml", TrainConfig, ["model.pretrained=none"])
    assert load_config(ROOT / "configs" / "train_dacs.yaml", TrainConfig, ["model.pretrained=none", "uda.fd.enabled=false"]).model.random_init


def test_train_dacs_without_weights_ends_with_one_line_about_model_pretrained(tmp_path, monkeypatch):
    """The shipped DATUM config on a machine whose Hugging Face cache lacks nvidia/mit-b5: one line, exit 2,
    before any data is read or anything is written."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)  # the config's relative data and output paths land here
    config = str(ROOT / "configs" / "train_dacs.yaml")
    for extra in ([], ["--set", "model.pretrained=null"], ["--set", "model.pretrained=none"]):
        result = CliRunner().invoke(app, ["train", config, *extra])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "model.pretrained" in lines[0] and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())  # no output directory, nothing else either


def test_the_datum_configs_chain_by_path():
    """personalize → generate → train: each config reads where the one before writes, generation from
    DreamBooth step 200 (DATUM's default checkpoint)."""
    from dreamshard.config import GenerateConfig, PersonalizeConfig

    personalize = load_config(ROOT / "configs" / "personalize_datum.yaml", PersonalizeConfig)
    generate = load_config(ROOT / "configs" / "datum_gta2cityscapes.yaml", GenerateConfig)
    train = load_config(ROOT / "configs" / "train_dacs.yaml", TrainConfig)
    assert 200 % personalize.output.checkpoint_every == 0 and personalize.train.max_steps > 200
    assert generate.model.path == f"{personalize.output.path}/checkpoint-200"
    assert train.data.target.shards.path == generate.output.path
    assert (train.model.backbone, train.model.decoder, train.uda.fd.enabled) == ("mit_b5", "daformer", True)
    assert (train.uda.ignore_top, train.uda.ignore_bottom, train.eval_interval, train.max_iters) == (15, 120, 2000, 40000)
    assert json.dumps(train.model_dump(mode="json"))
