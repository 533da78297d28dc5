"""Is the host ever the bottleneck of a decode step? Per batch size: the step time (ITL) with
overlap, CUDA graphs and streaming requests, the GPU time of one graph replay (CUDA events),
their ratio, and the host microseconds per scheduler component, measured with perf_counter
around each.

    python benchmark/decode_host_profile.py --out DIR [--presets qwen3-0.6b llama-3.1-8b]
        [--bs 1 8 64] [--sampling greedy top_p]

Also: the kernels and copies launched outside the graph per steady step (profiler runtime
calls), and the ITL of the same running batch while more than 100 requests wait for KV memory
(`--saturated`), and greedy rows under deterministic inference (`--deterministic`). Writes
DIR/decode_host_profile.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import _scheduler, _submit_ids, write_results  # noqa: E402

from sglab.srt.utils.provenance import (  # noqa: E402
    add_provenance_args,
    provenance,
    provenance_line,
)

STEPS, WARMUP, INPUT_LEN = int(os.environ.get("SGLAB_PROFILE_STEPS", 100)), 20, 256
SAMPLING = {"greedy": {"temperature": 0}, "top_p": {"temperature": 0.8, "top_p": 0.9,
                                                    "sampling_seed": 1}}
# (owner, attribute) of each timed component, by its name in the table.
COMPONENTS = {
    "schedule (get_next_batch_to_run)": ("sglab.srt.managers.scheduler", "Scheduler",
                                         "get_next_batch_to_run"),
    "prepare_for_decode": ("sglab.srt.managers.schedule_batch", "ScheduleBatch",
                           "prepare_for_decode"),
    "get_model_worker_batch": ("sglab.srt.managers.schedule_batch", "ScheduleBatch",
                               "get_model_worker_batch"),
    "graph inputs upload": ("sglab.srt.model_executor.cuda_graph_runner", "GraphInputs",
                            "upload"),
    "graph run (upload + replay launch)": ("sglab.srt.model_executor.cuda_graph_runner",
                                           "CudaGraphRunner", "replay"),
    "forward_batch_generation": ("sglab.srt.managers.tp_worker", "TpModelWorker",
                                 "forward_batch_generation"),
    "result wait + read": ("sglab.srt.managers.tp_worker", "GenerationBatchResult",
                           "synchronize"),
    "process_batch_result_decode": ("sglab.srt.managers.scheduler", "Scheduler",
                                    "process_batch_result_decode"),
    # Part of the one before: the streamed requests' message to the detokenizer.
    "stream_output": ("sglab.srt.managers.scheduler", "Scheduler", "stream_output"),
}


class Timers:
    """perf_counter around each component; µs per call."""

    def __init__(self):
        self.us: dict[str, list[float]] = collections.defaultdict(list)
        self.saved = []

    def __enter__(self) -> "Timers":
        import importlib

        for name, (mod, cls, attr) in COMPONENTS.items():
            owner = getattr(importlib.import_module(mod), cls)
            fn = getattr(owner, attr)
            self.saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def timed(*a, **kw):
            tic = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.us[name].append((time.perf_counter() - tic) * 1e6)
        return timed

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in self.saved:
            setattr(owner, attr, fn)

    def clear(self) -> None:
        self.us.clear()


def _collect() -> None:
    """A scheduler's pools are held in reference cycles: collect them before the next one
    sizes its KV cache from the free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_replay_us(sched, bs: int) -> tuple[float | None, float | None]:
    """GPU µs of one replay (CUDA events), and the host µs its launch takes with the GPU idle
    (in the loop a launch may also wait for the device; this is its cost alone)."""
    gr = sched.tp_worker.model_runner.graph_runner
    if gr is None:
        return None, None
    # The graph the steps replayed: the smallest captured size for bs, of the batch's sampler
    # (the last one captured at that size).
    size = min(k[0] for k in gr.graphs if k[0] >= bs)
    graph = [g for k, g in gr.graphs.items() if k[0] == size][-1]
    times, launches = [], []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        tic = time.perf_counter()
        graph.replay()
        launches.append((time.perf_counter() - tic) * 1e6)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times[5:]), statistics.median(launches[5:])


def outside_graph_calls(sched, steps: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile

    _sync()
    cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    with profile(activities=[ProfilerActivity.CPU, *cuda]) as prof:
        for _ in range(steps):
            sched.run_step()
        _sync()
    calls = collections.Counter(e.name for e in prof.events())
    names = ["cudaGraphLaunch", "cudaLaunchKernel", "cudaMemcpyAsync"]
    return {n: calls[n] / steps for n in names}


def _prompts(vocab: int, n: int, seed: int, length: int = INPUT_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 64, (n, length), generator=g).tolist()


def measure(preset: str, bs: int, sampling: str, deterministic: bool = False) -> dict:
    sched = _scheduler(preset, cuda_graph_max_bs=max(64, bs), max_total_tokens=1 << 18,
                       enable_deterministic_inference=deterministic)
    vocab = sched.model_config.vocab_size
    _submit_ids(sched, _prompts(vocab, bs, bs), WARMUP + STEPS + 40, f"d{bs}",
                SAMPLING[sampling], stream=True)
    for _ in range(WARMUP):
        sched.run_step()
    with Timers() as timers:
        _sync()
        tic = time.perf_counter()
        for _ in range(STEPS):
            sched.run_step()
        _sync()
        itl_us = (time.perf_counter() - tic) / STEPS * 1e6
    host = {k: statistics.median(v) for k, v in timers.us.items()}
    gpu_us, launch_us = graph_replay_us(sched, bs)
    row = {"preset": preset, "bs": bs, "sampling": sampling + (" det" if deterministic else ""),
           "deterministic": deterministic, "itl_us": itl_us, "graph_replay_gpu_us": gpu_us,
           "graph_launch_idle_us": launch_us, "host_us": host,
           "outside_graph_per_step": outside_graph_calls(sched)}
    if row["graph_replay_gpu_us"]:
        row["itl_over_graph"] = itl_us / row["graph_replay_gpu_us"]
    del sched
    _collect()
    return row


def saturated(preset: str, bs: int = 32) -> dict:
    """ITL of a running batch of `bs` with 128 long requests waiting for KV memory, against
    the same batch with nothing waiting."""
    out = {}
    for waiting in (0, 128):
        tokens = bs * (INPUT_LEN + 300 + 8)  # the running batch's own need: nothing else fits
        sched = _scheduler(preset, cuda_graph_max_bs=64, max_total_tokens=tokens)
        vocab = sched.model_config.vocab_size
        _submit_ids(sched, _prompts(vocab, bs, 1), 300, "run")
        for _ in range(WARMUP):
            sched.run_step()
        if waiting:
            # Longer than the KV memory the running batch leaves: they all keep waiting.
            length = min(tokens - bs * INPUT_LEN + 1, sched.context_len - 301)
            _submit_ids(sched, _prompts(vocab, waiting, 2, length=length), 300, "wait")
        for _ in range(5):
            sched.run_step()
        _sync()
        tic = time.perf_counter()
        for _ in range(STEPS):
            sched.run_step()
        _sync()
        out[f"itl_us_waiting_{waiting}"] = (time.perf_counter() - tic) / STEPS * 1e6
        out[f"waiting_{waiting}_queue"] = len(sched.waiting_queue)
        del sched
        _collect()
    out["ratio"] = out["itl_us_waiting_128"] / out["itl_us_waiting_0"]
    return out


def to_markdown(report: dict) -> str:
    comps = list(COMPONENTS)
    lines = ["# Decode step: host per component vs one graph replay", "",
             provenance_line(report["provenance"]), "",
             "| preset | bs | sampling | ITL µs | graph GPU µs | ITL / graph | "
             + " | ".join(comps) + " | graph launch, GPU idle | outside the graph per step |",
             "|---|---|---|---|---|---|" + "---|" * len(comps) + "---|---|"]
    for r in report["rows"]:
        h = " | ".join(f"{r['host_us'].get(c, 0):.0f}" for c in comps)
        o = r["outside_graph_per_step"]
        lines.append(
            f"| {r['preset']} | {r['bs']} | {r['sampling']} | {r['itl_us']:.0f} | "
            f"{(r['graph_replay_gpu_us'] or 0):.0f} | {r.get('itl_over_graph', 0):.3f} | {h} | "
            f"{(r.get('graph_launch_idle_us') or 0):.0f} | "
            f"{o['cudaGraphLaunch']:.1f} graph, {o['cudaLaunchKernel']:.1f} kernels, "
            f"{o['cudaMemcpyAsync']:.1f} copies |")
    for preset, sat in report.get("saturated", {}).items():
        lines.append(f"\nSaturated ({preset}, 32 running): ITL {sat['itl_us_waiting_0']:.0f} µs "
                     f"with none waiting, {sat['itl_us_waiting_128']:.0f} µs with "
                     f"{sat['waiting_128_queue']} waiting: {sat['ratio']:.3f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    parser.add_argument("--bs", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--sampling", nargs="+", default=["greedy", "top_p"],
                        choices=list(SAMPLING))
    parser.add_argument("--saturated", action="store_true")
    parser.add_argument("--deterministic", action="store_true",
                        help="Also greedy rows under --enable-deterministic-inference (decode as "
                             "a one-token unified extend): the speed cost of deterministic mode.")
    add_provenance_args(parser)
    args = parser.parse_args()
    rows = [measure(p, bs, s) for p in args.presets for bs in args.bs for s in args.sampling]
    if args.deterministic:
        rows += [measure(p, bs, "greedy", deterministic=True) for p in args.presets
                 for bs in args.bs]
    report = {"provenance": provenance(args.commit), "rows": rows}
    if args.saturated:
        report["saturated"] = {p: saturated(p) for p in args.presets}
    write_results(args.out, "decode_host_profile", report, to_markdown(report))


if __name__ == "__main__":
    main()
