"""Hub models are fingerprinted by the content of their snapshot in the local Hugging Face cache, with its
commit: a cache laid out as `huggingface_hub` lays it out (models--org--name/{refs,snapshots}), built here
from the tiny model, no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dreamshard.config import ModelConfig
from dreamshard.engine.models import load_pipeline, model_fingerprint, model_identity
from dreamshard.errors import UserError

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch) -> Path:
    """`org/tiny` cached at two commits (B has other UNet weights), refs/main → A."""
    from huggingface_hub import constants
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit in (COMMIT_A, COMMIT_B):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
    weights = next((repo / "snapshots" / COMMIT_B / "unet").glob("*.safetensors"))
    save_file({name: tensor + 0.5 for name, tensor in load_file(weights).items()}, weights)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_a_hub_id_is_fingerprinted_by_its_cached_snapshot_and_commit(hub_cache):
    main = model_identity(ModelConfig(path="org/tiny"))
    assert main["revision"] == COMMIT_A and main["hash"] == model_fingerprint(hub_cache / "snapshots" / COMMIT_A)
    pinned = model_identity(ModelConfig(path="org/tiny", revision=COMMIT_B))
    assert pinned["revision"] == COMMIT_B and pinned["hash"] != main["hash"]
    (hub_cache / "refs" / "main").write_text(COMMIT_B)  # the branch moved on: same name, other weights
    assert model_identity(ModelConfig(path="org/tiny"))["hash"] == pinned["hash"]


def test_a_cached_hub_id_loads_offline_and_a_missing_one_is_one_line(hub_cache):
    pipe = load_pipeline(ModelConfig(path="org/tiny", device="cpu"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    with pytest.raises(UserError, match="'org/absent' is not in this machine's Hugging Face cache"):
        model_identity(ModelConfig(path="org/absent"))  # nothing to hash: refused before any worker starts
    with pytest.raises(UserError, match="cannot load model 'org/absent'.*local Hugging Face cache"):
        load_pipeline(ModelConfig(path="org/absent", device="cpu"))
