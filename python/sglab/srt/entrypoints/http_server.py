"""The HTTP server: native and OpenAI-compatible APIs on FastAPI/uvicorn, and launch_server.

The HTTP server, the Engine's process launching and the TokenizerManager share the main
process; the scheduler and the detokenizer are child processes talking over ZMQ.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglab.srt.entrypoints.engine import _launch_subprocesses
from sglab.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from sglab.srt.entrypoints.openai.serving_base import (
    SSE_DONE,
    collect_one,
    create_error_response,
    dumps_json,
    error_body,
    error_for_exception,
    first_and_rest,
    json_response,
    sse,
    streaming_response,
)
from sglab.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglab.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglab.srt.managers.io_struct import (
    GenerateReqInput,
    LoadLoRAAdapterReqInput,
    LoRAUpdateOutput,
    UnloadLoRAAdapterReqInput,
)
from sglab.srt.managers.tokenizer_manager import TokenizerManager
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
_UNSUPPORTED_FLAGS = ("return_hidden_states", "return_routed_experts")


@dataclass
class _GlobalState:
    tokenizer_manager: TokenizerManager
    server_args: ServerArgs
    scheduler_info: dict
    serving_completion: OpenAIServingCompletion
    serving_chat: OpenAIServingChat
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


def add_api_key_middleware(fastapi_app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}"

    @fastapi_app.middleware("http")
    async def authentication(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if request.method == "OPTIONS" or path.startswith(("/health", "/metrics")):
            return await call_next(request)
        if not secrets.compare_digest(request.headers.get("Authorization", ""), expected):
            return create_error_response("Unauthorized: invalid or missing API key.", 401,
                                         err_type="authentication_error")
        return await call_next(request)


# --- health and info -----------------------------------------------------------------------


@app.get("/health")
@app.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """200 once the server answers a 1-token generation; 503 while starting or broken."""
    tm = _tm()
    if tm.server_status != "Up" or tm.dead_message is not None:
        return Response(status_code=503)
    if request.url.path == "/health" and not HEALTH_ENDPOINT_GENERATION:
        return Response(status_code=200)
    rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
    obj = GenerateReqInput(input_ids=[0], rid=rid,
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


@app.api_route("/flush_cache", methods=["GET", "POST"])
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


@app.api_route("/start_profile", methods=["GET", "POST"])
async def start_profile(raw_request: Request) -> Response:
    try:
        body = await _optional_json_object(raw_request)
        ret = await _tm().start_profile(
            output_dir=body.get("output_dir"),
            num_steps=_optional_int(body.get("num_steps"), "num_steps"),
            activities=body.get("activities"),
            with_stack=body.get("with_stack"),
            record_shapes=body.get("record_shapes"),
            profile_prefix=body.get("profile_prefix"),
        )
    except Exception as e:  # noqa: BLE001
        return error_for_exception(e)
    if ret.success:
        return PlainTextResponse("Start profiling.\n")
    return PlainTextResponse(ret.message, status_code=400)


@app.api_route("/stop_profile", methods=["GET", "POST"])
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
        tm.metrics.update_scheduler_state(await tm.get_internal_state())
    except Exception:  # noqa: BLE001 - the request counters are still worth serving
        logger.warning("Could not refresh scheduler metrics", exc_info=True)
    body, content_type = tm.metrics.render()
    return Response(body, media_type=content_type)


# --- native generate -----------------------------------------------------------------------


@app.api_route("/generate", methods=["POST", "PUT"])
async def generate_request(raw_request: Request) -> Response:
    try:
        obj = parse_generate_request(await _json_body(raw_request))
    except ValueError as e:
        return create_error_response(str(e), 400)
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
        status = getattr(e, "status_code", 400 if isinstance(e, ValueError) else 500)
        yield sse(dumps_json(error_body(str(e), code=status)))
    finally:
        await rest.aclose()
    yield SSE_DONE


def parse_generate_request(body: Any) -> GenerateReqInput:
    """A GenerateReqInput from a /generate JSON body; unknown keys are ignored, as upstream."""
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    names = {f.name for f in dataclasses.fields(GenerateReqInput)} - _INTERNAL_FIELDS
    ignored = sorted(set(body) - names)
    if ignored:
        logger.debug("/generate ignores unknown field(s): %s", ", ".join(ignored))
    kwargs = {k: v for k, v in body.items() if k in names}
    for name in ("stream", "return_text_in_logprobs", "log_metrics", *_UNSUPPORTED_FLAGS):
        value = kwargs.get(name)
        if value is None:
            kwargs.pop(name, None)
        elif not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean.")
    for name in _UNSUPPORTED_FLAGS:
        if kwargs.get(name):
            raise ValueError(f"{name} is not supported by sglab.")
    return GenerateReqInput(**kwargs)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        import json

        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"The request body is not valid JSON: {e}") from None


async def _optional_json_object(request: Request) -> dict:
    if request.method == "GET" or not (await request.body()).strip():
        return {}
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    return body


def _optional_int(value: Any, name: str) -> int | None:
    """bench_serving may send numbers as strings."""
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


# --- OpenAI-compatible ---------------------------------------------------------------------


@app.post("/v1/completions")
async def openai_v1_completions(request: CompletionRequest, raw_request: Request) -> Response:
    return await _global_state.serving_completion.handle_request(request, raw_request)


@app.post("/v1/chat/completions")
async def openai_v1_chat_completions(request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
    return await _global_state.serving_chat.handle_request(request, raw_request)


@app.get("/v1/models")
async def available_models() -> Response:
    cards = [_model_card()] + [_lora_card(name) for name in _tm().loaded_lora_adapters]
    return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")


@app.get("/v1/models/{model:path}")
async def retrieve_model(model: str) -> Response:
    tm = _tm()
    if model in tm.loaded_lora_adapters:
        return Response(_lora_card(model).model_dump_json(), media_type="application/json")
    if model not in (tm.served_model_name, tm.model_path):
        return create_error_response(f"The model '{model}' does not exist", 404,
                                     param="model", code="model_not_found")
    return Response(_model_card().model_dump_json(), media_type="application/json")


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


def launch_server(server_args: ServerArgs) -> None:
    """Start the children, serve HTTP until SIGINT/SIGTERM, then stop everything.

    Exits with status 1 (SystemExit) when a child process dies or the warmup fails.
    """
    tokenizer_manager, scheduler_info = _launch_subprocesses(server_args)
    children = tokenizer_manager.child_processes
    state = _GlobalState(tokenizer_manager, server_args, scheduler_info,
                         OpenAIServingCompletion(tokenizer_manager),
                         OpenAIServingChat(tokenizer_manager))
    set_global_state(state)
    if server_args.api_key:
        add_api_key_middleware(app, server_args.api_key)
    debug = server_args.log_level == "debug"
    config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                            log_level=server_args.log_level, access_log=debug,
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)
    state.uvicorn_server = uvicorn.Server(config)
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
