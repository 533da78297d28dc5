"""Digest of the tokens and logprobs a fixed mixed workload gets, to show a refactor of the
engine changed no output: run it on the tree before and after, compare the printed digests.

    python scripts/output_digest.py [--preset tiny-qwen3] [--device cpu]

The workload: shared prefixes and mixed prompt lengths, greedy and seeded sampling (top-p,
top-k, min-p), penalties, prompt and output logprobs; run with overlap on and off, chunked
prefill at 16 tokens and the radix cache on, plus a forced retraction.

The dummy weights and the float kernels come from the installed torch / transformers, so a
digest is comparable only to one printed with the same versions (printed with it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random

from sglab.test.runners import SchedulerRunner
from sglab.test.schedule_invariance import forced_retraction

SAMPLING = [
    {"temperature": 0},
    {"temperature": 0.7, "top_p": 0.9, "sampling_seed": 11},
    {"temperature": 1.0, "top_k": 20, "min_p": 0.05, "sampling_seed": 12},
    {"temperature": 0, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
]


def workload(vocab: int, seed: int = 0) -> list[tuple[list[int], dict]]:
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(vocab - 64) for _ in range(n)]  # noqa: E731
    prefixes = [tok(40), tok(23)]
    reqs = []
    for i in range(12):
        prompt = prefixes[i % 2] + tok(rng.randint(1, 30)) if i % 3 else tok(rng.randint(2, 50))
        params = {**SAMPLING[i % len(SAMPLING)], "max_new_tokens": rng.randint(4, 24),
                  "ignore_eos": True}
        reqs.append((prompt, params))
    return reqs


def run(runner: SchedulerRunner, reqs) -> list:
    rids = [runner.submit(p, params, return_logprob=True, logprob_start_len=len(p) // 2,
                          top_logprobs_num=2) for p, params in reqs]
    outs = runner.run()
    return [[outs[r].output_ids, _asked(outs[r].logprobs)] for r in rids]


def _asked(logprobs: dict) -> dict:
    """The logprob fields the workload asks for: token_ids_logprob is not asked, and its
    (empty) fields are left out so the digest compares with trees that predate it."""
    return {k: v for k, v in logprobs.items() if "token_ids" not in k}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-qwen3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", default="/tmp/sglab-digest-models")
    args = parser.parse_args()
    from sglab.srt.utils.dummy_model import make_dummy_model

    path = make_dummy_model(args.preset, f"{args.model_dir}/{args.preset}", weights=True)
    results = {}
    for overlap in (True, False):
        runner = SchedulerRunner(model_path=path, device=args.device, chunked_prefill_size=16,
                                 disable_overlap_schedule=not overlap)
        reqs = workload(runner.scheduler.model_config.vocab_size)
        name = "overlap" if overlap else "normal"
        results[name] = digest(run(runner, reqs))
        results[name + " (radix warm)"] = digest(run(runner, reqs))
        assert runner.scheduler.flush_cache()
        with forced_retraction():
            results[name + " (retraction)"] = digest(run(runner, reqs))
        assert runner.integrity_error() is None
    import torch
    import transformers

    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
