"""Verifier registry: name -> callable ``(response_text, answer) -> bool``.

Built-in verifiers are registered by import path and imported on first use, so that reading a
configuration (which checks verifier names) does not pay for importing sympy/math-verify. A name of
the form ``"package.module:attr"`` loads a user verifier by dotted path (slime's plug-in style).
"""

from __future__ import annotations

import importlib
import threading
from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class Verifier(Protocol):
    """Outcome verifier. Must never raise on model output: malformed text is simply False."""

    def __call__(self, response_text: str, answer: str) -> bool: ...


# Lazily imported built-ins: name -> "module:attribute".
_BUILTINS: dict[str, str] = {
    "math": "uniopd_mcore.rewards.math:math_verifier",
    "exact_match": "uniopd_mcore.rewards.exact:exact_match",
    "exact_match_ci": "uniopd_mcore.rewards.exact:exact_match_ci",
    "integer": "uniopd_mcore.rewards.exact:integer_match",
}
_REGISTRY: dict[str, Callable[[str, str], bool]] = {}
_LOCK = threading.Lock()


def register_verifier(name: str, fn: Callable[[str, str], bool], *, overwrite: bool = False) -> None:
    """Register ``fn`` under ``name``; re-registering an existing name needs ``overwrite=True``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"verifier name must be a non-empty string without ':', got {name!r}")
    if not callable(fn):
        raise TypeError(f"verifier {name!r} must be callable, got {type(fn).__name__}")
    with _LOCK:
        if not overwrite and (name in _REGISTRY or name in _BUILTINS):
            raise ValueError(f"verifier {name!r} is already registered (pass overwrite=True to replace it)")
        _BUILTINS.pop(name, None)
        _REGISTRY[name] = fn


def available_verifiers() -> list[str]:
    """Sorted names accepted by :func:`get_verifier` (dotted ``module:attr`` paths are also accepted)."""
    return sorted(set(_REGISTRY) | set(_BUILTINS))


def _load_dotted(path: str) -> Callable[[str, str], bool]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise KeyError(f"verifier path {path!r} must look like 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"cannot load verifier {path!r}: {e}") from e
    if not callable(obj):
        raise KeyError(f"verifier {path!r} is not callable ({type(obj).__name__})")
    return obj


def get_verifier(name: str) -> Callable[[str, str], bool]:
    """The verifier registered as ``name``, or loaded from a ``module:attr`` path.

    Raises ``KeyError`` listing the known names when there is none.
    """
    with _LOCK:
        fn = _REGISTRY.get(name)
        builtin = _BUILTINS.get(name)
    if fn is not None:
        return fn
    if builtin is not None:
        fn = _load_dotted(builtin)
    elif isinstance(name, str) and ":" in name:
        fn = _load_dotted(name)
    else:
        raise KeyError(f"unknown verifier {name!r} (available: {', '.join(available_verifiers())}; "
                       f"or a 'package.module:function' path)")
    with _LOCK:
        _REGISTRY.setdefault(name, fn)
        return _REGISTRY[name]


def check_verifier_name(name: str) -> str | None:
    """Why ``name`` cannot be resolved (one line), or None when it can; never imports built-ins."""
    with _LOCK:
        if name in _REGISTRY or name in _BUILTINS:
            return None
    if isinstance(name, str) and ":" in name:
        try:
            _load_dotted(name)
        except KeyError as e:
            return str(e.args[0])
        return None
    return f"{name!r} is not one of {available_verifiers()} (nor a 'package.module:function' path)"
