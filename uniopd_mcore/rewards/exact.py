"""String verifiers: exact match (whitespace/case normalised) and last-integer match."""

from __future__ import annotations

import re

# Only the tail of a response is searched for the final integer: a final answer sits at the end,
# and this bounds the work on pathological multi-megabyte outputs.
_TAIL_CHARS = 65536
# A thousands-grouped integer (1,234,567), or a plain number with an optional decimal part.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?![\d,])|-?\d+(?:\.\d+)?")


class ExactMatch:
    """True when the response equals the answer after normalisation.

    ``normalize_whitespace`` strips the ends and collapses inner runs of whitespace to one space;
    ``ignore_case`` compares case-folded strings.
    """

    def __init__(self, *, normalize_whitespace: bool = True, ignore_case: bool = False) -> None:
        self.normalize_whitespace = normalize_whitespace
        self.ignore_case = ignore_case

    def _norm(self, text: str) -> str:
        if self.normalize_whitespace:
            text = " ".join(text.split())
        if self.ignore_case:
            text = text.casefold()
        return text

    def __call__(self, response_text: str, answer: str) -> bool:
        if not isinstance(response_text, str) or not isinstance(answer, str):
            return False
        try:
            return self._norm(response_text) == self._norm(answer)
        except Exception:  # never raise on model output
            return False


def _as_integer(token: str) -> str | None:
    """Canonical digits of an integer token: '1,234' -> '1234', '-007' -> '-7', '3.0' -> '3',
    '3.5' -> None. Compared as strings: int() of a 5000-digit number is refused by Python."""
    token = token.strip().replace(",", "")
    sign = "-" if token.startswith("-") else ""
    token = token.lstrip("+-")
    whole, _, frac = token.partition(".")
    digits = whole + frac
    if not (whole and digits.isascii() and digits.isdigit()) or frac.strip("0"):
        return None
    whole = whole.lstrip("0") or "0"
    return ("" if whole == "0" else sign) + whole


def integer_match(response_text: str, answer: str) -> bool:
    """True when the last number in the response is an integer equal to the gold integer.

    Used by the synthetic arithmetic task. A trailing decimal such as ``3.5`` counts as the last
    number (and is not an integer), so ``... = 3.5`` never matches gold ``5``.
    """
    if not isinstance(response_text, str) or not isinstance(answer, str):
        return False
    try:
        gold = _as_integer(answer)
        if gold is None:
            return False
        numbers = _NUMBER.findall(response_text[-_TAIL_CHARS:])
        return bool(numbers) and _as_integer(numbers[-1]) == gold
    except Exception:  # never raise on model output
        return False


exact_match = ExactMatch()
exact_match_ci = ExactMatch(ignore_case=True)
