"""`dreamshard train --address ADDRESS --workers N`: the same training as a DDP job on a Ray cluster (the one
the shards were generated on, say), through Ray Train's TorchTrainer. Ray Train starts N worker processes
(one GPU each with use_gpu), sets up the process group (nccl on GPUs, gloo on CPUs) and the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK); each worker runs `train(config)` exactly as under torchrun. Rank 0
writes the output, so output.path must be on a filesystem every worker's node sees (or the job fits on one
node); the shards can be anywhere the workers can read (s3://, a shared disk).

Ray Train's own storage (its run records; dreamshard reports no checkpoints to it) goes to a node-local
temporary folder: dreamshard's checkpoints are the ones in output.path, and a re-run resumes from them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from dreamshard.config import TrainConfig
from dreamshard.errors import RunFailure, UserError, one_line

log = logging.getLogger(__name__)


def train_on_ray(
    config: TrainConfig, address: str | None, workers: int | None = None, use_gpu: bool | None = None, cpus_per_worker: float = 1, restart: bool = False
):
    """Run `train` on `workers` Ray Train workers (default: one per GPU of the cluster, 1 without GPUs);
    returns rank 0's TrainSummary (read from summary.json)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dreamshard.cluster import ray_session
    from dreamshard.trainer.loop import SUMMARY, TrainSummary

    with ray_session(address):
        gpus = ray.cluster_resources().get("GPU", 0)
        workers = workers or max(1, int(gpus))
        use_gpu = gpus >= workers if use_gpu is None else use_gpu
        if use_gpu and gpus < workers:
            raise UserError(f"--workers {workers} with GPUs needs {workers} GPUs, but the Ray cluster has {gpus:g}; lower --workers or add nodes")
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "restart": restart, "use_gpu": use_gpu},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=Path(config.output.path).name, storage_path=str(Path(tempfile.gettempdir()) / "dreamshard-ray-train")),
        )
        log.info("training on %d Ray Train worker(s) (%s)", workers, "one GPU each" if use_gpu else "CPU")
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error: find it and keep its one line
            raise _worker_error(exc) from None
    summary = json.loads((Path(config.output.path) / SUMMARY).read_text())
    return TrainSummary(**summary)


def _train_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: the ordinary training, in the process group Ray Train made."""
    from ray.train.torch import get_device

    from dreamshard.trainer.loop import train

    config = TrainConfig.model_validate(loop_config["config"])
    if loop_config["use_gpu"]:
        config.device = str(get_device())
    train(config, restart=loop_config["restart"])


def _worker_error(exc: BaseException) -> Exception:
    """The first dreamshard error inside Ray's wrapping (causes, worker failures), as itself; else one line."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (UserError, RunFailure)):
            return type(current)(one_line(current, last=True))
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            stack += [e for e in failures.values() if isinstance(e, BaseException)]
    text = one_line(exc, last=True)
    for marker in ("UserError: ", "DataError: ", "RunFailure: "):
        if marker in text:
            return UserError(text.split(marker, 1)[1])
    return RunFailure(f"the Ray Train job failed ({text[:300]})")
