"""POST /v1/score: label-token probabilities after each (query, item) pair, as upstream's
single-item scoring with a generation model (one prefill per pair, no decode)."""

from __future__ import annotations

import math
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import Response

from sglab.srt.entrypoints.openai.protocol import ScoringRequest, ScoringResponse, UsageInfo
from sglab.srt.entrypoints.openai.serving_base import (
    check_request_fields,
    collect_one,
    error_for_exception,
    resolve_model,
)
from sglab.srt.managers.io_struct import GenerateReqInput
from sglab.srt.managers.request_validator import check_vocab_ids
from sglab.srt.managers.tokenizer_manager import TokenizerManager


class OpenAIServingScore:
    def __init__(self, tokenizer_manager: TokenizerManager):
        self.tokenizer_manager = tokenizer_manager

    async def handle_request(self, request: ScoringRequest, raw_request: Request) -> Response:
        try:
            check_request_fields(request)
            resolve_model(self.tokenizer_manager, request.model)
            scores, prompt_tokens = await score_request(
                self.tokenizer_manager, request.query, request.items, request.label_token_ids,
                request.apply_softmax, request.item_first, raw_request)
        except Exception as e:  # noqa: BLE001 - every failure gets an HTTP answer
            return error_for_exception(e)
        response = ScoringResponse(scores=scores, model=request.model, usage=UsageInfo(
            prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
        return Response(response.model_dump_json(), media_type="application/json")


async def score_request(tm: TokenizerManager, query: Any, items: Any,
                        label_token_ids: list[int] | None, apply_softmax: bool,
                        item_first: bool, request: Any = None) -> tuple[list[list[float]], int]:
    """(per item, the label tokens' probabilities; the prompt tokens processed). Upstream's
    checks and wording; a prefill-only request (max_new_tokens 0, as upstream's): the
    logprobs are those of the position after the prompt, at temperature 1."""
    if label_token_ids is None:
        raise ValueError("label_token_ids is required for generation (CausalLM) models.")
    if items is None:
        raise ValueError("items must be provided")
    if not items:
        return [], 0
    check_vocab_ids(label_token_ids, tm.vocab_size)
    obj = GenerateReqInput(token_ids_logprob=list(label_token_ids), return_logprob=True,
                           sampling_params={"max_new_tokens": 0, "temperature": 0.0},
                           log_metrics=False)
    _set_prompts(obj, query, items, item_first)
    results = await collect_one(tm.generate_request(obj, request))
    scores = [_scores(r["meta_info"]["output_token_ids_logprobs"][0], label_token_ids,
                      apply_softmax) for r in results]
    return scores, sum(r["meta_info"]["prompt_tokens"] for r in results)


def _set_prompts(obj: GenerateReqInput, query: Any, items: Any, item_first: bool) -> None:
    if isinstance(query, str):
        texts = [items] if isinstance(items, str) else items
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("Invalid combination of query/items types for score_request.")
        obj.text = [f"{t}{query}" if item_first else f"{query}{t}" for t in texts]
    elif isinstance(query, list) and isinstance(items, list) and \
            all(isinstance(t, list) for t in items):
        obj.input_ids = [t + query if item_first else query + t for t in items]
    else:
        raise ValueError("Invalid combination of query/items types for score_request.")


def _scores(position: list, label_token_ids: list[int], apply_softmax: bool) -> list[float]:
    """Each label's probability, or with apply_softmax their softmax over the labels only."""
    logprobs = {token_id: logprob for logprob, token_id, _ in position}
    values = [logprobs.get(t, float("-inf")) for t in label_token_ids]
    if apply_softmax:
        return torch.softmax(torch.tensor(values), dim=0).tolist()
    return [math.exp(v) if v != float("-inf") else 0.0 for v in values]
