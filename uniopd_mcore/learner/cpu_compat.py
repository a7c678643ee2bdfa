"""Let Megatron-Core run on a machine without CUDA (CPU tensors, gloo collectives).

Megatron-Core assumes a GPU in places that have nothing to do with the maths. On a machine
without CUDA every one of them raises, so redirecting them to the CPU changes no behaviour that
could otherwise have run: "the current CUDA device" simply becomes the CPU. Found by running
GPTModel forward/backward at TP=2, the 1F1B schedule at PP=2 (tied embeddings), Megatron's DDP,
its optimizer (FP32Optimizer over torch AdamW) and grad clipping, all with gloo:

  torch.cuda.current_device()      factory device everywhere (layers, p2p shape exchange)
  torch.cuda.synchronize()         around pipeline p2p sends
  device="cuda" literals           torch.zeros/tensor in the schedules (token counters), grad
                                   clipping, the optimizer's found_inf / scale buffers
  Tensor.cuda()                    tied embeddings with PP > 1 (language_module)
  Tensor.type() == 'torch.cuda.*'  asserts in grad clipping and the mixed-precision optimizer
  CUDA RNG state                   Megatron's RNG tracker saves/restores/seeds the CUDA generator
                                   around TP regions; here the CPU generator plays that role

The other factory functions in `_FACTORIES` are covered for code paths not exercised yet.

`install()` applies the redirections once (idempotent: every replacement carries the marker
attribute `_uniopd_cpu_compat` and keeps the original as `__wrapped__`), and does nothing at all
when CUDA is available. `uninstall()` restores the originals (tests).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch

_MARK = "_uniopd_cpu_compat"
_CPU = torch.device("cpu")
# (id(owner), attribute) -> (owner, original), for uninstall()
_PATCHED: dict[tuple[int, str], tuple[Any, Any]] = {}

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint")


def is_active() -> bool:
    return bool(getattr(torch.cuda.current_device, _MARK, False))


def _patch(owner: Any, name: str, replacement: Callable) -> None:
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return  # already installed
    functools.update_wrapper(replacement, original)  # also sets __wrapped__ = original
    setattr(replacement, _MARK, True)
    setattr(owner, name, replacement)
    _PATCHED[(id(owner), name)] = (owner, original)


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (str, int ordinal, torch.device) to the CPU; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory(original: Callable) -> Callable:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is not None:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original(*args, **kwargs)

    return factory


def _tensor_cuda(original: Callable) -> Callable:
    # the "GPU" is the CPU: the tensor is already where it should be
    def cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
        return self

    return cuda


def _tensor_type(original: Callable) -> Callable:
    # Only callers inside megatron.* see the CUDA type name; everyone else gets the true one.
    def type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            name = original(self)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.") and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    return type


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def install() -> bool:
    """Install the CPU redirections when CUDA is absent. Returns True when they are active."""
    if torch.cuda.is_available():
        return False
    if is_active():
        return True
    _patch(torch.cuda, "current_device", lambda: _CPU)
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    _patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
    # torch's device context managers (`with torch.device("meta")`, used by Hugging Face loading)
    # recognise factories by identity in a cached set: fill that cache with the originals before
    # wrapping them, or tensors made under such a context land on the wrong device (seen as
    # uninitialised weights in HF models loaded after install()).
    from torch.utils import _device

    _device._device_constructors()
    for name in _FACTORIES:
        _patch(torch, name, _factory(getattr(torch, name)))
    _patch(torch.Tensor, "cuda", _tensor_cuda(torch.Tensor.cuda))
    _patch(torch.Tensor, "type", _tensor_type(torch.Tensor.type))
    # Megatron's tracker reads/writes torch.cuda.default_generators directly, not via torch.cuda
    from megatron.core.tensor_parallel import random as mrandom

    _patch(mrandom, "_get_cuda_rng_state", _get_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", _set_rng_state)
    return True


def uninstall() -> None:
    """Restore every original."""
    for (_, name), (owner, original) in list(_PATCHED.items()):
        setattr(owner, name, original)
    _PATCHED.clear()
