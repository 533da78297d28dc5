"""Whether a decode layer's o_proj weight can be pulled into L2 while decode attention runs.

At 64 decode rows of llama-3.1-8b, decode attention (264 keys each) reads the KV cache at about
2/3 of the copy bandwidth and o_proj ([4096, 4096] bf16, 33.5 MB, under the H200's 50 MB L2)
streams its weight at about 2/3 too. This times, in one CUDA graph over LAYERS layers (own KV
slots and own weight per layer, so nothing stays in L2 from the layer before):
- attention alone, o_proj alone, and attention then o_proj;
- the same with the o_proj weight prefetched on a side stream during attention, by loads
  with evict_last (`load`) or by `prefetch.global.L2::evict_last` per 128-byte line (`asm`).

    python3 benchmark/l2_prefetch_probe.py [--bs 64] [--ctx 264] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from sglab.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd  # noqa
from sglab.srt.utils.provenance import provenance  # noqa: E402

LAYERS = 32
HQ, HKV, D, HIDDEN = 32, 8, 128, 4096  # llama-3.1-8b


@triton.jit
def _prefetch_load_kernel(ptr, n, sink, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    s = tl.sum(x.to(tl.float32), axis=0)
    if s == 1.2345e-30:  # never: keeps the loads
        tl.store(sink, s)


@triton.jit
def _prefetch_asm_kernel(ptr, n, sink, BLOCK: tl.constexpr):
    lines = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    p = ptr + lines * 64  # bf16 elements of one 128-byte line
    r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n mov.u32 $0, 0;",
                                  "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)
    if tl.sum(r, axis=0) != 0:  # never
        tl.store(sink, 1.0)


def prefetch(w: torch.Tensor, sink: torch.Tensor, mode: str) -> None:
    n = w.numel()
    if mode == "load":
        _prefetch_load_kernel[(triton.cdiv(n, 8192),)](w, n, sink, BLOCK=8192, num_warps=8)
    else:
        lines = n // 64
        _prefetch_asm_kernel[(triton.cdiv(lines, 1024),)](w, lines, sink, BLOCK=1024,
                                                           num_warps=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=264)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bs, ctx = args.bs, args.ctx
    n = bs * ctx
    k_buf = torch.randn(LAYERS * n + 1, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_buf = torch.randn_like(k_buf)
    q = torch.randn(bs, HQ, D, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    indptr = (torch.arange(bs + 1, device="cuda") * ctx).to(torch.int32)
    indices = [torch.arange(1 + i * n, 1 + (i + 1) * n, device="cuda") for i in range(LAYERS)]
    logits = torch.empty(bs, HQ, 1, D, device="cuda")
    lse = torch.empty(bs, HQ, 1, device="cuda")
    counts = torch.zeros(bs * HQ, dtype=torch.int32, device="cuda")
    splits = torch.ones(bs, dtype=torch.int32, device="cuda")
    weights = [torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.01
               for _ in range(LAYERS)]
    sink = torch.zeros(1, device="cuda")
    outs = [torch.empty(bs, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    torch.backends.cuda.preferred_blas_library("cublaslt")
    side = torch.cuda.Stream()

    def attention(i):
        decode_attention_fwd(q, k_buf, v_buf, o, indptr, indices[i], logits, lse, splits, 1,
                             D ** -0.5, merge_count=counts)

    def o_proj(i):
        torch.matmul(o.view(bs, -1), weights[i].t(), out=outs[i])

    def layer(i, mode):
        if mode in ("load", "asm"):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefetch(weights[i], sink, mode)
        if mode != "o_proj":
            attention(i)
        if mode in ("load", "asm"):
            torch.cuda.current_stream().wait_stream(side)
        if mode != "attention":
            o_proj(i)

    def timed(mode) -> float:
        for i in range(LAYERS):  # compile, autotune, workspaces
            layer(i, mode)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(LAYERS):
                layer(i, mode)
        times = []
        for rep in range(23):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            if rep >= 3:
                times.append(a.elapsed_time(b) * 1e3 / LAYERS)
        return sorted(times)[len(times) // 2]

    rows = [(mode, round(timed(mode), 2)) for mode in ("attention", "o_proj", "both", "load",
                                                        "asm", "both", "load", "asm")]
    report = {"provenance": provenance(), "bs": bs, "context": ctx, "layers": LAYERS,
              "weight_mb": HIDDEN * HIDDEN * 2 / 1e6, "us_per_layer": rows}
    print(json.dumps(report["us_per_layer"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "l2_prefetch_probe.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
