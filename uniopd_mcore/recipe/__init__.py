"""The Uni-OPD recipe in plain torch (DESIGN.md section 1): advantages, balancing and the loss."""

from __future__ import annotations

from .advantages import AdvantageResult
from .advantages import TEACHER_SENTINEL
from .advantages import uniopd_advantages
from .balancing import balance_groups
from .balancing import bin_labels
from .balancing import difficulty_balance
from .balancing import difficulty_bins
from .balancing import histogram
from .loss import policy_loss

__all__ = [
    "TEACHER_SENTINEL",
    "AdvantageResult",
    "balance_groups",
    "bin_labels",
    "difficulty_balance",
    "difficulty_bins",
    "histogram",
    "policy_loss",
    "uniopd_advantages",
]
