"""Outcome verifiers: ``fn(response_text, answer) -> bool``, looked up by name."""

from uniopd_mcore.rewards.registry import Verifier
from uniopd_mcore.rewards.registry import available_verifiers
from uniopd_mcore.rewards.registry import get_verifier
from uniopd_mcore.rewards.registry import register_verifier

__all__ = ["Verifier", "available_verifiers", "get_verifier", "register_verifier"]
