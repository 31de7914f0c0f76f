"""Process-group helpers for one run across several processes (``torchrun … -m openworld run``).

Training runs in lockstep on every rank (DistributedDataParallel, each rank a slice of every
global batch); evaluation, logging and checkpoints happen on rank 0 only, with the same metrics
engine as a single-process run. Single-process runs never touch ``torch.distributed``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_kind: str) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world)."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def local_device(kind: str) -> torch.device:
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when several processes train it; else ``model``."""
    if world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if model_device(model).type == "cuda":
        # Batch statistics over the global batch, as in a single-process run (SyncBatchNorm needs a GPU;
        # on CPU each rank normalises its own slice). Converted in place, so `model` stays the trained one.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
