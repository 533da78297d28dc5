"""Linear layers, tensor-parallel as upstream's: column-parallel layers hold a slice of the output
rows, row-parallel layers a slice of the input columns followed by an all-reduce. Fused layers
(qkv, gate_up) load HF's per-projection weights by shard id, each rank keeping its part.

Sizes stored on a layer (`output_size`, `output_sizes`, `q_size`, `kv_size`) are this rank's; at
tp=1 they are the model's. Every weight carries `full_shape`, its tp=1 shape, and `load_full`,
which loads a tp=1 tensor, so a dummy weight drawn at full shape is each rank's exact shard.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from sglab.srt.batch_invariant_ops import linear_batch_invariant
from sglab.srt.distributed.parallel_state import GroupCoordinator, get_tp_group
from sglab.srt.layers.skinny_gemm import RMSNormPrologue, max_m, skinny_applies, skinny_gemm
from sglab.srt.layers.splitk_gemm import (
    config_for,
    load_table,
    silu_out_config,
    splitk_applies,
    splitk_fold_max_m,
    splitk_gemm,
    splitk_silu,
)


def _tp_rank_size(tp_rank: int | None, tp_size: int | None,
                  group: GroupCoordinator | None = None) -> tuple[int, int]:
    group = group or get_tp_group()
    return (group.rank if tp_rank is None else tp_rank,
            group.world_size if tp_size is None else tp_size)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the TP size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    # The weight's dimension split over ranks (None: replicated).
    shard_dim: int | None = None

    def __init__(self, input_size: int, output_size: int, bias: bool, params_dtype: torch.dtype,
                 batch_invariant: bool, tp_rank: int | None = None, tp_size: int | None = None,
                 full_shape: tuple[int, int] | None = None,
                 group: GroupCoordinator | None = None):
        super().__init__()
        self.group = group or get_tp_group()  # the collectives' group
        self.tp_rank, self.tp_size = _tp_rank_size(tp_rank, tp_size, self.group)
        self.input_size = input_size
        self.output_size = output_size
        self.weight = self._make_param((output_size, input_size), params_dtype,
                                       full_shape or (output_size, input_size))
        if bias:
            full_bias = (full_shape or (output_size,))[0] if self.shard_dim == 0 else output_size
            self.bias = self._make_param((output_size,), params_dtype, (full_bias,))
        else:
            self.register_parameter("bias", None)
        # --enable-deterministic-inference (ModelOptions.batch_invariant).
        self.batch_invariant = batch_invariant
        # --kernel-fusion on: matmuls of at most this many rows go to skinny_gemm (0: none;
        # set by enable_decode_gemms, so the forward reads no environment).
        self.skinny_max_m = 0
        # --kernel-fusion on (enable_decode_gemms): decode rows the split-K table has a layout
        # for go to splitk_gemm; up to splitk_fold_max_m rows the norms fold into it, and
        # splitk_silu folds SiLU into gate_up.
        self.splitk = False
        self.splitk_fold_max_m = 0
        self.splitk_silu = False

    def _make_param(self, shape: tuple[int, ...], dtype: torch.dtype,
                    full_shape: tuple[int, ...]) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        param.weight_loader = self.weight_loader
        param.full_shape = tuple(full_shape)
        param.load_full = self.load_full_weight
        return param

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None,
                prologue: str | None = None) -> torch.Tensor:
        """x @ W^T (+ bias); a prologue (skinny_gemm.SILU_MUL) only where skinny_fits(x)."""
        if prologue is not None or self.skinny_fits(x):
            return skinny_gemm(x, self.weight, bias, prologue)
        cfg = self.splitk_layout(x)
        if cfg is not None:
            return splitk_gemm(x, self.weight, bias, cfg)
        if self.batch_invariant:
            return linear_batch_invariant(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def skinny_fits(self, x: torch.Tensor) -> bool:
        """Whether this layer may fold the op before it into its matmul for input x."""
        return self.skinny_max_m > 0 and skinny_applies(x, self.skinny_max_m)

    def _splitk_rows(self, x: torch.Tensor) -> int | None:
        """x's rows where splitk_gemm may serve them (enabled, on the GPU, 1 to MAX_M)."""
        return x.numel() // x.shape[-1] if self.splitk and splitk_applies(x) else None

    def splitk_layout(self, x: torch.Tensor, fused: bool = False) -> dict | None:
        """splitk_gemm's layout for input x (a fused product's: see config_for), or None."""
        m = self._splitk_rows(x)
        return None if m is None else config_for(*self.weight.shape, m, fused)

    def folds_norm(self, x: torch.Tensor) -> bool:
        """Whether forward_norm serves x (skinny_gemm, or splitk_gemm up to its fold bound)."""
        return self.skinny_fits(x) or (
            x.numel() // x.shape[-1] <= self.splitk_fold_max_m
            and self.splitk_layout(x, fused=True) is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        """(start, size) of a fused block in this rank's param (rows)."""
        raise NotImplementedError

    def loaded_range(self, shard_id: object) -> tuple[int, int, int]:
        """(full size, start, size) of this rank's part of a checkpoint tensor along
        `shard_dim`."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> None:
        # A row-parallel bias is replicated; every other sharded tensor is cut along shard_dim.
        if self.tp_size > 1 and self.shard_dim is not None and \
                (param.dim() == 2 or self.shard_dim == 0):
            loaded = self._rank_part(loaded, shard_id)
        dst = param.data if shard_id is None else param.data.narrow(0,
                                                                    *self.shard_range(shard_id))
        _copy_checked(dst, loaded)

    def _rank_part(self, loaded: torch.Tensor, shard_id: object) -> torch.Tensor:
        full, start, size = self.loaded_range(shard_id)
        if loaded.shape[self.shard_dim] != full:
            raise ValueError(f"weight shape mismatch: expected {full} along dim "
                             f"{self.shard_dim}, got {tuple(loaded.shape)}")
        return loaded.narrow(self.shard_dim, start, size)

    def load_full_weight(self, param: nn.Parameter, full: torch.Tensor) -> None:
        """Load a tp=1 tensor (a fused layer's blocks are cut by their shard ids)."""
        self.weight_loader(param, full)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False):
        super().__init__(input_size, output_size, bias, params_dtype, batch_invariant,
                         tp_rank=0, tp_size=1)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by output rows; `gather_output` all-gathers the full Y."""

    shard_dim = 0

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False,
                 gather_output: bool = False, tp_rank: int | None = None,
                 tp_size: int | None = None, group: GroupCoordinator | None = None):
        rank, size = _tp_rank_size(tp_rank, tp_size, group)
        self.gather_output = gather_output
        super().__init__(input_size, divide(output_size, size), bias, params_dtype,
                         batch_invariant, rank, size, (output_size, input_size), group)

    def loaded_range(self, shard_id: object) -> tuple[int, int, int]:
        size = self.output_size
        return size * self.tp_size, self.tp_rank * size, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x, self.bias)
        return self.group.all_gather(out) if self.gather_output else out

    def forward_norm(self, x: torch.Tensor, norm: RMSNormPrologue, silu_out: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x [+ residual]) @ W^T (+ bias), x [+ residual]) in one launch; only where
        folds_norm(x) (and, for silu_out, a gate_up whose fuses_silu(x)), and without
        gather_output."""
        assert not self.gather_output
        if self.skinny_fits(x) and not silu_out:
            return skinny_gemm(x, self.weight, self.bias, norm)
        cfg = self.silu_layout(x) if silu_out else self.splitk_layout(x, fused=True)
        return splitk_gemm(x, self.weight, self.bias, cfg, norm, silu_out)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column blocks stacked along the output dim (e.g. gate_up_proj); shard ids 0, 1.
    Each rank holds its slice of every block, blocks in order."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 group: GroupCoordinator | None = None):
        _, size = _tp_rank_size(tp_rank, tp_size, group)
        self.total_output_sizes = list(output_sizes)
        self.output_sizes = [divide(s, size) for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, params_dtype, batch_invariant,
                         tp_rank=tp_rank, tp_size=tp_size, group=group)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        idx = int(shard_id)
        return sum(self.output_sizes[:idx]), self.output_sizes[idx]

    def loaded_range(self, shard_id: object) -> tuple[int, int, int]:
        if shard_id is None:
            _refuse_fused(type(self).__name__)
        size = self.output_sizes[int(shard_id)]
        return self.total_output_sizes[int(shard_id)], self.tp_rank * size, size

    def fuses_silu(self, x: torch.Tensor) -> bool:
        """Whether forward_silu serves x: [gate; up] halves, splitk_gemm with SiLU folded in."""
        return self.splitk_silu and len(self.output_sizes) == 2 \
            and self.output_sizes[0] == self.output_sizes[1] \
            and self.silu_layout(x) is not None

    def silu_layout(self, x: torch.Tensor) -> dict | None:
        """splitk_gemm's layout for the SiLU-out product of input x (silu_out_config), or
        None."""
        m = self._splitk_rows(x)
        return None if m is None else silu_out_config(*self.weight.shape, m)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ gate^T) * (x @ up^T) in one launch; only where fuses_silu(x)."""
        return splitk_gemm(x, self.weight, self.bias, self.silu_layout(x), silu_out=True)

    def load_full_weight(self, param: nn.Parameter, full: torch.Tensor) -> None:
        for i, block in enumerate(full.split(self.total_output_sizes, dim=0)):
            self.weight_loader(param, block, i)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; shard ids "q", "k", "v". Each rank holds
    heads / tp query heads and kv_heads / tp KV heads; with fewer KV heads than ranks, each KV
    head is replicated on tp / kv_heads consecutive ranks (upstream's layout)."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 group: GroupCoordinator | None = None):
        _, size = _tp_rank_size(tp_rank, tp_size, group)
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, size)
        if size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, size)
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        self.output_sizes = [self.q_size, self.kv_size, self.kv_size]
        self.total_output_sizes = [total_num_heads * head_size,
                                   total_num_kv_heads * head_size,
                                   total_num_kv_heads * head_size]
        rank, _ = _tp_rank_size(tp_rank, tp_size, group)
        LinearBase.__init__(self, hidden_size, sum(self.output_sizes), bias, params_dtype,
                            batch_invariant, rank, size,
                            (sum(self.total_output_sizes), hidden_size), group)
        self.gather_output = False

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        offsets = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                   "v": (self.q_size + self.kv_size, self.kv_size)}
        return offsets[shard_id]

    def loaded_range(self, shard_id: object) -> tuple[int, int, int]:
        if shard_id is None:
            _refuse_fused(type(self).__name__)
        if shard_id == "q":
            return self.total_output_sizes[0], self.tp_rank * self.q_size, self.q_size
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        return self.total_output_sizes[1], kv_rank * self.kv_size, self.kv_size

    def load_full_weight(self, param: nn.Parameter, full: torch.Tensor) -> None:
        for shard_id, block in zip("qkv", full.split(self.total_output_sizes, dim=0)):
            self.weight_loader(param, block, shard_id)


class RowParallelLinear(LinearBase):
    """Y = X A with A split by input columns (X arrives split the same way); the partial
    products are all-reduced, then the (replicated) bias is added once."""

    shard_dim = 1

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False,
                 reduce_results: bool = True, tp_rank: int | None = None,
                 tp_size: int | None = None, group: GroupCoordinator | None = None):
        rank, size = _tp_rank_size(tp_rank, tp_size, group)
        self.reduce_results = reduce_results
        if bias and not reduce_results:
            raise ValueError("RowParallelLinear: a bias needs reduce_results (it is added once, "
                             "after the sum)")
        super().__init__(divide(input_size, size), output_size, bias, params_dtype,
                         batch_invariant, rank, size, (output_size, input_size), group)

    def loaded_range(self, shard_id: object) -> tuple[int, int, int]:
        size = self.input_size
        return size * self.tp_size, self.tp_rank * size, size

    def forward(self, x: torch.Tensor, prologue: str | None = None) -> torch.Tensor:
        """A prologue (skinny_gemm.SILU_MUL: x holds [gate, up]) only where skinny_fits."""
        if self.tp_size == 1:
            return self._matmul(x, self.bias, prologue)
        out = self._matmul(x, None, prologue)
        if self.reduce_results:
            out = self.group.all_reduce(out)
        return out if self.bias is None else out + self.bias


def enable_decode_gemms(model: nn.Module, hidden_size: int) -> None:
    """--kernel-fusion on: every linear layer of `model` serves up to max_m(hidden_size) rows
    with skinny_gemm, and the shapes and rows of the split-K table with splitk_gemm (not under
    deterministic inference, whose GEMM is batch invariant)."""
    bound, fold, silu = max_m(hidden_size), splitk_fold_max_m(), splitk_silu()
    load_table()
    for module in model.modules():
        if isinstance(module, LinearBase) and not module.batch_invariant:
            module.skinny_max_m = bound
            module.splitk = True
            module.splitk_fold_max_m, module.splitk_silu = fold, silu


def prefer_cublaslt() -> None:
    """--kernel-fusion on, CUDA: torch's matmuls through cuBLASLt's heuristics rather than
    cuBLAS's. On an H200 at 64 decode rows of llama-3.1-8b they choose tiles without a split-K
    reduction (5238 vs 5454 µs of kernels per graph replay); at 8 rows up to 2% slower, at one
    row and for qwen3-0.6b the same
    (benchmark/results/2026-12-03-h200-kernel-decode-rope.md). Process-wide; a set
    TORCH_BLAS_PREFER_CUBLASLT (torch's own switch) decides instead."""
    if "TORCH_BLAS_PREFER_CUBLASLT" not in os.environ:
        torch.backends.cuda.preferred_blas_library("cublaslt")


def _refuse_fused(name: str) -> None:
    raise ValueError(f"{name}: a pre-fused checkpoint tensor cannot be sharded over ranks; "
                     "load per-projection weights")


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight shape mismatch: expected {tuple(dst.shape)}, "
                         f"got {tuple(src.shape)}")
    dst.copy_(src.to(dst.dtype))
