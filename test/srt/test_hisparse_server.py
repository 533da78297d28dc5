"""HiSparse through a real server process: sparse decode with the official openai client and
/generate (tokens as the in-process scheduler gives them), patch 0004 in /get_server_info, a
prompt too long for the device pool refused with a 400, and bad configs as startup errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.test.runners import SchedulerRunner

CONFIG = json.dumps({"top_k": 16, "device_buffer_size": 24, "num_recent_pages": 1})
HISPARSE = ["--enable-hisparse", "--disable-radix-cache", "--page-size", "4",
            "--hisparse-config", CONFIG, "--max-total-tokens", "192"]
SERVER_ARGS = ["--skip-server-warmup", *HISPARSE]
GREEDY = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
PROMPTS = [[random.Random(i).randrange(900) for _ in range(n)] for i, n in enumerate((37, 58))]


def test_sparse_decode_serves_what_the_scheduler_computes(http, server):
    """Both prompts pass the 24-token buffer within 40 tokens: sparse decode, swap-ins."""
    res = http.post(f"{server.base_url}/generate",
                    json={"input_ids": PROMPTS, "sampling_params": GREEDY}, timeout=120)
    assert res.status_code == 200, res.text
    served = [o["output_ids"] for o in res.json()]
    runner = SchedulerRunner(model_path=get_default_model_path(), disable_radix_cache=True,
                             enable_hisparse=True, page_size=4, hisparse_config=CONFIG,
                             max_total_tokens=192)
    assert served == [o.output_ids for o in runner.generate(PROMPTS, GREEDY)]


def test_openai_completion_and_server_info(client, http, server):
    out = client.completions.create(model=client.models.list().data[0].id,
                                    prompt="one two three four five six seven eight nine " * 4,
                                    max_tokens=40, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 40
    info = http.get(f"{server.base_url}/get_server_info", timeout=30).json()
    assert info["patch_status"]["0004"] == {"on": True, "applies": True, "mode": "pr",
                                            "reason": None}
    assert info["enable_hisparse"] is True


def test_prompt_beyond_the_device_pool_is_a_400_and_the_server_keeps_serving(client, http,
                                                                                  server):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=client.models.list().data[0].id, prompt=[5] * 300,
                                  max_tokens=4)
    assert "does not fit in the KV cache" in e.value.body["message"]
    res = http.post(f"{server.base_url}/generate",
                    json={"input_ids": PROMPTS[0], "sampling_params": GREEDY}, timeout=120)
    assert res.status_code == 200 and len(res.json()["output_ids"]) == 40


@pytest.mark.parametrize("args,message", [
    (["--hisparse-config", '{"top_k": 64, "device_buffer_size": 32}'],
     "device_buffer_size (32) must be no smaller than top_k (64)"),
    (["--hisparse-config", '{"top_k": 64, "ratio": 2}'], "unknown key 'ratio'"),
])
def test_bad_config_exits_at_startup_naming_the_key(args, message):
    done = subprocess.run([sys.executable, "-m", "sglab.launch_server", "--model-path",
                           get_default_model_path(), "--enable-hisparse",
                           "--disable-radix-cache", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and f"--hisparse-config: {message}" in done.stderr
