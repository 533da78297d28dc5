"""The tensor-parallel group of this process: its rank, the device group for tensors and a gloo
CPU group for scheduler metadata (requests, pool budgets), both from `torch.distributed`.

A process that never calls `initialize_model_parallel` is rank 0 of a group of one: every
collective is the identity, so tp=1 runs exactly the single-rank code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    rank: int
    world_size: int
    device_group: Any = None  # nccl on CUDA, gloo on CPU; None for a group of one
    cpu_group: Any = None  # always gloo

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x`, concatenated along `dim` in rank order."""
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        x = x.contiguous()
        if x.is_cuda:
            out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                              device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.device_group)
            parts = out.chunk(self.world_size, dim=0)
        else:  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x, group=self.device_group)
        return torch.cat(parts, dim=dim)

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's host integer (on the CPU group)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank (on the CPU group): size, then bytes."""
        if self.world_size == 1:
            return obj
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=src, group=self.cpu_group)
        if self.rank != src:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=src, group=self.cpu_group)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())


_TP = GroupCoordinator(rank=0, world_size=1)


def initialize_model_parallel(tp_rank: int, tp_size: int, init_method: str | None,
                              device: str, timeout_s: float = 1800.0) -> GroupCoordinator:
    """Join the TP group (every rank calls this with the same `init_method`)."""
    global _TP
    if tp_size == 1:
        _TP = GroupCoordinator(rank=0, world_size=1)
        return _TP
    if init_method is None:
        raise ValueError(f"--tp-size {tp_size} needs one process per rank: start it through "
                         "sglab.launch_server or sglab.Engine")
    backend = "nccl" if device == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, world_size=tp_size,
                            rank=tp_rank, timeout=timeout)
    ranks = list(range(tp_size))
    cpu_group = dist.new_group(ranks, backend="gloo", timeout=timeout) \
        if backend == "nccl" else dist.group.WORLD
    _TP = GroupCoordinator(tp_rank, tp_size, dist.group.WORLD, cpu_group)
    if backend == "nccl":
        # NCCL builds its communicator at the first collective: here, not inside a CUDA graph
        # capture, where that is illegal.
        _TP.all_reduce(torch.zeros(1, device="cuda"))
        torch.cuda.synchronize()
    return _TP


def destroy_model_parallel() -> None:
    global _TP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = GroupCoordinator(rank=0, world_size=1)


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_tensor_model_parallel_rank() -> int:
    return _TP.rank


def get_tensor_model_parallel_world_size() -> int:
    return _TP.world_size
