"""Split-K GEMM for decode batches (`--kernel-fusion on`): `y = x @ W^T` for 1-64 rows, where
reading the weight once sets the time and cuBLAS's tiles leave SMs idle.

At 64 rows of llama-3.1-8b, cuBLASLt's tiles for o_proj and down_proj (N = 4096) make 86
programs for 132 SMs. Here a program owns BLOCK_N columns of every row and one of SPLIT_K
ranges of K, so N / BLOCK_N * SPLIT_K programs stream the weight. Each writes its fp32 partial
tile to a workspace; the last of a column tile's programs to arrive (counted atomically, as the
one-launch decode attention merges its splits) sums the SPLIT_K partials in split order, adds
the bias, rounds once and re-zeroes its counter. The sum's order is fixed, so the result is the
same on every run; a row's result never depends on the other rows' values (across batch sizes
the tile, and so the rounding, may differ: deterministic inference keeps its own
batch-invariant GEMM).

`config_for(n, k, m)` picks the launch parameters from a table measured on an H200
(`benchmark/kernel_bench.py sweep --parts splitk`); a shape or row count it has no entry for
goes to F.linear (cuBLAS).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from sglab.srt.layers.arrival import arrival_counters


@triton.jit
def _splitk_gemm_kernel(X, W, B, Out, Part, Count, M, N, K, stride_xm, stride_wn, stride_om,
                        k_per_split, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < k_end
        a = tl.load(X + rows[:, None] * stride_xm + kk[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_wn + kk[:, None],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        else:  # Triton's interpreter cannot tl.dot bf16
            acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if SPLIT_K == 1:
        _store_tile(acc, B, Out, rows, cols, rmask, cmask, stride_om, HAS_BIAS)
    else:
        tile = Part + (pid_n * SPLIT_K * BLOCK_M + rows[:, None]) * BLOCK_N \
            + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile + pid_k * BLOCK_M * BLOCK_N, acc)
        tl.debug_barrier()  # every thread's partial before the arrival
        arrived = tl.atomic_add(Count + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(tile + s * BLOCK_M * BLOCK_N, volatile=True)
            _store_tile(total, B, Out, rows, cols, rmask, cmask, stride_om, HAS_BIAS)
            tl.store(Count + pid_n, 0)


@triton.jit
def _store_tile(acc, B, Out, rows, cols, rmask, cmask, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], acc.to(Out.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])

# (N, K) of a weight -> ((lowest M, highest M, config), ...): the decode row counts where this
# kernel beat F.linear under cuBLASLt on an H200
# (benchmark/results/2026-12-04-h200-kernel-sweep-splitk.md).
Table = dict[tuple[int, int], tuple[tuple[int, int, dict], ...]]
SPLITK_TABLE: Table = {}
MAX_M = 64
_LAYOUT_KEYS = {"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"}


def load_table() -> None:
    """SGLAB_SPLITK_TABLE: a JSON file {"NxK": [[lowest M, highest M, config], ...]} (a
    table measured on another GPU, `kernel_bench.py sweep --parts splitk-sweep` writes one)
    replaces the built-in table; "none": no shape goes to splitk_gemm."""
    global SPLITK_TABLE
    path = os.environ.get("SGLAB_SPLITK_TABLE")
    if path is None:
        return
    if path == "none":
        SPLITK_TABLE = {}
        return
    try:
        with open(path) as f:
            SPLITK_TABLE = parse_table(json.load(f))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"SGLAB_SPLITK_TABLE={path!r}: {e}") from None


def parse_table(raw: dict) -> Table:
    table = {}
    for shape, entries in raw.items():
        n, k = (int(v) for v in shape.split("x"))
        rows = []
        for lo, hi, cfg in entries:
            if not 0 < int(lo) <= int(hi) <= MAX_M or not {"BLOCK_N", "BLOCK_K", "SPLIT_K"} \
                    <= set(cfg) <= _LAYOUT_KEYS:
                raise ValueError(f"bad entry for {shape}: {[lo, hi, cfg]}")
            rows.append((int(lo), int(hi), {key: int(v) for key, v in cfg.items()}))
        table[n, k] = tuple(rows)
    return table


def splitk_applies(x: torch.Tensor) -> bool:
    """Whether x's rows may go to splitk_gemm at all: on the GPU, 1 to MAX_M of them."""
    return x.is_cuda and 0 < x.numel() // max(1, x.shape[-1]) <= MAX_M


def config_for(n: int, k: int, m: int) -> dict | None:
    """The measured launch parameters for an [m, k] @ [n, k]^T product, or None (F.linear)."""
    for lo, hi, cfg in SPLITK_TABLE.get((n, k), ()):
        if lo <= m <= hi:
            return cfg
    return None


def splitk_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for at most MAX_M rows. `config`: BLOCK_N, BLOCK_K, SPLIT_K and
    optionally num_warps / num_stages (default: config_for's entry, which must exist)."""
    n, k = weight.shape
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if x2.shape[1] != k:
        raise ValueError(f"splitk_gemm: x has {x2.shape[1]} columns for a weight of K={k}")
    if not 0 < m <= MAX_M:
        raise ValueError(f"splitk_gemm: {m} rows; it serves 1 to {MAX_M}")
    cfg = dict(config or config_for(n, k, m))
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    assert weight.stride(1) == 1
    block_m = max(16, triton.next_power_of_2(m))
    split_k = cfg.pop("SPLIT_K")
    block_k = cfg.pop("BLOCK_K")
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty(tiles * split_k * block_m * cfg["BLOCK_N"] if split_k > 1 else 1,
                       dtype=torch.float32, device=x.device)
    _splitk_gemm_kernel[(tiles, split_k)](
        x2, weight, bias if bias is not None else weight, out, part,
        arrival_counters(x.device, tiles), m, n, k, x2.stride(0), weight.stride(0),
        out.stride(0), k_per_split, HAS_BIAS=bias is not None, USE_DOT=x.is_cuda,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_K=block_k, **cfg)
    return out.view(*x.shape[:-1], n)
