"""What the OpenAI-compatible handlers share: validation, errors, sampling params, usage."""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from sglab.srt.entrypoints.openai.protocol import (
    DEFAULT_MODEL_NAME,
    ErrorDetail,
    ErrorResponse,
    PromptTokensDetails,
    UsageInfo,
)
from sglab.srt.managers.io_struct import GenerateReqInput, invalid_unicode_path
from sglab.srt.managers.tokenizer_manager import (
    EngineDeadError,
    RequestRefusedError,
    TokenizerManager,
)

logger = logging.getLogger(__name__)

MAX_N = 128
# The one cap on completions `logprobs` and chat `top_logprobs`: vLLM's default max_logprobs.
MAX_LOGPROBS = 20


def dumps_json(obj: Any) -> bytes:
    """orjson when it can; json's ASCII escapes for what orjson refuses (lone surrogates)."""
    try:
        import orjson

        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    except (ImportError, TypeError):  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, default=str).encode()


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(dumps_json(content), status_code=status_code, media_type="application/json")


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict:
    detail = ErrorDetail(message=message, type=err_type, param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def create_error_response(message: str, status_code: int = 400,
                          err_type: str = "invalid_request_error", param: str | None = None,
                          code: int | str | None = None) -> Response:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    return json_response(error_body(message, err_type, param,
                                    status_code if code is None else code), status_code)


def error_for_exception(e: BaseException) -> Response:
    """Map a generation failure to its HTTP answer."""
    if isinstance(e, ParamError):
        return create_error_response(str(e), e.status_code, param=e.param, code=e.code)
    if isinstance(e, RequestRefusedError):
        return create_error_response(str(e), e.status_code)
    if isinstance(e, ValueError):
        return create_error_response(str(e), 400)
    if isinstance(e, EngineDeadError):
        return create_error_response(str(e), 503, err_type="service_unavailable")
    logger.error("Request failed", exc_info=e)
    return create_error_response(f"Internal server error: {type(e).__name__}: {e}", 500,
                                 err_type="internal_error")


def stream_error_event(e: BaseException) -> bytes:
    """The SSE event that ends a stream broken by `e` (`data: [DONE]` follows it)."""
    status = getattr(e, "status_code", 400 if isinstance(e, ValueError) else 500)
    err_type = "service_unavailable" if status == 503 else "invalid_request_error"
    if status >= 500 and status != 503:
        logger.error("Stream failed", exc_info=e)
        err_type = "internal_error"
    return sse(dumps_json(error_body(str(e), err_type, getattr(e, "param", None), status)))


def sse(data: bytes | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def first_and_rest(agen: AsyncIterator) -> tuple[Any, AsyncIterator]:
    """Pull the first item, so errors before any output become an HTTP status, not a stream."""
    try:
        first = await agen.__anext__()
    except BaseException:
        await agen.aclose()
        raise
    return first, agen


async def collect_one(agen: AsyncIterator) -> Any:
    try:
        return await agen.__anext__()
    finally:
        await agen.aclose()


def streaming_response(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


class OpenAIServingBase:
    """Turns an OpenAI request into a GenerateReqInput and the outputs back into responses."""

    def __init__(self, tokenizer_manager: TokenizerManager):
        self.tokenizer_manager = tokenizer_manager

    async def handle_request(self, request: Any, raw_request: Request) -> Response:
        try:
            check_request_fields(request)
            self._validate_model(request.model)
            obj, context = self._convert_to_internal_request(request)
        except ValueError as e:
            return error_for_exception(e)
        agen = self.tokenizer_manager.generate_request(obj, raw_request)
        try:
            if request.stream:
                first, rest = await first_and_rest(agen)
                return streaming_response(self._stream_chunks(first, rest, request, context))
            return await self._build_response(await collect_one(agen), request, context)
        except Exception as e:  # noqa: BLE001 - every failure gets an HTTP answer
            return error_for_exception(e)

    async def _stream_chunks(self, first: Any, rest: AsyncIterator, request: Any,
                             context: dict) -> AsyncIterator[bytes]:
        async def outputs() -> AsyncIterator[dict]:
            yield first
            async for out in rest:
                yield out

        try:
            async for chunk in self._generate_chunks(outputs(), request, context):
                yield chunk
        except Exception as e:  # noqa: BLE001 - reported in the stream
            yield stream_error_event(e)
        finally:
            await rest.aclose()
        yield SSE_DONE

    # Subclasses implement these three.
    def _convert_to_internal_request(self, request: Any) -> tuple[GenerateReqInput, dict]:
        raise NotImplementedError

    async def _build_response(self, ret: Any, request: Any, context: dict) -> Response:
        raise NotImplementedError

    def _generate_chunks(self, outputs: AsyncIterator[dict], request: Any,
                         context: dict) -> AsyncIterator[bytes]:
        raise NotImplementedError

    # --- shared helpers ----------------------------------------------------------------------

    def _validate_model(self, model: str) -> None:
        self._lora_path(model, None)

    def _lora_path(self, model: str, lora_path: str | None) -> str | None:
        """The adapter a request asks for: `lora_path`, else the one its model names."""
        return lora_path or resolve_model(self.tokenizer_manager, model)

    def _sampling_params(self, request: Any, max_new_tokens: int | None) -> dict:
        if not 1 <= request.n <= MAX_N:
            raise ParamError(f"n must be in [1, {MAX_N}], got {request.n}.", "n")
        params = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": request.min_tokens,
            "stop": request.stop,
            "stop_regex": request.stop_regex or None,
            "stop_token_ids": request.stop_token_ids,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "ignore_eos": request.ignore_eos,
            "skip_special_tokens": request.skip_special_tokens,
            "spaces_between_special_tokens": request.spaces_between_special_tokens,
            "no_stop_trim": request.no_stop_trim,
            "sampling_seed": request.seed,
            "logit_bias": request.logit_bias or None,
            "custom_params": request.custom_params,
            **grammar_params(request),
        }
        defaults = self.tokenizer_manager.generation_defaults
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(request, name)
            value = defaults.get(name) if value is None else value
            if value is not None:
                params[name] = value
        return params

    def _cache_report(self) -> bool:
        return bool(getattr(self.tokenizer_manager.server_args, "enable_cache_report", False))

    def _request_ids(self, request: Any, batch_size: int) -> tuple[str, list[str] | str]:
        base = request.rid or self._new_id()
        return base, base if batch_size == 1 else [f"{base}-{i}" for i in range(batch_size)]

    def _new_id(self) -> str:
        from sglab.srt.entrypoints.openai.protocol import new_request_id

        return new_request_id()


class ParamError(ValueError):
    """Invalid input tied to one request field (reported as the error's `param`)."""

    def __init__(self, message: str, param: str | None, status_code: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status_code = status_code
        self.code = code


def resolve_model(tm: TokenizerManager, model: str) -> str | None:
    """The LoRA adapter a model name selects (None: the base model). Accepted names: the
    served name, the model path, "default", a loaded adapter's name (as vLLM clients send it)
    and `base:adapter`. Raises ParamError (404 model_not_found) for any other name."""
    bases = (tm.served_model_name, tm.model_path, DEFAULT_MODEL_NAME)
    if model in bases:
        return None
    if model in getattr(tm, "loaded_lora_adapters", {}):
        return model
    base, _, adapter = model.rpartition(":")
    if base in bases and adapter:
        if not getattr(tm.server_args, "enable_lora", False):
            raise ParamError("LoRA is not enabled. Please set `--enable-lora` to enable LoRA.",
                             "model")
        return adapter
    raise model_not_found(model)


def model_not_found(model: str) -> ParamError:
    """OpenAI's and vLLM's answer to an unknown model: 404, code `model_not_found`."""
    return ParamError(f"The model `{model}` does not exist.", "model", 404, "model_not_found")


def check_request_fields(request: Any) -> None:
    """Refuse strings that are not valid Unicode and fields sglab would have to ignore."""
    path = invalid_unicode_path(request.model_dump())
    if path is not None:
        raise ParamError(f"{path} is not valid Unicode (it holds a lone surrogate).", path)
    refuse_unsupported(dict(request), request.UNSUPPORTED_FIELDS)


def refuse_unsupported(values: dict, fields: dict[str, tuple]) -> None:
    """400 for the first of `fields` (name -> its no-op values besides None) set otherwise."""
    for name, noops in fields.items():
        if not is_noop(values.get(name), noops):
            raise ParamError(f"{name} is not supported by sglab.", name)


def is_noop(value: Any, noops: tuple = ()) -> bool:
    """None, or one of `noops` with the same type (so 0 is not False, nor 1 True)."""
    return value is None or any(type(value) is type(n) and value == n for n in noops)


def check_logprobs_cap(value: int | None, name: str) -> None:
    if value is not None and value > MAX_LOGPROBS:
        raise ParamError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}.", name)


def grammar_params(request: Any) -> dict:
    """json_schema / regex / ebnf from SGLang's extras and `response_format`, as upstream
    (json_object is the schema {"type": "object"})."""
    params = {name: getattr(request, name) for name in ("json_schema", "regex", "ebnf")
              if getattr(request, name) is not None}
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return params
    if fmt.type == "structural_tag":  # upstream: the whole response_format, as JSON
        params["structural_tag"] = json.dumps(fmt.model_dump(exclude_none=True))
        return params
    if fmt.type == "json_object":
        params["json_schema"] = '{"type": "object"}'
        return params
    spec = fmt.json_schema or {}
    if "schema" not in spec:  # upstream's wording
        raise ParamError("schema_ is required for json_schema response format request.",
                         "response_format")
    params["json_schema"] = json.dumps(spec["schema"])
    return params


def finish_reason_type(reason: dict | None) -> str | None:
    return None if reason is None else reason.get("type")


def matched_stop(reason: dict | None) -> int | str | None:
    if reason is None or reason.get("type") != "stop":
        return None
    return reason.get("matched")


def usage_from_outputs(outputs: list[dict], n: int, enable_cache_report: bool) -> UsageInfo:
    """Prompt tokens count once per prompt (n choices share one), completions per choice."""
    prompt = sum(o["meta_info"]["prompt_tokens"] for i, o in enumerate(outputs) if i % n == 0)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    cached = sum(o["meta_info"].get("cached_tokens", 0) for i, o in enumerate(outputs)
                 if i % n == 0)
    details = PromptTokensDetails(cached_tokens=cached) if enable_cache_report and cached else None
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion, prompt_tokens_details=details)

