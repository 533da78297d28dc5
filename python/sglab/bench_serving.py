"""Online serving benchmark: load, latency and throughput of an SGLang-compatible server.

Same arguments, timing definitions, printed result block and jsonl record as SGLang's
`python -m sglang.bench_serving` (0.5.10 layout), so the same client measures sglab, SGLang and
vLLM side by side.

Usage:
    python -m sglab.bench_serving --backend sglab --dataset-name random-ids \
        --random-input-len 1024 --random-output-len 256 --random-range-ratio 1 --num-prompts 200
    python -m sglab.bench_serving --backend vllm --port 8000 --tokenizer /models/Llama-3.1-8B ...

In-process:
    from sglab.bench_serving import get_default_args, run_benchmark
    result = run_benchmark(get_default_args(port=30000, dataset_name="random-ids", num_prompts=8))
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import sys
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import requests
from tqdm.asyncio import tqdm

from sglab.srt.utils.provenance import add_provenance_args, provenance

ASSISTANT_SUFFIX = "Assistant:"

NATIVE_BACKENDS = ("sglab", "sglang", "sglang-native")
COMPLETIONS_BACKENDS = ("sglab-oai", "sglang-oai", "vllm")
CHAT_BACKENDS = ("sglab-oai-chat", "sglang-oai-chat", "vllm-chat")
BACKEND_CHOICES = NATIVE_BACKENDS + COMPLETIONS_BACKENDS + CHAT_BACKENDS
# Backends whose OpenAI stream may carry several speculative tokens per chunk.
RETOKENIZED_ITL_BACKENDS = ("sglab-oai", "sglab-oai-chat", "sglang-oai", "sglang-oai-chat")
DATASET_CHOICES = ("sharegpt", "random", "random-ids", "generated-shared-prefix")

# Pause between warmup and the measured run, as upstream (lets the server go idle).
SETTLE_SEC = 1.0
_HTTP_TIMEOUT_SEC = 30.0


def _is_sglang_family(backend: str) -> bool:
    return backend.startswith(("sglab", "sglang"))


# ----------------------------------------------------------------------------------------------
# Request / response records
# ----------------------------------------------------------------------------------------------


@dataclass
class DatasetRow:
    prompt: Any  # str, or a list of token ids with --tokenize-prompt
    prompt_len: int
    output_len: int
    text_prompt_len: int | None = None
    vision_prompt_len: int = 0
    extra_request_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.text_prompt_len is None:
            self.text_prompt_len = self.prompt_len


@dataclass(frozen=True)
class RequestOptions:
    """Per-run request settings shared by every request (built once from the args)."""

    stream: bool = True
    ignore_eos: bool = True
    return_logprob: bool = False
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    logprob_start_len: int = -1
    return_routed_experts: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # A JSON schema (as JSON text) every request's output must follow (sglab's option).
    json_schema: str | None = None


@dataclass
class RequestFuncInput:
    prompt: Any
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    lora_name: str | None = None
    extra_request_body: dict[str, Any] = field(default_factory=dict)
    options: RequestOptions = field(default_factory=RequestOptions)


@dataclass
class RequestFuncOutput:
    generated_text: str = ""
    success: bool = False
    latency: float = 0.0  # E2E: request sent -> last line received
    ttft: float = 0.0  # request sent -> first chunk with non-empty text
    itl: list[float] = field(default_factory=list)  # inter-token latencies
    text_chunks: list[str] = field(default_factory=list)  # OpenAI deltas after the first
    prompt_len: int = 0
    error: str = ""
    output_len: int = 0
    start_time: float = 0.0  # perf_counter() when the request was sent
    output_ids: list[int] = field(default_factory=list)  # native /generate only
    input_digest: str = ""  # of the exact payload sent (see request_digest)

    @staticmethod
    def init_new(request_func_input: RequestFuncInput) -> RequestFuncOutput:
        return RequestFuncOutput(prompt_len=request_func_input.prompt_len)


# ----------------------------------------------------------------------------------------------
# HTTP helpers
# ----------------------------------------------------------------------------------------------


def get_auth_headers() -> dict[str, str]:
    openai_api_key = os.environ.get("OPENAI_API_KEY")
    if openai_api_key:
        return {"Authorization": f"Bearer {openai_api_key}"}
    api_key = os.environ.get("API_KEY")
    if api_key:
        return {"Authorization": api_key}
    return {}


def parse_custom_headers(header_args: list[str] | None) -> dict[str, str]:
    headers = {}
    for item in header_args or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--header expects KEY=VALUE, got {item!r}")
        headers[key.strip()] = value.strip()
    return headers


def _create_bench_client_session() -> aiohttp.ClientSession:
    # A 10 MB read buffer keeps long SSE lines (logprobs) from overflowing under load.
    timeout = aiohttp.ClientTimeout(total=6 * 60 * 60)
    return aiohttp.ClientSession(timeout=timeout, read_bufsize=10 * 1024**2)


def remove_prefix(text: str, prefix: str) -> str:
    return text.removeprefix(prefix)


def remove_suffix(text: str, suffix: str) -> str:
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


class _StreamError(Exception):
    """An error object sent by the server inside a 200 stream."""


async def _iter_lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Non-blank lines of the body with any `data: ` prefix removed."""
    async for raw in response.content:
        line = raw.strip()
        if line:
            yield remove_prefix(line.decode("utf-8"), "data: ")


def _error_message(data: dict) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


async def _http_error(response: aiohttp.ClientResponse) -> str:
    return (response.reason or "") + ": " + (await response.text())


# ----------------------------------------------------------------------------------------------
# Request functions, one per API
# ----------------------------------------------------------------------------------------------


def build_sglang_payload(inp: RequestFuncInput) -> dict[str, Any]:
    opts = inp.options
    payload = {
        ("text" if isinstance(inp.prompt, str) else "input_ids"): inp.prompt,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": inp.output_len,
            "ignore_eos": opts.ignore_eos,
        },
        "stream": opts.stream,
        "lora_path": inp.lora_name,
        "return_logprob": opts.return_logprob,
        "return_routed_experts": opts.return_routed_experts,
        "logprob_start_len": opts.logprob_start_len,
    }
    if opts.top_logprobs_num:
        payload["top_logprobs_num"] = opts.top_logprobs_num
    if opts.token_ids_logprob:
        payload["token_ids_logprob"] = opts.token_ids_logprob
    if opts.json_schema is not None:
        payload["sampling_params"]["json_schema"] = opts.json_schema
    payload.update(inp.extra_request_body)  # top level: an extra sampling_params replaces all
    return payload


def build_openai_completions_payload(inp: RequestFuncInput) -> dict[str, Any]:
    opts, extra = inp.options, inp.extra_request_body
    payload = {
        "model": inp.model,
        "prompt": inp.prompt,
        "best_of": 1,
        "max_tokens": inp.output_len,
        "stream": opts.stream,
    }
    if "temperature" not in extra:
        payload["temperature"] = 0.0
    if "ignore_eos" not in extra:
        payload["ignore_eos"] = opts.ignore_eos
    if opts.return_logprob:
        payload["logprobs"] = opts.top_logprobs_num
    _add_response_format(payload, opts)
    payload.update(extra)
    if inp.lora_name:  # SGLang reads lora_path, vLLM reads model
        payload["model"] = inp.lora_name
        payload["lora_path"] = inp.lora_name
    return payload


def _add_response_format(payload: dict[str, Any], opts: RequestOptions) -> None:
    if opts.json_schema is not None:
        payload["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "bench", "schema": json.loads(opts.json_schema)}}


def build_openai_chat_payload(inp: RequestFuncInput) -> dict[str, Any]:
    opts, extra = inp.options, inp.extra_request_body
    payload = {
        "model": inp.model,
        "messages": [{"role": "user", "content": inp.prompt}],
        "max_completion_tokens": inp.output_len,
        "stream": opts.stream,
    }
    if "temperature" not in extra:
        payload["temperature"] = 0.0
    if "ignore_eos" not in extra:
        payload["ignore_eos"] = opts.ignore_eos
    if opts.return_logprob:
        payload["logprobs"] = True
        if opts.top_logprobs_num:
            payload["top_logprobs"] = opts.top_logprobs_num
    _add_response_format(payload, opts)
    payload.update(extra)
    if inp.lora_name:
        payload["model"] = inp.lora_name
        payload["lora_path"] = inp.lora_name
    return payload


def request_digest(payload: dict[str, Any]) -> str:
    """Digest of one request body as sent: prompt (token ids or text), sampling parameters,
    and every other field (stream, logprob options, adapter)."""
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def inputs_digest(request_digests: list[str]) -> str:
    """Digest of a whole run's requests, in request order."""
    return hashlib.sha256("\n".join(request_digests).encode()).hexdigest()[:16]


async def _run_request(
    inp: RequestFuncInput,
    payload: dict[str, Any],
    read_body: Callable[[aiohttp.ClientResponse, RequestFuncOutput, float], Awaitable[None]],
    pbar: tqdm | None,
) -> RequestFuncOutput:
    """POST `payload`, let `read_body` fill the output; failures land in output.error."""
    output = RequestFuncOutput.init_new(inp)
    output.input_digest = request_digest(payload)
    headers = get_auth_headers() | inp.options.headers
    async with _create_bench_client_session() as session:
        st = time.perf_counter()
        output.start_time = st
        try:
            async with session.post(url=inp.api_url, json=payload, headers=headers) as response:
                if response.status == 200:
                    await read_body(response, output, st)
                    output.success = True
                else:
                    output.error = await _http_error(response)
                    output.success = False
        except _StreamError as e:
            output.success = False
            output.error = str(e)
        except Exception:  # noqa: BLE001 (any failure is recorded on the output)
            output.success = False
            output.error = "".join(traceback.format_exception(*sys.exc_info()))
    if pbar is not None:
        pbar.update(1)
    return output


async def async_request_sglang_generate(
    request_func_input: RequestFuncInput, pbar: tqdm | None = None
) -> RequestFuncOutput:
    """Native `/generate`: cumulative text; ITL split evenly over the tokens a chunk adds."""

    async def read_body(response, output: RequestFuncOutput, st: float) -> None:
        ttft, most_recent_timestamp, last_output_len = 0.0, st, 0
        output_len = request_func_input.output_len
        async for chunk in _iter_lines(response):
            output.latency = time.perf_counter() - st
            if chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            if "error" in data and "text" not in data:
                raise _StreamError(_error_message(data))
            output.output_ids = data.get("output_ids", output.output_ids)
            if not data.get("text"):
                continue
            timestamp = time.perf_counter()
            output.generated_text = data["text"]
            output_len = data["meta_info"]["completion_tokens"]
            if ttft == 0.0:
                ttft = timestamp - st
                output.ttft = ttft
            else:
                num_new_tokens = output_len - last_output_len
                if num_new_tokens == 0:
                    continue
                gap = (timestamp - most_recent_timestamp) / num_new_tokens
                output.itl.extend([gap] * num_new_tokens)
            most_recent_timestamp = timestamp
            last_output_len = output_len
        output.output_len = output_len

    payload = build_sglang_payload(request_func_input)
    return await _run_request(request_func_input, payload, read_body, pbar)


async def async_request_openai_completions(
    request_func_input: RequestFuncInput, pbar: tqdm | None = None
) -> RequestFuncOutput:
    """`/v1/completions`: delta text; output_len from usage, else the requested max_tokens."""
    assert request_func_input.api_url.endswith("completions"), "URL must end with 'completions'"

    async def read_body(response, output: RequestFuncOutput, st: float) -> None:
        ttft, most_recent_timestamp = 0.0, st
        output_len = request_func_input.output_len
        async for chunk in _iter_lines(response):
            output.latency = time.perf_counter() - st
            if chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            if "error" in data and "choices" not in data:
                raise _StreamError(_error_message(data))
            text = data["choices"][0]["text"]
            if not text:
                continue
            timestamp = time.perf_counter()
            if ttft == 0.0:
                ttft = timestamp - st
                output.ttft = ttft
            else:
                output.text_chunks.append(text)
                output.itl.append(timestamp - most_recent_timestamp)
            most_recent_timestamp = timestamp
            output.generated_text += text
            output_len = (data.get("usage") or {}).get("completion_tokens", output_len)
        output.output_len = output_len

    payload = build_openai_completions_payload(request_func_input)
    return await _run_request(request_func_input, payload, read_body, pbar)


async def async_request_openai_chat_completions(
    request_func_input: RequestFuncInput, pbar: tqdm | None = None
) -> RequestFuncOutput:
    """`/v1/chat/completions`: delta content; non-stream replies count TTFT = latency."""
    assert request_func_input.api_url.endswith("chat/completions"), (
        "URL must end with 'chat/completions'"
    )
    stream = request_func_input.options.stream

    async def read_body(response, output: RequestFuncOutput, st: float) -> None:
        output_len = request_func_input.output_len
        if not stream:
            data = await response.json()
            output.generated_text = data["choices"][0]["message"]["content"]
            output.latency = time.perf_counter() - st
            output.ttft = output.latency
            output.output_len = (data.get("usage") or {}).get("completion_tokens", output_len)
            return
        ttft, most_recent_timestamp = 0.0, st
        async for chunk in _iter_lines(response):
            output.latency = time.perf_counter() - st
            if chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            if "error" in data and "choices" not in data:
                raise _StreamError(_error_message(data))
            choices = data.get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content") or ""
            if content:
                timestamp = time.perf_counter()
                if ttft == 0.0:
                    ttft = timestamp - st
                    output.ttft = ttft
                else:
                    output.text_chunks.append(content)
                    output.itl.append(timestamp - most_recent_timestamp)
                most_recent_timestamp = timestamp
                output.generated_text += content
            output_len = (data.get("usage") or {}).get("completion_tokens", output_len)
        output.output_len = output_len

    payload = build_openai_chat_payload(request_func_input)
    return await _run_request(request_func_input, payload, read_body, pbar)


ASYNC_REQUEST_FUNCS: dict[str, Callable[..., Awaitable[RequestFuncOutput]]] = {
    **{b: async_request_sglang_generate for b in NATIVE_BACKENDS},
    **{b: async_request_openai_completions for b in COMPLETIONS_BACKENDS},
    **{b: async_request_openai_chat_completions for b in CHAT_BACKENDS},
}


def _profile_body(args: argparse.Namespace) -> dict[str, Any]:
    num_steps = args.profile_num_steps
    if args.profile_by_stage and num_steps is None:
        num_steps = 5
    output_dir = args.profile_output_dir or os.getenv("SGLANG_TORCH_PROFILER_DIR", "/tmp")
    output_dir = Path(os.path.abspath(os.path.normpath(output_dir))) / str(time.time())
    output_dir.mkdir(exist_ok=True, parents=True)
    body = {
        "activities": args.profile_activities,
        "num_steps": num_steps,
        "profile_by_stage": args.profile_by_stage,
        "profile_stages": args.profile_stages,
        "output_dir": str(output_dir),
        "profile_prefix": args.profile_prefix,
    }
    if args.profile_start_step is not None:
        body["start_step"] = args.profile_start_step
    return body


async def async_request_profile(api_url: str, body: dict[str, Any]) -> RequestFuncOutput:
    output = RequestFuncOutput()
    async with _create_bench_client_session() as session:
        try:
            async with session.post(url=api_url, json=body, headers=get_auth_headers()) as resp:
                output.success = resp.status == 200
                if not output.success:
                    output.error = await _http_error(resp)
        except Exception:  # noqa: BLE001 (any failure is recorded on the output)
            output.error = "".join(traceback.format_exception(*sys.exc_info()))
    return output


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def compute_random_lens(full_len: int, range_ratio: float, num: int) -> list[int]:
    """Uniform integers on [max(int(full_len * range_ratio), 1), full_len]."""
    if full_len <= 0:
        return [0] * num
    low = max(int(full_len * range_ratio), 1)
    return np.random.randint(low, full_len + 1, size=num).tolist()


def _missing_dataset_error(dataset_name: str, dataset_path: str) -> FileNotFoundError:
    where = f"{dataset_path!r} is not a file" if dataset_path else "no --dataset-path given"
    return FileNotFoundError(
        f"--dataset-name {dataset_name} needs a local ShareGPT JSON file ({where}); "
        "pass --dataset-path /path/to/ShareGPT_V3_unfiltered_cleaned_split.json, "
        "or use --dataset-name random-ids (no file needed)."
    )


def _load_sharegpt_pairs(dataset_path: str, dataset_name: str) -> list[tuple[str, str]]:
    """First (human, assistant) turn of every conversation with >= 2 turns, shuffled."""
    if not dataset_path or not os.path.isfile(dataset_path):
        raise _missing_dataset_error(dataset_name, dataset_path)
    with open(dataset_path) as f:
        dataset = json.load(f)
    pairs = []
    for data in dataset:
        turns = data.get("conversations", data.get("conversation", []))
        if len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    random.shuffle(pairs)
    return pairs


def sample_random_requests(
    input_len: int,
    output_len: int,
    num_prompts: int,
    range_ratio: float,
    tokenizer: Any,
    dataset_path: str = "",
    random_sample: bool = False,
    return_text: bool = True,
) -> list[DatasetRow]:
    """`random-ids` (random_sample=False): consecutive ids `(offset_i + i + j) % vocab_size`.
    `random` (random_sample=True): ShareGPT prompt ids truncated or tiled to the length."""
    input_lens = compute_random_lens(input_len, range_ratio, num_prompts)
    output_lens = compute_random_lens(output_len, range_ratio, num_prompts)
    if return_text:
        # The server adds special tokens (BOS) when it tokenizes the text.
        num_special_tokens = int(tokenizer.num_special_tokens_to_add())
        input_lens = [max(1, n - num_special_tokens) for n in input_lens]

    rows: list[DatasetRow] = []
    if random_sample:
        for prompt, _ in _load_sharegpt_pairs(dataset_path, "random"):
            i = len(rows)
            if i == num_prompts:
                break
            prompt_ids = tokenizer.encode(prompt)
            if not prompt_ids:
                continue
            ratio = (input_lens[i] + len(prompt_ids) - 1) // len(prompt_ids)
            ids = (prompt_ids * ratio)[: input_lens[i]]
            content = tokenizer.decode(ids) if return_text else ids
            rows.append(DatasetRow(content, input_lens[i], output_lens[i]))
    else:
        vocab_size = tokenizer.vocab_size
        offsets = np.random.randint(0, vocab_size, size=num_prompts)
        for i in range(num_prompts):
            ids = [int((offsets[i] + i + j) % vocab_size) for j in range(input_lens[i])]
            content = tokenizer.decode(ids) if return_text else ids
            rows.append(DatasetRow(content, input_lens[i], output_lens[i]))

    print(f"#Input tokens: {np.sum(input_lens)}")
    print(f"#Output tokens: {np.sum(output_lens)}")
    return rows


def sample_sharegpt_requests(
    dataset_path: str,
    num_requests: int,
    tokenizer: Any,
    fixed_output_len: int | None = None,
    context_len: int | None = None,
    prompt_suffix: str = "",
    apply_chat_template: bool = False,
) -> list[DatasetRow]:
    if fixed_output_len is not None and fixed_output_len < 4:
        raise ValueError("output_len too small")
    rows: list[DatasetRow] = []
    for prompt, completion in _load_sharegpt_pairs(dataset_path, "sharegpt"):
        if len(rows) == num_requests:
            break
        if prompt_suffix:
            prompt = remove_suffix(prompt, ASSISTANT_SUFFIX) + prompt_suffix + ASSISTANT_SUFFIX
        if apply_chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            if tokenizer.bos_token:
                prompt = prompt.replace(tokenizer.bos_token, "")
        prompt_len = len(tokenizer.encode(prompt))
        output_len = (
            len(tokenizer.encode(completion)) if fixed_output_len is None else fixed_output_len
        )
        if prompt_len < 2 or output_len < 2:
            continue
        if context_len and prompt_len + output_len > context_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, output_len))
    print(f"#Input tokens: {np.sum([r.prompt_len for r in rows])}")
    print(f"#Output tokens: {np.sum([r.output_len for r in rows])}")
    return rows


def vocab_ids_of(tokenizer: Any) -> list[int]:
    # Sorted: a fast tokenizer's get_vocab() order changes from process to process, and the
    # same --seed must give the same prompts on every run.
    return sorted(tokenizer.get_vocab().values())


def gen_prompt(tokenizer: Any, token_num: int, vocab_ids: list[int] | None = None) -> str:
    """Random vocabulary ids decoded to text."""
    if vocab_ids is None:
        vocab_ids = vocab_ids_of(tokenizer)
    return tokenizer.decode(random.choices(vocab_ids, k=token_num))


def sample_generated_shared_prefix_requests(
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    range_ratio: float,
    tokenizer: Any,
    fast_prepare: bool = False,
    ordered: bool = False,
) -> list[DatasetRow]:
    """`num_groups` random system prompts, each shared by `prompts_per_group` questions.

    Prompts are regenerated on every run (no on-disk cache), so the random stream that later
    draws arrival times is the same on every run with the same seed."""
    system_lens = compute_random_lens(system_prompt_len, range_ratio, num_groups)
    question_lens = compute_random_lens(question_len, range_ratio, num_groups * prompts_per_group)
    output_lens = compute_random_lens(output_len, range_ratio, num_groups * prompts_per_group)
    vocab_ids = vocab_ids_of(tokenizer)
    system_prompts = [gen_prompt(tokenizer, n, vocab_ids) for n in system_lens]
    questions = [gen_prompt(tokenizer, n, vocab_ids) for n in question_lens]

    rows: list[DatasetRow] = []
    for g in range(num_groups):
        for p in range(prompts_per_group):
            k = g * prompts_per_group + p
            prompt = f"{system_prompts[g]}\n\n{questions[k]}"
            prompt_len = 1 if fast_prepare else len(tokenizer.encode(prompt))
            rows.append(DatasetRow(prompt, prompt_len, int(output_lens[k])))
    if not ordered:
        random.shuffle(rows)

    print("\nGenerated shared prefix dataset statistics:")
    print(f"Number of groups: {num_groups}")
    print(f"Prompts per group: {prompts_per_group}")
    print(f"Total prompts: {len(rows)}")
    if not fast_prepare:
        print(f"Total input tokens: {sum(r.prompt_len for r in rows)}")
        print(f"Total output tokens: {sum(r.output_len for r in rows)}")
    return rows


def get_dataset(args: argparse.Namespace, tokenizer: Any) -> list[DatasetRow]:
    tokenize_prompt = getattr(args, "tokenize_prompt", False)
    name = args.dataset_name
    if name == "sharegpt":
        assert not tokenize_prompt, "--tokenize-prompt is not supported with sharegpt"
        return sample_sharegpt_requests(
            dataset_path=args.dataset_path,
            num_requests=args.num_prompts,
            tokenizer=tokenizer,
            fixed_output_len=args.sharegpt_output_len,
            context_len=args.sharegpt_context_len,
            prompt_suffix=args.prompt_suffix,
            apply_chat_template=args.apply_chat_template,
        )
    if name.startswith("random"):
        return sample_random_requests(
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            num_prompts=args.num_prompts,
            range_ratio=args.random_range_ratio,
            tokenizer=tokenizer,
            dataset_path=args.dataset_path,
            random_sample=name == "random",
            return_text=not tokenize_prompt,
        )
    if name == "generated-shared-prefix":
        assert not tokenize_prompt, (
            "--tokenize-prompt is not supported with generated-shared-prefix"
        )
        return sample_generated_shared_prefix_requests(
            num_groups=args.gsp_num_groups,
            prompts_per_group=args.gsp_prompts_per_group,
            system_prompt_len=args.gsp_system_prompt_len,
            question_len=args.gsp_question_len,
            output_len=args.gsp_output_len,
            range_ratio=args.gsp_range_ratio,
            tokenizer=tokenizer,
            fast_prepare=args.gsp_fast_prepare,
            ordered=args.gsp_ordered,
        )
    raise ValueError(f"Unknown dataset: {name}")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchmarkMetrics:
    completed: int
    total_input: int
    total_input_text: int
    total_input_vision: int
    total_output: int
    total_output_retokenized: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    output_throughput_retokenized: float
    total_throughput: float
    total_throughput_retokenized: float
    mean_ttft_ms: float
    median_ttft_ms: float
    std_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    std_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    std_itl_ms: float
    p95_itl_ms: float
    p99_itl_ms: float
    max_itl_ms: float
    mean_e2e_latency_ms: float
    median_e2e_latency_ms: float
    std_e2e_latency_ms: float
    p90_e2e_latency_ms: float
    p99_e2e_latency_ms: float
    concurrency: float
    max_output_tokens_per_s: float = 0.0
    max_concurrent_requests: int = 0


def _ms(fn: Callable[..., Any], values: list[float], *fn_args: Any) -> float:
    """numpy statistic of `values` (seconds) in ms; an empty list counts as [0]."""
    return float(fn(values or [0.0], *fn_args)) * 1000


def compute_peaks(outputs: list[RequestFuncOutput]) -> tuple[float, int]:
    """(peak output tokens/s, peak concurrent requests) over 1-s buckets from the first start.

    A request's token times are start+ttft, then +itl cumulatively; it is active in every
    bucket from int(start) to int(start + latency)."""
    done = [o for o in outputs if o.success]
    if not done:
        return 0.0, 0
    t0 = min(o.start_time for o in done)
    num_buckets = int(np.ceil(max(o.start_time + o.latency for o in done) - t0)) + 1
    tokens = np.zeros(num_buckets)
    active = np.zeros(num_buckets)
    for o in done:
        token_time = o.start_time + o.ttft
        token_times = [token_time]
        for gap in o.itl:
            token_time += gap
            token_times.append(token_time)
        for t in token_times:
            bucket = int(t - t0)
            if 0 <= bucket < num_buckets:
                tokens[bucket] += 1
        first, last = int(o.start_time - t0), int(o.start_time + o.latency - t0)
        for bucket in range(first, min(last + 1, num_buckets)):
            active[bucket] += 1
    return float(np.max(tokens)), int(np.max(active))


def calculate_metrics(
    input_requests: list[DatasetRow] | None,
    outputs: list[RequestFuncOutput],
    dur_s: float,
    tokenizer: Any,
    backend: str,
    accept_length: float | None = None,
) -> tuple[BenchmarkMetrics, list[int]]:
    """Metrics over successful requests; also returns per-request output lens (0 if failed)."""
    output_lens: list[int] = []
    retokenized_lens: list[int] = []
    total_input = total_input_text = total_input_vision = completed = 0
    ttfts: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2e_latencies: list[float] = []
    use_retokenized_itl = bool(accept_length) and backend in RETOKENIZED_ITL_BACKENDS

    for i, out in enumerate(outputs):
        if not out.success:
            output_lens.append(0)
            retokenized_lens.append(0)
            continue
        output_lens.append(out.output_len)
        retokenized_lens.append(len(tokenizer.encode(out.generated_text, add_special_tokens=False)))
        if input_requests is not None:
            total_input += input_requests[i].prompt_len
            total_input_text += input_requests[i].text_prompt_len
            total_input_vision += input_requests[i].vision_prompt_len
        if out.output_len > 1:
            tpots.append((out.latency - out.ttft) / (out.output_len - 1))
        if use_retokenized_itl:
            for gap, text in zip(out.itl, out.text_chunks):
                n = max(1, len(tokenizer.encode(text, add_special_tokens=False)))
                itls.extend([gap / n] * n)
        else:
            itls.extend(out.itl)
        ttfts.append(out.ttft)
        e2e_latencies.append(out.latency)
        completed += 1

    if completed == 0:
        warnings.warn(
            "All requests failed. This is likely due to a misconfiguration "
            "on the benchmark arguments.",
            stacklevel=2,
        )
    peak_tokens, peak_requests = compute_peaks(outputs)
    total_output, total_retok = sum(output_lens), sum(retokenized_lens)
    metrics = BenchmarkMetrics(
        completed=completed,
        total_input=total_input,
        total_input_text=total_input_text,
        total_input_vision=total_input_vision,
        total_output=total_output,
        total_output_retokenized=total_retok,
        request_throughput=completed / dur_s,
        input_throughput=total_input / dur_s,
        output_throughput=total_output / dur_s,
        output_throughput_retokenized=total_retok / dur_s,
        total_throughput=(total_input + total_output) / dur_s,
        total_throughput_retokenized=(total_input + total_retok) / dur_s,
        mean_ttft_ms=_ms(np.mean, ttfts),
        median_ttft_ms=_ms(np.median, ttfts),
        std_ttft_ms=_ms(np.std, ttfts),
        p99_ttft_ms=_ms(np.percentile, ttfts, 99),
        mean_tpot_ms=_ms(np.mean, tpots),
        median_tpot_ms=_ms(np.median, tpots),
        std_tpot_ms=_ms(np.std, tpots),
        p99_tpot_ms=_ms(np.percentile, tpots, 99),
        mean_itl_ms=_ms(np.mean, itls),
        median_itl_ms=_ms(np.median, itls),
        std_itl_ms=_ms(np.std, itls),
        p95_itl_ms=_ms(np.percentile, itls, 95),
        p99_itl_ms=_ms(np.percentile, itls, 99),
        max_itl_ms=_ms(np.max, itls),
        mean_e2e_latency_ms=_ms(np.mean, e2e_latencies),
        median_e2e_latency_ms=_ms(np.median, e2e_latencies),
        std_e2e_latency_ms=_ms(np.std, e2e_latencies),
        p90_e2e_latency_ms=_ms(np.percentile, e2e_latencies, 90),
        p99_e2e_latency_ms=_ms(np.percentile, e2e_latencies, 99),
        concurrency=float(np.sum(e2e_latencies)) / dur_s,
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_requests,
    )
    return metrics, output_lens


# ----------------------------------------------------------------------------------------------
# Report: printed block and jsonl record
# ----------------------------------------------------------------------------------------------


def format_result_block(
    backend: str,
    request_rate: float,
    max_concurrency: int | None,
    duration: float,
    metrics: BenchmarkMetrics,
    accept_length: float | None = None,
) -> str:
    """The result block exactly as upstream prints it (leading blank line, padded rows)."""

    def row(label: str, value: Any) -> str:
        return f"{label:<40} {value:<10}"

    def frow(label: str, value: float) -> str:
        return f"{label:<40} {value:<10.2f}"

    def rule(title: str) -> str:
        return "{s:{c}^{n}}".format(s=title, n=50, c="-")

    m = metrics
    lines = [
        "\n{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        row("Backend:", backend),
        row("Traffic request rate:", request_rate),
        row("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        row("Successful requests:", m.completed),
        frow("Benchmark duration (s):", duration),
        row("Total input tokens:", m.total_input),
        row("Total input text tokens:", m.total_input_text),
        row("Total generated tokens:", m.total_output),
        row("Total generated tokens (retokenized):", m.total_output_retokenized),
        frow("Request throughput (req/s):", m.request_throughput),
        frow("Input token throughput (tok/s):", m.input_throughput),
        frow("Output token throughput (tok/s):", m.output_throughput),
        frow("Peak output token throughput (tok/s):", m.max_output_tokens_per_s),
        row("Peak concurrent requests:", m.max_concurrent_requests),
        frow("Total token throughput (tok/s):", m.total_throughput),
        frow("Concurrency:", m.concurrency),
    ]
    if accept_length:
        lines.append(frow("Accept length:", accept_length))
    lines += [
        rule("End-to-End Latency"),
        frow("Mean E2E Latency (ms):", m.mean_e2e_latency_ms),
        frow("Median E2E Latency (ms):", m.median_e2e_latency_ms),
        frow("P90 E2E Latency (ms):", m.p90_e2e_latency_ms),
        frow("P99 E2E Latency (ms):", m.p99_e2e_latency_ms),
        rule("Time to First Token"),
        frow("Mean TTFT (ms):", m.mean_ttft_ms),
        frow("Median TTFT (ms):", m.median_ttft_ms),
        frow("P99 TTFT (ms):", m.p99_ttft_ms),
        rule("Time per Output Token (excl. 1st token)"),
        frow("Mean TPOT (ms):", m.mean_tpot_ms),
        frow("Median TPOT (ms):", m.median_tpot_ms),
        frow("P99 TPOT (ms):", m.p99_tpot_ms),
        rule("Inter-Token Latency"),
        frow("Mean ITL (ms):", m.mean_itl_ms),
        frow("Median ITL (ms):", m.median_itl_ms),
        frow("P95 ITL (ms):", m.p95_itl_ms),
        frow("P99 ITL (ms):", m.p99_itl_ms),
        frow("Max ITL (ms):", m.max_itl_ms),
        "=" * 50,
    ]
    return "\n".join(lines)


def build_result_record(
    args: argparse.Namespace,
    server_info: dict | None,
    duration: float,
    metrics: BenchmarkMetrics,
    accept_length: float | None,
    request_digests: list[str] | None = None,
) -> dict[str, Any]:
    """One jsonl line: upstream's keys in upstream's order, then sglab's: `active_patches`, the
    digests of the requests sent (per request, in order, and overall) and `provenance`."""
    m = metrics
    request_digests = request_digests or []
    active_patches = server_info.get("active_patches") if isinstance(server_info, dict) else None
    return {
        "tag": getattr(args, "tag", None),
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "sharegpt_output_len": args.sharegpt_output_len,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "server_info": server_info,
        "duration": duration,
        "completed": m.completed,
        "total_input_tokens": m.total_input,
        "total_input_text_tokens": m.total_input_text,
        "total_input_vision_tokens": m.total_input_vision,
        "total_output_tokens": m.total_output,
        "total_output_tokens_retokenized": m.total_output_retokenized,
        "request_throughput": m.request_throughput,
        "input_throughput": m.input_throughput,
        "output_throughput": m.output_throughput,
        "total_throughput": m.total_throughput,
        "mean_e2e_latency_ms": m.mean_e2e_latency_ms,
        "median_e2e_latency_ms": m.median_e2e_latency_ms,
        "std_e2e_latency_ms": m.std_e2e_latency_ms,
        "p90_e2e_latency_ms": m.p90_e2e_latency_ms,
        "p99_e2e_latency_ms": m.p99_e2e_latency_ms,
        "mean_ttft_ms": m.mean_ttft_ms,
        "median_ttft_ms": m.median_ttft_ms,
        "std_ttft_ms": m.std_ttft_ms,
        "p99_ttft_ms": m.p99_ttft_ms,
        "mean_tpot_ms": m.mean_tpot_ms,
        "median_tpot_ms": m.median_tpot_ms,
        "std_tpot_ms": m.std_tpot_ms,
        "p99_tpot_ms": m.p99_tpot_ms,
        "mean_itl_ms": m.mean_itl_ms,
        "median_itl_ms": m.median_itl_ms,
        "std_itl_ms": m.std_itl_ms,
        "p95_itl_ms": m.p95_itl_ms,
        "p99_itl_ms": m.p99_itl_ms,
        "concurrency": m.concurrency,
        "accept_length": accept_length,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
        "active_patches": active_patches,
        "input_digest": inputs_digest(request_digests),
        "input_digests": request_digests,
        "provenance": provenance(getattr(args, "commit", None)),
    }


def default_output_file_name(args: argparse.Namespace) -> str:
    now = datetime.now().strftime("%m%d")
    if args.dataset_name.startswith("random"):
        return (
            f"{args.backend}_{now}_{args.num_prompts}_"
            f"{args.random_input_len}_{args.random_output_len}.jsonl"
        )
    return f"{args.backend}_{now}_{args.num_prompts}_{args.dataset_name}.jsonl"


# ----------------------------------------------------------------------------------------------
# Server queries
# ----------------------------------------------------------------------------------------------


def get_server_info(base_url: str, headers: dict[str, str] | None = None) -> dict | None:
    """`GET /server_info` (falling back to the older `/get_server_info`); None if neither."""
    for path in ("/server_info", "/get_server_info"):
        try:
            resp = requests.get(base_url + path, headers=headers, timeout=_HTTP_TIMEOUT_SEC)
        except requests.RequestException:
            return None
        if resp.status_code == 200:
            try:
                return resp.json()
            except ValueError:
                return None
    return None


def get_accept_length(server_info: dict | None) -> float | None:
    if not server_info:
        return None
    if "decode" in server_info:  # PD router: the decode worker's view
        server_info = server_info["decode"][0]
    states = server_info.get("internal_states")
    return states[0].get("avg_spec_accept_length") if states else None


def wait_for_server_ready(url: str, timeout_sec: float, headers: dict[str, str]) -> None:
    """Poll `url` (the /v1/models endpoint) until it answers 200; timeout_sec <= 0 skips."""
    if timeout_sec <= 0:
        return
    deadline = time.perf_counter() + timeout_sec
    last_error = ""
    while time.perf_counter() < deadline:
        try:
            resp = requests.get(url, headers=headers, timeout=5)
            if resp.status_code == 200:
                return
            last_error = f"HTTP {resp.status_code}"
        except requests.RequestException as e:
            last_error = str(e)
        time.sleep(1.0)
    raise RuntimeError(
        f"Server not ready: {url} did not answer 200 within {timeout_sec}s ({last_error}). "
        "Check --host/--port/--base-url, or pass --ready-check-timeout-sec 0 to skip the check."
    )


def get_model_id(model_url: str, headers: dict[str, str]) -> str:
    try:
        resp = requests.get(model_url, headers=headers, timeout=_HTTP_TIMEOUT_SEC)
        models = resp.json().get("data", [])
    except Exception as e:
        raise RuntimeError(
            f"Failed to fetch the model from {model_url} ({e}). Please specify the correct host "
            "and port using `--host` and `--port`, or pass `--model`."
        ) from e
    if not models:
        raise RuntimeError(f"{model_url} lists no model; pass `--model`.")
    return models[0]["id"]


def get_tokenizer(tokenizer_id: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if tokenizer_id.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=tokenizer_id)
        return AutoTokenizer.from_pretrained(tokenizer_id, trust_remote_code=True)
    except Exception as e:
        raise RuntimeError(
            f"Cannot load the tokenizer {tokenizer_id!r} ({type(e).__name__}: {e}). "
            "Pass --tokenizer with a local tokenizer directory (or tokenizer.json)."
        ) from e


def _resolve_urls(args: argparse.Namespace) -> tuple[str, str, str]:
    """(base_url, api_url, model_url) from --base-url, or --host and --port."""
    if args.port is None:
        args.port = 8000 if args.backend.startswith("vllm") else 30000
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    if args.backend in NATIVE_BACKENDS:
        path = "/generate"
    elif args.backend in COMPLETIONS_BACKENDS:
        path = "/v1/completions"
    elif args.backend in CHAT_BACKENDS:
        path = "/v1/chat/completions"
    else:
        raise ValueError(f"Unknown backend: {args.backend}")
    return base_url, base_url + path, base_url + "/v1/models"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


async def get_request(
    input_requests: list[DatasetRow], request_rate: float
) -> AsyncIterator[DatasetRow]:
    """Yield requests with exponential (Poisson-process) gaps; all at once when rate is inf."""
    for request in input_requests:
        yield request
        if request_rate == float("inf"):
            continue
        await asyncio.sleep(np.random.exponential(1.0 / request_rate))


class _LoraPicker:
    """Chooses each request's adapter: uniform, distinct (round robin) or skewed (Zipf)."""

    def __init__(self, names: list[str] | None, distribution: str, zipf_alpha: float):
        self.names = names or []
        self.distribution = distribution
        self.next_idx = 0
        if distribution == "skewed" and self.names:
            weights = np.array([zipf_alpha**-i for i in range(len(self.names))])
            self.probs = weights / np.sum(weights)

    def pick(self) -> str | None:
        if not self.names:
            return None
        if self.distribution == "uniform":
            return random.choice(self.names)
        if self.distribution == "distinct":
            name = self.names[self.next_idx]
            self.next_idx = (self.next_idx + 1) % len(self.names)
            return name
        return str(np.random.choice(self.names, p=self.probs))


def request_options_from_args(args: argparse.Namespace) -> RequestOptions:
    return RequestOptions(
        stream=not args.disable_stream,
        ignore_eos=not args.disable_ignore_eos,
        return_logprob=args.return_logprob,
        top_logprobs_num=args.top_logprobs_num,
        token_ids_logprob=args.token_ids_logprob,
        logprob_start_len=args.logprob_start_len,
        return_routed_experts=args.return_routed_experts,
        headers=parse_custom_headers(args.header),
        json_schema=load_json_schema(args.json_schema),
    )


def load_json_schema(value: str | None) -> str | None:
    """--json-schema: inline JSON, or @path of a JSON file; normalized JSON text."""
    if value is None:
        return None
    if value.startswith("@"):
        with open(value[1:]) as f:
            value = f.read()
    return json.dumps(json.loads(value))


async def _warmup(request_func, make_input, test_request: DatasetRow, args) -> None:
    print(f"Starting warmup with {args.warmup_requests} sequences...")
    lora_name = args.lora_name[0] if args.lora_name else None
    test_input = make_input(test_request, min(test_request.output_len, 32), lora_name)
    outputs = await asyncio.gather(
        *[request_func(request_func_input=test_input) for _ in range(args.warmup_requests)]
    )
    if args.warmup_requests > 0 and not any(o.success for o in outputs):
        raise ValueError(
            "Warmup failed - Please make sure benchmark arguments "
            f"are correctly specified. Error: {outputs[0].error}"
        )
    print(f"Warmup completed with {args.warmup_requests} sequences. Starting main benchmark run...")


def _should_flush_cache(args: argparse.Namespace) -> bool:
    in_ci = os.getenv("SGLANG_IS_IN_CI", "false").lower() in ("true", "1")
    return args.flush_cache or (in_ci and _is_sglang_family(args.backend))


async def benchmark(
    args: argparse.Namespace,
    api_url: str,
    base_url: str,
    model_id: str,
    input_requests: list[DatasetRow],
    extra_request_body: dict[str, Any],
) -> tuple[list[RequestFuncOutput], float, float | None]:
    """Warmup, then the measured run. Returns (outputs, duration_s, accept_length)."""
    backend = args.backend
    request_func = ASYNC_REQUEST_FUNCS[backend]
    options = request_options_from_args(args)
    auth = get_auth_headers()

    def make_input(row: DatasetRow, output_len: int, lora_name: str | None) -> RequestFuncInput:
        return RequestFuncInput(
            prompt=row.prompt,
            api_url=api_url,
            prompt_len=row.prompt_len,
            output_len=output_len,
            model=model_id,
            lora_name=lora_name,
            extra_request_body={**extra_request_body, **row.extra_request_body},
            options=options,
        )

    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def limited_request_func(inp: RequestFuncInput, pbar: tqdm | None):
        if semaphore is None:
            return await request_func(request_func_input=inp, pbar=pbar)
        async with semaphore:
            return await request_func(request_func_input=inp, pbar=pbar)

    await _warmup(request_func, make_input, input_requests[0], args)
    if _should_flush_cache(args):
        await asyncio.to_thread(
            requests.post, base_url + "/flush_cache", headers=auth, timeout=_HTTP_TIMEOUT_SEC
        )
    await asyncio.sleep(SETTLE_SEC)

    if args.profile:
        print("Starting profiler...")
        out = await async_request_profile(base_url + "/start_profile", _profile_body(args))
        print("Profiler started" if out.success else f"Failed to start profiler: {out.error}")

    lora_picker = _LoraPicker(args.lora_name, args.lora_request_distribution, args.lora_zipf_alpha)
    benchmark_start_time = time.perf_counter()
    pbar = None if args.disable_tqdm else tqdm(total=len(input_requests))
    tasks: list[asyncio.Task] = []
    async for row in get_request(input_requests, args.request_rate):
        inp = make_input(row, row.output_len, lora_picker.pick())
        tasks.append(asyncio.create_task(limited_request_func(inp, pbar)))
    outputs: list[RequestFuncOutput] = await asyncio.gather(*tasks)

    if args.profile and args.profile_num_steps is None:
        print("Stopping profiler...")
        out = await async_request_profile(base_url + "/stop_profile", {})
        print("Profiler stopped" if out.success else f"Failed to stop profiler: {out.error}")
    if pbar is not None:
        pbar.close()

    accept_length = None
    if _is_sglang_family(backend):
        server_info = await asyncio.to_thread(get_server_info, base_url, auth)
        accept_length = get_accept_length(server_info)
    # As upstream, the duration ends after the accept-length query.
    return outputs, time.perf_counter() - benchmark_start_time, accept_length


def report(
    args: argparse.Namespace,
    base_url: str,
    tokenizer: Any,
    input_requests: list[DatasetRow],
    outputs: list[RequestFuncOutput],
    duration: float,
    accept_length: float | None,
) -> dict[str, Any]:
    """Print the result block, append the jsonl record; return record | details."""
    metrics, output_lens = calculate_metrics(
        input_requests, outputs, duration, tokenizer, args.backend, accept_length
    )
    block = format_result_block(
        args.backend, args.request_rate, args.max_concurrency, duration, metrics, accept_length
    )
    print(block)

    server_info = get_server_info(base_url, get_auth_headers())
    result = build_result_record(args, server_info, duration, metrics, accept_length,
                                 [o.input_digest for o in outputs])
    details = {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        # Token ids compare runs exactly: streamed text depends on how tokens were chunked.
        "output_ids": [o.output_ids for o in outputs],
        "errors": [o.error for o in outputs],
    }
    output_file = args.output_file or default_output_file_name(args)
    with open(output_file, "a") as f:
        f.write(json.dumps(result | details if args.output_details else result) + "\n")
    return result | details


def set_ulimit(target_soft_limit: int = 65535) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < target_soft_limit:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target_soft_limit, hard), hard))
        except ValueError as e:
            print(f"Fail to set RLIMIT_NOFILE: {e}")


def _validate_args(args: argparse.Namespace) -> None:
    if args.backend not in ASYNC_REQUEST_FUNCS:
        raise ValueError(f"Unknown backend: {args.backend}; choose from {list(BACKEND_CHOICES)}")
    if args.tokenize_prompt and args.backend not in NATIVE_BACKENDS:
        raise ValueError("--tokenize-prompt is only compatible with the native /generate backends")
    if args.lora_request_distribution in ("distinct", "skewed") and args.lora_name is not None:
        assert len(args.lora_name) > 1, (
            "More than 1 LoRA adapter must be specified via --lora-name to use "
            "'distinct' or 'skewed' request distribution."
        )
    assert args.lora_zipf_alpha > 1, (
        f"Got invalid value for --lora-zipf-alpha of {args.lora_zipf_alpha}. "
        "It must be greater than 1."
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark; returns the jsonl record merged with the per-request details.

    `args` may be a partial namespace (e.g. a SimpleNamespace): missing fields take the CLI
    defaults."""
    args = complete_args(args)
    _validate_args(args)
    print(f"benchmark_args={args}")
    set_ulimit()
    extra_request_body = json.loads(args.extra_request_body) if args.extra_request_body else {}

    base_url, api_url, model_url = _resolve_urls(args)
    auth = get_auth_headers()
    wait_for_server_ready(model_url, args.ready_check_timeout_sec, auth)
    if args.model is None:
        args.model = get_model_id(model_url, auth)

    tokenizer = get_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    if not getattr(tokenizer, "chat_template", None):
        print(
            "\nWARNING It is recommended to use the `Chat` or `Instruct` model for benchmarking.\n"
            "Because when the tokenizer counts the output tokens, if there is gibberish, "
            "it might count incorrectly.\n"
        )
    # Seeded right here: loading a tokenizer or waiting for the server may draw from the
    # global generators (and only on a process's first run), which would change the prompts.
    random.seed(args.seed)
    np.random.seed(args.seed)
    input_requests = get_dataset(args, tokenizer)
    if not input_requests:
        raise ValueError("The dataset produced no requests.")
    outputs, duration, accept_length = asyncio.run(
        benchmark(
            args=args,
            api_url=api_url,
            base_url=base_url,
            model_id=args.served_model_name or args.model,
            input_requests=input_requests,
            extra_request_body=extra_request_body,
        )
    )
    return report(args, base_url, tokenizer, input_requests, outputs, duration, accept_length)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


class _LoRANameAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark the online serving throughput.")
    add = parser.add_argument
    add("--backend", type=str, choices=list(BACKEND_CHOICES), default="sglab")
    add("--base-url", type=str, default=None, help="Server URL; overrides --host/--port.")
    add("--host", type=str, default="0.0.0.0")
    add("--port", type=int, default=None, help="Default: 30000 (sglab/sglang), 8000 (vllm).")
    add(
        "--ready-check-timeout-sec",
        type=float,
        default=60,
        help="Wait this long for /v1/models to answer 200; 0 skips the check.",
    )
    add("--dataset-name", type=str, default="sharegpt", choices=list(DATASET_CHOICES))
    add("--dataset-path", type=str, default="", help="Local ShareGPT JSON (sharegpt, random).")
    add("--model", type=str, default=None, help="Default: the first id of /v1/models.")
    add("--served-model-name", type=str, default=None)
    add("--tokenizer", type=str, default=None, help="Local tokenizer path. Default: --model.")
    add("--num-prompts", type=int, default=1000)
    add("--sharegpt-output-len", type=int, default=None)
    add("--sharegpt-context-len", type=int, default=None)
    add("--random-input-len", type=int, default=1024)
    add("--random-output-len", type=int, default=1024)
    add(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths are uniform on [max(int(len*ratio), 1), len]; 1 gives fixed lengths.",
    )
    add(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second (Poisson arrivals); inf sends all at time 0.",
    )
    add("--max-concurrency", type=int, default=None)
    add("--output-file", type=str, default=None, help="JSONL file the result is appended to.")
    add("--output-details", action="store_true")
    add("--disable-tqdm", action="store_true")
    add("--disable-stream", action="store_true")
    add("--return-logprob", action="store_true")
    add("--top-logprobs-num", type=int, default=0)
    add("--token-ids-logprob", type=int, nargs="*", default=None)
    add("--logprob-start-len", type=int, default=-1)
    add("--return-routed-experts", action="store_true")
    add("--seed", type=int, default=1)
    add("--disable-ignore-eos", action="store_true")
    add("--json-schema", type=str, default=None, metavar="JSON|@FILE",
        help="Constrain every request's output to this JSON schema (sglab's option): "
             "sampling_params.json_schema on /generate, response_format on the OpenAI "
             "routes.")
    add(
        "--extra-request-body",
        metavar='{"key1": "value1"}',
        type=str,
        default=None,
        help="JSON object merged into every request payload.",
    )
    add("--apply-chat-template", action="store_true")
    add("--profile", action="store_true", help="Call /start_profile and /stop_profile.")
    add(
        "--profile-activities",
        type=str,
        nargs="+",
        default=["CPU", "GPU"],
        choices=["CPU", "GPU", "MEM", "RPD", "CUDA_PROFILER"],
    )
    add("--profile-start-step", type=int, default=None)
    add("--profile-num-steps", type=int, default=None)
    add("--profile-by-stage", action="store_true")
    add("--profile-stages", nargs="+", default=None)
    add("--profile-output-dir", type=str, default=None)
    add("--profile-prefix", type=str, default=None)
    add("--lora-name", type=str, nargs="*", default=None, action=_LoRANameAction)
    add(
        "--lora-request-distribution",
        type=str,
        default="uniform",
        choices=["uniform", "distinct", "skewed"],
    )
    add("--lora-zipf-alpha", type=float, default=1.5)
    add("--prompt-suffix", type=str, default="")
    add("--flush-cache", action="store_true")
    add("--warmup-requests", type=int, default=1)
    add(
        "--tokenize-prompt",
        action="store_true",
        help="Send input_ids instead of text (native backends only).",
    )
    add("--tag", type=str, default=None, help="Stored in the jsonl record.")
    add("--header", type=str, nargs="+", default=None, help="Extra request headers KEY=VALUE.")
    add_provenance_args(parser)
    gsp = parser.add_argument_group("generated-shared-prefix dataset arguments")
    gsp.add_argument("--gsp-num-groups", type=int, default=64)
    gsp.add_argument("--gsp-prompts-per-group", type=int, default=16)
    gsp.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    gsp.add_argument("--gsp-question-len", type=int, default=128)
    gsp.add_argument("--gsp-output-len", type=int, default=256)
    gsp.add_argument("--gsp-range-ratio", type=float, default=1.0)
    gsp.add_argument("--gsp-fast-prepare", action="store_true")
    gsp.add_argument("--gsp-ordered", action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def get_default_args(**overrides: Any) -> argparse.Namespace:
    """CLI defaults with `overrides` applied; an unknown name raises instead of being dropped."""
    args = parse_args([])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise TypeError(f"unknown bench_serving argument: {name!r}")
        setattr(args, name, value)
    return args


def complete_args(args: Any) -> argparse.Namespace:
    """A full Namespace: the fields of `args` over the CLI defaults."""
    full = parse_args([])
    for name, value in vars(args).items():
        setattr(full, name, value)
    return full


def main(argv: list[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
