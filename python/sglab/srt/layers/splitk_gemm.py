"""Split-K GEMM for decode batches (`--kernel-fusion on`): `y = x @ W^T` for 1-64 rows, where
reading the weight once sets the time, cuBLAS's tiles at a narrow N leave SMs idle and its
split-K adds a reduction kernel.

A program owns BLOCK_N columns of every row and one of SPLIT_K ranges of K, so
N / BLOCK_N * SPLIT_K programs stream the weight. Each writes its fp32 partial tile to a
workspace; the last of a column tile's programs to arrive (counted atomically, as the
one-launch decode attention merges its splits) sums the SPLIT_K partials in split order, adds
the bias, rounds once and re-zeroes its counter. The sum's order is fixed, so the result is the
same on every run; a row's result never depends on the other rows' values (across batch sizes
the tile, and so the rounding, may differ: deterministic inference keeps its own
batch-invariant GEMM).

Folded in, as skinny_gemm has them: the decoder's RMSNorm (+ residual add) or SiLU-and-mul in
the loads, and for gate_up (`silu_out`) SiLU-and-mul before the store, with gate and up
columns interleaved in the tile so one program holds both halves of its outputs.

A layout with "TMA" loads the x and W tiles through tensor descriptors (the tensor memory
accelerator; products without a prologue), SiLU out as separate gate and up tiles.

`config_for(n, k, m)` picks the layout from a table measured on an H200
(`benchmark/kernel_bench.py sweep --parts splitk-sweep`); a plain product it has no winning
entry for goes to F.linear (cuBLAS). On the H200 it won for qwen3-0.6b's o_proj / down_proj at
1-64 rows and llama-3.1-8b's o_proj at 1-16 and down_proj at 5-16; at 17-64 rows of the 8B
shape cuBLASLt's tiles stayed faster, TMA layouts included. gate_up's SiLU-out product has its
own table (`silu_out_config`): TMA layouts won for llama-3.1-8b at 1 and 33-64 rows.
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sglab.srt.layers.arrival import arrival_counters
from sglab.srt.layers.skinny_gemm import _NONE, _RMSNORM, _SILU, SILU_MUL, RMSNormPrologue, \
    _sum_squares, load_x_tile


@triton.jit
def _splitk_gemm_kernel(X, W, B, Out, Part, Count, Res, ResOut, NormW, M, N, K, stride_xm,
                        stride_wn, stride_om, stride_rm, stride_rom, eps, k_per_split,
                        PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, SILU_OUT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k, rows, c, cols, rmask, cmask = _program_tile(M, N, SILU_OUT, BLOCK_M, BLOCK_N)
    dtype = Out.dtype.element_ty
    inv = 0.0
    if PROLOGUE == 1:  # the whole row's sum of squares in every program
        ss = _sum_squares(X, Res, ResOut, rows, rmask, K, stride_xm, stride_rm, stride_rom,
                          pid_n + pid_k, HAS_RES, BLOCK_M, BLOCK_K)
        inv = 1.0 / tl.sqrt(ss / K + eps)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < k_end
        m2 = rmask[:, None] & kmask[None, :]
        a = load_x_tile(X, Res, NormW, rows, kk, m2, kmask, K, stride_xm, stride_rm, inv, dtype,
                        PROLOGUE, HAS_RES)
        w = tl.load(W + cols[None, :] * stride_wn + kk[:, None],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        else:  # Triton's interpreter cannot tl.dot bf16
            acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    _finish(acc, B, Out, Part, Count, rows, cols, c, rmask, cmask, pid_n, pid_k, N, stride_om,
            HAS_BIAS, SILU_OUT, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _splitk_tma_kernel(X_desc, W_desc, B, Out, Part, Count, M, N, K, stride_om, k_per_split,
                       SILU_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The plain product with x and W tiles loaded by the tensor memory accelerator (TMA
    layouts): rows past M and keys past K arrive as zeros. SILU_OUT loads the gate and up
    halves as two tiles and interleaves their accumulators as the pointer kernel holds them."""
    pid_n, pid_k, rows, c, cols, rmask, cmask = _program_tile(M, N, SILU_OUT, BLOCK_M, BLOCK_N)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if SILU_OUT:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N // 2], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N // 2], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            a = X_desc.load([0, k0])
            acc_g = _tma_dot(acc_g, a, W_desc.load([pid_n * (BLOCK_N // 2), k0]), USE_DOT,
                             DOT_PRECISION)
            acc_u = _tma_dot(acc_u, a, W_desc.load([N // 2 + pid_n * (BLOCK_N // 2), k0]),
                             USE_DOT, DOT_PRECISION)
        acc = tl.reshape(tl.join(acc_g, acc_u), (BLOCK_M, BLOCK_N))
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            acc = _tma_dot(acc, X_desc.load([0, k0]), W_desc.load([pid_n * BLOCK_N, k0]),
                           USE_DOT, DOT_PRECISION)
    _finish(acc, B, Out, Part, Count, rows, cols, c, rmask, cmask, pid_n, pid_k, N, stride_om,
            HAS_BIAS, SILU_OUT, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _program_tile(M, N, SILU_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's column tile and split, its rows and weight rows (cols) with their masks.
    SILU_OUT (N = [gate; up] rows): even tile columns gate, odd ones up, of one output."""
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    if SILU_OUT:
        out_cols = pid_n * (BLOCK_N // 2) + c // 2
        cols = out_cols + (c % 2) * (N // 2)
        cmask = out_cols < N // 2
    else:
        cols = pid_n * BLOCK_N + c
        cmask = cols < N
    return pid_n, tl.program_id(1), rows, c, cols, rows < M, cmask


@triton.jit
def _tma_dot(acc, a, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ w^T for a [BLOCK_M, BLOCK_K] and w [BLOCK_N, BLOCK_K] tile."""
    if USE_DOT:
        return tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _finish(acc, B, Out, Part, Count, rows, cols, c, rmask, cmask, pid_n, pid_k, N, stride_om,
            HAS_BIAS: tl.constexpr, SILU_OUT: tl.constexpr, SPLIT_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One split's fp32 tile: stored (one split), or written to the workspace, where the last
    split of the column tile to arrive sums them in split order, stores and re-zeroes."""
    if SPLIT_K == 1:
        _store_tile(acc, B, Out, rows, cols, rmask, cmask, pid_n, N, stride_om, HAS_BIAS,
                    SILU_OUT, BLOCK_M, BLOCK_N)
    else:
        tile = Part + (pid_n * SPLIT_K * BLOCK_M + rows[:, None]) * BLOCK_N + c[None, :]
        tl.store(tile + pid_k * BLOCK_M * BLOCK_N, acc)
        tl.debug_barrier()  # every thread's partial before the arrival
        arrived = tl.atomic_add(Count + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(tile + s * BLOCK_M * BLOCK_N, volatile=True)
            _store_tile(total, B, Out, rows, cols, rmask, cmask, pid_n, N, stride_om,
                        HAS_BIAS, SILU_OUT, BLOCK_M, BLOCK_N)
            tl.store(Count + pid_n, 0)


@triton.jit
def _store_tile(acc, B, Out, rows, cols, rmask, cmask, pid_n, N, stride_om,
                HAS_BIAS: tl.constexpr, SILU_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The tile rounded once (to F.linear's output); SILU_OUT: then silu(gate) * up, rounded
    where SiluAndMul rounds."""
    dtype = Out.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU_OUT:
        g, u = tl.split(tl.reshape(acc.to(dtype), (BLOCK_M, BLOCK_N // 2, 2)))
        g = g.to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Out + rows[:, None] * stride_om + out_cols[None, :], (s * u).to(dtype),
                 mask=rmask[:, None] & (out_cols < N // 2)[None, :])
    else:
        tl.store(Out + rows[:, None] * stride_om + cols[None, :], acc.to(dtype),
                 mask=rmask[:, None] & cmask[None, :])


# (N, K) of a weight -> ((lowest M, highest M, layout, beats F.linear), ...): the fastest
# layout per range of decode rows on an H200, and whether it beat F.linear under cuBLASLt by
# SPLITK_WIN (benchmark/results/2026-12-03-h200-kernel-sweep-splitk.md). Plain products take
# only the winning layouts; the fused ones (a norm or SiLU folded in, which a separate kernel
# would cost) take any.
Table = dict[tuple[int, int], tuple[tuple[int, int, dict, bool], ...]]
MAX_M = 64
_LAYOUT_KEYS = {"BLOCK_N", "BLOCK_K", "SPLIT_K", "TMA", "num_warps", "num_stages"}


def _layout(block_n: int, block_k: int, split_k: int, tma: bool = False, num_warps: int = 4,
            num_stages: int = 4) -> dict:
    cfg = {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": num_warps,
           "num_stages": num_stages}
    return {**cfg, "TMA": 1} if tma else cfg


SPLITK_TABLE: Table = {
    (1024, 2048): (  # qwen3-0.6b o
        (1, 1, _layout(32, 64, 8), True),
        (2, 4, _layout(32, 128, 8), True),
        (5, 8, _layout(32, 128, 8), True),
        (9, 16, _layout(32, 128, 8), True),
        (17, 32, _layout(32, 128, 4), True),
        (33, 64, _layout(32, 128, 4), False),
    ),
    (1024, 3072): (  # qwen3-0.6b down
        (1, 1, _layout(32, 128, 8), True),
        (2, 4, _layout(32, 128, 8), True),
        (5, 8, _layout(32, 128, 8), True),
        (9, 16, _layout(32, 128, 8), True),
        (17, 32, _layout(32, 128, 4), True),
        (33, 64, _layout(32, 128, 4), True),
    ),
    (4096, 1024): (  # qwen3-0.6b qkv
        (1, 1, _layout(32, 128, 1), False),
        (2, 4, _layout(32, 128, 1), False),
        (5, 8, _layout(32, 128, 1), False),
        (9, 16, _layout(32, 128, 1), False),
        (17, 32, _layout(32, 128, 1), False),
        (33, 64, _layout(32, 128, 1), True),
    ),
    (4096, 4096): (  # llama-3.1-8b o
        (1, 1, _layout(64, 128, 4), True),
        (2, 4, _layout(32, 128, 2), True),
        (5, 8, _layout(32, 128, 2), True),
        (9, 16, _layout(32, 128, 2), True),
        (17, 32, _layout(32, 128, 2), False),
        (33, 64, _layout(32, 128, 2), False),
    ),
    (4096, 14336): (  # llama-3.1-8b down
        (1, 1, _layout(64, 128, 4), False),
        (2, 4, _layout(64, 128, 4), False),
        (5, 8, _layout(64, 128, 4), True),
        (9, 16, _layout(128, 128, 4), True),
        (17, 32, _layout(128, 128, 4), False),
        (33, 64, _layout(64, 128, 2), False),
    ),
    (6144, 1024): (  # qwen3-0.6b gate_up
        (1, 1, _layout(64, 128, 1), False),
        (2, 4, _layout(64, 128, 1), False),
        (5, 8, _layout(64, 128, 1), False),
        (9, 16, _layout(64, 128, 1), False),
        (17, 32, _layout(64, 128, 1), False),
        (33, 64, _layout(64, 128, 1), False),
    ),
    (6144, 4096): (  # llama-3.1-8b qkv
        (1, 1, _layout(32, 128, 2), False),
        (2, 4, _layout(32, 128, 2), False),
        (5, 8, _layout(32, 128, 2), False),
        (9, 16, _layout(32, 128, 2), False),
        (17, 32, _layout(32, 128, 2), False),
        (33, 64, _layout(32, 128, 1), False),
    ),
    (28672, 4096): (  # llama-3.1-8b gate_up
        (1, 1, _layout(32, 64, 1), False),
        (2, 4, _layout(128, 128, 1), False),
        (5, 8, _layout(128, 64, 1), True),
        (9, 16, _layout(32, 64, 1), False),
        (17, 32, _layout(128, 128, 1), False),
        (33, 64, _layout(128, 128, 1), False),
    ),
}


# gate_up weights -> the SiLU-out product's layouts (splitk_gemm(silu_out=True)) and whether
# it beat gate_up through F.linear + the SiLU kernel by SPLITK_WIN on an H200. llama-3.1-8b:
# at 1 and 64 rows TMA layouts (56.6 vs 61.8 µs, 61.3 vs 63.4; kernel_bench's wide sweep,
# results/2026-12-03-h200-kernel-sweep-tma.md), at 2-8 rows the plain product's layouts
# (decode replays, -kernel-decode-splitk.md), at 9-32 none measured to win. qwen3-0.6b: the
# plain product's layouts at every row count. A gate_up shape not listed takes its plain
# product's layouts (config_for's fused entries) at every row count.
_TMA_SILU_1 = _layout(256, 128, 1, tma=True, num_warps=8, num_stages=3)
SILU_OUT_TABLE: Table = {
    (28672, 4096): ((1, 1, _TMA_SILU_1, True),
                    *((lo, hi, cfg, hi <= 8) for lo, hi, cfg, _ in SPLITK_TABLE[28672, 4096][1:-1]),
                    (33, 64, _layout(128, 64, 1, tma=True), True)),
    (6144, 1024): tuple((lo, hi, cfg, True) for lo, hi, cfg, _ in SPLITK_TABLE[6144, 1024]),
}
SILU_SUFFIX = "+silu"  # SGLAB_SPLITK_TABLE's key of a SiLU-out entry: "NxK+silu"

# load_table's SGLAB_SPLITK_TABLE (plain, SiLU out); None: the built-in tables
_override: tuple[Table, Table] | None = None


def load_table() -> None:
    """SGLAB_SPLITK_TABLE: a JSON file {"NxK": [[lowest M, highest M, layout, wins], ...],
    "NxK+silu": [...]} (tables measured on another GPU, `kernel_bench.py sweep --parts
    splitk-sweep` writes one) replaces the built-in tables; "none": no shape goes to
    splitk_gemm; unset: the built-in tables, whatever an earlier model of the process loaded."""
    global _override
    path = os.environ.get("SGLAB_SPLITK_TABLE")
    if path is None or path == "none":
        _override = None if path is None else ({}, {})
        return
    try:
        with open(path) as f:
            raw = json.load(f)
        _override = (parse_table({s: e for s, e in raw.items() if not s.endswith(SILU_SUFFIX)}),
                     parse_table({s[:-len(SILU_SUFFIX)]: e for s, e in raw.items()
                                  if s.endswith(SILU_SUFFIX)}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"SGLAB_SPLITK_TABLE={path!r}: {e}") from None


def parse_table(raw: dict) -> Table:
    table = {}
    for shape, entries in raw.items():
        n, k = (int(v) for v in shape.split("x"))
        rows = []
        for lo, hi, cfg, wins in entries:
            if not 0 < int(lo) <= int(hi) <= MAX_M or not {"BLOCK_N", "BLOCK_K", "SPLIT_K"} \
                    <= set(cfg) <= _LAYOUT_KEYS or not isinstance(wins, bool):
                raise ValueError(f"bad entry for {shape}: {[lo, hi, cfg, wins]}")
            rows.append((int(lo), int(hi), {key: int(v) for key, v in cfg.items()}, wins))
        table[n, k] = tuple(rows)
    return table


# Off: at one row of llama-3.1-8b the folded norms made the decode replay 40% slower (6171 vs
# 4418 µs): every program of qkv and gate_up (up to 1792) runs the row's sum of squares before
# its own loads (benchmark/results/2026-12-03-h200-kernel-decode-splitk.md).
DEFAULT_FOLD_MAX_M = 0
def splitk_fold_max_m() -> int:
    """SGLAB_SPLITK_FOLD_MAX_M (default DEFAULT_FOLD_MAX_M): up to this many rows the decoder's
    norms fold into splitk_gemm's loads, each program reading the whole rows for their sum of
    squares."""
    env = os.environ.get("SGLAB_SPLITK_FOLD_MAX_M")
    if env is None:
        return DEFAULT_FOLD_MAX_M
    if not env.isdigit():
        raise ValueError(f"SGLAB_SPLITK_FOLD_MAX_M={env!r}: expected a non-negative integer")
    return min(MAX_M, int(env))


def splitk_silu() -> bool:
    """SGLAB_SPLITK_SILU (0 / 1, default 1): gate_up's splitk_gemm applies SiLU-and-mul
    before it stores, instead of a separate kernel."""
    env = os.environ.get("SGLAB_SPLITK_SILU", "1")
    if env not in ("0", "1"):
        raise ValueError(f"SGLAB_SPLITK_SILU={env!r}: expected 0 or 1")
    return env == "1"


def splitk_applies(x: torch.Tensor) -> bool:
    """Whether x's rows may go to splitk_gemm at all: on the GPU, 1 to MAX_M of them."""
    return x.is_cuda and 0 < x.numel() // max(1, x.shape[-1]) <= MAX_M


def config_for(n: int, k: int, m: int, fused: bool = False) -> dict | None:
    """The measured layout for an [m, k] @ [n, k]^T product: for a plain one only where it beat
    F.linear, for a fused one (`fused`) wherever measured; None: F.linear."""
    return _lookup(SPLITK_TABLE if _override is None else _override[0], n, k, m, fused)


def silu_out_config(n: int, k: int, m: int) -> dict | None:
    """The SiLU-out product's layout for an [n, k] gate_up weight: where SILU_OUT_TABLE's
    entry won, or for a shape it does not list the plain product's fused entry."""
    table = SILU_OUT_TABLE if _override is None else _override[1]
    if (n, k) in table:
        return _lookup(table, n, k, m, False)
    return config_for(n, k, m, fused=True)


def _lookup(table: Table, n: int, k: int, m: int, fused: bool) -> dict | None:
    for lo, hi, cfg, wins in table.get((n, k), ()):
        if lo <= m <= hi:
            return cfg if wins or fused else None
    return None


def _tma_aligned(*ts: torch.Tensor) -> bool:
    """TMA's rule for a 2-D tensor: a 16-byte aligned base and row stride."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in ts)


def splitk_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None, prologue: RMSNormPrologue | str | None = None,
                silu_out: bool = False):
    """x @ weight^T (+ bias) for at most MAX_M rows, after the prologue as skinny_gemm has
    them (RMSNormPrologue: returns (y, x + residual); SILU_MUL: x is [g, u]). silu_out: the
    weight is [gate; up] and the result silu(x @ gate^T) * (x @ up^T), half as wide. `config`:
    BLOCK_N, BLOCK_K, SPLIT_K and optionally num_warps / num_stages (default: config_for's
    entry, which must exist); TMA: 1 loads the tiles through the tensor memory accelerator
    (products without a prologue, on 16-byte aligned rows; otherwise the pointer kernel)."""
    n, k = weight.shape
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    kind = _RMSNORM if isinstance(prologue, RMSNormPrologue) else \
        _SILU if prologue == SILU_MUL else _NONE
    if x2.shape[1] != (2 * k if kind == _SILU else k):
        raise ValueError(f"splitk_gemm: x has {x2.shape[1]} columns for a weight of K={k}")
    if not 0 < m <= MAX_M:
        raise ValueError(f"splitk_gemm: {m} rows; it serves 1 to {MAX_M}")
    cfg = dict(config or config_for(n, k, m))
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    assert weight.stride(1) == 1 and (not silu_out or n % 2 == 0)
    res = prologue.residual if kind == _RMSNORM else None
    res2 = res.reshape(-1, k) if res is not None else x2
    res_out = torch.empty_like(x2) if res is not None else x2
    block_m = max(16, triton.next_power_of_2(m))
    split_k, block_k = cfg.pop("SPLIT_K"), cfg.pop("BLOCK_K")
    tma = cfg.pop("TMA", 0) and kind == _NONE and _tma_aligned(x2, weight)
    out_n = n // 2 if silu_out else n
    tiles = triton.cdiv(out_n, cfg["BLOCK_N"] // 2 if silu_out else cfg["BLOCK_N"])
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    out = torch.empty((m, out_n), dtype=x.dtype, device=x.device)
    part = torch.empty(tiles * split_k * block_m * cfg["BLOCK_N"] if split_k > 1 else 1,
                       dtype=torch.float32, device=x.device)
    common = dict(SILU_OUT=silu_out, HAS_BIAS=bias is not None, USE_DOT=x.is_cuda,
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_K=block_k, **cfg)
    b = bias if bias is not None else weight
    if tma:
        w_rows = cfg["BLOCK_N"] // 2 if silu_out else cfg["BLOCK_N"]
        _splitk_tma_kernel[(tiles, split_k)](
            TensorDescriptor.from_tensor(x2, [block_m, block_k]),
            TensorDescriptor.from_tensor(weight, [w_rows, block_k]), b, out, part,
            arrival_counters(x.device, tiles), m, n, k, out.stride(0), k_per_split, **common)
    else:
        _splitk_gemm_kernel[(tiles, split_k)](
            x2, weight, b, out, part, arrival_counters(x.device, tiles), res2, res_out,
            prologue.weight if kind == _RMSNORM else weight, m, n, k, x2.stride(0),
            weight.stride(0), out.stride(0), res2.stride(0), res_out.stride(0),
            prologue.eps if kind == _RMSNORM else 0.0, k_per_split, PROLOGUE=kind,
            HAS_RES=res is not None, **common)
    out = out.view(*x.shape[:-1], out_n)
    if kind != _RMSNORM:
        return out
    return out, res_out.view(*x.shape[:-1], k)
