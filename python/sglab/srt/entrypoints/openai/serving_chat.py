"""POST /v1/chat/completions."""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from fastapi.responses import Response

from sglab.srt.entrypoints.openai.protocol import (
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
)
from sglab.srt.entrypoints.openai.serving_base import (
    OpenAIServingBase,
    ParamError,
    check_logprobs_cap,
    finish_reason_type,
    matched_stop,
    sse,
    usage_from_outputs,
)
from sglab.srt.managers.io_struct import GenerateReqInput

logger = logging.getLogger(__name__)

# Used only when the tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class OpenAIServingChat(OpenAIServingBase):
    def _convert_to_internal_request(
        self, request: ChatCompletionRequest
    ) -> tuple[GenerateReqInput, dict]:
        self._check_request(request)
        input_ids = self._apply_chat_template(request)
        max_new_tokens = request.max_completion_tokens
        if max_new_tokens is None:
            max_new_tokens = request.max_tokens
        sampling_params = self._sampling_params(request, max_new_tokens)
        n = request.n
        base_id = request.rid or self._new_id()
        obj = GenerateReqInput(
            input_ids=input_ids,
            sampling_params={**sampling_params, "n": n},  # n samples share the prompt's prefix
            rid=base_id,
            stream=request.stream,
            return_logprob=request.logprobs,
            top_logprobs_num=request.top_logprobs or 0,
            return_text_in_logprobs=True,
            lora_path=self._lora_path(request.model, request.lora_path),
            custom_logit_processor=request.custom_logit_processor,
        )
        return obj, {"id": base_id, "created": int(time.time()), "n": n}

    def _check_request(self, request: ChatCompletionRequest) -> None:
        max_output = request.max_completion_tokens or request.max_tokens
        context_len = self.tokenizer_manager.context_len
        if max_output and context_len and max_output > context_len:  # upstream's wording
            raise ParamError(f"max_completion_tokens is too large: {max_output}. This model "
                             f"supports at most {context_len} completion tokens.",
                             "max_completion_tokens")
        check_logprobs_cap(request.top_logprobs, "top_logprobs")
        if request.top_logprobs and not request.logprobs:
            raise ParamError("top_logprobs requires logprobs to be true.", "top_logprobs")

    def _apply_chat_template(self, request: ChatCompletionRequest) -> list[int]:
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ParamError("Chat completions need a tokenizer; the server runs with "
                             "--skip-tokenizer-init.", "messages")
        messages = [_message_dict(m) for m in request.messages]
        messages, assistant_prefix = _split_assistant_prefix(
            messages, request.messages[-1], request.continue_final_message)
        template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        try:
            prompt = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True,
                **(request.chat_template_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - template errors come from the client's input
            raise ParamError(f"Failed to apply the chat template: {e}", "messages") from None
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        if assistant_prefix:  # upstream: the prefix's tokens, without a leading BOS
            prefix_ids = tokenizer.encode(assistant_prefix)
            if prefix_ids and prefix_ids[0] == tokenizer.bos_token_id:
                prefix_ids = prefix_ids[1:]
            prompt_ids += prefix_ids
        return prompt_ids

    async def _build_response(self, ret: Any, request: ChatCompletionRequest,
                              context: dict) -> Response:
        outputs = ret if isinstance(ret, list) else [ret]
        choices = []
        for i, out in enumerate(outputs):
            meta = out["meta_info"]
            logprobs = None
            if request.logprobs:
                logprobs = to_chat_logprobs(meta.get("output_token_logprobs", []),
                                            meta.get("output_top_logprobs"))
            reason = meta["finish_reason"]
            choices.append(ChatCompletionResponseChoice(
                index=i, message=ChatCompletionMessage(content=out.get("text", "")),
                logprobs=logprobs, finish_reason=finish_reason_type(reason),
                matched_stop=matched_stop(reason)))
        usage = usage_from_outputs(outputs, context["n"], self._cache_report())
        response = ChatCompletionResponse(
            id=context["id"], created=context["created"], model=request.model, choices=choices,
            usage=usage, metadata={"weight_version": outputs[0]["meta_info"]["weight_version"]})
        return Response(response.model_dump_json(), media_type="application/json")

    async def _generate_chunks(self, outputs: AsyncIterator[dict],
                               request: ChatCompletionRequest,
                               context: dict) -> AsyncIterator[bytes]:
        sent_chars: dict[int, int] = {}
        sent_logprobs: dict[int, int] = {}
        finals: dict[int, dict] = {}
        options = request.stream_options

        def chunk(index: int, delta: DeltaMessage, logprobs: ChoiceLogprobs | None = None,
                  reason: dict | None = None, usage: Any = None) -> bytes:
            choice = ChatCompletionResponseStreamChoice(
                index=index, delta=delta, logprobs=logprobs,
                finish_reason=finish_reason_type(reason), matched_stop=matched_stop(reason))
            response = ChatCompletionStreamResponse(
                id=context["id"], created=context["created"], model=request.model,
                choices=[choice], usage=usage)
            return sse(response.model_dump_json())

        async for out in outputs:
            index = out.get("index", 0)
            meta = out["meta_info"]
            if index not in sent_chars:
                sent_chars[index] = 0
                yield chunk(index, DeltaMessage(role="assistant", content=""))
            text = out.get("text", "")
            delta = text[sent_chars[index]:]
            sent_chars[index] = len(text)
            logprobs = None
            if request.logprobs:
                start = sent_logprobs.get(index, 0)
                tokens = meta.get("output_token_logprobs", [])[start:]
                tops = meta.get("output_top_logprobs")
                sent_logprobs[index] = start + len(tokens)
                if tokens:
                    logprobs = to_chat_logprobs(tokens, None if tops is None else tops[start:])
            usage = None
            if options is not None and options.continuous_usage_stats:
                usage = usage_from_outputs([out], 1, self._cache_report())
            if delta or logprobs is not None:
                yield chunk(index, DeltaMessage(content=delta), logprobs, usage=usage)
            reason = meta["finish_reason"]
            if reason is not None:
                finals[index] = out
                yield chunk(index, DeltaMessage(), reason=reason, usage=usage)
        if options is not None and options.include_usage:
            ordered = [finals[i] for i in sorted(finals)]
            usage = usage_from_outputs(ordered, context["n"], self._cache_report())
            response = ChatCompletionStreamResponse(
                id=context["id"], created=context["created"], model=request.model, choices=[],
                usage=usage)
            yield sse(response.model_dump_json(exclude_none=True))


def _message_dict(message: Any) -> dict:
    d = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text":
                raise ParamError(f"Content part type {part.type!r} is not supported by sglab "
                                 f"(text only).", "messages")
            texts.append(part.text or "")
        d["content"] = "".join(texts)
    elif content is None:
        d["content"] = ""
    return d


def _split_assistant_prefix(messages: list[dict], last: Any,
                            continue_final: bool) -> tuple[list[dict], str | None]:
    """Upstream's handling of a final assistant message with text content: with
    continue_final_message its text is the start of the reply (returned, to follow the
    generation prompt), otherwise it is sent as a user message."""
    if last.role != "assistant" or isinstance(last.content, list):
        return messages, None
    if continue_final:
        return messages[:-1], messages[-1]["content"]
    return messages[:-1] + [{"role": "user", "content": messages[-1]["content"]}], None


def to_chat_logprobs(token_lps: list, top_lps: list | None) -> ChoiceLogprobs:
    content = []
    for k, (logprob, _, text) in enumerate(token_lps):
        text = text or ""
        top = (top_lps[k] if top_lps is not None and k < len(top_lps) else None) or []
        content.append(ChatCompletionTokenLogprob(
            token=text, bytes=list(text.encode("utf-8")), logprob=logprob,
            top_logprobs=[TopLogprob(token=t or "", bytes=list((t or "").encode("utf-8")),
                                     logprob=v) for v, _, t in top]))
    return ChoiceLogprobs(content=content)

