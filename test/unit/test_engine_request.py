"""Engine.generate and Engine.async_generate hand the TokenizerManager the same request, with
every argument in its GenerateReqInput field, streaming or not."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

from sglab.srt.entrypoints.engine import Engine
from sglab.srt.managers.io_struct import GenerateReqInput

ARGS = {"prompt": ["a", "b"], "sampling_params": {"top_p": 0.5}, "return_logprob": True,
        "logprob_start_len": 1, "top_logprobs_num": 2, "lora_path": ["x", None],
        "rid": ["r1", "r2"], "return_text_in_logprobs": True}


class _RecordingTokenizerManager:
    def __init__(self):
        self.requests: list[GenerateReqInput] = []

    async def generate_request(self, obj: GenerateReqInput, request):
        self.requests.append(obj)
        for i in range(2 if obj.stream else 1):
            yield {"chunk": i}


@pytest.fixture
def engine():
    """An Engine on its own loop thread, without child processes."""
    eng = Engine.__new__(Engine)
    eng._closed = False
    eng._loop = asyncio.new_event_loop()
    eng._thread = threading.Thread(target=eng._loop.run_forever, daemon=True)
    eng._thread.start()
    eng.tokenizer_manager = _RecordingTokenizerManager()
    yield eng
    eng._closed = True
    eng._loop.call_soon_threadsafe(eng._loop.stop)
    eng._thread.join(5)


def test_both_entry_points_take_the_same_arguments():
    sync, coro = (inspect.signature(f) for f in (Engine.generate, Engine.async_generate))
    assert list(sync.parameters.values()) == list(coro.parameters.values())


@pytest.mark.parametrize("stream", [False, True])
def test_generate_and_async_generate_build_the_same_request(engine, stream):
    async def async_outputs():
        out = await engine.async_generate(**ARGS, stream=stream)
        return [o async for o in out] if stream else [out]

    sync = engine.generate(**ARGS, stream=stream)
    sync_outputs = list(sync) if stream else [sync]
    assert asyncio.run(async_outputs()) == sync_outputs == [
        {"chunk": i} for i in range(2 if stream else 1)]
    args = {k: v for k, v in ARGS.items() if k != "prompt"}
    expected = GenerateReqInput(text=ARGS["prompt"], stream=stream, **args)
    assert engine.tokenizer_manager.requests == [expected, expected]


def test_unset_logprob_arguments_take_the_request_defaults(engine):
    engine.generate(input_ids=[1, 2])
    (obj,) = engine.tokenizer_manager.requests
    obj.normalize_batch_and_arguments()
    assert (obj.logprob_start_len, obj.top_logprobs_num, obj.return_logprob) == ([-1], [0], [False])
