"""ServerArgs: upstream flag names, defaults, and startup errors that name the flag."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.models.registry import resolve_model_cls
from sglab.srt.server_args import ServerArgs, ServerArgsError, prepare_server_args
from sglab.srt.utils.dummy_model import make_dummy_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_dummy_model("tiny-llama", str(tmp_path_factory.mktemp("m") / "tiny-llama"))


def test_cli_names_and_defaults(model_dir):
    args = prepare_server_args(["--model", model_dir, "--max-total-tokens", "2k",
                                "--chunked-prefill-size", "-1", "--schedule-policy", "lpm"])
    assert args.model_path == args.tokenizer_path == args.served_model_name == model_dir
    assert args.max_total_tokens == 2000 and args.chunked_prefill_size == -1
    assert args.device == "cpu" and args.attention_backend == "torch_native"
    assert args.page_size == 1 and args.load_format == "auto" and args.port == 30000
    assert args.disable_cuda_graph  # no CUDA graphs without CUDA
    assert args.tp_size == 1


@pytest.mark.parametrize("flag", ["--tp", "--tp-size", "--tensor-parallel-size"])
def test_tp_size_flag_names(model_dir, flag):
    assert prepare_server_args(["--model", model_dir, flag, "2"]).tp_size == 2


@pytest.mark.parametrize("max_flag,list_flag", [("--cuda-graph-max-bs", "--cuda-graph-bs"), (
    "--cuda-graph-max-bs-decode", "--cuda-graph-bs-decode")])
def test_decode_cuda_graph_flag_names(model_dir, max_flag, list_flag):
    """Upstream's newer `-decode` names set the same decode-graph sizes."""
    assert prepare_server_args(["--model", model_dir, max_flag, "12"]).cuda_graph_max_bs == 12
    args = prepare_server_args(["--model", model_dir, list_flag, "1", "4"])
    assert args.cuda_graph_bs == [1, 4] and args.cuda_graph_max_bs == 4


@pytest.mark.parametrize("kwargs,flag", [
    ({"page_size": 0}, "--page-size"),
    ({"page_size": 16, "chunked_prefill_size": 24}, "--chunked-prefill-size"),
    ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
    ({"max_total_tokens": -5}, "--max-total-tokens"),
    ({"attention_backend": "flashinfer"}, "--attention-backend"),
    ({"dtype": "int4"}, "--dtype"),
    ({"load_format": "gguf"}, "--load-format"),
    ({"schedule_policy": "dfs-weight"}, "--schedule-policy"),
    ({"grammar_backend": "guidance"}, "--grammar-backend"),
    ({"is_embedding": True}, "--is-embedding: embedding and rerank models are not supported"),
    ({"device": "cuda"}, "--device"),
])
def test_bad_values_name_the_flag(model_dir, kwargs, flag):
    with pytest.raises(ServerArgsError, match=flag):
        ServerArgs(model_path=model_dir, **kwargs)


def test_bad_model_dirs(tmp_path, model_dir):
    with pytest.raises(ServerArgsError, match="--model-path.*not a local model directory"):
        ServerArgs(model_path=str(tmp_path / "missing"))
    with pytest.raises(ServerArgsError, match="no config.json"):
        ServerArgs(model_path=str(tmp_path))
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    with open(odd / "config.json") as f:
        config = json.load(f)
    config["architectures"] = ["MambaForCausalLM"]
    with open(odd / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="Unsupported model architecture.*MambaForCausalLM"):
        resolve_model_cls(ModelConfig(str(odd)).architectures)


def test_cli_rejects_unknown_choice(model_dir, capsys):
    with pytest.raises(SystemExit):
        prepare_server_args(["--model-path", model_dir, "--dtype", "int4"])
    assert "--dtype" in capsys.readouterr().err


def test_default_model_is_built(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLAB_CACHE_DIR", str(tmp_path))
    args = ServerArgs()
    assert os.path.isfile(os.path.join(args.model_path, "config.json"))
    assert args.model_path.startswith(str(tmp_path))


def test_every_flag_has_a_description():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and not (a.help or "").strip()]
    assert undocumented == []


def test_api_key_protect_metrics_flag(model_dir):
    args = prepare_server_args(["--model-path", model_dir, "--api-key", "k",
                                "--api-key-protect-metrics"])
    assert args.api_key == "k" and args.api_key_protect_metrics is True
    assert prepare_server_args(["--model-path", model_dir]).api_key_protect_metrics is False


HISPARSE = {"enable_hisparse": True, "disable_radix_cache": True}


@pytest.mark.parametrize("config,kwargs,message", [
    ({"top_k": 0}, {}, "top_k must be an integer >= 1"),
    ({"top_k": -8}, {}, "top_k must be an integer >= 1"),
    ({"top_k": 64, "device_buffer_size": 32}, {}, "device_buffer_size .32. must be no smaller"),
    ({"host_to_device_ratio": 0.5}, {}, "host_to_device_ratio must be a number >= 1"),
    ({"top_k": 64, "spill": 1}, {}, "unknown key 'spill'"),
    ({"top_k": 100}, {}, r"top_k \(100\) must be a multiple of the page size \(64\)"),
    ({"top_k": 64, "page_size": 8}, {"page_size": 16}, r"page_size \(8\) must equal --page-size"),
    ({"top_k": 16, "page_size": 8}, {}, r"top_k \(16\) selects 2 pages of 8 tokens, fewer"),
    ({"min_sparse_prompt_len": -1}, {}, "min_sparse_prompt_len must be an integer >= 0"),
    ("[1, 2]", {}, "must be a JSON object"),
    ("{top_k: 3}", {}, "not valid JSON"),
])
def test_bad_hisparse_config_is_a_startup_error_naming_the_key(model_dir, config, kwargs,
                                                               message):
    text = config if isinstance(config, str) else json.dumps(config)
    with pytest.raises(ServerArgsError, match="--hisparse-config: " + message):
        ServerArgs(model_path=model_dir, hisparse_config=text, **HISPARSE, **kwargs)


def test_hisparse_needs_radix_cache_off_and_sets_the_page(model_dir):
    with pytest.raises(ServerArgsError, match="--enable-hisparse requires --disable-radix-cache"):
        ServerArgs(model_path=model_dir, enable_hisparse=True)
    with pytest.raises(ServerArgsError, match="--hisparse-config requires --enable-hisparse"):
        ServerArgs(model_path=model_dir, hisparse_config="{}")
    with pytest.raises(ServerArgsError, match="--enable-deterministic-inference"):
        ServerArgs(model_path=model_dir, enable_deterministic_inference=True, **HISPARSE)
    args = prepare_server_args(["--model-path", model_dir, "--enable-hisparse",
                                "--disable-radix-cache", "--hisparse-config",
                                '{"top_k": 64, "page_size": 8}'])
    assert args.page_size == 8 and args.enable_hisparse
    assert ServerArgs(model_path=model_dir, **HISPARSE).page_size == 64  # upstream's default
    assert ServerArgs(model_path=model_dir, page_size=16, **HISPARSE).page_size == 16
    assert args.enable_hisparse_async_backup and args.hisparse_backup_mode == "pr"
    off = prepare_server_args(["--model-path", model_dir, "--disable-hisparse-async-backup",
                               "--hisparse-backup-mode", "async_finish"])
    assert off.enable_hisparse_async_backup is False
    with pytest.raises(ServerArgsError, match="--hisparse-backup-mode: invalid choice"):
        ServerArgs(model_path=model_dir, hisparse_backup_mode="eager")
