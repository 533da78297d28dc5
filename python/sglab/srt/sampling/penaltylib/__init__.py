"""Penalties over each request's tokens so far (upstream's `srt/sampling/penaltylib`)."""

from sglab.srt.sampling.penaltylib.frequency_penalty import BatchedFrequencyPenalizer
from sglab.srt.sampling.penaltylib.logit_bias import BatchedLogitBiasPenalizer
from sglab.srt.sampling.penaltylib.min_new_tokens import BatchedMinNewTokensPenalizer
from sglab.srt.sampling.penaltylib.orchestrator import BatchedPenalizerOrchestrator
from sglab.srt.sampling.penaltylib.presence_penalty import BatchedPresencePenalizer
from sglab.srt.sampling.penaltylib.repetition_penalty import BatchedRepetitionPenalizer

# In the order they apply: the additive penalties, then the multiplicative one, then the
# logit bias (as upstream).
PENALIZERS = (BatchedFrequencyPenalizer, BatchedPresencePenalizer, BatchedMinNewTokensPenalizer,
              BatchedRepetitionPenalizer, BatchedLogitBiasPenalizer)

__all__ = ["PENALIZERS", "BatchedPenalizerOrchestrator"]
