"""The tensor-parallel group of this process: its rank, the device group for tensors and a gloo
CPU group for scheduler metadata (requests, pool budgets), both from `torch.distributed`.

Under DP attention (`--enable-dp-attention --dp-size N`) the TP group is cut into N attention
groups of tp / N consecutive ranks (upstream's layout: tp_rank = dp_rank * attn_tp + attn_tp_rank):
attention runs tensor-parallel inside the attention group, the MLP over the whole TP group.

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
    ranks: tuple[int, ...] = ()  # global ranks of the group's members (() = 0..world_size-1)

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

    def all_gather_into_tensor(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """`out` = every rank's `x` stacked along dim 0, in rank order."""
        if self.world_size == 1:
            out.copy_(x)
        elif x.is_cuda:
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.device_group)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.chunk(self.world_size)), x.contiguous(),
                            group=self.device_group)

    def reduce_scatter_tensor(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """`out` = this rank's dim-0 chunk of the sum over ranks of `x`."""
        if self.world_size == 1:
            out.copy_(x)
        elif x.is_cuda:
            dist.reduce_scatter_tensor(out, x.contiguous(), group=self.device_group)
        else:  # gloo has no reduce_scatter: the sum, then this rank's chunk
            total = x.clone()
            dist.all_reduce(total, group=self.device_group)
            out.copy_(total.chunk(self.world_size)[self.rank])

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's host integers (on the CPU group), in rank order."""
        if self.world_size == 1:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.cpu_group)
        return [p.tolist() for p in parts]

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
        global_src = self.ranks[src] if self.ranks else src
        dist.broadcast(size, src=global_src, group=self.cpu_group)
        if self.rank != src:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=global_src, group=self.cpu_group)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())


@dataclass(frozen=True)
class DpAttentionInfo:
    """Where this rank sits under DP attention (dp_size 1 and attn_tp_size = tp without it)."""

    dp_rank: int = 0
    dp_size: int = 1
    attn_tp_rank: int = 0
    attn_tp_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.dp_size > 1


def compute_dp_attention_info(tp_rank: int, tp_size: int, dp_size: int,
                              enable_dp_attention: bool) -> DpAttentionInfo:
    """Upstream's `compute_dp_attention_world_info`: attention TP is the fastest-changing dim."""
    if not enable_dp_attention:
        return DpAttentionInfo(0, 1, tp_rank, tp_size)
    attn_tp_size = tp_size // dp_size
    return DpAttentionInfo(tp_rank // attn_tp_size, dp_size, tp_rank % attn_tp_size,
                           attn_tp_size)


_TP = GroupCoordinator(rank=0, world_size=1)
_ATTN_TP = _TP
_DP_INFO = DpAttentionInfo()


def initialize_model_parallel(tp_rank: int, tp_size: int, init_method: str | None,
                              device: str, timeout_s: float = 1800.0, dp_size: int = 1,
                              enable_dp_attention: bool = False) -> GroupCoordinator:
    """Join the TP group and, under DP attention, this rank's attention group (every rank
    calls this with the same `init_method`)."""
    global _TP, _ATTN_TP, _DP_INFO
    _DP_INFO = compute_dp_attention_info(tp_rank, tp_size, dp_size, enable_dp_attention)
    if tp_size == 1:
        _TP = _ATTN_TP = GroupCoordinator(rank=0, world_size=1)
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
    _ATTN_TP = _new_attention_groups(_DP_INFO, backend, timeout) if _DP_INFO.enabled else _TP
    if backend == "nccl":
        # NCCL builds its communicator at the first collective: here, not inside a CUDA graph
        # capture, where that is illegal.
        for group in {id(_TP): _TP, id(_ATTN_TP): _ATTN_TP}.values():
            group.all_reduce(torch.zeros(1, device="cuda"))
        torch.cuda.synchronize()
    return _TP


def _new_attention_groups(info: DpAttentionInfo, backend: str,
                          timeout: timedelta) -> GroupCoordinator:
    """This rank's attention-TP group (every rank creates every group, in the same order)."""
    mine = None
    for dp_rank in range(info.dp_size):
        ranks = list(range(dp_rank * info.attn_tp_size, (dp_rank + 1) * info.attn_tp_size))
        device_group = dist.new_group(ranks, backend=backend, timeout=timeout)
        cpu_group = dist.new_group(ranks, backend="gloo", timeout=timeout) \
            if backend == "nccl" else device_group
        if dp_rank == info.dp_rank:
            mine = GroupCoordinator(info.attn_tp_rank, info.attn_tp_size, device_group,
                                    cpu_group, tuple(ranks))
    if info.attn_tp_size == 1:  # a group of one: no collective at all
        return GroupCoordinator(rank=0, world_size=1)
    return mine


def destroy_model_parallel() -> None:
    global _TP, _ATTN_TP, _DP_INFO
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = _ATTN_TP = GroupCoordinator(rank=0, world_size=1)
    _DP_INFO = DpAttentionInfo()


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_attention_tp_group() -> GroupCoordinator:
    """The group attention (and, under DP attention, the vocabulary layers) is split over."""
    return _ATTN_TP


def get_dp_attention_info() -> DpAttentionInfo:
    return _DP_INFO


def is_dp_attention_enabled() -> bool:
    return _DP_INFO.enabled


def get_tensor_model_parallel_rank() -> int:
    return _TP.rank


def get_tensor_model_parallel_world_size() -> int:
    return _TP.world_size
