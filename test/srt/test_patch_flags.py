"""PatchFlags: one frozen object per process, built from ServerArgs and handed to each consumer
through its constructor; what /get_server_info reports per patch."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

import pytest
from torch import nn

import sglab
from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.layers.attention.triton_backend import TritonAttnBackend
from sglab.srt.layers.linear import LinearBase
from sglab.srt.lora.layers import QKVParallelLinearWithLoRA
from sglab.srt.model_executor.model_runner import ModelRunner
from sglab.srt.patches import PATCH_BY_ID, PATCHES, PatchFlags, patch_status
from sglab.srt.server_args import ServerArgs

PACKAGE = pathlib.Path(sglab.__file__).parent
# The registry's own module and the ServerArgs fields it resolves.
BUILDER_FILES = {PACKAGE / "srt" / "patches.py", PACKAGE / "srt" / "server_args.py"}
DETERMINISTIC_TRITON = {"enable_deterministic_inference": True, "attention_backend": "triton"}
LORA = {"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ["all"]}
HISPARSE = {"enable_hisparse": True, "disable_radix_cache": True, "page_size": 4,
            "hisparse_config": '{"top_k": 16, "device_buffer_size": 24, "num_recent_pages": 1}'}
RUNNER_CONFIGS = {
    "all-det": {"patches": "all", "unified_index_build": "kernel", "pinned_h2d_mode": "packed",
                **DETERMINISTIC_TRITON},
    "none-det": {"patches": "none", **DETERMINISTIC_TRITON},
    "0005-lora": {"patches": "0005", **LORA},
    "0003a,0005b-lora": {"patches": "0003a,0005b", "pinned_h2d_mode": "packed", **LORA},
    "0004-hisparse": {"patches": "0004", "hisparse_backup_mode": "async_finish", **HISPARSE},
    "none-hisparse": {"patches": "none", **HISPARSE},
}
UNIFIED_BUILDS = {"loop": TritonAttnBackend._build_unified_loop,
                  "batched": TritonAttnBackend._build_unified_batched,
                  "kernel": TritonAttnBackend._build_unified_kernel}


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def _args(path: str, **kwargs) -> ServerArgs:
    return ServerArgs(model_path=path, random_seed=0, max_total_tokens=256, **kwargs)


def _runner(args: ServerArgs) -> ModelRunner:
    config = ModelConfig(args.model_path, args.dtype, args.context_length, args.device,
                         args.trust_remote_code)
    return ModelRunner(config, args)


def test_flags_mirror_the_registry_and_are_frozen(path):
    names = [f.name for f in dataclasses.fields(PatchFlags)]
    assert names == [p.flag for p in PATCHES] + [p.mode_field for p in PATCHES if p.mode_field]
    for patch in PATCHES:
        flags = PatchFlags.from_server_args(_args(path, patches=patch.id))
        assert flags.active_ids() == [patch.id]
        assert [p.id for p in PATCHES if getattr(flags, p.flag)] == [patch.id]
    flags = PatchFlags.from_server_args(_args(path, patches="all", pinned_h2d_mode="packed",
                                              enable_sync_free_unified_extend=False))
    assert flags.pinned_h2d_mode == "packed" and flags.unified_index_build == "batched"
    assert not flags.sync_free_unified_extend and flags.sync_free_logits_metadata
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags.pinned_h2d = False
    with pytest.raises(AssertionError, match="pinned_h2d_mode"):
        dataclasses.replace(flags, pinned_h2d_mode="bogus")


@pytest.mark.parametrize("config", RUNNER_CONFIGS.values(), ids=RUNNER_CONFIGS.keys())
def test_runner_builds_flags_once_and_hands_them_to_constructors(path, monkeypatch, config):
    args = _args(path, **config)
    expected = PatchFlags.from_server_args(args)
    built = []
    real = PatchFlags.from_server_args.__func__

    def counting(cls, server_args):
        built.append(server_args)
        return real(cls, server_args)

    monkeypatch.setattr(PatchFlags, "from_server_args", classmethod(counting))
    runner = _runner(args)
    assert len(built) == 1 and built[0] is args and runner.patch_flags == expected
    flags = runner.patch_flags
    assert runner.h2d_uploader.mode == (
        {"pr": "pinned", "packed": "packed"}[flags.pinned_h2d_mode] if flags.pinned_h2d
        else "pageable")
    model = runner.model
    assert model.logits_processor.sync_free_metadata is flags.sync_free_logits_metadata
    det = args.enable_deterministic_inference
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.batch_invariant is det for m in linears)
    assert model.logits_processor.batch_invariant is det
    if args.attention_backend == "triton":
        build = flags.unified_index_build if flags.sync_free_unified_extend else "loop"
        assert runner.attn_backend._build_unified.__func__ is UNIFIED_BUILDS[build]
    if args.enable_hisparse:
        expected_mode = flags.hisparse_backup_mode if flags.hisparse_async_backup else "blocking"
        assert runner.hisparse_coordinator.backup_mode == expected_mode
    if args.enable_lora:
        manager = runner.lora_manager
        assert manager.cache_qkv_offset is flags.lora_cache_qkv_offset
        assert manager.async_batch_info is flags.lora_async_batch_info
        qkv = [m for m in model.modules() if isinstance(m, QKVParallelLinearWithLoRA)]
        assert qkv and all(m.cache_qkv_offset is flags.lora_cache_qkv_offset for m in qkv)


@pytest.mark.parametrize("config", [RUNNER_CONFIGS["all-det"], RUNNER_CONFIGS["0005-lora"]],
                         ids=["det", "lora"])
def test_no_layer_attribute_set_after_its_construction(path, monkeypatch, config):
    """While a ModelRunner is built, a layer's attributes are set only by its own __init__,
    except `training` (model.eval()) and a submodule swapped for its LoRA wrapper."""
    setattr_real = nn.Module.__setattr__
    outside = set()

    def recording(module, name, value):
        caller = sys._getframe(1)
        own_init = caller.f_code.co_name == "__init__" and caller.f_locals.get("self") is module
        if not own_init and name != "training" and not isinstance(value, nn.Module):
            outside.add((type(module).__name__, name, caller.f_code.co_name))
        setattr_real(module, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", recording)
    _runner(_args(path, **config))
    assert outside == set()


def _python_files() -> list[pathlib.Path]:
    return [f for f in sorted(PACKAGE.rglob("*.py")) if f not in BUILDER_FILES]


def test_no_module_outside_the_builder_reads_patch_server_args():
    enable = re.compile(r"\b(" + "|".join(p.field for p in PATCHES) + r")\b")
    modes = re.compile(r"(\w+)\s*\.\s*(" + "|".join(p.mode_field for p in PATCHES
                                                     if p.mode_field) + r")\b")
    registry_field = re.compile(r"(?<!dataclasses)\.field\b")
    found = []
    for file in _python_files():
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            where = f"{file.relative_to(PACKAGE)}:{lineno}: {line.strip()}"
            if enable.search(line) or registry_field.search(line):
                found.append(where)
            found += [where for m in modes.finditer(line)
                      if m.group(1) not in ("flags", "patch_flags")]
    assert found == []


def _status(path: str, **kwargs) -> dict[str, dict]:
    args = _args(path, **kwargs)
    return patch_status(PatchFlags.from_server_args(args), args)


def test_patch_status_on_applies_mode_reason(path):
    default = _status(path)  # CPU: torch_native attention, no LoRA
    assert list(default) == [p.id for p in PATCHES]
    assert all(set(s) == {"on", "applies", "mode", "reason"} and s["on"] for s in default.values())
    assert default["0001"] == {"on": True, "applies": True, "mode": "pr", "reason": None}
    assert default["0002"]["applies"] is False and default["0002"]["mode"] == "batched"
    assert default["0002"]["reason"] == PATCH_BY_ID["0002"].scope
    assert "_forward_extend_unified" in default["0002"]["reason"]
    assert default["0003a"]["applies"] is True and "prompt logprobs" in default["0003a"]["reason"]
    for pid in ("0005", "0005b"):
        assert default[pid]["applies"] is False and "LoRA" in default[pid]["reason"]
        assert default[pid]["mode"] is None

    det = _status(path, patches="0002", unified_index_build="kernel", **DETERMINISTIC_TRITON)
    assert det["0002"] == {"on": True, "applies": True, "mode": "kernel", "reason": None}
    assert det["0001"] == {"on": False, "applies": True, "mode": None, "reason": None}
    assert _status(path, enable_deterministic_inference=True)["0002"]["applies"] is False
    assert _status(path, attention_backend="triton")["0002"]["applies"] is False

    assert default["0004"]["applies"] is False and default["0004"]["mode"] == "pr"
    assert "--enable-hisparse" in default["0004"]["reason"]
    hisparse = _status(path, hisparse_backup_mode="async_finish", **HISPARSE)
    assert hisparse["0004"] == {"on": True, "applies": True, "mode": "async_finish",
                                "reason": None}
    assert _status(path, patches="none", **HISPARSE)["0004"]["mode"] is None

    lora = _status(path, patches="0005b", **LORA)
    assert lora["0005"] == {"on": False, "applies": True, "mode": None, "reason": None}
    assert lora["0005b"] == {"on": True, "applies": True, "mode": None, "reason": None}

