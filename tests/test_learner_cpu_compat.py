"""The CPU compatibility layer: idempotent, marked, reversible, and only where CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from uniopd_mcore.learner import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


@pytest.fixture
def installed():
    was_active = cpu_compat.is_active()
    assert cpu_compat.install()
    yield
    if not was_active:
        cpu_compat.uninstall()


def test_idempotent_with_marker_and_wrapped(installed):
    first = torch.cuda.current_device
    assert cpu_compat.install()  # second call changes nothing
    assert torch.cuda.current_device is first
    assert getattr(first, "_uniopd_cpu_compat", False)
    assert not getattr(first.__wrapped__, "_uniopd_cpu_compat", False)  # the original


def test_redirections(installed):
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(2, device="cpu").device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t
    # type strings: CUDA names for Megatron-Core's checks only
    assert t.type() == "torch.FloatTensor"
    scope = {"__name__": "megatron.core.fake", "t": t}
    exec("name = t.type()", scope)
    assert scope["name"] == "torch.cuda.FloatTensor"
    assert t.type(torch.float64).dtype == torch.float64


def test_rng_tracker_forks_the_cpu_generator(installed):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # restored on exit
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked state advanced


def test_uninstall_restores_originals():
    was_active = cpu_compat.is_active()
    cpu_compat.install()
    cpu_compat.uninstall()
    assert not cpu_compat.is_active()
    assert not hasattr(torch.zeros, "_uniopd_cpu_compat")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    if was_active:
        cpu_compat.install()
