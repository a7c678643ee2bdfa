"""Teacher scorers: log-probs of given response tokens; embedded, SGLang pools, routing."""

from uniopd_mcore.teachers.base import TEACHER_FAILED, TeacherScorer
from uniopd_mcore.teachers.embedded import EmbeddedTeacher
from uniopd_mcore.teachers.routing import TeacherRouter
from uniopd_mcore.teachers.sglang import SGLangTeacher

__all__ = ["TEACHER_FAILED", "EmbeddedTeacher", "SGLangTeacher", "TeacherRouter", "TeacherScorer"]
