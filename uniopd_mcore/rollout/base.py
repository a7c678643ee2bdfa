"""The rollout-engine protocol: what the trainer loop needs from any generator.

Two implementations sit behind it: the embedded one (a Hugging Face model in this process, for
CPU runs and tests) and the SGLang one (servers on GPU nodes). Both speak token ids only, so
no tokenizer round trip can change what the learner sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

from torch import Tensor

FINISH_STOP = "stop"  # ended on one of `stop_token_ids` (the stop token is part of the output)
FINISH_LENGTH = "length"  # hit `max_new_tokens`


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Generation of a sequence ends right after it emits any of these ids."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)


@dataclass
class Generation:
    token_ids: list[int]
    """The sampled response ids (the prompt is not repeated), including the stop token if any."""
    logprobs: list[float]
    """log p(token_ids[i] | prompt, token_ids[:i]) under the engine's raw (temperature 1) model."""
    finish_reason: str
    """"stop" or "length"."""


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None
    ) -> list[Generation]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Receive the learner's weights by Hugging Face parameter name (streamed)."""
        ...

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...
