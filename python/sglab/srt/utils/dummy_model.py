"""HF-format model directories made without a hub: config, tokenizer, random weights.

A directory written here loads in HF transformers (`AutoConfig`, `AutoTokenizer`,
`AutoModelForCausalLM`) exactly like a downloaded checkpoint, so HF can serve as the reference
for sglab's model math. Real presets carry the real shapes (and the real special-token ids);
tiny presets keep every code path (GQA, tied or untied embeddings, q/k norm, qkv bias,
llama3 rope scaling) at shapes a CPU test can run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

DEFAULT_PRESET = "tiny-qwen3"
# Bump when the files written for a preset change, so cached directories get rebuilt.
_FORMAT_VERSION = 1
_MARKER_FILE = "sglab_dummy.json"
_MAX_SHARD_BYTES = 4 << 30

_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special) in id order, as in the Qwen2/Qwen3 tokenizers (first id 151643).
_QWEN_SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


def _llama3_special_tokens(count: int) -> list[tuple[str, bool]]:
    """The Llama-3.1 special tokens (first id 128000); the full set has 256."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = (f"<|reserved_special_token_{i}|>" for i in itertools.count(3))
    tokens = named[:count] + list(itertools.islice(reserved, max(0, count - len(named))))
    return [(t, True) for t in tokens]


_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3's hybrid-thinking switch: `enable_thinking=False` pre-fills an empty think block.
_QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Per tokenizer family, as in the real tokenizer.json: Qwen normalizes to NFC and applies every
# merge; Llama 3 takes a whole pre-tokenized piece when it is in the vocabulary.
_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": {
        "tokenizer_class": "Qwen2Tokenizer",
        "nfc": True,
        "ignore_merges": False,
        "split": _QWEN_SPLIT,
        "specials": _QWEN_SPECIAL_TOKENS,
        "chat_template": _QWEN3_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos": False,
    },
    "qwen2": {
        "tokenizer_class": "Qwen2Tokenizer",
        "nfc": True,
        "ignore_merges": False,
        "split": _QWEN_SPLIT,
        "specials": _QWEN_SPECIAL_TOKENS,
        "chat_template": _CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos": False,
    },
    "llama3": {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "nfc": False,
        "ignore_merges": True,
        "split": _LLAMA3_SPLIT,
        "chat_template": _LLAMA3_TEMPLATE,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "add_bos": True,
    },
}


def _qwen_ids(first_special_id: int) -> dict[str, int]:
    ids = {t: first_special_id + i for i, (t, _) in enumerate(_QWEN_SPECIAL_TOKENS)}
    return {"endoftext": ids["<|endoftext|>"], "im_end": ids["<|im_end|>"]}


def _qwen3_preset(
    *,
    vocab_size: int,
    first_special_id: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    tie: bool,
    max_pos: int,
    dtype: str,
    sampling: dict[str, Any] | None,
) -> dict[str, Any]:
    ids = _qwen_ids(first_special_id)
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_pos,
        "max_window_layers": num_layers,
        "model_type": "qwen3",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    generation = {
        "bos_token_id": ids["endoftext"],
        "eos_token_id": [ids["im_end"], ids["endoftext"]],
        "pad_token_id": ids["endoftext"],
        **(sampling or {}),
    }
    return {
        "family": "qwen3",
        "first_special_id": first_special_id,
        "config": config,
        "generation_config": generation,
    }


def _qwen2_preset(
    *,
    vocab_size: int,
    first_special_id: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie: bool,
    max_pos: int,
    dtype: str,
) -> dict[str, Any]:
    # Qwen2 always has a q/k/v bias; its config has no switch for it.
    ids = _qwen_ids(first_special_id)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_pos,
        "max_window_layers": num_layers,
        "model_type": "qwen2",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    generation = {
        "bos_token_id": ids["endoftext"],
        "eos_token_id": [ids["im_end"], ids["endoftext"]],
        "pad_token_id": ids["endoftext"],
    }
    return {
        "family": "qwen2",
        "first_special_id": first_special_id,
        "config": config,
        "generation_config": generation,
    }


def _llama3_preset(
    *,
    vocab_size: int,
    first_special_id: int,
    num_special: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    rope_original_max_pos: int,
    max_pos: int,
    rms_norm_eps: float,
    dtype: str,
    sampling: dict[str, Any] | None,
) -> dict[str, Any]:
    bos, end_of_text = first_special_id, first_special_id + 1
    eom, eot = first_special_id + 8, first_special_id + 9
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": [end_of_text, eom, eot],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_pos,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": rope_original_max_pos,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    generation = {
        "bos_token_id": bos,
        "eos_token_id": [end_of_text, eom, eot],
        **(sampling or {}),
    }
    return {
        "family": "llama3",
        "first_special_id": first_special_id,
        "num_special": num_special,
        "config": config,
        "generation_config": generation,
    }


def _qwen35_preset(
    *,
    vocab_size: int,
    first_special_id: int,
    hidden_size: int,
    layer_types: list[str],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    linear_key_heads: int,
    linear_value_heads: int,
    linear_head_dim: int,
    intermediate_size: int,
    tie: bool,
    max_pos: int,
    mrope_section: list[int],
    dtype: str,
) -> dict[str, Any]:
    """Qwen3.5 (dense) text model: Gated DeltaNet and gated full-attention layers."""
    ids = _qwen_ids(first_special_id)
    config = {
        "architectures": ["Qwen3_5ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_types": layer_types,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": linear_head_dim,
        "linear_num_key_heads": linear_key_heads,
        "linear_num_value_heads": linear_value_heads,
        "linear_value_head_dim": linear_head_dim,
        "max_position_embeddings": max_pos,
        "model_type": "qwen3_5_text",
        "num_attention_heads": num_heads,
        "num_hidden_layers": len(layer_types),
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": mrope_section,
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    generation = {
        "bos_token_id": ids["endoftext"],
        "eos_token_id": [ids["im_end"], ids["endoftext"]],
        "pad_token_id": ids["endoftext"],
    }
    return {
        "family": "qwen3",
        "first_special_id": first_special_id,
        "config": config,
        "generation_config": generation,
    }


def _every_fourth_full(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
            for i in range(num_layers)]


_TINY_VOCAB = 1024
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny: q_dim (4 x 32) != hidden (64) as in Qwen3-0.6B; tied embeddings; q/k norm.
    "tiny-qwen3": _qwen3_preset(
        vocab_size=_TINY_VOCAB,
        first_special_id=_TINY_VOCAB - len(_QWEN_SPECIAL_TOKENS),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=128,
        tie=True,
        max_pos=4096,
        dtype="float32",
        sampling=None,
    ),
    # Tiny: untied; llama3 rope scaling with all three frequency bands in use at head_dim 16.
    "tiny-llama": _llama3_preset(
        vocab_size=_TINY_VOCAB,
        first_special_id=_TINY_VOCAB - 16,
        num_special=16,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        rope_original_max_pos=512,
        max_pos=4096,
        rms_norm_eps=1e-05,
        dtype="float32",
        sampling=None,
    ),
    # Tiny: q/k/v bias, untied.
    "tiny-qwen2": _qwen2_preset(
        vocab_size=_TINY_VOCAB,
        first_special_id=_TINY_VOCAB - len(_QWEN_SPECIAL_TOKENS),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        tie=False,
        max_pos=4096,
        dtype="float32",
    ),
    # Tiny hybrid: full attention at layers 1 and 3 (a non-trivial KV layer map), 2 key / 4
    # value heads in the Gated DeltaNet layers (grouped values), partial rotary (8 of 32).
    "tiny-qwen3.5": _qwen35_preset(
        vocab_size=_TINY_VOCAB,
        first_special_id=_TINY_VOCAB - len(_QWEN_SPECIAL_TOKENS),
        hidden_size=64,
        layer_types=["linear_attention", "full_attention"] * 2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        linear_key_heads=2,
        linear_value_heads=4,
        linear_head_dim=16,
        intermediate_size=128,
        tie=False,
        max_pos=4096,
        mrope_section=[2, 1, 1],
        dtype="float32",
    ),
    "qwen3-0.6b": _qwen3_preset(
        vocab_size=151936,
        first_special_id=151643,
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie=True,
        max_pos=40960,
        dtype="bfloat16",
        sampling={"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
    ),
    "qwen3-8b": _qwen3_preset(
        vocab_size=151936,
        first_special_id=151643,
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tie=False,
        max_pos=40960,
        dtype="bfloat16",
        sampling={"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
    ),
    # The dimensions of transformers' Qwen3_5TextConfig defaults (Qwen3.5-9B's text model).
    "qwen3.5-9b": _qwen35_preset(
        vocab_size=248320,
        first_special_id=248044,
        hidden_size=4096,
        layer_types=_every_fourth_full(32),
        num_heads=16,
        num_kv_heads=4,
        head_dim=256,
        linear_key_heads=16,
        linear_value_heads=32,
        linear_head_dim=128,
        intermediate_size=12288,
        tie=False,
        max_pos=32768,
        mrope_section=[11, 11, 10],
        dtype="bfloat16",
    ),
    # Llama-3.1-8B-Instruct's config and generation config.
    "llama-3.1-8b": _llama3_preset(
        vocab_size=128256,
        first_special_id=128000,
        num_special=256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        rope_original_max_pos=8192,
        max_pos=131072,
        rms_norm_eps=1e-05,
        dtype="bfloat16",
        sampling={"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    ),
}


# ---------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: every byte maps to one printable character."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\xa1"), ord("\xac") + 1)) | set(range(ord("\xae"), 256))
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


_COMMON_WORDS_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which"
    " but have an they you were her she there one all we can their has been if more when will"
    " would who so no what up out about into than them its only other new some time could these"
    " two may first then do any like my now over such our man me even most made after also did"
    " many before must through back years where much your way well down should because each just"
    " those people how too little state good very make world still own see men work long get"
    " here between both life being under never day same another know while last might us great"
    " old year off come since against go came right used take three number answer question total"
    " how many each per cost price more less left remaining hello world def return import class"
    " self none true false print function value data model token"
)
_PUNCT_TEXT = (
    '. , ! ? : ; \' " ( ) [ ] { } - -- ... .\n ,\n :\n .\n\n ( ) ), ). (\' \') " ". ", ://'
    ' = == != -> => += <= >= ** // # ## ### \' ( [ { ." ", ".\n }\n ]\n );\n ):\n $ % @ & * _ __'
)
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"


def _candidate_texts(digit_group: int) -> Iterator[str]:
    """Pre-tokenized pieces, most useful first, from which synthetic merges are built."""
    for n in (2, 3, 4, 8, 12, 16):
        yield " " * n
    yield from ("\n\n", "\n\n\n", " \n", "\t\t", "\n ", "\n   ")
    words = _COMMON_WORDS_TEXT.split()
    for word in words:
        yield " " + word
    for word in words:
        yield word
        yield " " + word.capitalize()
        yield word.capitalize()
    yield from (p for p in _PUNCT_TEXT.split(" ") if len(p) > 1)
    for width in range(2, digit_group + 1):
        for digits in itertools.product("0123456789", repeat=width):
            yield "".join(digits)
    for length in itertools.count(2):
        for letters in itertools.product(_LETTERS, repeat=length):
            word = "".join(letters)
            yield " " + word
            yield word
            if length <= 3:
                yield " " + word.capitalize()


def _build_bpe_vocab(
    vocab_size: int, specials: list[tuple[str, bool]], first_special_id: int, digit_group: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary of exactly `vocab_size` ids, specials at their ids.

    Every merge is (prefix, next byte), so each token's prefixes are tokens too; the merge ranks
    follow `_candidate_texts`, which makes common English, whitespace and numbers compress.
    """
    special_ids = range(first_special_id, first_special_id + len(specials))
    if special_ids.stop > vocab_size or vocab_size - len(specials) < 256:
        raise ValueError(f"vocab_size {vocab_size} cannot hold 256 bytes and the special tokens")
    num_bpe = vocab_size - len(specials)
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    seen = set(tokens) | {content for content, _ in specials}
    merges: list[tuple[str, str]] = []
    for text in _candidate_texts(digit_group):
        if len(tokens) >= num_bpe:
            break
        chars = "".join(byte_chars[b] for b in text.encode("utf-8"))
        for end in range(2, len(chars) + 1):
            token = chars[:end]
            if token in seen:
                continue
            if len(tokens) >= num_bpe:
                break
            seen.add(token)
            tokens.append(token)
            merges.append((chars[: end - 1], chars[end - 1]))
    free_ids = (i for i in range(vocab_size) if i not in special_ids)
    vocab = dict(zip(tokens, free_ids))
    for i, (content, _) in enumerate(specials):
        vocab[content] = first_special_id + i
    return vocab, merges


def _family_specials(preset: dict[str, Any]) -> list[tuple[str, bool]]:
    family = _FAMILIES[preset["family"]]
    if "specials" in family:
        return family["specials"]
    return _llama3_special_tokens(preset["num_special"])


def build_tokenizer(preset: str | dict[str, Any]):
    """The `tokenizers.Tokenizer` of a preset: len == vocab_size, every id decodable."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    family = _FAMILIES[spec["family"]]
    specials = _family_specials(spec)
    vocab, merges = _build_bpe_vocab(
        spec["config"]["vocab_size"],
        specials,
        spec["first_special_id"],
        digit_group=3 if family["split"] == _LLAMA3_SPLIT else 1,
    )
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=family["ignore_merges"])
    )
    if family["nfc"]:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family["split"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    if family["add_bos"]:
        bos = family["bos_token"]
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, vocab[bos])],
            )
        )
    tokenizer.post_processor = processors.Sequence(post)
    tokenizer.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in specials])
    return tokenizer


def _write_tokenizer(spec: dict[str, Any], out_dir: str) -> None:
    family = _FAMILIES[spec["family"]]
    build_tokenizer(spec).save(os.path.join(out_dir, "tokenizer.json"))
    named = {k: family[k] for k in ("bos_token", "eos_token", "pad_token")}
    specials = [c for c, s in _family_specials(spec) if s]
    extra = [t for t in specials if t not in named.values()]
    tokenizer_config = {
        "tokenizer_class": family["tokenizer_class"],
        **named,
        "unk_token": None,
        "additional_special_tokens": extra,
        "chat_template": family["chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec["config"]["max_position_embeddings"],
        "split_special_tokens": False,
    }
    special_tokens_map = {k: v for k, v in named.items() if v is not None}
    special_tokens_map["additional_special_tokens"] = extra
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special_tokens_map)


# ---------------------------------------------------------------- weights


def _is_qwen35(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "qwen3_5_text"


def hf_param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a Llama / Qwen2 / Qwen3 / Qwen3.5 causal LM, as saved."""
    if _is_qwen35(config):
        return _qwen35_param_shapes(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    model_type = config["model_type"]
    qkv_bias = model_type == "qwen2" or config.get("attention_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (rows * head_dim, hidden)
            if qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (rows * head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if config.get("attention_bias", False):
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if model_type == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _qwen35_param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads, head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                                 config["head_dim"])
    key_dim = config["linear_key_head_dim"] * config["linear_num_key_heads"]
    value_heads = config["linear_num_value_heads"]
    value_dim = config["linear_value_head_dim"] * value_heads
    inter = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        if kind == "linear_attention":
            a = p + "linear_attn."
            shapes[a + "in_proj_qkv.weight"] = (2 * key_dim + value_dim, hidden)
            shapes[a + "in_proj_z.weight"] = (value_dim, hidden)
            shapes[a + "in_proj_b.weight"] = (value_heads, hidden)
            shapes[a + "in_proj_a.weight"] = (value_heads, hidden)
            shapes[a + "conv1d.weight"] = (2 * key_dim + value_dim, 1,
                                           config["linear_conv_kernel_dim"])
            shapes[a + "dt_bias"] = (value_heads,)
            shapes[a + "A_log"] = (value_heads,)
            shapes[a + "norm.weight"] = (config["linear_value_head_dim"],)
            shapes[a + "out_proj.weight"] = (hidden, value_dim)
        else:
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = (2 * heads * head_dim, hidden)
            shapes[a + "k_proj.weight"] = (kv_heads * head_dim, hidden)
            shapes[a + "v_proj.weight"] = (kv_heads * head_dim, hidden)
            shapes[a + "o_proj.weight"] = (hidden, heads * head_dim)
            shapes[a + "q_norm.weight"] = (head_dim,)
            shapes[a + "k_norm.weight"] = (head_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def init_std_mean(name: str, shape: tuple[int, ...], hidden: int,
                  zero_centered_norms: bool = False) -> tuple[float, float]:
    """sglab's scale-preserving random init of a parameter: (std, mean) of its normal draw.

    Projections keep activations O(1), norms sit near (not at) 1 (zero-centred norms, which
    scale by 1 + weight, near 0): a live network whose outputs and numerics behave like a
    trained model's, unlike tiny uniform noise. Gated DeltaNet decays (A_log) keep a state alive
    over tens of tokens.
    """
    if name.endswith(".A_log"):
        return 0.5, -2.0
    if name.endswith(".dt_bias"):
        return 0.1, 1.0
    if name.endswith(("conv1d.weight", "conv1d_weight")):
        return 1.0 / math.sqrt(shape[-1]), 0.0
    if name.endswith("norm.weight"):
        plain = name.endswith("linear_attn.norm.weight")  # the gated norm scales by weight
        return 0.1, 0.0 if zero_centered_norms and not plain else 1.0
    if name.endswith(".bias"):
        return 0.1, 0.0
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 1.0 / math.sqrt(hidden), 0.0
    return 1.0 / math.sqrt(shape[1]), 0.0


def _random_tensor(name: str, shape: tuple[int, ...], generator, hidden: int,
                   zero_centered_norms: bool):
    import torch

    std, mean = init_std_mean(name, shape, hidden, zero_centered_norms)
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).add_(mean)


def _write_weights(config: dict[str, Any], out_dir: str, seed: int, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    elem = torch.tensor([], dtype=torch_dtype).element_size()
    shapes = hf_param_shapes(config)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * elem
        if shards[-1] and shard_bytes + nbytes > _MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    order = {name: i for i, name in enumerate(shapes)}
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        if len(shards) == 1:
            filename = "model.safetensors"
        else:
            filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            # Seeded per tensor, so values do not depend on how tensors fall into shards.
            generator = torch.Generator().manual_seed(seed * 1_000_003 + order[name])
            tensor = _random_tensor(name, shapes[name], generator, config["hidden_size"],
                                    _is_qwen35(config))
            tensors[name] = tensor.to(torch_dtype)
            weight_map[name] = filename
        save_file(tensors, os.path.join(out_dir, filename), metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, filename), 0o644)
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * elem
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)


# ---------------------------------------------------------------- directories

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_dummy_model(
    preset: str,
    out_dir: str,
    weights: bool = False,
    seed: int = 0,
    dtype: str | None = None,
) -> str:
    """Write an HF-format model directory for `preset` into `out_dir`; return its path.

    Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, and with `weights` random safetensors under HF parameter names
    (sharded above 4 GiB). `dtype` overrides the preset's torch_dtype for config and weights.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    config = dict(spec["config"])
    if dtype is not None:
        if dtype not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPE_ALIASES)}")
        config["torch_dtype"] = _DTYPE_ALIASES[dtype]
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, _MARKER_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"), spec["generation_config"])
    _write_tokenizer(spec, out_dir)
    if weights:
        _write_weights(config, out_dir, seed, config["torch_dtype"])
    # Written last: its presence says the directory is complete.
    _write_json(marker, _fingerprint(preset, weights, seed, config["torch_dtype"]))
    return out_dir


def _fingerprint(preset: str, weights: bool, seed: int, dtype: str) -> dict[str, Any]:
    return {
        "preset": preset,
        "weights": weights,
        "seed": seed,
        "dtype": dtype,
        "format_version": _FORMAT_VERSION,
    }


def _is_complete(path: str, expected: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(path, _MARKER_FILE), encoding="utf-8") as f:
            return json.load(f) == expected
    except (OSError, ValueError):
        return False


def default_cache_dir() -> str:
    """Root of sglab's model cache: `$SGLAB_CACHE_DIR`, else `~/.cache/sglab`."""
    root = os.environ.get("SGLAB_CACHE_DIR") or os.path.join("~", ".cache", "sglab")
    return os.path.join(os.path.expanduser(root), "models")


def get_default_model_path(preset: str = DEFAULT_PRESET, seed: int = 0) -> str:
    """A cached directory of `preset` with random weights, built once and reused.

    The directory is built under a temporary name and renamed into place, so concurrent
    callers (other processes, other threads) either see a complete directory or none.
    """
    final = os.path.join(default_cache_dir(), preset)
    expected = _fingerprint(preset, True, seed, PRESETS[preset]["config"]["torch_dtype"])
    if _is_complete(final, expected):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{preset}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        make_dummy_model(preset, tmp, weights=True, seed=seed)
        for _ in range(8):
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if _is_complete(final, expected):
                    return final  # another builder won the race
                # A stale or partial directory: move it aside, then retry the rename.
                trash = tempfile.mkdtemp(prefix=f".{preset}.old-", dir=parent)
                try:
                    os.rename(final, os.path.join(trash, preset))
                except OSError:
                    pass
                shutil.rmtree(trash, ignore_errors=True)
        raise RuntimeError(f"could not install {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
