"""LoRA through a real server process: `lora_path` on /generate, adapter names as the OpenAI
`model`, /load_lora_adapter and /unload_lora_adapter, adapters in /v1/models, and 400s (not
crashes) for unknown adapters, ranks above --max-lora-rank and bad directories."""

from __future__ import annotations

import random

import pytest
from conftest import kill_server, popen_launch_server
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.test.lora_utils import make_peft_adapter
from sglab.test.runners import HFRunner

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
PROMPT = [random.Random(5).randrange(1000) for _ in range(11)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    base = get_default_model_path()
    root = tmp_path_factory.mktemp("server_adapters")
    specs = {"a": (8, ["q_proj", "v_proj", "down_proj"]), "b": (4, ["o_proj", "up_proj"]),
             "big": (32, ["q_proj"])}
    return {name: make_peft_adapter(base, str(root / name), r, 2 * r, targets, seed=i,
                                    std=0.3)
            for i, (name, (r, targets)) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def server(adapters):
    srv = popen_launch_server(["--skip-server-warmup", "--lora-paths", f"a={adapters['a']}",
                               "--max-lora-rank", "16", "--lora-target-modules", "all",
                               "--max-loras-per-batch", "2"])
    yield srv
    kill_server(srv)


@pytest.fixture(scope="module")
def expected(adapters) -> dict:
    base = get_default_model_path()
    return {name: HFRunner(base, adapters.get(name)).greedy(PROMPT, GREEDY["max_new_tokens"])
            for name in ("a", "b", None)}


def _generate(http, server, lora_path, status=200):
    res = http.post(f"{server.base_url}/generate", timeout=120, json={
        "input_ids": PROMPT, "sampling_params": GREEDY, "lora_path": lora_path})
    assert res.status_code == status, res.text
    return res.json()


def _completion(http, server, model, status=200):
    res = http.post(f"{server.base_url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
        "ignore_eos": True})
    assert res.status_code == status, res.text
    return res.json()


def _update(http, server, route, body, status):
    res = http.post(f"{server.base_url}/{route}", json=body, timeout=120)
    assert res.status_code == status, res.text
    out = res.json()
    assert list(out) == ["rid", "http_worker_ipc", "success", "error_message",
                         "loaded_adapters"]
    assert out["success"] == (status == 200)
    return out


def test_lora_serving_and_runtime_updates(http, server, adapters, expected):
    served = server.model_path
    assert _generate(http, server, "a")["output_ids"] == expected["a"]
    assert _generate(http, server, None)["output_ids"] == expected[None]
    assert "'b' is not loaded" in _generate(http, server, "b", 400)["error"]["message"]
    models = http.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in models] == [
        (served, served, None), ("a", adapters["a"], served)]

    out = _update(http, server, "load_lora_adapter",
                  {"lora_name": "b", "lora_path": adapters["b"]}, 200)
    assert out["loaded_adapters"] == {"a": adapters["a"], "b": adapters["b"]}
    assert _generate(http, server, "b")["output_ids"] == expected["b"]
    # OpenAI routes: the adapter's name, or base:adapter, as the model.
    text = _completion(http, server, "b")["choices"][0]["text"]
    assert text == _completion(http, server, f"{served}:b")["choices"][0]["text"]
    assert expected["b"] != expected[None]
    assert text != _completion(http, server, served)["choices"][0]["text"]
    assert http.get(f"{server.base_url}/v1/models/b", timeout=30).json()["parent"] == served

    errors = [
        ({"lora_name": "x", "lora_path": "/no/such/dir"}, "does not exist"),
        ({"lora_name": "big", "lora_path": adapters["big"]}, "above --max-lora-rank 16"),
        ({"lora_name": "b", "lora_path": adapters["b"]}, "already loaded"),
        ({"lora_path": adapters["b"]}, "lora_name must be a non-empty string"),
    ]
    for body, message in errors:
        out = _update(http, server, "load_lora_adapter", body, 400)
        assert message in out["error_message"] and out["loaded_adapters"] is None

    out = _update(http, server, "unload_lora_adapter", {"lora_name": "b"}, 200)
    assert out["loaded_adapters"] == {"a": adapters["a"]}
    assert _update(http, server, "unload_lora_adapter", {"lora_name": "b"}, 400)
    _generate(http, server, "b", 400)
    _completion(http, server, "b", 404)  # an unloaded adapter is an unknown model
    # Still serving, with the same outputs.
    assert _generate(http, server, "a")["output_ids"] == expected["a"]
