"""GPU generation throughput: the engine's whole run against a bare diffusers loop in the same run, with the
GPU's utilisation sampled while each runs, img/s per GPU and model FLOPs utilisation.

Default (sized for a short GPU loan: a few minutes on one H100): the `sd15` shape (SD 1.5's architecture,
random weights built once under bench/out: the GPU machine cannot reach a hub) at 512x512, 25 steps,
float16, batch 8, guidance 7.5 (classifier-free guidance: the UNet sees 16 latents per call), compile off.
`--full`: also the `sdxl` shape at 1024x1024, compile off and on, and each speed option. `--smoke`: the `tiny`
shape at 64x64, 2 steps, float32, batch 2, on the CPU: it keeps this script working where there is no GPU
(tests/test_bench_gpu.py runs it).

Per shape, in one process on one device:
- bare: `AutoPipelineForText2Image.from_pretrained` and its own `__call__` (diffusers' defaults: SDPA
  attention), per-sample CPU generators as the engine uses, PIL output; img/s over --batches batches after
  one warm-up batch (which pays torch.compile, when on).
- engine: `dreamshard generate` on an embedded Ray, one worker on the device, --batches + 1 shards of one
  call each. `engine img/s` is its whole run without the warm-up shard (the one whose call took longest, as
  the bare loop's first): its images over the worker's time from ready to the end less that shard's, so
  JPEG encoding, tar writing, commits and the driver all count; `in calls` is the rate inside its pipeline
  calls only, and `busy` the share of the worker's time inside them (stats.jsonl).
- GPU util: the mean of `nvidia-smi`'s utilisation.gpu sampled every 0.2 s while each side runs.
- MFU: FLOPs per image x img/s / the device's dense fp16 peak (a table of known GPUs, or --peak-tflops).
  FLOPs per image are counted with torch.utils.flop_counter over one eager call for one image (text
  encoders, every UNet step of both guidance branches, VAE decode: 42.7 TFLOP for sd15 at 512x512 with 25
  steps); attention is counted through the eager processor, since the counter does not see every SDPA kernel.
- options (--full): the engine's loader and call (load_pipeline + call_pipeline, in process, no Ray) with each
  speed option alone: base, channels_last, attention eager, vae_slicing, vae_tiling: img/s and peak memory.

    python -m bench.bench_gpu [--full | --smoke] [--shapes sd15,sdxl] [--batch 8] [--steps 25] [--batches 4]
                              [--compile off|on|both] [--options base,channels_last,...] [--peak-tflops X]
                              [--json OUT] [--models bench/out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
SIZES = {"sd15": 512, "sdxl": 1024, "tiny": 64, "tiny-sdxl": 64}
OPTIONS = ("base", "channels_last", "eager_attention", "vae_slicing", "vae_tiling")
GUIDANCE = 7.5
# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; first match wins.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("V100", 125.0), ("T4", 65.0))


def build_model(shape: str, models: Path = OUT) -> Path:
    from dreamshard.engine.tiny import build_tiny_model

    path = models / ("tiny-sd" if shape == "tiny" else shape)
    if not (path / "model_index.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        build_tiny_model(path, shape)
    return path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device, given: float | None) -> float | None:
    import torch

    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for marker, peak in PEAK_TFLOPS if marker in name), None)


def device_name(device) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


class Utilisation:
    """The GPU's utilisation (nvidia-smi, every 0.2 s) while a block runs: `mean` in %, None without nvidia-smi."""

    def __init__(self, device) -> None:
        self.index = (device.index or 0) if device.type == "cuda" else None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Utilisation:
        if self.index is not None and shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(self.index)]
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip()))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return


def engine_config(model: Path, args, size: int, compile_on: bool, out: Path):
    from dreamshard.config import GenerateConfig

    return GenerateConfig.model_validate({
        "model": {"path": str(model), "dtype": args.dtype, "device": args.device},
        "sampling": {"width": size, "height": size, "steps": args.steps, "guidance_scale": GUIDANCE},
        "output": {"path": str(out), "samples_per_shard": args.batch},
        "run": {"num_samples": args.batch * (args.batches + 1), "batch_size": args.batch, "workers": 1, "compile": compile_on},
    })  # fmt: skip


def batches_of(config, batch: int) -> list[list]:
    from dreamshard.engine.plan import build_plan

    specs = build_plan(config.prompts, config.sampling, config.run.seed).specs(0, config.run.num_samples)
    return [specs[start : start + batch] for start in range(0, len(specs), batch)]


def bare_loop(model: Path, config, args, device, compile_on: bool) -> dict:
    """diffusers alone: from_pretrained, its own call, the same prompts, seeds and sizes as the engine."""
    import torch
    from diffusers import AutoPipelineForText2Image

    from dreamshard.engine.models import resolve_dtype

    pipe = AutoPipelineForText2Image.from_pretrained(str(model), dtype=resolve_dtype(args.dtype, device), local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile_on:
        pipe.unet.compile()
        pipe.vae.decoder.compile()

    def call(specs):
        first = specs[0]
        return pipe(
            prompt=[spec.prompt for spec in specs], num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
            height=first.height, width=first.width, generator=[torch.Generator("cpu").manual_seed(spec.seed) for spec in specs], output_type="pil",
        ).images  # fmt: skip

    work = batches_of(config, args.batch)
    started = time.perf_counter()
    call(work[0])
    sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    with Utilisation(device) as gpu:
        images = sum(len(call(specs)) for specs in work[1:])
        sync(device)
    result = {"images_per_s": images / (time.perf_counter() - started), "warm_up_s": warm, "gpu_util": gpu.mean}
    if not compile_on:
        result["flops_per_image"] = count_flops(pipe, work[0][:1])
    return result


def count_flops(pipe, specs) -> float:
    """FLOPs of one eager pipeline call for one image (attention through the eager processor)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode

    from dreamshard.engine.generation import call_pipeline

    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_pipeline(pipe, specs)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    return float(counter.get_total_flops()) / len(specs)


def engine_run(config, device) -> dict:
    """The engine's whole run after its warm-up shard, its rate inside calls, its worker's busy share."""
    from dreamshard.engine.run import generate

    with Utilisation(device) as gpu:
        summary = generate(config, show_progress=False)
    if not summary.ok:
        raise RuntimeError(f"engine run failed: {summary.failed_shards}")
    out = Path(config.output.path)
    [worker] = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])["workers"]
    # The warm-up shard: the one whose call took longest (its first call pays CUDA's and compile's warm-up).
    markers = [json.loads(path.read_text()) for path in sorted((out / "index").glob("*.commit.json"))]
    warm = max(markers, key=lambda marker: marker["generation"]["pipeline_s"])["generation"]
    images, seconds = worker["images"] - warm["images"], worker["ready_s"] - warm["seconds"]
    in_calls = worker["pipeline_s"] - warm["pipeline_s"]
    return {
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "in_calls_images_per_s": (worker["drawn"] - warm["images"]) / in_calls if in_calls > 0 else 0.0,
        "busy": worker["busy_fraction"], "images_per_call": worker["images_per_call"], "gpu_util": gpu.mean,
    }  # fmt: skip


def option_runs(model: Path, config, args, device, names: list[str]) -> dict:
    """The engine's own loader and call with one speed option at a time: img/s and peak device memory."""
    import torch

    from dreamshard.config import RunConfig
    from dreamshard.engine.generation import call_pipeline
    from dreamshard.engine.models import load_pipeline

    work = batches_of(config, args.batch)
    results = {}
    for name in names:
        model_config = config.model.model_copy(update={"attention": "eager" if name == "eager_attention" else "sdpa"})
        speed = RunConfig(**({name: True} if name in ("channels_last", "vae_slicing", "vae_tiling") else {}))
        pipe = load_pipeline(model_config, "txt2img", speed=speed)
        call_pipeline(pipe, work[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        images = sum(len(call_pipeline(pipe, specs)) for specs in work[1:])
        sync(device)
        rate = images / (time.perf_counter() - started)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[name] = {"images_per_s": rate, "peak_memory_gib": memory}
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def measure(shape: str, args, device, root: Path) -> dict:
    import torch

    model, size = build_model(shape, args.models), args.size or SIZES[shape]
    result: dict = {"size": size, "compile": {}}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compile_on in modes:
        config = engine_config(model, args, size, compile_on, root / f"{shape}-{'compiled' if compile_on else 'eager'}")
        bare = bare_loop(model, config, args, device, compile_on)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        engine = engine_run(config, device)
        result["compile"]["on" if compile_on else "off"] = {
            "bare_images_per_s": bare["images_per_s"], "bare_warm_up_s": bare["warm_up_s"], "bare_gpu_util": bare["gpu_util"],
            "engine_images_per_s": engine["images_per_s"], "engine_in_calls_images_per_s": engine["in_calls_images_per_s"],
            "engine_busy": engine["busy"], "engine_images_per_call": engine["images_per_call"], "engine_gpu_util": engine["gpu_util"],
            "ratio": engine["images_per_s"] / bare["images_per_s"],
        }  # fmt: skip
        if "flops_per_image" in bare:
            result["flops_per_image"] = bare["flops_per_image"]
        print(f"{shape} {size}x{size} compile {'on' if compile_on else 'off'}: {json.dumps(result['compile'], default=float)}", flush=True)
    if args.options:
        config = engine_config(model, args, size, False, root / f"{shape}-options")
        result["options"] = option_runs(model, config, args, device, args.options)
    peak = peak_tflops(device, args.peak_tflops)
    for entry in result["compile"].values():
        flops = result.get("flops_per_image")
        entry["mfu"] = flops * entry["engine_images_per_s"] / (peak * 1e12) if flops and peak else None
    return result


def table(results: dict, args, device) -> str:
    lines = [
        f"device: {device_name(device)}; {args.steps} steps, {args.dtype}, batch {args.batch}, guidance {GUIDANCE}, {args.batches} timed batches",
        "",
        "| shape | compile | bare img/s | engine img/s (whole run) | ratio | engine in calls img/s | engine busy | img/call | GPU util bare / engine | TFLOP per image | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, result in results.items():
        flops = result.get("flops_per_image")
        flops_text = f"{flops / 1e12:.4f}" if flops else "n/a"
        for mode, entry in result["compile"].items():
            mfu = f"{100 * entry['mfu']:.1f}%" if entry.get("mfu") is not None else "n/a"
            util = " / ".join(f"{value:.0f}%" if value is not None else "n/a" for value in (entry["bare_gpu_util"], entry["engine_gpu_util"]))
            lines.append(
                f"| {shape} {result['size']}² | {mode} | {entry['bare_images_per_s']:.3f} | {entry['engine_images_per_s']:.3f} | {entry['ratio']:.3f} | "
                f"{entry['engine_in_calls_images_per_s']:.3f} | {100 * entry['engine_busy']:.0f}% | {entry['engine_images_per_call']:.1f} | {util} | {flops_text} | {mfu} |"
            )
    if any("options" in result for result in results.values()):
        lines += ["", "| shape | option | img/s | vs base | peak memory GiB |", "| --- | --- | --- | --- | --- |"]
        for shape, result in results.items():
            options = result.get("options", {})
            base = options.get("base", {}).get("images_per_s")
            for name, entry in options.items():
                memory = f"{entry['peak_memory_gib']:.2f}" if entry["peak_memory_gib"] is not None else "n/a"
                ratio = f"{entry['images_per_s'] / base:.3f}" if base else "n/a"
                lines.append(f"| {shape} {result['size']}² | {name} | {entry['images_per_s']:.3f} | {ratio} | {memory} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny shape at 64x64 on the CPU, 2 steps, batch 2 (a check, not a measurement)")
    parser.add_argument("--full", action="store_true", help="sd15 and sdxl, compile off and on, every speed option (tens of minutes)")
    parser.add_argument("--shapes", type=lambda text: text.split(","), default=None, help="comma-separated: sd15, sdxl, tiny, tiny-sdxl")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 512 sd15, 1024 sdxl, 64 tiny shapes)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None, help="timed batches after the warm-up one")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--compile", default=None, choices=["off", "on", "both"])
    parser.add_argument(
        "--options", type=lambda text: [o for o in text.split(",") if o], default=None, help=f"comma-separated of {', '.join(OPTIONS)}; '' for none"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense fp16 peak, for MFU where the table has no entry")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--models", type=Path, default=OUT, help="where the random-weight models are built (once) and reused")
    args = parser.parse_args(argv)
    smoke, full = args.smoke, args.full
    defaults = {"shapes": ["tiny"] if smoke else ["sd15", "sdxl"] if full else ["sd15"], "steps": 2 if smoke else 25,
                "batch": 2 if smoke else 8, "batches": 2 if smoke else 4, "dtype": "float32" if smoke else "float16",
                "compile": "both" if full else "off", "options": list(OPTIONS) if full or smoke else []}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(args.options) - set(OPTIONS)
    if unknown or set(args.shapes) - set(SIZES):
        parser.error(f"unknown option(s) or shape(s): {sorted(unknown | (set(args.shapes) - set(SIZES)))}")
    args.device = "cpu" if smoke else "auto"
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    from dreamshard.engine.models import resolve_device

    args = parse(argv)
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("no GPU here: run with --smoke for the CPU check (its figures are not GPU figures)")
        return {}
    if device.type == "cpu":
        torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        results = {shape: measure(shape, args, device, root) for shape in args.shapes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = table(results, args, device)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(device), "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
