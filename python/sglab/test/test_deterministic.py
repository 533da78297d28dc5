"""Determinism check against a running server, as upstream's `sglang.test.test_deterministic`.

    python -m sglab.test.test_deterministic --test-mode single|mixed|prefix|radix_cache|p_vs_d \
        --n-trials N [--host 127.0.0.1 --port 30000] [--temperature 0.5] [--return-logprob]

* single: one /generate with the same prompt `bs` times, for bs = 1..N.
* mixed: per trial a batch of bs = 1..N mixing two short prompts and (bs > 10) 1-10 copies of a
  long one.
* prefix: per trial, /flush_cache, then a batch of `bs` random picks among prefixes of the long
  prompt (1, 511, 2048 and 4097 characters, as upstream; bs = n_start .. n_start + N - 1).
* radix_cache: per trial, the prompt uncached (after /flush_cache), then the same prompt after a
  prefix of it was cached (meta_info.cached_tokens > 0).
* p_vs_d: prefill vs decode: per trial a batch of bs prompts generates; then, from an empty
  cache, the prompts plus their outputs are prefilled, and the logprobs the decode gave each
  output token must equal the ones the prefill gives it.

Every request carries sampling_seed (42 unless told). A sample is the output text and token
ids, plus the output token logprobs when --return-logprob; the server is deterministic when each
count prints `Unique samples: 1` (p_vs_d: `Matching sequences: N/N`). The printed lines follow
upstream's, so upstream tooling that reads them works.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass, field

import requests

PROMPT_1 = "Tell me about Richard Feynman: "
PROMPT_2 = ("Generate 1000 random numbers. Go directly into it, don't say Sure and don't say "
            "here are numbers. Just start with a number.")
PREFIX_LENGTHS = [1, 511, 2048, 4097]  # characters of LONG_PROMPT, as upstream
TEST_MODES = ["single", "mixed", "prefix", "radix_cache", "p_vs_d"]
_WORDS = [
    "the", "quantum", "electrodynamics", "of", "light", "and", "matter", "was", "explained",
    "with", "diagrams", "that", "show", "how", "particles", "move", "interact", "scatter",
    "through", "space", "time", "in", "a", "lecture", "given", "to", "students", "who", "asked",
    "many", "questions", "about", "physics", "nature", "measurement",
]


def _long_prompt(num_chars: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < num_chars:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:num_chars]


LONG_PROMPT = _long_prompt()


@dataclass
class DeterministicArgs:
    host: str = "127.0.0.1"
    port: int = 30000
    test_mode: str = "single"
    n_trials: int = 50
    n_start: int = 1
    temperature: float = 0.0
    sampling_seed: int | None = 42
    max_new_tokens: int = 100
    return_logprob: bool = False
    prefix_lengths: list[int] = field(default_factory=lambda: list(PREFIX_LENGTHS))
    seed: int = 0  # for the random batch compositions

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = DeterministicArgs
        parser.add_argument("--host", type=str, default=d.host)
        parser.add_argument("--port", type=int, default=d.port)
        parser.add_argument("--test-mode", type=str, default=d.test_mode, choices=TEST_MODES)
        parser.add_argument("--n-trials", type=int, default=d.n_trials)
        parser.add_argument("--n-start", type=int, default=d.n_start)
        parser.add_argument("--temperature", type=float, default=d.temperature)
        parser.add_argument("--sampling-seed", type=int, default=d.sampling_seed)
        parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
        parser.add_argument("--return-logprob", action="store_true")
        parser.add_argument("--prefix-lengths", type=int, nargs="+", default=PREFIX_LENGTHS,
                            help="Prefix lengths (characters of the long prompt).")
        parser.add_argument("--seed", type=int, default=d.seed)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> DeterministicArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def sample_key(ret: dict) -> tuple:
    """What two outputs must share to count as the same sample."""
    meta = ret.get("meta_info", {})
    logprobs = tuple(lp[0] for lp in meta.get("output_token_logprobs") or [])
    return ret["text"], tuple(ret.get("output_ids") or []), logprobs


def count_unique(samples: list[tuple]) -> int:
    return len(set(samples))


def summary(samples: list[tuple]) -> str:
    return f"total samples: {len(samples)}, Unique samples: {count_unique(samples)}"


class Client:
    def __init__(self, args: DeterministicArgs):
        self.args = args
        self.base_url = f"http://{args.host}:{args.port}"
        self.http = requests.Session()
        self.http.trust_env = False  # a local server is never behind a proxy

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int | None = None,
                 **extra) -> list[dict]:
        a = self.args
        params = {"temperature": a.temperature,
                  "max_new_tokens": a.max_new_tokens if max_new_tokens is None
                  else max_new_tokens}
        if a.sampling_seed is not None:
            params["sampling_seed"] = a.sampling_seed
        key = "input_ids" if prompts and isinstance(prompts[0], list) else "text"
        body = {key: prompts, "sampling_params": params,
                "return_logprob": a.return_logprob, **extra}
        resp = self.http.post(f"{self.base_url}/generate", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"/generate answered {resp.status_code}: {resp.text}")
        return resp.json()

    def flush_cache(self) -> None:
        resp = self.http.post(f"{self.base_url}/flush_cache", params={"timeout": 30})
        if resp.status_code != 200:
            raise RuntimeError(f"/flush_cache answered {resp.status_code}: {resp.text}")

    def warmup(self) -> None:
        for _ in range(3):  # as upstream: compile and capture before anything is counted
            self.generate([PROMPT_1] * 16)


def run_single(client: Client) -> list[int]:
    samples = []
    for bs in range(1, client.args.n_trials + 1):
        rets = client.generate([PROMPT_1] * bs)
        samples.extend(sample_key(r) for r in rets)
        text = rets[0]["text"].replace("\n", " ")
        print(f"Trial {bs} with batch size {bs}: {text}")
    print(f"Total samples: {len(samples)}, Unique samples: {count_unique(samples)}")
    return [count_unique(samples)]


def run_mixed(client: Client) -> list[int]:
    rng = random.Random(client.args.seed)
    kinds = [("Prompt 1", PROMPT_1), ("Prompt 2", PROMPT_2), ("Long prompt", LONG_PROMPT)]
    samples: list[list[tuple]] = [[] for _ in kinds]
    for bs in range(1, client.args.n_trials + 1):
        num_long = 0 if bs <= 10 else rng.randint(1, 10)
        num_1 = rng.randint(1, bs - num_long)
        counts = [num_1, bs - num_1 - num_long, num_long]
        rets = iter(client.generate([p for (_, p), n in zip(kinds, counts) for _ in range(n)]))
        for got, n in zip(samples, counts):
            got.extend(sample_key(next(rets)) for _ in range(n))
        print(f"Testing Trial {bs} with batch size {bs}, number of prompt 1: {counts[0]}, "
              f"number of prompt 2: {counts[1]}, number of long prompt: {counts[2]}")
    for (name, _), got in zip(kinds, samples):
        print(f"{name}: {summary(got)}")
    return [count_unique(got) for got in samples]


def run_prefix(client: Client) -> list[int]:
    a = client.args
    rng = random.Random(a.seed)
    prompts = [LONG_PROMPT[:n] for n in a.prefix_lengths]
    samples: list[list[tuple]] = [[] for _ in prompts]
    for bs in range(a.n_start, a.n_start + a.n_trials):
        client.flush_cache()
        picks = [rng.randrange(len(prompts)) for _ in range(bs)]
        for i, ret in zip(picks, client.generate([prompts[i] for i in picks])):
            samples[i].append(sample_key(ret))
        counts = "".join(f" # prefix length {n}: {picks.count(i)},"
                         for i, n in enumerate(a.prefix_lengths))
        print(f"Testing Trial {bs} with batch size {bs},{counts}")
    for i, (n, got) in enumerate(zip(a.prefix_lengths, samples)):
        print(f"Prompt {i} with prefix length {n}: {summary(got)}")
    return [count_unique(got) for got in samples]


def run_radix_cache(client: Client) -> list[int]:
    a = client.args
    rng = random.Random(a.seed)
    prompt = LONG_PROMPT[:max(a.prefix_lengths)]
    samples = []
    for trial in range(a.n_trials):
        client.flush_cache()
        (uncached,) = client.generate([prompt])
        client.flush_cache()
        cut = rng.randrange(len(prompt) // 4, 3 * len(prompt) // 4)
        client.generate([prompt[:cut]], max_new_tokens=1)
        (cached,) = client.generate([prompt])
        hit = cached["meta_info"].get("cached_tokens", 0)
        if uncached["meta_info"].get("cached_tokens", 0) or not hit:
            raise RuntimeError(f"trial {trial}: expected a radix miss then a hit, got "
                               f"cached_tokens {uncached['meta_info'].get('cached_tokens')} "
                               f"and {hit}")
        samples += [sample_key(uncached), sample_key(cached)]
        print(f"Trial {trial}: prefix of {cut} chars cached, {hit} tokens hit")
    print(f"Total samples: {len(samples)}, Unique samples: {count_unique(samples)}")
    return [count_unique(samples)]


def _logprob_values(entries: list) -> list:
    return [e[0] for e in entries]


def _token_ids(entries: list) -> list[int]:
    return [e[1] for e in entries]


def run_p_vs_d(client: Client) -> list[int]:
    """1 per sequence whose decode logprobs equal its prefill logprobs, bit for bit."""
    rng = random.Random(client.args.seed)
    matches = []
    for bs in range(1, client.args.n_trials + 1):
        prompts = [PROMPT_1, PROMPT_2] + [
            LONG_PROMPT[b:rng.randrange(b + 1, b + 4096)]
            for b in (rng.randrange(0, 2048) for _ in range(max(bs - 2, 0)))]
        client.flush_cache()
        decoded = client.generate(prompts[:bs], return_logprob=True, logprob_start_len=0)
        client.flush_cache()
        prefilled = client.generate([_token_ids(r["meta_info"]["input_token_logprobs"])
                                     + r["output_ids"] for r in decoded], max_new_tokens=1,
                                    return_logprob=True, logprob_start_len=0)
        for d, p in zip(decoded, prefilled):
            n = len(d["output_ids"])
            out = _logprob_values(d["meta_info"]["output_token_logprobs"])
            matches.append(int(out == _logprob_values(p["meta_info"]["input_token_logprobs"])
                               [-n:]))
        print(f"Trial {bs} with batch size {bs}: {sum(matches[-bs:])}/{bs} sequences match")
    print(f"Matching sequences: {sum(matches)}/{len(matches)}")
    return matches


def run(args: DeterministicArgs) -> list[int]:
    """Unique-sample counts (one per prompt; p_vs_d: 1 per matching sequence)."""
    runner = {"single": run_single, "mixed": run_mixed, "prefix": run_prefix,
              "radix_cache": run_radix_cache, "p_vs_d": run_p_vs_d}[args.test_mode]
    client = Client(args)
    client.warmup()
    return runner(client)


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(prog="python -m sglab.test.test_deterministic")
    DeterministicArgs.add_cli_args(parser)
    return run(DeterministicArgs.from_cli_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
