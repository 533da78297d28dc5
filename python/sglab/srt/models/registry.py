from __future__ import annotations

from torch import nn

from sglab.srt.models.llama import LlamaForCausalLM
from sglab.srt.models.qwen2 import Qwen2ForCausalLM
from sglab.srt.models.qwen3 import Qwen3ForCausalLM
from sglab.srt.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForConditionalGeneration,
}


def resolve_model_cls(architectures: list[str]) -> type[nn.Module]:
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"Unsupported model architecture(s) {architectures}; sglab supports "
        f"{', '.join(sorted(MODEL_REGISTRY))}"
    )
