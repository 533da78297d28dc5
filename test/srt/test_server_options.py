"""Server options: --skip-tokenizer-init, --served-model-name, --stream-interval,
--decode-log-interval."""

from __future__ import annotations

import json
import re
import time

SERVER_ARGS = ["--skip-server-warmup", "--skip-tokenizer-init", "--served-model-name", "tiny",
               "--stream-interval", "3", "--decode-log-interval", "4"]
DECODE_LINE = re.compile(
    r"Decode batch, #running-req: (\d+), #token: (\d+), token usage: (\d\.\d\d), "
    r"cpu graph: False, gen throughput \(token/s\): (\d+\.\d\d), #queue-req: (\d+)$")


def test_served_model_name(server, http):
    models = http.get(f"{server.base_url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny"


def test_token_ids_in_and_out(server, http):
    body = {"input_ids": [5, 6, 7, 8],
            "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}}
    out = http.post(f"{server.base_url}/generate", json=body).json()
    assert len(out["output_ids"]) == 5 and "text" not in out
    assert out["meta_info"]["completion_tokens"] == 5
    refused = http.post(f"{server.base_url}/generate", json={"text": "hello"})
    assert refused.status_code == 400 and "error" in refused.json()


def test_stream_interval(server, http):
    body = {"input_ids": [9, 10, 11], "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    with http.post(f"{server.base_url}/generate", json=body, stream=True) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    counts = [c["meta_info"]["completion_tokens"] for c in chunks]
    assert counts[-1] == 8 and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    # Chunks come for the first token, every 3rd token and the finish; consecutive updates
    # may be coalesced on the way (the first token's with the third's), as upstream does.
    assert counts == sorted(set(counts)) and len(counts) >= 2 and counts[0] in (1, 3)
    assert all(c in (1, 8) or c % 3 == 0 for c in counts), counts


def _decode_lines(server) -> list[re.Match]:
    lines = server.log().splitlines()
    return [m for m in map(DECODE_LINE.search, lines) if m]


def test_decode_log_interval(server, http):
    before = len(_decode_lines(server))
    body = {"input_ids": [21, 22, 23], "sampling_params": {
        "temperature": 0, "max_new_tokens": 9, "ignore_eos": True}}
    assert http.post(f"{server.base_url}/generate", json=body).status_code == 200
    time.sleep(0.5)
    # 8 decode steps (one more where the overlap schedule decodes past the finish): a line
    # every 4th step, whatever the count before.
    new = _decode_lines(server)[before:]
    assert len(new) in (2, 3), new
    for m in new:
        running, tokens, usage, throughput, queued = m.groups()
        assert (running, queued) == ("1", "0") and 3 <= int(tokens) <= 12
        assert float(throughput) > 0 and float(usage) <= 1.0
