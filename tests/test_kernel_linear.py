"""linear_token_logprobs (LM head fused, token-chunked) against the unfused path and float64."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from uniopd_kernels import linear_token_logprobs  # noqa: E402
from uniopd_kernels import token_logprobs  # noqa: E402
from uniopd_kernels.linear_token_logprobs import default_chunk_size  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n_tok, hidden, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tok, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    y = torch.randint(0, vocab, (n_tok,), generator=gen)
    g = torch.randn(n_tok, generator=gen)  # per-token upstream grad, e.g. advantage weights
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), y.to(DEVICE), g.to(DEVICE)


def _grads(fn, h, w, y, g):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w, y)
    if out.numel():
        (out * g).sum().backward()
    else:
        h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    return out.detach(), h.grad, w.grad


def _float64(h, w, y):
    return torch.log_softmax(h.double() @ w.double().t(), dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)


def _unfused(h, w, y):
    return token_logprobs(h @ w.t(), y)


def _close(a, b, atol, rtol):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("n_tok, hidden, vocab, chunk", [
    (1, 16, 7, None), (13, 32, 97, 4), (37, 64, 97, 5), (37, 16, 1000, 16), (8, 16, 1, 3),
])  # fmt: skip
def test_fused_matches_unfused_and_float64(n_tok, hidden, vocab, chunk):
    h, w, y, g = _inputs(n_tok, hidden, vocab, torch.float32)
    fused = _grads(lambda a, b, c: linear_token_logprobs(a, b, c, chunk_size=chunk), h, w, y, g)
    unfused = _grads(_unfused, h, w, y, g)
    exact = _grads(lambda a, b, c: _float64(a, b, c).float(), h.double(), w.double(), y, g.double())
    for a, b, c in zip(fused, unfused, exact):
        _close(a, b, 1e-5, 1e-5)
        _close(a, c, 1e-4, 1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)])
def test_low_precision_matches_unfused(dtype, atol, rtol):
    h, w, y, g = _inputs(21, 32, 97, dtype, seed=1)
    f_out, f_dh, f_dw = _grads(lambda a, b, c: linear_token_logprobs(a, b, c, chunk_size=8), h, w, y, g)
    u_out, u_dh, u_dw = _grads(_unfused, h, w, y, g)
    assert f_out.dtype == torch.float32 and f_dh.dtype == dtype and f_dw.dtype == dtype
    _close(f_out, u_out, atol, rtol)
    _close(f_dh, u_dh, atol, rtol)
    # The fused dW accumulates the chunk products in fp32, the unfused one rounds one GEMM: compare
    # both to float64 rather than to each other bit for bit.
    x_out, x_dh, x_dw = _grads(lambda a, b, c: _float64(a, b, c).float(), h.double(), w.double(), y, g.double())
    _close(f_dw, x_dw, atol, rtol)
    _close(f_out, x_out, atol, rtol)


def test_empty_and_partial_grads():
    h, w, y, g = _inputs(0, 16, 7, torch.float32)
    out, dh, dw = _grads(linear_token_logprobs, h, w, y, g)
    assert out.shape == (0,) and dh.shape == (0, 16)
    # frozen LM head: only dH; frozen trunk: only dW
    h, w, y, g = _inputs(9, 16, 33, torch.float32, seed=2)
    ref = _grads(_unfused, h, w, y, g)
    hh = h.clone().requires_grad_()
    (linear_token_logprobs(hh, w, y, chunk_size=4) * g).sum().backward()
    _close(hh.grad, ref[1], 1e-5, 1e-5)
    ww = w.clone().requires_grad_()
    (linear_token_logprobs(h, ww, y, chunk_size=4) * g).sum().backward()
    _close(ww.grad, ref[2], 1e-5, 1e-5)
    with torch.no_grad():
        _close(linear_token_logprobs(h, w, y), ref[0], 1e-5, 1e-5)


def test_default_chunk_size():
    assert default_chunk_size(65536, 2560, 151936) == 2048
    assert default_chunk_size(10, 64, 97) == 10
    assert default_chunk_size(0, 64, 97) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: bf16 Qwen3-4B head on device")
@pytest.mark.gpu
def test_gpu_bf16_qwen_head():
    h, w, y, g = _inputs(4096, 2560, 151_936, torch.bfloat16, seed=3)
    w = w / 3  # logits ~ N(0, 1): a bf16 ulp is <= 0.03 where the logits live
    f_out, f_dh, f_dw = _grads(lambda a, b, c: linear_token_logprobs(a, b, c, chunk_size=1024), h, w, y, g)
    u_out, u_dh, u_dw = _grads(_unfused, h, w, y, g)
    # Chunked and whole GEMMs may round a few logits to neighbouring bf16 values: ulp-level slack.
    _close(f_out, u_out, 4e-2, 1e-2)
    _close(f_dh, u_dh, 2e-2, 2e-2)
    _close(f_dw, u_dw, 2e-2, 2e-2)
