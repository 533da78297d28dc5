"""POST /v1/completions."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi.responses import Response

from sglab.srt.entrypoints.openai.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    LogProbs,
)
from sglab.srt.entrypoints.openai.serving_base import (
    MAX_N,
    OpenAIServingBase,
    ParamError,
    check_logprobs_cap,
    finish_reason_type,
    matched_stop,
    sse,
    usage_from_outputs,
)
from sglab.srt.managers.io_struct import GenerateReqInput


class OpenAIServingCompletion(OpenAIServingBase):
    def _convert_to_internal_request(
        self, request: CompletionRequest
    ) -> tuple[GenerateReqInput, dict]:
        prompts, is_text = _split_prompts(request.prompt)
        sampling_params = self._sampling_params(request, request.max_tokens)
        check_logprobs_cap(request.logprobs, "logprobs")
        samples = _num_samples(request)
        items = [p for p in prompts for _ in range(samples)]
        # One request per prompt; its `samples` samples share its prefix-cache entry.
        batch = prompts[0] if len(prompts) == 1 else prompts
        base_id, rid = self._request_ids(request, len(prompts))
        want_logprobs = request.logprobs is not None
        obj = GenerateReqInput(
            text=batch if is_text else None,
            input_ids=None if is_text else batch,
            sampling_params={**sampling_params, "n": samples},
            rid=rid,
            stream=request.stream,
            return_logprob=want_logprobs or samples > request.n,
            logprob_start_len=0 if want_logprobs and request.echo else -1,
            top_logprobs_num=request.logprobs or 0,
            return_text_in_logprobs=True,
            lora_path=self._lora_path(request.model, request.lora_path),
            custom_logit_processor=request.custom_logit_processor,
        )
        echo = [self._prompt_text(p, is_text) for p in items] if request.echo else None
        context = {"id": base_id, "created": int(time.time()), "n": request.n,
                   "samples": samples, "echo": echo}
        return obj, context

    def _prompt_text(self, prompt: Any, is_text: bool) -> str:
        if is_text:
            return prompt
        tokenizer = self.tokenizer_manager.tokenizer
        return "" if tokenizer is None else tokenizer.decode(prompt)

    async def _build_response(self, ret: Any, request: CompletionRequest,
                              context: dict) -> Response:
        outputs = ret if isinstance(ret, list) else [ret]
        choices = []
        for i, k in enumerate(_best_of(outputs, context["samples"], context["n"])):
            out = outputs[k]
            meta = out["meta_info"]
            prefix = context["echo"][k] if context["echo"] else ""
            logprobs = None
            if request.logprobs is not None:
                logprobs, _ = to_legacy_logprobs(*_token_logprobs(meta, request, 0), 0)
            reason = meta["finish_reason"]
            choices.append(CompletionResponseChoice(
                index=i, text=prefix + out.get("text", ""), logprobs=logprobs,
                finish_reason=finish_reason_type(reason), matched_stop=matched_stop(reason)))
        usage = usage_from_outputs(outputs, context["samples"], self._cache_report())
        response = CompletionResponse(
            id=context["id"], created=context["created"], model=request.model, choices=choices,
            usage=usage, metadata={"weight_version": outputs[0]["meta_info"]["weight_version"]})
        return Response(response.model_dump_json(), media_type="application/json")

    async def _generate_chunks(self, outputs: AsyncIterator[dict], request: CompletionRequest,
                               context: dict) -> AsyncIterator[bytes]:
        sent_chars: dict[int, int] = {}
        sent_logprobs: dict[int, int] = {}
        text_offsets: dict[int, int] = {}
        finals: dict[int, dict] = {}
        options = request.stream_options
        async for out in outputs:
            index = out.get("index", 0)
            meta = out["meta_info"]
            text = out.get("text", "")
            delta = text[sent_chars.get(index, 0):]
            if index not in sent_chars and context["echo"]:
                delta = context["echo"][index] + delta
            sent_chars[index] = len(text)
            logprobs = None
            if request.logprobs is not None:
                token_lps, top_lps = _token_logprobs(meta, request, sent_logprobs.get(index, 0))
                sent_logprobs[index] = sent_logprobs.get(index, 0) + len(token_lps)
                if token_lps:
                    logprobs, text_offsets[index] = to_legacy_logprobs(
                        token_lps, top_lps, text_offsets.get(index, 0))
            reason = meta["finish_reason"]
            if reason is not None:
                finals[index] = out
            if not delta and reason is None and logprobs is None:
                continue
            usage = None
            if options is not None and options.continuous_usage_stats:
                usage = usage_from_outputs([out], 1, self._cache_report())
            chunk = CompletionStreamResponse(
                id=context["id"], created=context["created"], model=request.model,
                choices=[CompletionResponseStreamChoice(
                    index=index, text=delta, logprobs=logprobs,
                    finish_reason=finish_reason_type(reason), matched_stop=matched_stop(reason))],
                usage=usage)
            yield sse(chunk.model_dump_json())
        if options is not None and options.include_usage:
            ordered = [finals[i] for i in sorted(finals)]
            usage = usage_from_outputs(ordered, context["n"], self._cache_report())
            chunk = CompletionStreamResponse(id=context["id"], created=context["created"],
                                             model=request.model, choices=[], usage=usage)
            yield sse(chunk.model_dump_json(exclude_none=True))


def _num_samples(request: CompletionRequest) -> int:
    """Samples per prompt: `best_of` (the n with the highest cumulative logprob are returned,
    as OpenAI and vLLM do), else n."""
    best_of = request.best_of
    if best_of is None:
        return request.n
    if not request.n <= best_of <= MAX_N:
        raise ParamError(f"best_of must be in [n, {MAX_N}] (n is {request.n}), got {best_of}.",
                         "best_of")
    if request.stream and best_of > request.n:
        raise ParamError("best_of > n cannot be streamed: the best choices are known only "
                         "once all are finished.", "best_of")
    return best_of


def _best_of(outputs: list[dict], samples: int, n: int) -> list[int]:
    """Indices of the returned outputs: per prompt, the n of `samples` with the highest
    cumulative output logprob (ties keep their order)."""
    if samples == n:
        return list(range(len(outputs)))
    picked = []
    for start in range(0, len(outputs), samples):
        group = range(start, start + samples)
        picked += sorted(group, key=lambda k: -_cumulative_logprob(outputs[k]))[:n]
    return picked


def _cumulative_logprob(out: dict) -> float:
    return sum(lp for lp, _, _ in out["meta_info"].get("output_token_logprobs", [])
               if lp is not None)


def _split_prompts(prompt: Any) -> tuple[list, bool]:
    """([prompt, ...], is_text) from OpenAI's str | [str] | [int] | [[int]]."""
    if isinstance(prompt, str):
        return [prompt], True
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt), True
    if prompt and all(isinstance(p, list) for p in prompt):
        return list(prompt), False
    return [list(prompt)], False


def _token_logprobs(meta: dict, request: CompletionRequest, start: int) -> tuple[list, list | None]:
    """The [logprob, id, text] entries from position `start` (echo puts the prompt's first)."""
    tokens = meta.get("output_token_logprobs", [])
    tops = meta.get("output_top_logprobs", []) if request.logprobs else None
    if request.echo:
        tokens = meta.get("input_token_logprobs", []) + tokens
        if tops is not None:
            tops = meta.get("input_top_logprobs", []) + tops
    return tokens[start:], None if tops is None else tops[start:]


def _top_dict(top: list) -> dict[str, float]:
    """{token text: logprob}; tokens sharing a text (byte pieces) keep the best logprob."""
    out: dict[str, float] = {}
    for logprob, _, text in top:
        out.setdefault(text or "", logprob)
    return out


def to_legacy_logprobs(token_lps: list, top_lps: list | None,
                       offset: int) -> tuple[LogProbs, int]:
    """OpenAI's legacy completions logprobs, and the text offset after these tokens."""
    logprobs = LogProbs()
    for k, (logprob, _, text) in enumerate(token_lps):
        text = text or ""
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(logprob)
        logprobs.text_offset.append(offset)
        offset += len(text)
        if top_lps is not None:
            top = top_lps[k] if k < len(top_lps) else None
            logprobs.top_logprobs.append(None if top is None else _top_dict(top))
    return logprobs, offset

