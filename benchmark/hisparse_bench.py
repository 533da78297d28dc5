"""HiSparse on the GPU: capacity and decode step time against dense attention.

    python benchmark/hisparse_bench.py capacity --out DIR [--preset llama-3.1-8b]
        [--input-len 32768] [--requests 48] [--mem-fraction-static 0.3]
    python benchmark/hisparse_bench.py step --out DIR [--contexts 8192 32768 65536]
        [--batch-sizes 1 8]
    python benchmark/hisparse_bench.py profile --out DIR --contexts 8192 --batch-sizes 4

capacity: the most concurrent `--input-len`-token requests served without a retraction, dense
vs HiSparse at the same `--mem-fraction-static` (HiSparse's host tier is
`host_to_device_ratio` times the device pool, in pinned host memory). `--requests` are submitted
at once and stepped until the first one finishes; the peak of the running batch is recorded,
and a run that retracted is repeated with one request fewer than its peak.
step: median decode step time (overlap off, so a step is its own wall time; CUDA graphs on) of
`bs` requests at each context, dense vs HiSparse (`--hisparse-config`). The device pool is sized
for the workload in each mode (HiSparse: two prompts plus the hot buffers, the rest on the
host).
profile: the same decode steps under torch.profiler: wall and kernel time per step, kernel
launches per step and the top kernels by device time.

Each measurement runs in its own process. Writes DIR/hisparse_bench.json and .md. The 0004 A/B
itself is `python -m sglab.bench_ab --patch 0004` (scripts/run_gpu.sh hisparse).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line

HISPARSE_CONFIG = {"top_k": 2048, "device_buffer_size": 4096}
OUTPUT_LEN = 32


def _model_dir(preset: str) -> str:
    from sglab.srt.utils.dummy_model import make_dummy_model

    path = os.path.join(tempfile.gettempdir(), "sglab-bench-models", preset)
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_dummy_model(preset, path)
    return path


def _scheduler(preset: str, hisparse: dict | None, **kwargs):
    from sglab.srt.managers.scheduler import Scheduler
    from sglab.srt.server_args import ServerArgs

    extra = {"enable_hisparse": True, "hisparse_config": json.dumps(hisparse)} if hisparse \
        else {}
    args = ServerArgs(model_path=_model_dir(preset), load_format="dummy", dtype="bfloat16",
                      random_seed=0, disable_radix_cache=True, **extra, **kwargs)
    return Scheduler(args)


def _submit(scheduler, n: int, input_len: int, output_len: int) -> list:
    import numpy as np

    from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglab.srt.sampling.sampling_params import SamplingParams

    rng = np.random.default_rng(0)
    vocab = scheduler.model_config.vocab_size
    for i in range(n):
        sp = SamplingParams(max_new_tokens=output_len, ignore_eos=True, temperature=0)
        sp.normalize(None)
        scheduler.handle_generate_request(TokenizedGenerateReqInput(
            rid=f"r{i}", input_text=None, input_ids=rng.integers(0, vocab, input_len).tolist(),
            sampling_params=sp))
    return list(scheduler.waiting_queue)


def _busy(scheduler) -> bool:
    return not scheduler.is_idle()


def capacity_once(preset: str, hisparse: dict | None, requests: int, input_len: int,
                  mem_fraction: float) -> dict:
    """Steps until the first request finishes: by then every request that fits has been
    admitted (prefill goes first) and the running ones have decoded side by side."""
    sched = _scheduler(preset, hisparse, mem_fraction_static=mem_fraction)
    reqs = _submit(sched, requests, input_len, OUTPUT_LEN)
    peak, tic = 0, time.perf_counter()
    while _busy(sched) and not any(r.finished() for r in reqs):
        sched.run_step()
        peak = max(peak, len(sched.running_batch.reqs))
        sched.outputs.clear()
    out = {"requests": requests, "peak_running": peak,
           "retractions": sum(r.total_retractions for r in reqs),
           "device_kv_tokens": sched.max_total_num_tokens, "seconds": time.perf_counter() - tic}
    if sched.hisparse is not None:
        out["host_kv_tokens"] = sched.hisparse.allocator.logical.size
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decoding(preset: str, hisparse: dict | None, bs: int, context: int):
    """A scheduler whose running batch is `bs` requests decoding at `context`."""
    need = bs * (context + 128) + 8192
    kwargs = {"max_total_tokens": need, "disable_overlap_schedule": True}
    if hisparse:
        page = hisparse.get("page_size", 64)
        device = 2 * context + bs * (hisparse["device_buffer_size"] + page) + 8192
        kwargs["max_total_tokens"] = min(device, need)
        ratio = max(1.0, need / kwargs["max_total_tokens"])
        hisparse = {**hisparse, "host_to_device_ratio": ratio}
    sched = _scheduler(preset, hisparse, **kwargs)
    _submit(sched, bs, context, 96)
    while len(sched.running_batch.reqs) < bs or sched.waiting_queue:
        sched.run_step()
    for _ in range(8):
        sched.run_step()
    return sched


def step_once(preset: str, hisparse: dict | None, bs: int, context: int) -> dict:
    sched = _decoding(preset, hisparse, bs, context)
    times = []
    for _ in range(48):
        _sync()
        tic = time.perf_counter()
        sched.run_step()
        times.append(time.perf_counter() - tic)
    return {"bs": bs, "context": context, "median_step_ms": 1e3 * statistics.median(times),
            "device_kv_tokens": sched.max_total_num_tokens}


def profile_once(preset: str, hisparse: dict | None, bs: int, context: int,
                 steps: int = 10) -> dict:
    """Kernels of `steps` decode steps: time per step, kernel launches per step, top kernels."""
    import torch
    from torch.autograd import DeviceType

    sched = _decoding(preset, hisparse, bs, context)
    _sync()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    tic = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            sched.run_step()
        _sync()
    wall = (time.perf_counter() - tic) / steps
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.end - e.time_range.start for e in kernels) / steps
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    return {"bs": bs, "context": context, "wall_ms_per_step": 1e3 * wall,
            "kernel_ms_per_step": busy / 1e3, "kernels_per_step": len(kernels) / steps,
            "table": table}


def _in_subprocess(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_one", "--kind", kind, "--params",
           json.dumps(kwargs)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:], **kwargs}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_capacity(args) -> list[dict]:
    rows = []
    for name, hisparse in (("dense", None), ("hisparse", _config(args))):
        requests = args.requests
        for _ in range(3):
            r = _in_subprocess("capacity", preset=args.preset, hisparse=hisparse,
                               requests=requests, input_len=args.input_len,
                               mem_fraction=args.mem_fraction_static)
            if "error" in r or r["retractions"] == 0 or r["peak_running"] <= 1:
                break
            requests = r["peak_running"] - 1
        rows.append({"mode": name, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _per_shape(args, kind: str) -> list[dict]:
    """`kind` in its own process per context, batch size and mode (dense, HiSparse)."""
    rows = []
    for context in args.contexts:
        for bs in args.batch_sizes:
            for name, hisparse in (("dense", None), ("hisparse", _config(args))):
                if name not in args.modes:
                    continue
                r = _in_subprocess(kind, preset=args.preset, hisparse=hisparse, bs=bs,
                                   context=context)
                rows.append({"mode": name, **r})
                print(f"{name}: " + json.dumps({k: v for k, v in r.items() if k != "table"}),
                      flush=True)
                if "table" in r:
                    print(r["table"], flush=True)
    return rows


def run_step(args) -> list[dict]:
    return _per_shape(args, "step")


def run_profile(args) -> list[dict]:
    return _per_shape(args, "profile")


def _config(args) -> dict:
    return json.loads(args.hisparse_config)


def _markdown(kind: str, rows: list[dict], prov: dict, argv: list[str]) -> str:
    lines = [f"# HiSparse {kind}", "", provenance_line(prov), "",
             f"`python benchmark/hisparse_bench.py {' '.join(argv)}`", ""]
    if kind == "profile":
        lines += ["| mode | context | bs | wall ms / step | kernel ms / step | kernels / step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r.get('context')} | {r.get('bs')} | "
                  f"{r.get('wall_ms_per_step', 0):.2f} | {r.get('kernel_ms_per_step', 0):.2f} | "
                  f"{r.get('kernels_per_step', 0):.0f} |" for r in rows if "error" not in r]
        lines += ["", *(f"## {r['mode']}, context {r['context']}, bs {r['bs']}\n\n```\n"
                        f"{r['table']}\n```\n" for r in rows if "table" in r)]
    elif kind == "capacity":
        lines += ["| mode | requests | peak running | retractions | device KV tokens | "
                  "host KV tokens |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r.get('requests')} | {r.get('peak_running')} | "
                  f"{r.get('retractions')} | {r.get('device_kv_tokens')} | "
                  f"{r.get('host_kv_tokens', '-')} |" for r in rows]
    else:
        lines += ["| context | bs | dense ms | HiSparse ms | HiSparse / dense |",
                  "|---|---|---|---|---|"]
        pairs = {}
        for r in rows:
            pairs.setdefault((r.get("context"), r.get("bs")), {})[r["mode"]] = r
        for (context, bs), modes in pairs.items():
            d, h = (modes.get(m, {}).get("median_step_ms") for m in ("dense", "hisparse"))
            ratio = f"{h / d:.3f}" if d and h else "-"
            lines.append(f"| {context} | {bs} | {d and f'{d:.2f}'} | {h and f'{h:.2f}'} | "
                         f"{ratio} |")
    errors = [r for r in rows if "error" in r]
    lines += ["", *(f"- {r['mode']}: failed: `{r['error'].splitlines()[-1]}`" for r in errors)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["capacity", "step", "profile", "_one"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--hisparse-config", default=json.dumps(HISPARSE_CONFIG))
    parser.add_argument("--input-len", type=int, default=32768)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--mem-fraction-static", type=float, default=0.3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=["dense", "hisparse"],
                        default=["dense", "hisparse"], help="step / profile: which to measure")
    parser.add_argument("--kind", dest="one_kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--params", default=None, help=argparse.SUPPRESS)
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.kind == "_one":
        fn = {"capacity": capacity_once, "step": step_once,
              "profile": profile_once}[args.one_kind]
        print(json.dumps(fn(**json.loads(args.params))))
        return
    prov = provenance(args.commit)
    rows = {"capacity": run_capacity, "step": run_step, "profile": run_profile}[args.kind](args)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"hisparse_{args.kind}")
    with open(base + ".json", "w") as f:
        json.dump({"provenance": prov, "argv": sys.argv[1:], "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(_markdown(args.kind, rows, prov, sys.argv[1:]))
    print(open(base + ".md").read())


if __name__ == "__main__":
    main()
