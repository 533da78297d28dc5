"""The HTTP server: native and OpenAI-compatible APIs on FastAPI/uvicorn, and launch_server.

The HTTP server, the Engine's process launching and the TokenizerManager share the main
process; the scheduler and the detokenizer are child processes talking over ZMQ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from sglab.srt.entrypoints.engine import _launch_subprocesses
from sglab.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    ScoringRequest,
)
from sglab.srt.entrypoints.openai.serving_base import (
    SSE_DONE,
    ParamError,
    collect_one,
    create_error_response,
    dumps_json,
    error_for_exception,
    first_and_rest,
    json_response,
    model_not_found,
    refuse_unsupported,
    resolve_model,
    sse,
    stream_error_event,
    streaming_response,
)
from sglab.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglab.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglab.srt.entrypoints.openai.serving_responses import OpenAIServingResponses
from sglab.srt.entrypoints.openai.serving_score import OpenAIServingScore
from sglab.srt.managers.io_struct import (
    GenerateReqInput,
    LoadLoRAAdapterReqInput,
    LoRAUpdateOutput,
    RUNTIME_SERVER_ARGS,
    UnloadLoRAAdapterReqInput,
    invalid_unicode_path,
)
from sglab.srt.managers.tokenizer_manager import INTERNAL_STATE_WAIT_S, TokenizerManager
from sglab.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

HEALTH_CHECK_TIMEOUT_S = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "20"))
HEALTH_ENDPOINT_GENERATION = os.environ.get(
    "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower() not in ("0", "false", "no")
WARMUP_TIMEOUT_S = 600.0
_FORCED_EXIT_DELAY_S = 30.0
_FLUSH_CACHE_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)
# GenerateReqInput fields that are set by normalization, never by a client.
_INTERNAL_FIELDS = {"is_single", "batch_size"}
_BOOL_FIELDS = ("stream", "return_text_in_logprobs", "log_metrics")
# /generate fields of upstream SGLang that sglab does not implement, with their no-op values
# besides null: setting one to anything else is refused, never silently ignored.
_UNSUPPORTED_GENERATE_FIELDS: dict[str, tuple] = {
    "return_hidden_states": (False,), "return_routed_experts": (False,),
    "routed_experts_start_len": (0,), "priority": (), "extra_key": ("",),
    "routed_dp_rank": (), "disagg_prefill_dp_rank": (), "data_parallel_rank": (),
    "positional_embed_overrides": (), "video_data": (), "audio_data": (),
    "use_audio_in_video": (False,), "modalities": ([],), "lora_id": (), "bootstrap_host": (),
    "bootstrap_port": (), "bootstrap_room": (), "bootstrap_pair_key": (), "decode_tp_size": (),
    "require_reasoning": (False,), "background": (False,), "conversation_id": (),
    "routing_key": (), "no_logs": (False,), "custom_labels": ({},), "return_bytes": (False,),
    "return_entropy": (False,), "external_trace_header": (), "max_dynamic_patch": (),
    "min_dynamic_patch": (), "image_max_dynamic_patch": (), "video_max_dynamic_patch": (),
    "multi_item_delimiter_indices": (),
}
# /start_profile fields of upstream's ProfileReqInput that sglab's profiler does not implement.
_UNSUPPORTED_PROFILE_FIELDS: dict[str, tuple] = {
    "start_step": (), "profile_by_stage": (False,), "merge_profiles": (False,),
    "profile_stages": ([],),
}
_PROFILE_ACTIVITIES = ("CPU", "GPU")
# Without --api-key-protect-metrics these paths (exactly these) answer without the API key, as
# upstream leaves them open for liveness probes and Prometheus scrapers.
_OPEN_PATHS = ("/health", "/metrics")


@dataclass
class _GlobalState:
    tokenizer_manager: TokenizerManager
    server_args: ServerArgs
    scheduler_info: dict
    serving_completion: OpenAIServingCompletion
    serving_chat: OpenAIServingChat
    serving_score: OpenAIServingScore
    serving_responses: OpenAIServingResponses
    uvicorn_server: uvicorn.Server | None = None
    exit_code: int = 0


_global_state: _GlobalState | None = None
_background_tasks: set[asyncio.Task] = set()


def set_global_state(state: _GlobalState) -> None:
    global _global_state
    _global_state = state


def _tm() -> TokenizerManager:
    return _global_state.tokenizer_manager


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    if _global_state is not None:
        _tm().auto_create_handle_loop()
    yield


app = FastAPI(lifespan=lifespan, title="sglab")


# --- errors --------------------------------------------------------------------------------


@app.exception_handler(RequestValidationError)
async def validation_exception_handler(_: Request, exc: RequestValidationError) -> Response:
    """Malformed JSON and wrong types are a 400 (FastAPI's default is 422), OpenAI-style."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        loc = errors[0].get("loc", ())
        position = loc[1] if len(loc) > 1 else None
        reason = (errors[0].get("ctx") or {}).get("error", "JSON decode error")
        return create_error_response(invalid_json_message(reason, position), 400)
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    param = None
    if errors and errors[0].get("loc"):
        param = ".".join(str(x) for x in errors[0]["loc"] if x != "body") or None
    return create_error_response("Invalid request: " + "; ".join(parts), 400, param=param)


@app.exception_handler(StarletteHTTPException)
async def http_exception_handler(_: Request, exc: StarletteHTTPException) -> Response:
    return create_error_response(str(exc.detail), exc.status_code)


@app.exception_handler(Exception)
async def unhandled_exception_handler(_: Request, exc: Exception) -> Response:
    return error_for_exception(exc)


def invalid_json_message(reason: str, position: int | None) -> str:
    where = "" if position is None else f" at character {position}"
    return f"The request body is not valid JSON: {reason}{where}."


def add_api_key_middleware(fastapi_app: FastAPI, api_key: str,
                           protect_metrics: bool = False) -> None:
    """Every request needs `Authorization: Bearer <api_key>` (scheme case-insensitive, as RFC
    7235 says), except OPTIONS and, unless `protect_metrics`, exactly /health and /metrics."""
    open_paths = () if protect_metrics else _OPEN_PATHS
    fastapi_app.add_middleware(ApiKeyMiddleware, api_key=api_key, open_paths=open_paths)


class ApiKeyMiddleware:
    """A plain ASGI middleware (not BaseHTTPMiddleware), so streaming responses still see
    client disconnects."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...]):
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or \
                scope["path"] in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = create_error_response("Unauthorized: invalid or missing API key.", 401,
                                         err_type="authentication_error")
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and \
            secrets.compare_digest(token.strip().encode(), self.api_key)


# --- health and info -----------------------------------------------------------------------


@app.get("/health")
async def health(request: Request) -> Response:
    """Answered by the HTTP process: 503 while starting, shutting down or after a child died.

    While requests are in flight a health generation would only queue behind them, so the
    server is healthy unless nothing came back from the scheduler for --watchdog-timeout
    seconds. When idle it runs /health_generate's check, which then answers at once.
    """
    tm = _tm()
    if tm.server_status != "Up" or tm.dead_message is not None:
        return Response(status_code=503)
    if not HEALTH_ENDPOINT_GENERATION:
        return Response(status_code=200)
    if tm.rid_to_state:
        oldest = min(state.created_time for state in tm.rid_to_state.values())
        silent_s = time.time() - max(tm.last_receive_tstamp, oldest)
        stalled = silent_s > _global_state.server_args.watchdog_timeout
        return Response(status_code=503 if stalled else 200)
    return await health_generate(request)


@app.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """200 once anything comes back from the scheduler after a 1-token generation was sent
    (upstream's check); 503 while starting or broken, or after SGLANG_HEALTH_CHECK_TIMEOUT."""
    tm = _tm()
    if tm.server_status != "Up" or tm.dead_message is not None:
        return Response(status_code=503)
    rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
    obj = GenerateReqInput(input_ids=[0], rid=rid, log_metrics=False,
                           sampling_params={"max_new_tokens": 1, "temperature": 0.0})
    tic = time.time()
    task = asyncio.create_task(collect_one(tm.generate_request(obj, None)))
    _background_tasks.add(task)
    task.add_done_callback(_forget_task)
    while time.time() < tic + HEALTH_CHECK_TIMEOUT_S:
        await asyncio.wait({task}, timeout=0.05)
        if task.done():
            return Response(status_code=200 if task.exception() is None else 503)
        if tm.last_receive_tstamp > tic:
            return Response(status_code=200)
        if await request.is_disconnected():
            break
    tm.abort_request(rid)
    return Response(status_code=503)


def _forget_task(task: asyncio.Task) -> None:
    _background_tasks.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not warn about it


@app.get("/get_model_info")
@app.get("/model_info")
async def get_model_info() -> Response:
    return json_response(_tm().get_model_info())


@app.get("/get_server_info")
@app.get("/server_info")
async def get_server_info() -> Response:
    try:
        return json_response(await _tm().get_server_info())
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)


@app.get("/flush_cache")
@app.post("/flush_cache")
async def flush_cache(timeout: float = 0.0) -> Response:
    deadline = time.time() + max(0.0, timeout)
    try:
        while True:
            ret = await _tm().flush_cache()
            if ret.success or time.time() >= deadline:
                break
            await asyncio.sleep(0.1)
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)
    if ret.success:
        return PlainTextResponse(_FLUSH_CACHE_MESSAGE)
    message = ret.message or "Cache not flushed: there are running or waiting requests."
    return PlainTextResponse(message, status_code=400)


@app.post("/set_internal_state")
@app.put("/set_internal_state")
async def set_internal_state(raw_request: Request) -> Response:
    """Upstream's route: `{"server_args": {...}}`; sglab changes RUNTIME_SERVER_ARGS only."""
    try:
        body = await _json_body(raw_request)
        ret = await _tm().set_internal_state(_runtime_server_args(body))
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)
    return json_response([dataclasses.asdict(r) for r in ret])


def _runtime_server_args(body: Any) -> dict:
    args = body.get("server_args") if isinstance(body, dict) else None
    if not isinstance(args, dict) or not args:
        raise ParamError('The body must be {"server_args": {...}} with at least one entry.',
                         "server_args")
    for name, value in args.items():
        kind = RUNTIME_SERVER_ARGS.get(name)
        if kind is None:
            raise ParamError(f"Updating {name} is not supported (settable while serving: "
                             f"{', '.join(RUNTIME_SERVER_ARGS)}).", "server_args")
        if not isinstance(value, kind):
            raise ParamError(f"server_args.{name} must be a {kind.__name__}.", "server_args")
    return args


@app.get("/start_profile")
@app.post("/start_profile")
async def start_profile(raw_request: Request) -> Response:
    """Traces go under SGLANG_TORCH_PROFILER_DIR (default: the temp dir) and nowhere else."""
    try:
        body = await _optional_json_object(raw_request)
        ret = await _tm().start_profile(**_profile_args(body))
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)
    if ret.success:
        return PlainTextResponse("Start profiling.\n")
    return PlainTextResponse(ret.message, status_code=400)


def _profile_args(body: dict) -> dict:
    refuse_unsupported(body, _UNSUPPORTED_PROFILE_FIELDS)
    num_steps = _optional_int(body.get("num_steps"), "num_steps")
    if num_steps is not None and num_steps < 1:
        raise ParamError(f"num_steps must be a positive integer, got {num_steps}.", "num_steps")
    activities = body.get("activities")
    if activities is not None and (not isinstance(activities, list) or
                                   any(a not in _PROFILE_ACTIVITIES for a in activities)):
        raise ParamError(f"activities must be a list of {', '.join(_PROFILE_ACTIVITIES)} "
                         f"(sglab's profiler records no others).", "activities")
    for name in ("with_stack", "record_shapes"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise ParamError(f"{name} must be a boolean.", name)
    return {"output_dir": body.get("output_dir"), "num_steps": num_steps,
            "activities": activities, "with_stack": body.get("with_stack"),
            "record_shapes": body.get("record_shapes"),
            "profile_prefix": body.get("profile_prefix")}


@app.get("/stop_profile")
@app.post("/stop_profile")
async def stop_profile() -> Response:
    try:
        ret = await _tm().stop_profile()
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)
    if ret.success:
        return PlainTextResponse("Stop profiling. This will take some time.\n")
    return PlainTextResponse(ret.message, status_code=400)


@app.get("/metrics")
async def metrics() -> Response:
    tm = _tm()
    if tm.metrics is None:
        return create_error_response("Metrics are off; start the server with --enable-metrics.",
                                     404, err_type="not_found")
    try:
        tm.observe_scheduler_state(await tm.get_internal_state(INTERNAL_STATE_WAIT_S))
    except Exception:  # noqa: BLE001 - the request counters are still worth serving
        logger.warning("Could not refresh scheduler metrics", exc_info=True)
    body, content_type = tm.metrics.render()
    return Response(body, media_type=content_type)


@app.post("/abort_request")
async def abort_request(raw_request: Request) -> Response:
    """Abort the request `rid`, or all of them with `abort_all` (upstream's AbortReq): they
    finish with finish_reason `abort`; 200 with an empty body, as upstream."""
    try:
        body = await _optional_json_object(raw_request)
        rid, abort_all = body.get("rid") or "", body.get("abort_all", False)
        if not isinstance(rid, str):
            raise ValueError("rid must be a string.")
        if not isinstance(abort_all, bool):
            raise ValueError("abort_all must be a boolean.")
    except ValueError as e:
        return error_for_exception(e)
    _tm().abort_request(rid, abort_all=abort_all)
    return Response(status_code=200)


# --- native generate -----------------------------------------------------------------------


@app.post("/generate")
@app.put("/generate")
async def generate_request(raw_request: Request) -> Response:
    try:
        obj = parse_generate_request(await _json_body(raw_request))
    except ValueError as e:
        return error_for_exception(e)
    agen = _tm().generate_request(obj, raw_request)
    try:
        if obj.stream:
            first, rest = await first_and_rest(agen)
            return streaming_response(_native_stream(first, rest))
        return json_response(await collect_one(agen))
    except Exception as e:  # noqa: BLE001 - every failure gets an HTTP answer
        return error_for_exception(e)


async def _native_stream(first: Any, rest: AsyncIterator) -> AsyncIterator[bytes]:
    try:
        yield sse(dumps_json(first))
        async for out in rest:
            yield sse(dumps_json(out))
    except Exception as e:  # noqa: BLE001 - reported in the stream
        yield stream_error_event(e)
    finally:
        await rest.aclose()
    yield SSE_DONE


def parse_generate_request(body: Any) -> GenerateReqInput:
    """A GenerateReqInput from a /generate JSON body. Unknown keys are ignored, as upstream;
    upstream's fields that sglab does not implement are refused unless left at their no-op."""
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    path = invalid_unicode_path(body)
    if path is not None:
        raise ParamError(f"{path} is not valid Unicode (it holds a lone surrogate).", path)
    refuse_unsupported(body, _UNSUPPORTED_GENERATE_FIELDS)
    names = {f.name for f in dataclasses.fields(GenerateReqInput)} - _INTERNAL_FIELDS
    ignored = sorted(set(body) - names - set(_UNSUPPORTED_GENERATE_FIELDS))
    if ignored:
        logger.debug("/generate ignores unknown field(s): %s", ", ".join(ignored))
    kwargs = {k: v for k, v in body.items() if k in names - set(_UNSUPPORTED_GENERATE_FIELDS)}
    for name in _BOOL_FIELDS:
        value = kwargs.get(name)
        if value is None:
            kwargs.pop(name, None)
        elif not isinstance(value, bool):
            raise ParamError(f"{name} must be a boolean.", name)
    return GenerateReqInput(**kwargs)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(invalid_json_message(e.msg, e.pos)) from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError; nesting too deep
        raise ValueError(invalid_json_message(str(e), None)) from None


async def _optional_json_object(request: Request) -> dict:
    if request.method == "GET" or not (await request.body()).strip():
        return {}
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    return body


def _optional_int(value: Any, name: str) -> int | None:
    """An int, or a string holding one (bench_serving may send numbers as strings)."""
    if value is None:
        return None
    try:
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
    except ValueError:
        pass
    raise ParamError(f"{name} must be an integer, got {value!r}.", name)


# --- OpenAI-compatible ---------------------------------------------------------------------


@app.post("/v1/completions")
async def openai_v1_completions(request: CompletionRequest, raw_request: Request) -> Response:
    return await _global_state.serving_completion.handle_request(request, raw_request)


@app.post("/v1/chat/completions")
async def openai_v1_chat_completions(request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
    return await _global_state.serving_chat.handle_request(request, raw_request)


@app.post("/v1/score")
async def v1_score_request(request: ScoringRequest, raw_request: Request) -> Response:
    return await _global_state.serving_score.handle_request(request, raw_request)


@app.post("/v1/responses")
async def v1_responses_request(request: ResponsesRequest, raw_request: Request) -> Response:
    return await _global_state.serving_responses.create_responses(request, raw_request)


@app.get("/v1/responses/{response_id}")
async def v1_retrieve_responses(response_id: str) -> Response:
    return await _global_state.serving_responses.retrieve_responses(response_id)


@app.post("/v1/responses/{response_id}/cancel")
async def v1_cancel_responses(response_id: str) -> Response:
    return await _global_state.serving_responses.cancel_responses(response_id)


@app.get("/v1/models")
async def available_models() -> Response:
    cards = [_model_card()] + [_lora_card(name) for name in _tm().loaded_lora_adapters]
    return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")


@app.get("/v1/models/{model:path}")
async def retrieve_model(model: str) -> Response:
    """The card of any model name the OpenAI routes accept, under that name."""
    tm = _tm()
    try:
        adapter = resolve_model(tm, model)
    except ParamError:
        adapter = ""
    if adapter is None:
        card = _model_card().model_copy(update={"id": model})
    elif adapter in tm.loaded_lora_adapters:
        card = _lora_card(adapter).model_copy(update={"id": model})
    else:
        return error_for_exception(model_not_found(model))
    return Response(card.model_dump_json(), media_type="application/json")


def _lora_card(name: str) -> ModelCard:
    tm = _tm()
    return ModelCard(id=name, root=tm.loaded_lora_adapters[name], parent=tm.served_model_name,
                     max_model_len=None)


# --- LoRA adapters -------------------------------------------------------------------------


@app.post("/load_lora_adapter")
async def load_lora_adapter(raw_request: Request) -> Response:
    try:
        body = await _json_body(raw_request)
        obj = LoadLoRAAdapterReqInput(lora_name=_body_str(body, "lora_name"),
                                      lora_path=_body_str(body, "lora_path"),
                                      pinned=bool(body.get("pinned", False)))
    except ValueError as e:
        return _lora_update_response(LoRAUpdateOutput(success=False, error_message=str(e)))
    return await _lora_update(_tm().load_lora_adapter(obj))


@app.post("/unload_lora_adapter")
async def unload_lora_adapter(raw_request: Request) -> Response:
    try:
        body = await _json_body(raw_request)
        obj = UnloadLoRAAdapterReqInput(lora_name=_body_str(body, "lora_name"))
    except ValueError as e:
        return _lora_update_response(LoRAUpdateOutput(success=False, error_message=str(e)))
    return await _lora_update(_tm().unload_lora_adapter(obj))


async def _lora_update(coro: Any) -> Response:
    try:
        return _lora_update_response(await coro)
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)


def _lora_update_response(result: LoRAUpdateOutput) -> Response:
    """Upstream's body: the LoRAUpdateOutput fields; 200 on success, 400 otherwise."""
    return json_response(dataclasses.asdict(result), 200 if result.success else 400)


def _body_str(body: Any, key: str) -> str:
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string.")
    return value


def _model_card() -> ModelCard:
    tm = _tm()
    return ModelCard(id=tm.served_model_name, root=tm.served_model_name,
                     max_model_len=tm.context_len)


# --- launching -----------------------------------------------------------------------------


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM once uvicorn has shut down."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGINT/SIGTERM first ends the requests in flight: each
    stream gets an error event and `data: [DONE]`, each waiting request a 503, so the
    connections close at once instead of being cancelled when the graceful timeout ends."""

    def __init__(self, config: uvicorn.Config, tokenizer_manager: TokenizerManager):
        super().__init__(config)
        self.tokenizer_manager = tokenizer_manager

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        loop = self.tokenizer_manager.event_loop
        if loop is not None and not loop.is_closed():
            # From a signal handler: only the loop's thread-safe entry is safe to call.
            loop.call_soon_threadsafe(self.tokenizer_manager.notify_dead,
                                      "The server is shutting down.")


def launch_server(server_args: ServerArgs) -> None:
    """Start the children, serve HTTP until SIGINT/SIGTERM, then stop everything.

    Exits with status 1 (SystemExit) when a child process dies or the warmup fails.
    """
    tokenizer_manager, scheduler_info = _launch_subprocesses(server_args)
    children = tokenizer_manager.child_processes
    state = _GlobalState(tokenizer_manager, server_args, scheduler_info,
                         OpenAIServingCompletion(tokenizer_manager),
                         OpenAIServingChat(tokenizer_manager),
                         OpenAIServingScore(tokenizer_manager),
                         OpenAIServingResponses(tokenizer_manager))
    set_global_state(state)
    if server_args.api_key:
        add_api_key_middleware(app, server_args.api_key, server_args.api_key_protect_metrics)
    debug = server_args.log_level == "debug"
    config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                            log_level=server_args.log_level, access_log=debug,
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)
    state.uvicorn_server = _Server(config, tokenizer_manager)
    logger.info("%s", serving_message(server_args))
    children.start_watchdog(lambda message: _fail_server(state, message))
    threading.Thread(target=_wait_and_warmup, args=(state,), name="sglab-warmup",
                     daemon=True).start()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        state.uvicorn_server.run()
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        children.kill()
        tokenizer_manager.close()
    if state.exit_code:
        raise SystemExit(state.exit_code)


def serving_message(args: ServerArgs) -> str:
    """What is served, from where, on what, and at which URL (the startup log line)."""
    from sglab.srt.configs.model_config import ModelConfig
    from sglab.srt.utils.dummy_model import DEFAULT_PRESET, default_cache_dir

    dtype = ModelConfig(args.model_path, args.dtype, args.context_length, args.device,
                        args.trust_remote_code).dtype
    if os.path.realpath(args.model_path) == \
            os.path.realpath(os.path.join(default_cache_dir(), DEFAULT_PRESET)):
        source = (f"sglab's default {DEFAULT_PRESET} model with random weights, built on "
                  "first use by sglab.srt.utils.dummy_model; pass --model-path for another")
    elif args.load_format == "dummy":
        source = "random weights (--load-format dummy)"
    else:
        source = f"{args.load_format} weights"
    return (f"Serving model {args.served_model_name!r} from {args.model_path} ({source}) on "
            f"{args.device}, dtype {str(dtype).removeprefix('torch.')}, at "
            f"http://{args.host}:{args.port}")


def _fail_server(state: _GlobalState, message: str) -> None:
    """Fail pending requests, stop uvicorn, exit non-zero (forcibly if shutdown hangs)."""
    logger.error("Shutting down: %s", message)
    state.exit_code = 1
    state.tokenizer_manager.notify_dead(message)
    if state.uvicorn_server is not None:
        state.uvicorn_server.should_exit = True

    def force_exit() -> None:
        logger.error("Graceful shutdown timed out; exiting.")
        state.tokenizer_manager.child_processes.kill()
        os._exit(1)

    timer = threading.Timer(_FORCED_EXIT_DELAY_S, force_exit)
    timer.daemon = True
    timer.start()


def _wait_and_warmup(state: _GlobalState) -> None:
    import requests

    server_args = state.server_args
    url = server_args.url()
    session = requests.Session()
    session.trust_env = False  # never route localhost through an HTTP proxy
    if server_args.api_key:
        session.headers["Authorization"] = f"Bearer {server_args.api_key}"
    for _ in range(120):
        try:
            if session.get(f"{url}/model_info", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        _fail_server(state, "The HTTP server did not come up within 120 s.")
        return
    if not server_args.skip_server_warmup:
        payload: dict[str, Any] = {"sampling_params": {"temperature": 0, "max_new_tokens": 8}}
        if server_args.skip_tokenizer_init:
            payload["input_ids"] = [10, 11, 12]
        else:
            payload["text"] = "The capital city of France is"
        try:
            res = session.post(f"{url}/generate", json=payload, timeout=WARMUP_TIMEOUT_S)
            ok, detail = res.status_code == 200, res.text
        except requests.RequestException as e:
            ok, detail = False, str(e)
        if not ok:
            _fail_server(state, f"The warmup request failed: {detail}")
            return
    state.tokenizer_manager.server_status = "Up"
    logger.info("The server is fired up and ready to roll!")
