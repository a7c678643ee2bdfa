"""Multi-teacher routing: each data source names its teacher, one teacher per sequence.

Mirrors the Uni-OPD data config (reference/papers.md 1.8): math prompts go to the math expert,
code prompts to the code expert, and a sequence is never scored by a mix of teachers.
"""

from __future__ import annotations

from torch import Tensor

from uniopd_mcore.teachers.base import TeacherScorer


class TeacherRouter:
    def __init__(
        self,
        teachers: dict[str, TeacherScorer],
        source_to_teacher: dict[str, str],
        default: str | None = None,
    ) -> None:
        """`default` names the teacher for sources missing from `source_to_teacher`; without it
        an unknown source is an error (a silent fallback would distil from the wrong expert)."""
        if not teachers:
            raise ValueError("TeacherRouter needs at least one teacher")
        for source, name in source_to_teacher.items():
            if name not in teachers:
                raise KeyError(f"source {source!r} maps to teacher {name!r}, not among {sorted(teachers)}")
        if default is not None and default not in teachers:
            raise KeyError(f"default teacher {default!r} is not among {sorted(teachers)}")
        self.teachers = dict(teachers)
        self.source_to_teacher = dict(source_to_teacher)
        self.default = default

    def teacher_for(self, source: str | None) -> str:
        name = self.source_to_teacher.get(source) if source is not None else None
        if name is not None:
            return name
        if self.default is not None:
            return self.default
        raise KeyError(
            f"no teacher for data source {source!r}; known sources: {sorted(self.source_to_teacher)} "
            "(add it to source_to_teacher or set a default teacher)"
        )

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        sources: list[str] | None = None,
    ) -> list[Tensor]:
        """Score every sequence with its source's teacher; one batched call per teacher, results
        in input order. sources None sends everything to the default teacher."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if sources is None:
            sources = [None] * len(prompts)  # type: ignore[list-item]
        if len(sources) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sources)} sources")
        # Resolve every name before any call, so a bad source fails fast and costs no teacher time.
        by_teacher: dict[str, list[int]] = {}
        for i, source in enumerate(sources):
            by_teacher.setdefault(self.teacher_for(source), []).append(i)
        results: list[Tensor | None] = [None] * len(prompts)
        for name, rows in by_teacher.items():
            scored = self.teachers[name].score([prompts[i] for i in rows], [responses[i] for i in rows])
            if len(scored) != len(rows):
                raise RuntimeError(f"teacher {name!r} returned {len(scored)} results for {len(rows)} sequences")
            for i, lp in zip(rows, scored):
                results[i] = lp
        return results  # type: ignore[return-value]
