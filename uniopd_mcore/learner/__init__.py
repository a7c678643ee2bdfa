"""Megatron-Core learner: model from a Hugging Face config, HF <-> Megatron weights, parallel
state, log-probs on packed batches, train step, optimizer, checkpoints.

Imports are lazy so that `import uniopd_mcore.learner` does not pull in Megatron-Core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Learner": "uniopd_mcore.learner.learner",
    "OptimConfig": "uniopd_mcore.learner.learner",
    "sft_loss": "uniopd_mcore.learner.learner",
    "init_distributed": "uniopd_mcore.learner.parallel",
    "destroy": "uniopd_mcore.learner.parallel",
    "ModelArch": "uniopd_mcore.learner.model",
    "vocab_parallel_token_logprobs": "uniopd_mcore.learner.logprobs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
