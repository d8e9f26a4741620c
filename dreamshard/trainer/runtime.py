"""Where training runs: process group (torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK; gloo on
CPU, nccl on GPU), device, precision and threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dreamshard.config import TrainConfig
from dreamshard.errors import UserError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)


def init_distributed() -> bool:
    """Join the process group described by the environment (torchrun / accelerate launch); True if we made it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def runtime(config: TrainConfig) -> Runtime:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if config.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a cuda device; use fp32 or bf16 on cpu")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(rank, world, device, dtype)


def gather(value, rt: Runtime) -> list:
    if rt.world == 1:
        return [value]
    values = [None] * rt.world
    dist.all_gather_object(values, value)
    return values


def sync_buffers(model: torch.nn.Module, rt: Runtime) -> None:
    """BN running statistics are updated per rank by the last forward; take rank 0's, as DDP does at each forward."""
    if rt.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
