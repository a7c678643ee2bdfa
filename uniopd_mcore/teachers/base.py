"""The teacher-scorer protocol and the failure sentinel shared with the recipe."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

# A teacher log-prob equal to this value means "the teacher failed for this token": the recipe
# gives such tokens reward 0 and no loss (DESIGN.md section 1, step 1). A real log-prob of a
# token can only be this low if its probability is below e^-100, which no usable teacher emits.
TEACHER_FAILED = -100.0


@runtime_checkable
class TeacherScorer(Protocol):
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Tensor]:
        """float32 [len(response)] log p_teacher(response[t] | prompt, response[:t]) per sequence;
        TEACHER_FAILED where the teacher could not score."""
        ...
