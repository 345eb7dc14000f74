"""Ranks and devices: torchrun's environment -> :class:`Dist` (rank, world, device, collectives) and DDP.

Training, evaluation and generation all start from :func:`setup_distributed`; a plain process is rank 0
of 1 and never touches ``torch.distributed``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from qvl_data.errors import QvlError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank: for decisions that must not differ between ranks."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """Sum over ranks (a float64 scalar on the training device, so token counts stay exact)."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise QvlError(
            "--device cuda requested but CUDA is not available (torch.cuda.is_available() is False)"
        )
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(cfg: Any) -> Dist:
    """Rank, world and device from torchrun's environment (a plain process is rank 0 of 1); NCCL on CUDA,
    gloo on CPU. ``cfg`` needs ``device``, ``dry_run`` and ``ddp_timeout`` (any qvl-train config)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if world > 1 and not getattr(cfg, "dry_run", False) and not torch_dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=getattr(cfg, "ddp_timeout", 1800))}
        if (
            device.type == "cuda"
            and "device_id" in inspect.signature(torch_dist.init_process_group).parameters
        ):
            kwargs["device_id"] = device  # binds NCCL to this GPU up front (no guessing in barrier())
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel over the trainable (LoRA) weights; buffers (rotary tables) are never synced.

    DDP's start-up broadcast from rank 0 covers only the trainable weights: every rank loaded the same frozen
    base weights from the same files, so broadcasting them (16.6 GB for the 7B model) would change nothing.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [name for name, _ in model.named_buffers()]
    )
    no_buffer_sync = {"broadcast_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}  # torch >= 2.12 spelling
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def teardown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
