"""OpenAI-compatible request and response models, with upstream SGLang's extensions."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from sglab.srt.sampling.sampling_params import INT64_MAX, INT64_MIN

DEFAULT_MODEL_NAME = "default"


def _now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "sglab"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: List[ModelCard] = Field(default_factory=list)


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: Optional[int] = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    reasoning_tokens: Optional[int] = 0


class _SamplingFields(BaseModel):
    """Sampling fields shared by both endpoints (OpenAI's and SGLang's extensions).

    Unknown fields are ignored, as upstream and OpenAI do. Fields that upstream SGLang or OpenAI
    define but sglab does not implement are declared (typed `Any`) and listed in
    UNSUPPORTED_FIELDS with their no-op values besides None: a request that sets one to
    anything else is refused with a 400 naming the field, never silently ignored.
    """

    model_config = ConfigDict(extra="ignore")
    UNSUPPORTED_FIELDS: ClassVar[dict[str, tuple]] = {
        "session_params": ({},), "return_hidden_states": (False,),
        "return_routed_experts": (False,), "return_cached_tokens_details": (False,),
        "priority": (), "extra_key": ("",), "cache_salt": ("",), "custom_labels": ({},),
        "bootstrap_host": (), "bootstrap_port": (), "bootstrap_room": (),
        "routed_dp_rank": (), "disagg_prefill_dp_rank": (), "data_parallel_rank": (),
    }

    model: str = DEFAULT_MODEL_NAME
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    # OpenAI's seed is an int64; sglab hashes it as one on the device.
    seed: Optional[Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # SGLang extensions.
    min_tokens: NonNegativeInt = 0
    stop_token_ids: Optional[List[int]] = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    lora_path: Optional[str] = None
    rid: Optional[str] = None
    # {"<token id>": bias}, added to the logits each step (after the penalties).
    logit_bias: Optional[Dict[str, float]] = None
    # Structured outputs (SGLang extensions): at most one, with response_format.
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    # Stop once the output matches one of these patterns (re.search), as upstream.
    stop_regex: Optional[Union[str, List[str]]] = None
    # A serialized CustomLogitProcessor (needs --enable-custom-logit-processor), and its params.
    custom_logit_processor: Optional[str] = None
    custom_params: Optional[Dict[str, Any]] = None
    # Declared so that setting them is refused (UNSUPPORTED_FIELDS), not ignored.
    session_params: Any = None
    return_hidden_states: Any = None
    return_routed_experts: Any = None
    return_cached_tokens_details: Any = None
    priority: Any = None
    extra_key: Any = None
    cache_salt: Any = None
    custom_labels: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    routed_dp_rank: Any = None
    disagg_prefill_dp_rank: Any = None
    data_parallel_rank: Any = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    # For json_schema: {"name", "schema", "strict", "description"}, as OpenAI's.
    json_schema: Optional[Dict[str, Any]] = None


class CompletionRequest(_SamplingFields):
    UNSUPPORTED_FIELDS: ClassVar[dict[str, tuple]] = {
        **_SamplingFields.UNSUPPORTED_FIELDS, "suffix": ("",),
    }

    prompt: Union[List[int], List[List[int]], str, List[str]]
    best_of: Optional[int] = None
    echo: bool = False
    logprobs: Optional[NonNegativeInt] = None
    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    suffix: Any = None
    response_format: Optional[ResponseFormat] = None


class LogProbs(BaseModel):
    """The legacy completions logprobs object."""

    text_offset: List[int] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    tokens: List[str] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[LogProbs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[CompletionResponseChoice]
    usage: UsageInfo
    metadata: Optional[Dict[str, Any]] = None


class CompletionResponseStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[LogProbs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[CompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, List[ChatContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    UNSUPPORTED_FIELDS: ClassVar[dict[str, tuple]] = {
        **_SamplingFields.UNSUPPORTED_FIELDS, "tools": ([],), "tool_choice": ("none", "auto"),
        "parallel_tool_calls": (True,), "functions": ([],), "function_call": ("none", "auto"),
        "reasoning_effort": (), "max_dynamic_patch": (), "min_dynamic_patch": (),
        "use_audio_in_video": (False,),
    }

    messages: List[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[NonNegativeInt] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    response_format: Optional[ResponseFormat] = None
    continue_final_message: bool = False
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    use_audio_in_video: Any = None


class TopLogprob(BaseModel):
    token: str
    bytes: List[int]
    logprob: float


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    bytes: List[int]
    logprob: float
    top_logprobs: List[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: List[ChatCompletionTokenLogprob]


class ChatCompletionMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[ChatCompletionResponseChoice]
    usage: UsageInfo
    metadata: Optional[Dict[str, Any]] = None


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[ChatCompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


def new_request_id() -> str:
    return uuid.uuid4().hex


class ScoringRequest(BaseModel):
    """POST /v1/score (upstream's): the probability of each label token after query + item."""

    model_config = ConfigDict(extra="ignore")
    UNSUPPORTED_FIELDS: ClassVar[dict[str, tuple]] = {
        "embed_override_token_id": (), "query_embed_overrides": (),
        "item_embed_overrides": (), "return_pooled_hidden_states": (False,),
    }

    query: Optional[Union[str, List[int]]] = None
    items: Optional[Union[str, List[str], List[List[int]]]] = None
    label_token_ids: Optional[List[int]] = None
    apply_softmax: bool = False
    item_first: bool = False
    model: str = DEFAULT_MODEL_NAME
    embed_override_token_id: Any = None
    query_embed_overrides: Any = None
    item_embed_overrides: Any = None
    return_pooled_hidden_states: Any = None


class ScoringResponse(BaseModel):
    scores: List[List[float]]  # per item, in the order of label_token_ids
    pooled_hidden_states: Optional[List[Optional[List[float]]]] = None
    model: str
    usage: Optional[UsageInfo] = None
    object: str = "scoring"


class ResponseTool(BaseModel):
    """A built-in tool (upstream's two); they need a tool server, which sglab does not run."""

    type: Literal["web_search_preview", "code_interpreter"]


class ResponseReasoningParam(BaseModel):
    effort: Optional[Literal["low", "medium", "high"]] = "medium"


class ResponsesRequest(BaseModel):
    """POST /v1/responses, upstream's fields (OpenAI's, and SGLang's sampling extras)."""

    model_config = ConfigDict(extra="ignore")
    UNSUPPORTED_FIELDS: ClassVar[dict[str, tuple]] = {
        "include": ([],), "top_logprobs": (0,), "max_tool_calls": (),
        "priority": (0,), "extra_key": ("",), "cache_salt": ("",),
    }

    background: Optional[bool] = False
    include: Any = None
    input: Union[str, List[Dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    max_tool_calls: Any = None
    metadata: Optional[Dict[str, Any]] = None
    model: Optional[str] = None
    parallel_tool_calls: Optional[bool] = True
    previous_response_id: Optional[str] = None
    reasoning: Optional[ResponseReasoningParam] = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] = "auto"
    store: Optional[bool] = True
    stream: Optional[bool] = False
    temperature: Optional[float] = None
    tool_choice: Literal["auto", "required", "none"] = "auto"
    tools: List[ResponseTool] = Field(default_factory=list)
    top_logprobs: Any = None
    top_p: Optional[float] = None
    truncation: Optional[Literal["auto", "disabled"]] = "disabled"
    user: Optional[str] = None
    # SGLang extensions.
    request_id: str = Field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    priority: Any = None
    extra_key: Any = None
    cache_salt: Any = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: Optional[Union[str, List[str]]] = None
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0


class ResponseUsage(BaseModel):
    """The Responses API's usage; upstream also reports it under UsageInfo's names."""

    input_tokens: int = 0
    input_tokens_details: Dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int = 0
    output_tokens_details: Dict[str, int] = Field(
        default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0


class ResponsesResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=_now)
    model: str
    output: List[Dict[str, Any]] = Field(default_factory=list)
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    usage: Optional[ResponseUsage] = None
    parallel_tool_calls: bool = True
    tool_choice: str = "auto"
    tools: List[ResponseTool] = Field(default_factory=list)
    error: Optional[Dict[str, Any]] = None
    incomplete_details: Optional[Dict[str, Any]] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    previous_response_id: Optional[str] = None
    reasoning: Optional[Dict[str, Any]] = None
    store: Optional[bool] = None
    temperature: Optional[float] = None
    text: Optional[Dict[str, Any]] = None
    top_p: Optional[float] = None
    truncation: Optional[str] = None
    user: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    background: Optional[bool] = None
