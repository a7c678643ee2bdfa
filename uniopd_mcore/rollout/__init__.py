"""Rollout engines: generate token ids for prompt ids; receive the learner's weights by HF name."""

from uniopd_mcore.rollout.base import FINISH_LENGTH, FINISH_STOP, Generation, RolloutEngine, SamplingParams
from uniopd_mcore.rollout.embedded import EmbeddedRolloutEngine

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "EmbeddedRolloutEngine",
    "Generation",
    "RolloutEngine",
    "SamplingParams",
]
