"""Dummy model directories load in HF transformers like real checkpoints (HF is the oracle)."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sglab.srt.utils import dummy_model
from sglab.srt.utils.dummy_model import (
    PRESETS,
    get_default_model_path,
    hf_param_shapes,
    make_dummy_model,
)
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

TINY = ["tiny-qwen3", "tiny-llama", "tiny-qwen2"]
REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    (
        "The quick brown fox jumps over the lazy dog. In 2024, there were 12345 apples; "
        "how many are left?"
    ),
    "def f(x):\n    return x ** 2  # square\n\n\n\tindent\r\n",
    "Unicode: 你好, 世界 🙂🚀 naïve café Ωμέγα — «quotes» ∑ ∫ \u00a0nbsp",
    "   leading and trailing spaces   ",
    "<|im_end|>special<think>in text</think><|eot_id|>",
    "x",
    "",
]


def _read(path: str, name: str) -> str:
    with open(os.path.join(path, name), encoding="utf-8") as f:
        return f.read()


def _read_json(path: str, name: str):
    return json.loads(_read(path, name))


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def _load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dummy")
    return {p: make_dummy_model(p, str(root / p), weights=True) for p in TINY}


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs) -> dict[str, tuple]:
    out = {}
    for preset, path in tiny_dirs.items():
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, output_loading_info=True
        )
        out[preset] = (model.eval(), info)
    return out


@pytest.mark.parametrize("preset", TINY)
def test_hf_loads_every_weight_from_file(preset, tiny_dirs, tiny_models):
    path = tiny_dirs[preset]
    model, info = tiny_models[preset]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    spec = PRESETS[preset]["config"]
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == spec["architectures"][0]
    assert config.model_type == spec["model_type"]

    saved = _weights(path)
    tied = spec["tie_word_embeddings"]
    assert ("lm_head.weight" in saved) is (not tied)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert set(saved) == expected == set(hf_param_shapes(spec))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name  # nothing was re-initialized by HF
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    norms = [t for n, t in saved.items() if n.endswith("norm.weight")]
    assert all(0.5 < t.mean() < 1.5 and t.std() > 0.01 for t in norms)
    if preset == "tiny-qwen3":
        assert any(n.endswith("q_norm.weight") for n in saved)
    biases = [n for n in saved if n.endswith(".bias")]
    if preset == "tiny-qwen2":
        assert len(biases) == 3 * spec["num_hidden_layers"]
        assert all(saved[n].abs().max() > 0 for n in biases)
    else:
        assert not biases


@pytest.mark.parametrize("preset", TINY)
def test_tiny_shapes_exercise_the_model_features(preset, tiny_dirs):
    cfg = AutoConfig.from_pretrained(tiny_dirs[preset], local_files_only=True)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.vocab_size == 1024 and cfg.max_position_embeddings == 4096
    if preset == "tiny-qwen3":
        assert cfg.tie_word_embeddings
        assert cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size
    else:
        assert not cfg.tie_word_embeddings
    if preset == "tiny-llama":
        rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


@pytest.mark.parametrize("preset", TINY)
def test_tokenizer_covers_the_vocabulary(preset, tiny_dirs):
    path = tiny_dirs[preset]
    tok = _load_tokenizer(path)
    vocab_size = PRESETS[preset]["config"]["vocab_size"]
    assert len(tok) == vocab_size
    assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
    decoded = tok.batch_decode([[i] for i in range(vocab_size)])
    assert all(isinstance(s, str) for s in decoded)
    assert None not in tok.convert_ids_to_tokens(list(range(vocab_size)))

    config = _read_json(path, "config.json")
    generation = GenerationConfig.from_pretrained(path, local_files_only=True)
    eos_ids = config["eos_token_id"]
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    assert tok.eos_token_id in eos_ids
    assert tok.eos_token_id in generation.eos_token_id
    assert tok.pad_token_id is not None
    if preset == "tiny-llama":
        assert tok.bos_token_id == config["bos_token_id"] == generation.bos_token_id
    else:
        assert tok.convert_tokens_to_ids("<|endoftext|>") == config["bos_token_id"]


@pytest.mark.parametrize("preset", TINY)
def test_text_round_trips(preset, tiny_dirs):
    path = tiny_dirs[preset]
    tok = _load_tokenizer(path)
    raw = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    decomposed = "cafe\u0301"  # Qwen tokenizers normalize to NFC, as the real ones do
    ids = tok.encode(decomposed, add_special_tokens=False)
    want = decomposed if preset == "tiny-llama" else unicodedata.normalize("NFC", decomposed)
    assert tok.decode(ids) == want

    english = TEXTS[0]
    assert len(tok.encode(english, add_special_tokens=False)) < 0.75 * len(english.encode())
    with_specials = tok.encode("hello world")
    plain = tok.encode("hello world", add_special_tokens=False)
    if preset == "tiny-llama":
        assert with_specials == [tok.bos_token_id] + plain
    else:
        assert with_specials == plain


def test_special_tokens_inside_text_are_single_ids(tiny_dirs):
    tok = _load_tokenizer(tiny_dirs["tiny-qwen3"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    think = tok.convert_tokens_to_ids("<think>")
    ids = tok.encode("a<|im_end|>b<think>c", add_special_tokens=False)
    assert im_end in ids and think in ids
    # <think> is an ordinary added token (kept), <|im_end|> a special one (skipped).
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>c"


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
]


@pytest.mark.parametrize("preset", TINY)
def test_chat_template(preset, tiny_dirs):
    tok = _load_tokenizer(tiny_dirs[preset])
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    if preset == "tiny-llama":
        want = (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        first = tok.bos_token_id
    else:
        want = (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        first = tok.convert_tokens_to_ids("<|im_start|>")
    assert text == want
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == first
    assert tok.decode(ids) == text
    if preset == "tiny-qwen3":
        no_think = tok.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert no_think == want + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("preset", TINY)
def test_logits_are_not_degenerate(preset, tiny_dirs, tiny_models):
    tok = _load_tokenizer(tiny_dirs[preset])
    model, _ = tiny_models[preset]
    prompts = [
        "The capital of France is",
        "1 2 3 4 5 6 7 8",
        "def main():\n    print(",
        "Once upon a time, in a land far away",
    ]
    last_logits = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt)])
            logits = model(ids).logits[0].float()
            assert torch.isfinite(logits).all()
            assert len(set(logits.argmax(-1).tolist())) >= 3  # varies along the prompt
            last_logits.append(logits[-1])
    firsts = {int(x.argmax()) for x in last_logits}
    assert len(firsts) >= 3
    for i in range(len(last_logits)):
        probs = last_logits[i].softmax(-1)
        assert 2.0 / len(probs) < probs.max() < 0.9  # neither uniform nor saturated
        for j in range(i):
            assert not torch.allclose(last_logits[i], last_logits[j], atol=1e-2)


def test_weights_depend_on_seed_only(tmp_path):
    a, b, c = (
        _weights(make_dummy_model("tiny-llama", str(tmp_path / name), True, seed=seed))
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if not k.endswith("norm.weight"))


def test_dtype_override(tmp_path):
    path = make_dummy_model("tiny-qwen2", str(tmp_path / "m"), weights=True, dtype="bf16")
    assert _read_json(path, "config.json")["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _weights(path).values())
    with pytest.raises(ValueError):
        make_dummy_model("tiny-qwen2", str(tmp_path / "x"), dtype="int3")
    with pytest.raises(ValueError):
        make_dummy_model("no-such-model", str(tmp_path / "y"))


# Published parameter counts: Qwen3-0.6B (0.6B, 0.44B non-embedding), Qwen3-8B (8.2B, 6.95B
# non-embedding), Llama-3.1-8B (8,030,261,248).
REAL = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "num_params": 596_049_920,
    },
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "tie_word_embeddings": False,
        "rope_theta": 1e6,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "num_params": 8_190_735_360,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "num_params": 8_030_261_248,
    },
}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_real_preset_config(preset, tmp_path):
    path = make_dummy_model(preset, str(tmp_path / preset))
    assert not [f for f in os.listdir(path) if f.endswith(".safetensors")]
    raw = _read_json(path, "config.json")
    assert raw["torch_dtype"] == "bfloat16"
    want = dict(REAL[preset])
    num_params = want.pop("num_params")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for key, value in want.items():
        got = raw.get(key, getattr(config, key, None))
        assert got == value, key
    assert config.head_dim == want["head_dim"]
    if preset == "llama-3.1-8b":
        assert raw["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == num_params
    shapes = hf_param_shapes(raw)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes


@pytest.mark.parametrize(
    "preset, ids",
    [
        (
            "qwen3-0.6b",
            {
                "<|endoftext|>": 151643,
                "<|im_start|>": 151644,
                "<|im_end|>": 151645,
                "<think>": 151667,
                "</think>": 151668,
            },
        ),
        (
            "llama-3.1-8b",
            {
                "<|begin_of_text|>": 128000,
                "<|end_of_text|>": 128001,
                "<|start_header_id|>": 128006,
                "<|end_header_id|>": 128007,
                "<|eot_id|>": 128009,
                "<|reserved_special_token_247|>": 128255,
            },
        ),
    ],
)
def test_real_preset_tokenizer(preset, ids, tmp_path):
    path = make_dummy_model(preset, str(tmp_path / preset))
    tok = _load_tokenizer(path)
    assert len(tok) == PRESETS[preset]["config"]["vocab_size"]
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    generation = _read_json(path, "generation_config.json")
    eos = [151645, 151643] if preset.startswith("qwen") else [128001, 128008, 128009]
    assert generation["eos_token_id"] == eos


def test_default_model_path_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLAB_CACHE_DIR", str(tmp_path))
    path = get_default_model_path()
    assert path == str(tmp_path / "models" / "tiny-qwen3")
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert get_default_model_path() == path
    assert os.stat(weights).st_mtime_ns == stamp  # reused, not rebuilt
    assert os.listdir(tmp_path / "models") == ["tiny-qwen3"]

    marker = os.path.join(path, dummy_model._MARKER_FILE)
    os.remove(marker)  # an interrupted or foreign directory gets replaced
    assert get_default_model_path() == path
    assert os.path.exists(marker)
    assert os.listdir(tmp_path / "models") == ["tiny-qwen3"]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"


def test_default_model_path_concurrent_builders(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLAB_CACHE_DIR", str(tmp_path))
    results: list[str] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(get_default_model_path())
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert os.listdir(tmp_path / "models") == ["tiny-qwen3"]
    assert len(_load_tokenizer(results[0])) == PRESETS["tiny-qwen3"]["config"]["vocab_size"]


def test_cli_writes_the_same_directory(tmp_path):
    script = REPO / "scripts" / "make_dummy_model.py"
    spec = importlib.util.spec_from_file_location("make_dummy_model_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--preset", "tiny-llama", "--out", str(tmp_path / "cli"), "--weights", "--seed", "3"]
    out = cli.main(argv)
    ref = make_dummy_model("tiny-llama", str(tmp_path / "ref"), weights=True, seed=3)
    names = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    for name in names:
        assert _read(out, name) == _read(ref, name)
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_weights_load_in_hf(tmp_path, monkeypatch):
    whole = make_dummy_model("tiny-qwen2", str(tmp_path / "whole"), weights=True)
    monkeypatch.setattr(dummy_model, "_MAX_SHARD_BYTES", 200_000)
    path = make_dummy_model("tiny-qwen2", str(tmp_path / "sharded"), weights=True)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    index = _read_json(path, "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == shards
    model, info = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for name, tensor in _weights(whole).items():
        assert torch.equal(state[name], tensor), name
