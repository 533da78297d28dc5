"""LoRA on the host: PEFT adapter loading and normalization, rejections, --lora-* arguments,
the adapter registry and the slot pool's eviction rule."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from sglab.srt.lora.lora import LoRAAdapter, LoRAAdapterError, LoRAConfig
from sglab.srt.lora.lora_registry import LoRARef, LoRARegistry, parse_lora_path
from sglab.srt.lora.mem_pool import LoRAMemoryPool
from sglab.srt.lora.utils import LoRAModuleShape
from sglab.srt.server_args import ServerArgs, ServerArgsError, prepare_server_args
from sglab.test.lora_utils import edit_adapter_config, make_peft_adapter

# tiny-qwen3: hidden 64, q 4 x 32 = 128, kv 2 x 32 = 64, intermediate 128, 2 layers.
SHAPES = {
    "qkv_proj": LoRAModuleShape(64, (128, 64, 64)),
    "o_proj": LoRAModuleShape(128, (64,)),
    "gate_up_proj": LoRAModuleShape(64, (128, 128)),
    "down_proj": LoRAModuleShape(128, (64,)),
}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def adapter_qv(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "qv")
    return make_peft_adapter(base, out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             seed=0)


def test_normalizes_peft_weights_to_fused_layouts(adapter_qv):
    config = LoRAConfig.from_dir(adapter_qv)
    assert (config.r, config.scaling, config.target_modules) == (4, 2.0, ["q_proj", "v_proj"])
    adapter = LoRAAdapter("id", config)
    adapter.initialize_weights(SHAPES, 2, torch.float32)
    raw = load_file(os.path.join(adapter_qv, "adapter_model.safetensors"))
    assert adapter.modules() == {"qkv_proj"}
    for layer in range(2):
        a, b = adapter.layers[layer]["qkv_proj"]
        assert a.shape == (3, 4, 64) and b.shape == (256, 4)
        key = f"base_model.model.model.layers.{layer}.self_attn.{{}}_proj.lora_{{}}.weight"
        torch.testing.assert_close(a[0], raw[key.format("q", "A")])
        torch.testing.assert_close(a[2], raw[key.format("v", "A")])
        torch.testing.assert_close(b[:128], raw[key.format("q", "B")])
        torch.testing.assert_close(b[192:], raw[key.format("v", "B")])
        assert not a[1].any() and not b[128:192].any()  # k_proj: not trained, zero


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA"),
    ({"use_rslora": True}, "rank-stabilized"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens are not supported"),
    ({"r": 0}, "r must be a positive integer"),
])
def test_rejects_unsupported_configs(adapter_qv, tmp_path, changes, message):
    path = edit_adapter_config(adapter_qv, str(tmp_path / "bad"), **changes)
    with pytest.raises(LoRAAdapterError, match=message):
        LoRAConfig.from_dir(path)


def test_rejects_bad_directories(adapter_qv, tmp_path, tiny_model_dir):
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        LoRAConfig.from_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAAdapterError, match="no adapter_config.json"):
        LoRAConfig.from_dir(str(tmp_path / "empty"))
    no_weights = edit_adapter_config(adapter_qv, str(tmp_path / "nw"))
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match="no adapter_model.safetensors"):
        LoRAAdapter("x", LoRAConfig.from_dir(no_weights)).initialize_weights(SHAPES, 2,
                                                                             torch.float32)
    # An adapter trained for another base model (tiny-llama: q is 64 wide, not 128).
    other = make_peft_adapter(tiny_model_dir("tiny-llama"), str(tmp_path / "llama"), r=4,
                              lora_alpha=8, target_modules=["q_proj"], seed=0)
    with pytest.raises(LoRAAdapterError, match="expected .* is the adapter for this base"):
        LoRAAdapter("x", LoRAConfig.from_dir(other)).initialize_weights(SHAPES, 2, torch.float32)


def test_parse_lora_paths():
    assert parse_lora_path("/a/b").lora_name == "/a/b"
    ref = parse_lora_path("name=/a/b")
    assert (ref.lora_name, ref.lora_path, ref.pinned) == ("name", "/a/b", False)
    ref = parse_lora_path(json.dumps({"lora_name": "n", "lora_path": "/p", "pinned": True}))
    assert (ref.lora_name, ref.lora_path, ref.pinned) == ("n", "/p", True)
    with pytest.raises(ValueError, match="lora_name and lora_path"):
        parse_lora_path('{"lora_path": "/p"}')
    assert parse_lora_path("a=/x").lora_id != parse_lora_path("a=/x").lora_id


def test_lora_server_args(base, adapter_qv):
    args = prepare_server_args(["--model-path", base, "--lora-paths", f"qv={adapter_qv}",
                                "--max-loras-per-batch", "2"])
    assert args.enable_lora and args.disable_radix_cache
    assert [(r.lora_name, r.lora_path) for r in args.lora_paths] == [("qv", adapter_qv)]
    assert args.lora_backend == ("triton" if args.device == "cuda" else "torch_native")
    assert args.enable_lora_cache_qkv_offset and args.enable_lora_async_batch_info
    off = prepare_server_args(["--model-path", base, "--patches", "none"])
    assert not off.enable_lora and not off.disable_radix_cache
    assert not off.enable_lora_cache_qkv_offset and not off.enable_lora_async_batch_info
    args = ServerArgs(model_path=base, enable_lora=True, max_lora_rank=8,
                      lora_target_modules=["all"])
    assert args.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"]
    bad = [
        ({"enable_lora": True}, "--max-lora-rank and --lora-target-modules are required"),
        ({"lora_paths": [adapter_qv], "max_loras_per_batch": 0}, "must be positive"),
        ({"lora_paths": [adapter_qv], "max_loaded_loras": 1, "max_loras_per_batch": 2},
         "must be >= --max-loras-per-batch"),
        ({"lora_paths": [f"a={adapter_qv}", f"a={adapter_qv}"]}, "given twice"),
        ({"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ["lm_head"]},
         "unsupported LoRA target module 'lm_head'"),
        ({"lora_paths": [adapter_qv], "lora_backend": "csgmv"}, "--lora-backend"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ServerArgsError, match=message):
            ServerArgs(model_path=base, **kwargs)


def test_registry_lru_and_pinned():
    reg = LoRARegistry()
    a, b, c = LoRARef("a", "/a", pinned=True), LoRARef("b", "/b"), LoRARef("c", "/c")
    for ref in (a, b, c):
        reg.register(ref)
    with pytest.raises(ValueError, match="already loaded"):
        reg.register(LoRARef("b", "/other"))
    assert reg.lru_unpinned(set()) is b  # a is pinned
    reg.touch("b")
    assert reg.lru_unpinned(set()) is c
    assert reg.lru_unpinned({c.lora_id}) is b  # in use
    assert reg.loaded_adapters() == {"a": "/a", "c": "/c", "b": "/b"}


def _fake_adapter(uid: str, value: float, r: int = 2) -> LoRAAdapter:
    shape = SHAPES["o_proj"]
    adapter = LoRAAdapter(uid, LoRAConfig("/x", r, 2 * r, ["o_proj"], {}))
    adapter.layers = [{"o_proj": (torch.full((1, r, shape.in_dim), value),
                                  torch.full((shape.out_dim, r), value))}]
    return adapter


def test_pool_evicts_only_adapters_outside_the_batch_and_in_flight():
    pool = LoRAMemoryPool({"o_proj": SHAPES["o_proj"]}, 1, 3, 4, torch.float32,
                          torch.device("cpu"))
    loras = {u: _fake_adapter(u, float(i + 1)) for i, u in enumerate("abcd")}
    pool.prepare_lora_batch({"a", None}, loras)
    pool.prepare_lora_batch({"b"}, loras, protected_uids={"a", None})
    assert pool.loaded_uids() == {"a", "b", None} and pool.num_loads == 3
    # c needs a slot: a and None are in flight, so b (least recently used of the rest) goes.
    pool.prepare_lora_batch({"c"}, loras, protected_uids={"a", None})
    assert pool.loaded_uids() == {"a", "c", None}
    a_buf, b_buf = pool.get_tensor("o_proj", 0)
    slot_c = pool.get_buffer_id("c")
    assert (a_buf[slot_c, :2] == 3.0).all() and not a_buf[slot_c, 2:].any()
    assert (b_buf[slot_c, :, :2] == 3.0).all() and not b_buf[slot_c, :, 2:].any()
    assert not a_buf[pool.get_buffer_id(None)].any()  # the base model's slot is zero
    with pytest.raises(RuntimeError, match="no LoRA slot can be evicted"):
        pool.prepare_lora_batch({"d"}, loras, protected_uids={"a", "c", None})
    with pytest.raises(RuntimeError, match="only 3 slots"):
        pool.prepare_lora_batch({"a", "b", "c", "d"}, loras)
