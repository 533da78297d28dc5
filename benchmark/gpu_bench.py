"""GPU benchmark driver: sglab vs the HBM roofline and HF transformers, measured in one run.

    python benchmark/gpu_bench.py all --out DIR [--presets qwen3-0.6b llama-3.1-8b qwen3.5-9b]

Each measurement runs in its own process so the engines never share GPU memory. Writes
DIR/gpu_bench.json and DIR/gpu_bench.md. A hybrid model's decode step also reads and writes
each request's recurrent state: its roofline is (weights + batch x 2 x state bytes) / bandwidth.
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

import torch

from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line

DECODE_BS = [1, 8, 64]
INPUT_LEN = 256
OUTPUT_LEN = 64
CONCURRENCY = 64
THROUGHPUT_OUTPUT_LEN = 256


def measure_bandwidth(pairs: int = 3) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second): the best of `pairs`
    buffer pairs' median of 20 copies (after 5 discarded). One pair's median moved by 5%
    between processes on one H200 (4026-4207 GB/s); the best sustained copy is the roofline
    the ratios are taken against, so a slow measurement never flatters them."""
    n = 1 << 30
    medians = []
    for _ in range(pairs):
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        times = []
        for _ in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        medians.append(statistics.median(times[5:]))
        del src, dst
    t = min(medians)
    return {"copy_bytes": n, "median_s": t, "bandwidth_gbps": 2 * n / t / 1e9,
            "pair_gbps": [round(2 * n / m / 1e9, 1) for m in medians]}


def _model_dir(preset: str) -> str:
    from sglab.srt.utils.dummy_model import make_dummy_model

    path = os.path.join(tempfile.gettempdir(), "sglab-bench-models", preset)
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_dummy_model(preset, path)
    return path


def _scheduler(preset: str, **kwargs):
    from sglab.srt.configs.mamba_utils import is_hybrid_model_path
    from sglab.srt.managers.scheduler import Scheduler
    from sglab.srt.server_args import ServerArgs

    path = _model_dir(preset)
    if is_hybrid_model_path(path):  # the loop toggles overlap: no prefix cache of states
        kwargs.setdefault("disable_radix_cache", True)
    args = ServerArgs(model_path=path, load_format="dummy", dtype="bfloat16",
                      random_seed=0, **kwargs)
    return Scheduler(args)


def _submit(scheduler, n: int, input_len: int, output_len: int, tag: str) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = scheduler.model_config.vocab_size
    _submit_ids(scheduler, [rng.integers(0, vocab, input_len).tolist() for _ in range(n)],
                output_len, tag)


def _submit_ids(scheduler, ids_list: list[list[int]], output_len: int, tag: str,
                params: dict | None = None, stream: bool = False) -> None:
    """Requests with the given token ids (greedy unless `params` says otherwise), rids
    `tag-i`; `stream`: each step's tokens are sent out as they come."""
    from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglab.srt.sampling.sampling_params import SamplingParams

    for i, ids in enumerate(ids_list):
        sp = SamplingParams(max_new_tokens=output_len, ignore_eos=True,
                            **(params or {"temperature": 0}))
        sp.normalize(None)
        scheduler.handle_generate_request(TokenizedGenerateReqInput(
            rid=f"{tag}-{i}", input_text=None, input_ids=ids, sampling_params=sp,
            stream=stream))


def _time_steps(scheduler, steps: int) -> float:
    """Seconds per scheduler step over `steps` steps, device work included."""
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        scheduler.run_step()
    torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def _drain(scheduler) -> int:
    steps = 0
    while scheduler.run_step():
        steps += 1
    scheduler.outputs.clear()
    torch.cuda.synchronize()
    return steps


def run_sglab(preset: str, kernel_fusion: str = "off") -> dict:
    from sglab.bench_one_batch import run_one

    out: dict = {"preset": preset, "kernel_fusion": kernel_fusion}
    sched = _scheduler(preset, disable_overlap_schedule=True, kernel_fusion=kernel_fusion)
    out["weight_bytes"] = sched.model_config.weight_bytes()
    runner = sched.tp_worker.model_runner
    out["state_bytes_per_req"] = runner.mamba_slot_bytes() \
        if sched.model_config.hybrid is not None else 0
    run_one(sched, 1, 16, 8, seed=99)
    out["one_batch"] = [run_one(sched, bs, INPUT_LEN, OUTPUT_LEN).__dict__ for bs in DECODE_BS]
    sched.enable_overlap = True
    out["decode_bs1_overlap"] = _steady_decode(sched, 1)
    out["throughput"] = _throughput(sched)
    out["idle"] = _idle_fraction(sched)
    sched.enable_overlap = False
    out["throughput_no_overlap"] = _throughput(sched)
    return out


def _throughput(sched) -> dict:
    _submit(sched, CONCURRENCY, INPUT_LEN, THROUGHPUT_OUTPUT_LEN, f"tp{time.time()}")
    torch.cuda.synchronize()
    tic = time.perf_counter()
    _drain(sched)
    elapsed = time.perf_counter() - tic
    sched.flush_cache()
    tokens = CONCURRENCY * THROUGHPUT_OUTPUT_LEN
    return {"requests": CONCURRENCY, "input_len": INPUT_LEN,
            "output_len": THROUGHPUT_OUTPUT_LEN, "seconds": elapsed,
            "output_throughput": tokens / elapsed}


def _steady_decode(sched, batch_size: int, steps: int = 200) -> dict:
    """Decode step time (= ITL) in steady state with the server's loop, overlap as configured."""
    _submit(sched, batch_size, INPUT_LEN, steps + 100, f"steady{time.time()}")
    for _ in range(30):
        sched.run_step()
    step = _time_steps(sched, steps)
    _drain(sched)
    sched.flush_cache()
    return {"batch_size": batch_size, "steps": steps, "step_s": step}


def _idle_fraction(sched, batch_size: int = 8) -> dict:
    """GPU idle share between decode steps (overlap on), from a profiler trace."""
    from torch.autograd import DeviceType

    _submit(sched, batch_size, INPUT_LEN, 200, f"idle{time.time()}")
    for _ in range(20):  # prefill and a few decodes before the window
        sched.run_step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(60):
            sched.run_step()
        torch.cuda.synchronize()
    _drain(sched)
    sched.flush_cache()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        busy += cur_end - cur_start
    window = spans[-1][1] - spans[0][0] if spans else 0.0
    return {"batch_size": batch_size, "steps": 60, "gpu_busy_us": busy, "window_us": window,
            "idle_fraction": 1 - busy / window if window else None}


def run_hf(preset: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(_model_dir(preset))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    vocab = config.vocab_size

    def generate(bs: int, new_tokens: int) -> float:
        ids = torch.randint(0, vocab, (bs, INPUT_LEN), device="cuda")
        torch.cuda.synchronize()
        tic = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - tic

    generate(1, 4)
    t1, t_long = generate(1, 1), generate(1, OUTPUT_LEN + 1)
    itl = (t_long - t1) / OUTPUT_LEN
    t_batch = generate(CONCURRENCY, THROUGHPUT_OUTPUT_LEN)
    return {"preset": preset, "itl_bs1_s": itl,
            "output_throughput": CONCURRENCY * THROUGHPUT_OUTPUT_LEN / t_batch,
            "batch": CONCURRENCY, "input_len": INPUT_LEN,
            "output_len": THROUGHPUT_OUTPUT_LEN}


def _child(kind: str, preset: str, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, kind, "--preset", preset, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(out_dir: str, name: str, report: dict, markdown: str) -> None:
    """DIR/<name>.json and DIR/<name>.md, and the markdown on stdout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def sglab_key(fusion: str) -> str:
    """A report's key for sglab at `--kernel-fusion fusion` ("sglab": off, the default)."""
    return "sglab" if fusion == "off" else f"sglab-fusion-{fusion}"


def run_all(presets: list[str], out_dir: str, commit: str | None = None,
            fusions: tuple[str, ...] = ("off",)) -> dict:
    report = {**provenance(commit), "bandwidth": measure_bandwidth(), "models": {}}
    for preset in presets:
        report["models"][preset] = {
            **{sglab_key(f): _child("sglab", preset, ["--kernel-fusion", f]) for f in fusions},
            "hf": _child("hf", preset)}
        print(json.dumps(report["models"][preset])[:2000], flush=True)
        write_results(out_dir, "gpu_bench", report, to_markdown(report))
    return report


def _runs(report: dict):
    """(row label, sglab result, hf result) per preset and kernel-fusion setting."""
    for preset, m in report["models"].items():
        for key, s in m.items():
            if key.startswith("sglab"):
                label = preset if key == "sglab" else f"{preset} ({key.removeprefix('sglab-')})"
                yield label, s, m.get("hf", {"error": "not run"})


def to_markdown(report: dict) -> str:
    bw = report["bandwidth"]["bandwidth_gbps"]
    lines = [provenance_line(report),
             f"Measured device copy bandwidth: {bw:.0f} GB/s", "",
             "Decode step with a host sync after every step (bench_one_batch, overlap off):", "",
             "| model | bs | decode step (ms) | roofline (ms) | ratio | prefill (ms) |",
             "|---|---|---|---|---|---|"]
    for preset, s, _ in _runs(report):
        if "error" in s:
            lines.append(f"| {preset} | error | | | | |")
            continue
        for r in s["one_batch"]:
            roof = _roofline(s, r["batch_size"], bw)
            step = r["median_decode_latency_s"]
            lines.append(f"| {preset} | {r['batch_size']} | {step * 1e3:.3f} | "
                         f"{roof * 1e3:.3f} | {step / roof:.2f} | "
                         f"{r['prefill_latency_s'] * 1e3:.2f} |")
    lines += ["", "Decode ITL at batch 1 with the overlap loop (steady state, 200 steps):", "",
              "| model | ITL bs1 (ms) | roofline (ms) | ratio | HF ITL bs1 (ms) |",
              "|---|---|---|---|---|"]
    for preset, s, h in _runs(report):
        if "error" in s or "decode_bs1_overlap" not in s:
            continue
        roof = _roofline(s, 1, bw)
        itl = s["decode_bs1_overlap"]["step_s"]
        hf_itl = f"{h['itl_bs1_s'] * 1e3:.2f}" if "itl_bs1_s" in h else "error"
        lines.append(f"| {preset} | {itl * 1e3:.3f} | {roof * 1e3:.3f} | {itl / roof:.2f} | "
                     f"{hf_itl} |")
    lines += ["", "| model | sglab out tok/s (64 concurrent, overlap) | no overlap | "
              "HF tok/s | ratio vs HF | HF ITL bs1 (ms) | GPU idle (overlap) |",
              "|---|---|---|---|---|---|---|"]
    for preset, s, h in _runs(report):
        if "error" in s or "error" in h:
            lines.append(f"| {preset} | error | | | | | |")
            continue
        ours = s["throughput"]["output_throughput"]
        lines.append(
            f"| {preset} | {ours:.0f} | {s['throughput_no_overlap']['output_throughput']:.0f} | "
            f"{h['output_throughput']:.0f} | {ours / h['output_throughput']:.2f} | "
            f"{h['itl_bs1_s'] * 1e3:.2f} | {s['idle']['idle_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def _roofline(s: dict, batch_size: int, bandwidth_gbps: float) -> float:
    """Seconds to read the weights once and each request's state twice (read, write)."""
    state = 2 * batch_size * s.get("state_bytes_per_req", 0)
    return (s["weight_bytes"] + state) / (bandwidth_gbps * 1e9)


def bench_parser(kinds: list[str]) -> argparse.ArgumentParser:
    """`KIND [--preset P | --presets P...] [--out DIR] [--commit C]`: a driver ("all") and the
    children it starts, one measurement each."""
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=kinds)
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--presets", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    parser.add_argument("--out", default=".")
    add_provenance_args(parser)
    return parser


def main() -> None:
    parser = bench_parser(["all", "sglab", "hf", "bandwidth"])
    parser.add_argument("--kernel-fusion", choices=["off", "on"], default="off",
                        help="sglab child: its --kernel-fusion")
    parser.add_argument("--fusions", nargs="+", choices=["off", "on"], default=["off"],
                        help="all: one sglab run per --kernel-fusion setting")
    args = parser.parse_args()
    if args.kind == "all":
        run_all(args.presets, args.out, args.commit, tuple(args.fusions))
        return
    if args.kind == "sglab":
        result = run_sglab(args.preset, args.kernel_fusion)
    else:
        result = run_hf(args.preset) if args.kind == "hf" else measure_bandwidth()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
