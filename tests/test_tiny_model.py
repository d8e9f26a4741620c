"""Tiny random-weight models: complete pipeline directories, loadable in a separate process, fast,
deterministic; and the model loader's behaviour on good and bad input."""

import hashlib
import json
import subprocess
import sys
import time

import pytest
import torch

from dreamshard.config import ModelConfig
from dreamshard.engine.models import load_pipeline, model_fingerprint
from dreamshard.engine.tiny import build_tiny_model, build_tokenizer
from dreamshard.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", seed=0)


def weight_digest(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*.safetensors"))}


def test_directory_is_complete_and_uses_safetensors(tiny):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny / part).is_dir(), part
    assert (tiny / "model_index.json").is_file()
    assert len(list(tiny.rglob("*.safetensors"))) == 3
    assert not list(tiny.rglob("*.bin")) and not list(tiny.rglob("*.pt"))


def test_loads_in_a_separate_process_and_generates(tiny):
    code = (
        "import sys, torch; from diffusers import StableDiffusionPipeline;"
        "p = StableDiffusionPipeline.from_pretrained(sys.argv[1]);"
        "img = p('a photo of a sks car', num_inference_steps=2, height=64, width=64,"
        " generator=torch.Generator().manual_seed(0)).images[0];"
        "print(img.size)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(64, 64)" in out.stdout


def test_same_seed_same_weights_other_seed_differs(tiny, tmp_path):
    again = build_tiny_model(tmp_path / "again", "tiny", seed=0)
    other = build_tiny_model(tmp_path / "other", "tiny", seed=1)
    assert weight_digest(again) == weight_digest(tiny)
    assert weight_digest(other) != weight_digest(tiny)
    assert model_fingerprint(again) == model_fingerprint(tiny)
    assert model_fingerprint(other) != model_fingerprint(tiny)


def test_generation_is_deterministic_per_seed(tiny):
    pipe = load_pipeline(ModelConfig(path=str(tiny)))  # one torch thread (conftest)

    def image(seed):
        gen = torch.Generator().manual_seed(seed)
        return pipe("a photo of a sks car", num_inference_steps=4, height=64, width=64, generator=gen, output_type="np").images[0]

    first = image(3)
    start = time.perf_counter()
    second = image(3)
    seconds = time.perf_counter() - start
    assert (first == second).all()
    assert not (first == image(4)).all()
    print(f"tiny 64x64, 4 steps, 1 thread: {seconds:.3f} s")  # reported, not asserted (see bench/)


def test_tokenizer_gives_common_words_one_token(tmp_path):
    tok = build_tokenizer(tmp_path)
    ids = tok("a photo of a sks car at night").input_ids
    assert len(ids) == 2 + 8  # start, 8 words, end
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of a sks car at night"
    assert len(tok("an unusual wordxyz").input_ids) > 4  # unknown words fall back to characters


def test_controlnet_preset_matches_tiny_unet(tmp_path, tiny):
    from diffusers import ControlNetModel, UNet2DConditionModel

    cn = ControlNetModel.from_pretrained(build_tiny_model(tmp_path / "cn", "tiny-controlnet"))
    unet = UNet2DConditionModel.from_pretrained(tiny / "unet")
    assert cn.config.block_out_channels == unet.config.block_out_channels
    assert cn.config.cross_attention_dim == unet.config.cross_attention_dim


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++", "unipc"])
def test_scheduler_by_name(tiny, name):
    pipe = load_pipeline(ModelConfig(path=str(tiny), scheduler=name))
    expected = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
    assert type(pipe.scheduler).__name__ == expected[name]
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32  # fp32 on CPU


def test_missing_and_invalid_model_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist.*tiny-model"):
        load_pipeline(ModelConfig(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model_index.json"):
        load_pipeline(ModelConfig(path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="not found or incomplete.*local_files_only"):
        load_pipeline(ModelConfig(path="nobody/no-such-model", local_files_only=True))


def test_fingerprint_covers_the_pipeline_not_files_kept_beside_it(tmp_path, tiny):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    before = model_fingerprint(copy)
    (copy / "checkpoint-5").mkdir()
    (copy / "checkpoint-5" / "note.json").write_text("{}")
    (copy / "train_log.jsonl").write_text('{"step": 1}\n')
    assert model_fingerprint(copy) == before
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    config["steps_offset"] = 0
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != before


def test_model_identity_includes_lora_and_controlnet_content(tmp_path, tiny):
    from dreamshard.engine.models import model_identity

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"first")
    first = model_identity(ModelConfig(path=str(tiny), lora=str(lora)))
    lora.write_bytes(b"second")
    second = model_identity(ModelConfig(path=str(tiny), lora=str(lora)))
    assert first["hash"] == second["hash"] == model_fingerprint(tiny)
    assert first["loras"] != second["loras"] and first["loras"][0]["scale"] == 1.0
    assert model_identity(ModelConfig(path=str(tiny)))["loras"] == []
