"""The Responses API: POST /v1/responses (plain, streamed as OpenAI's events, or in the
background), GET /v1/responses/{id} and POST /v1/responses/{id}/cancel, as upstream's.

A response's input becomes chat messages (instructions first, then a previous response's
conversation), rendered by the chat template. Stored responses (`store`, the default) live in
memory, the most recent `MAX_STORED_RESPONSES` of them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from sglab.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
)
from sglab.srt.entrypoints.openai.serving_base import (
    ParamError,
    check_request_fields,
    collect_one,
    error_body,
    error_for_exception,
    first_and_rest,
    resolve_model,
    streaming_response,
)
from sglab.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglab.srt.managers.io_struct import GenerateReqInput
from sglab.srt.managers.tokenizer_manager import TokenizerManager

MAX_STORED_RESPONSES = 1024
DEFAULT_TEMPERATURE = 0.7  # upstream's Responses default
_TEXT_PARTS = ("input_text", "output_text", "text")


class OpenAIServingResponses:
    def __init__(self, tokenizer_manager: TokenizerManager):
        self.tokenizer_manager = tokenizer_manager
        self.chat = OpenAIServingChat(tokenizer_manager)
        # id -> response, and id -> the messages it answered (for previous_response_id).
        self.response_store: OrderedDict[str, ResponsesResponse] = OrderedDict()
        self.msg_store: dict[str, list[dict]] = {}
        self.background_tasks: dict[str, asyncio.Task] = {}

    # --- create -------------------------------------------------------------------------------

    async def create_responses(self, request: ResponsesRequest, raw_request: Request) -> Response:
        try:
            obj, messages = self._convert_to_internal_request(request)
        except ValueError as e:
            return error_for_exception(e)
        if request.store:
            self.msg_store[request.request_id] = messages
        if request.background:
            return self._start_background(request, obj)
        agen = self.tokenizer_manager.generate_request(obj, raw_request)
        try:
            if request.stream:
                first, rest = await first_and_rest(agen)
                return streaming_response(self._stream_events(request, first, rest))
            response = self._make_response(request, await collect_one(agen))
        except Exception as e:  # noqa: BLE001 - every failure gets an HTTP answer
            return error_for_exception(e)
        self._store(request, response)
        return _json(response)

    def _convert_to_internal_request(
        self, request: ResponsesRequest
    ) -> tuple[GenerateReqInput, list[dict]]:
        check_request_fields(request)
        _check_tools(request)
        model = request.model or self.tokenizer_manager.served_model_name
        lora_path = resolve_model(self.tokenizer_manager, model)
        if request.background and (request.stream or not request.store):
            raise ParamError("background responses must be stored (store: true) and are not "
                             "streamed by sglab.", "background")
        messages = self._input_messages(request)
        chat = ChatCompletionRequest(model=model, messages=messages)
        input_ids = self.chat._apply_chat_template(chat)
        obj = GenerateReqInput(input_ids=input_ids, sampling_params=self._sampling_params(request),
                               stream=bool(request.stream), rid=request.request_id,
                               lora_path=lora_path)
        return obj, messages

    def _input_messages(self, request: ResponsesRequest) -> list[dict]:
        messages: list[dict] = []
        if request.instructions:
            messages.append({"role": "system", "content": request.instructions})
        if request.previous_response_id is not None:
            previous = self._stored(request.previous_response_id, "previous_response_id")
            messages += self.msg_store.get(previous.id, [])
            messages += [{"role": "assistant", "content": text} for text in _texts(previous)]
        if isinstance(request.input, str):
            messages.append({"role": "user", "content": request.input})
        else:
            messages += [_input_message(item, i) for i, item in enumerate(request.input)]
        return messages

    def _sampling_params(self, request: ResponsesRequest) -> dict:
        defaults = self.tokenizer_manager.generation_defaults
        temperature = request.temperature
        if temperature is None:
            temperature = defaults.get("temperature", DEFAULT_TEMPERATURE)
        top_p = request.top_p if request.top_p is not None else defaults.get("top_p", 1.0)
        return {"max_new_tokens": request.max_output_tokens, "temperature": temperature,
                "top_p": top_p, "top_k": request.top_k, "min_p": request.min_p,
                "frequency_penalty": request.frequency_penalty,
                "presence_penalty": request.presence_penalty,
                "repetition_penalty": request.repetition_penalty, "stop": request.stop}

    # --- outputs ------------------------------------------------------------------------------

    def _make_response(self, request: ResponsesRequest, out: dict | None,
                       status: str = "completed") -> ResponsesResponse:
        output, usage = [], None
        if out is not None:
            if out.get("text"):
                output = [_message_item(f"msg_{uuid.uuid4().hex}", out["text"], "completed")]
            usage = _usage(out["meta_info"])
        return ResponsesResponse(
            id=request.request_id, model=request.model or self.tokenizer_manager.served_model_name,
            output=output, status=status, usage=usage,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            tool_choice=request.tool_choice, tools=request.tools,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            previous_response_id=request.previous_response_id,
            reasoning={"effort": request.reasoning.effort if request.reasoning else None,
                       "summary": None},
            store=request.store, temperature=request.temperature,
            text={"format": {"type": "text"}} if output else None, top_p=request.top_p,
            truncation=request.truncation, user=request.user, metadata=request.metadata or {},
            background=request.background)

    async def _stream_events(self, request: ResponsesRequest, first: dict,
                             rest: AsyncIterator) -> AsyncIterator[bytes]:
        """OpenAI's event sequence for one text message; an `error` event if it breaks."""
        events = _EventStream()
        item_id = f"msg_{uuid.uuid4().hex}"
        initial = self._make_response(request, None, "in_progress").model_dump()
        yield events.send("response.created", response=initial)
        yield events.send("response.in_progress", response=initial)
        yield events.send("response.output_item.added", output_index=0,
                          item=_message_item(item_id, None, "in_progress"))
        yield events.send("response.content_part.added", item_id=item_id, output_index=0,
                          content_index=0, part=_text_part(""))
        sent, out = 0, first
        try:
            while True:
                text = out.get("text", "")
                if len(text) > sent:
                    yield events.send("response.output_text.delta", item_id=item_id,
                                      output_index=0, content_index=0, delta=text[sent:],
                                      logprobs=[])
                    sent = len(text)
                if out["meta_info"]["finish_reason"] is not None:
                    break
                out = await rest.__anext__()
        except Exception as e:  # noqa: BLE001 - reported in the stream
            body = error_for_exception(e)
            error = json.loads(body.body)["error"]
            yield events.send("error", code=error.get("code"), message=error["message"],
                              param=error.get("param"))
            return
        finally:
            await rest.aclose()
        text = out.get("text", "")
        yield events.send("response.output_text.done", item_id=item_id, output_index=0,
                          content_index=0, text=text, logprobs=[])
        yield events.send("response.content_part.done", item_id=item_id, output_index=0,
                          content_index=0, part=_text_part(text))
        yield events.send("response.output_item.done", output_index=0,
                          item=_message_item(item_id, text, "completed"))
        response = self._make_response(request, out)
        if response.output:
            response.output[0]["id"] = item_id
        self._store(request, response)
        yield events.send("response.completed", response=response.model_dump())

    # --- background, retrieve, cancel ---------------------------------------------------------

    def _start_background(self, request: ResponsesRequest, obj: GenerateReqInput) -> Response:
        response = self._make_response(request, None, "queued")
        self._store(request, response)
        task = asyncio.create_task(self._run_background(request, obj))
        self.background_tasks[request.request_id] = task
        task.add_done_callback(lambda _: self.background_tasks.pop(request.request_id, None))
        return _json(response)

    async def _run_background(self, request: ResponsesRequest, obj: GenerateReqInput) -> None:
        stored = self.response_store[request.request_id]
        stored.status = "in_progress"
        try:
            out = await collect_one(self.tokenizer_manager.generate_request(obj, None))
        except Exception as e:  # noqa: BLE001 - the stored response records the failure
            if stored.status != "cancelled":
                stored.status = "failed"
                stored.error = error_body(str(e))["error"]
            return
        if stored.status != "cancelled":
            self._store(request, self._make_response(request, out))

    async def retrieve_responses(self, response_id: str) -> Response:
        try:
            return _json(self._stored(response_id, "response_id"))
        except ParamError as e:
            return error_for_exception(e)

    async def cancel_responses(self, response_id: str) -> Response:
        try:
            response = self._stored(response_id, "response_id")
        except ParamError as e:
            return error_for_exception(e)
        if response.status not in ("queued", "in_progress"):  # upstream's wording
            return error_for_exception(ParamError("Cannot cancel a synchronous response.", None))
        response.status = "cancelled"
        self.tokenizer_manager.abort_request(response_id)
        task = self.background_tasks.get(response_id)
        if task is not None:
            task.cancel()
        return _json(response)

    def _stored(self, response_id: str, param: str) -> ResponsesResponse:
        if not response_id.startswith("resp_"):  # upstream's wording
            raise ParamError(f"Invalid '{param}': '{response_id}'. Expected an ID that begins "
                             "with 'resp'.", param)
        response = self.response_store.get(response_id)
        if response is None:
            raise ParamError(f"Response with id '{response_id}' not found.", param, 404)
        return response

    def _store(self, request: ResponsesRequest, response: ResponsesResponse) -> None:
        if not request.store:
            return
        self.response_store[response.id] = response
        self.response_store.move_to_end(response.id)
        while len(self.response_store) > MAX_STORED_RESPONSES:
            old, _ = self.response_store.popitem(last=False)
            self.msg_store.pop(old, None)


class _EventStream:
    """`event: <type>` / `data: <json>` SSE frames with increasing sequence numbers."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def send(self, event_type: str, **fields: Any) -> bytes:
        data = {"type": event_type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {event_type}\ndata: {json.dumps(data)}\n\n".encode()


def _check_tools(request: ResponsesRequest) -> None:
    if request.tools:
        raise ParamError("Built-in tools (web_search_preview, code_interpreter) need a tool "
                         "server, which sglab does not run: tools must be empty.", "tools")
    if request.tool_choice == "required":
        raise ParamError("tool_choice 'required' needs tools, which sglab does not run.",
                         "tool_choice")


def _input_message(item: dict, index: int) -> dict:
    """A chat message from one input item: a message whose content is text or text parts."""
    role, content = item.get("role"), item.get("content")
    if item.get("type", "message") != "message" or role not in ("user", "system", "developer",
                                                                 "assistant"):
        raise ParamError(f"input[{index}] must be a message with role user, system, developer "
                         "or assistant (sglab has no tools).", f"input.{index}")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
            raise ParamError(f"input[{index}].content parts must be text (sglab serves text "
                             "only).", f"input.{index}.content")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ParamError(f"input[{index}].content must be a string or a list of text parts.",
                         f"input.{index}.content")
    return {"role": role, "content": content}


def _texts(response: ResponsesResponse) -> list[str]:
    return ["".join(part.get("text", "") for part in item.get("content", []))
            for item in response.output if item.get("type") == "message"]


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [_text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(meta: dict) -> ResponseUsage:
    prompt, completion = meta["prompt_tokens"], meta["completion_tokens"]
    return ResponseUsage(input_tokens=prompt, output_tokens=completion,
                         input_tokens_details={"cached_tokens": meta.get("cached_tokens", 0)},
                         total_tokens=prompt + completion, prompt_tokens=prompt,
                         completion_tokens=completion)


def _json(response: ResponsesResponse) -> Response:
    return Response(response.model_dump_json(), media_type="application/json")
