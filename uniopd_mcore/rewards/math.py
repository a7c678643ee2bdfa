"""Math answer equivalence with math-verify (LaTeX, \\boxed{}, fractions, sets, intervals...).

math-verify bounds its work with ``signal.alarm``, which only exists in the main thread; in any
other thread those timeouts are switched off (``parsing_timeout=None`` / ``timeout_seconds=None``)
and two cheaper guards stand in for them: only the tail of a long response is parsed, and parsed
answers whose evaluation would explode (power towers, huge symbolic powers, huge factorials) are
rejected before ``verify`` ever sees them.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

# The final answer of a reasoning trace sits at its end; 32K characters is ~8K tokens of tail.
_TAIL_CHARS = 32768
# Limits of the explosion guard (see _too_costly).
_MAX_INT_DIGITS = 10**6  # |exp| * log10|base| of a numeric power
_MAX_SYMBOLIC_EXP = 200  # (x + 1)^300 already takes ~0.5 s to compare
_MAX_FACTORIAL = 10**5


def _timeouts() -> int | None:
    # signal.alarm works only in the main thread of the main interpreter.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _magnitude(expr: Any) -> Any:
    # sympy Floats (mpmath) hold magnitudes like 9^(9^9) that overflow a Python float.
    return abs(expr.evalf(8))


def _too_costly(parsed: list[Any]) -> bool:
    """True when comparing one of the parsed expressions could run for minutes.

    Anything the guard itself cannot size counts as costly: a false "incorrect" is cheaper than a
    learner stuck in sympy.
    """
    import sympy

    for expr in parsed:
        if not isinstance(expr, sympy.Basic):
            continue
        try:
            for node in sympy.preorder_traversal(expr):
                if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
                    size = _magnitude(node.exp)
                    if node.base.free_symbols:
                        if bool(size > _MAX_SYMBOLIC_EXP):
                            return True
                        continue
                    base = _magnitude(node.base)
                    digits = size * sympy.log(base, 10).evalf(8) if bool(base > 10) else size
                    if bool(digits > _MAX_INT_DIGITS):
                        return True
                elif isinstance(node, sympy.factorial) and not node.args[0].free_symbols:
                    if bool(_magnitude(node.args[0]) > _MAX_FACTORIAL):
                        return True
        except Exception:  # noqa: BLE001
            return True
    return False


@functools.lru_cache(maxsize=8192)
def _parse_gold(answer: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import parse

    # A bare gold ("\frac{1}{2}", "x^2+1", "(1,2]") is read as if boxed, which makes the LaTeX
    # extractor take the whole string; a gold that already has delimiters is parsed as it is.
    if "\\boxed" in answer or "$" in answer:
        parsed = parse(answer, parsing_timeout=timeout)
    else:
        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout)
    return tuple(parsed)


class MathVerifier:
    """True when the final answer of the response is mathematically equal to the gold answer."""

    def __init__(self, *, tail_chars: int = _TAIL_CHARS) -> None:
        self.tail_chars = tail_chars

    def __call__(self, response_text: str, answer: str) -> bool:
        if not isinstance(response_text, str) or not isinstance(answer, str):
            return False
        if not response_text.strip() or not answer.strip():
            return False
        try:
            from math_verify import parse, verify

            timeout = _timeouts()
            gold = list(_parse_gold(answer.strip(), timeout))
            if not gold or _too_costly(gold):
                return False
            pred = parse(response_text[-self.tail_chars :], parsing_timeout=timeout)
            if not pred or _too_costly(pred):
                return False
            return bool(verify(gold, pred, timeout_seconds=timeout))
        except BaseException as e:  # noqa: BLE001 - never raise on model output (incl. TimeoutException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            logger.debug("math verifier failed on %.200r", response_text, exc_info=True)
            return False


math_verifier = MathVerifier()
