"""token_logprobs (Triton) and token_logprobs_torch against float64 torch: values and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import uniopd_kernels.utils as kernel_utils  # noqa: E402
from uniopd_kernels import token_logprobs  # noqa: E402
from uniopd_kernels import token_logprobs_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) of the *gradient*, which is stored in the logits dtype; outputs are fp32
# computed from the same (already rounded) inputs, so they get fp32 tolerances for every dtype.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]
SHAPES = [(1, 1), (1, 97), (5, 7), (37, 1000), (3, 4231)]


def _inputs(n_rows: int, n_cols: int, dtype: torch.dtype, scale: float = 3.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, n_cols, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, max(n_cols, 1), (n_rows,), generator=gen)
    g_logp = torch.randn(n_rows, generator=gen)
    g_ent = torch.randn(n_rows, generator=gen)
    return logits.to(DEVICE), targets.to(DEVICE), g_logp.to(DEVICE), g_ent.to(DEVICE)


def _reference(logits, targets, g_logp=None, g_ent=None):
    """float64 log-prob, entropy and d(sum g_logp*logp + g_ent*H)/dlogits of the rounded inputs."""
    x = logits.detach().double().requires_grad_()
    logsm = torch.log_softmax(x, dim=-1)
    logp = logsm.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(dim=-1)
    loss = 0.0
    if g_logp is not None:
        loss = loss + (logp * g_logp.double()).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.double()).sum()
    has_loss = isinstance(loss, torch.Tensor) and x.shape[0] > 0
    grad = torch.autograd.grad(loss, x)[0] if has_loss else torch.zeros_like(x)
    return logp.detach(), ent.detach(), grad


def _run(fn, logits, targets, g_logp, g_ent, **kw):
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, targets, return_entropy=True, **kw)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    return logp.detach(), ent.detach(), x.grad


def _close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("n_rows, n_cols", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_values_and_grads(n_rows, n_cols, dtype, atol, rtol):
    logits, targets, g_logp, g_ent = _inputs(n_rows, n_cols, dtype)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    logp, ent, grad = _run(token_logprobs, logits, targets, g_logp, g_ent)
    _close(logp, ref_logp, 1e-5, 1e-5)
    _close(ent, ref_ent, 1e-5, 1e-5)
    assert grad.dtype == dtype
    _close(grad, ref_grad, atol, rtol)


@pytest.mark.parametrize("n_rows, n_cols", [(1, 97), (5, 7), (37, 1000)])
def test_torch_reference_matches_float64(n_rows, n_cols):
    logits, targets, g_logp, g_ent = _inputs(n_rows, n_cols, torch.float32, seed=1)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    logp, ent, grad = _run(token_logprobs_torch, logits, targets, g_logp, g_ent)
    _close(logp, ref_logp, 1e-5, 1e-5)
    _close(ent, ref_ent, 1e-5, 1e-5)
    _close(grad, ref_grad, 1e-5, 1e-5)


@pytest.mark.parametrize("n_cols", [7, 97, 1000])
def test_multi_block_loop_and_tail(monkeypatch, n_cols):
    # 16-wide blocks: the online max/sum-exp runs over many blocks and the last one is partial.
    monkeypatch.setattr(kernel_utils, "MAX_FUSED_BLOCK", 16)
    logits, targets, g_logp, g_ent = _inputs(6, n_cols, torch.float32, seed=2)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    logp, ent, grad = _run(token_logprobs, logits, targets, g_logp, g_ent)
    _close(logp, ref_logp, 1e-5, 1e-5)
    _close(ent, ref_ent, 1e-5, 1e-5)
    _close(grad, ref_grad, 1e-5, 1e-5)


def test_empty_batch():
    logits = torch.randn(0, 97, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, ent = token_logprobs(logits, targets, return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (0, 97)


@pytest.mark.parametrize("n_cols", [97, 1000])
def test_large_magnitude_logits(monkeypatch, n_cols):
    # |x| ~ 1e4: exp overflows without the max shift; entropy must not cancel two ~1e4 numbers.
    monkeypatch.setattr(kernel_utils, "MAX_FUSED_BLOCK", 256)
    logits, targets, g_logp, g_ent = _inputs(7, n_cols, torch.float32, scale=1e4, seed=3)
    logits[:, :3] = torch.tensor([1e4, -1e4, 9999.5], device=DEVICE)  # near-ties at the top
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    logp, ent, grad = _run(token_logprobs, logits, targets, g_logp, g_ent)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    _close(logp, ref_logp, 1e-3, 1e-6)  # fp32 spacing at 1e4 is 1e-3
    _close(ent, ref_ent, 1e-4, 1e-4)
    _close(grad, ref_grad, 1e-4, 1e-4)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_inplace_backward(dtype, atol, rtol):
    logits, targets, g_logp, g_ent = _inputs(9, 97, dtype, seed=4)
    _, _, ref_grad = _reference(logits, targets, g_logp, g_ent)
    base = logits.detach().clone().requires_grad_()
    x = base * 1  # non-leaf: its buffer is free to be overwritten by the backward
    seen = []
    x.register_hook(seen.append)
    logp, ent = token_logprobs(x, targets, inplace_backward=True, return_entropy=True)
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    assert seen[0].data_ptr() == x.data_ptr(), "gradient was not written into the logits buffer"
    _close(base.grad, ref_grad, atol, rtol)
    _close(x.detach(), ref_grad, atol, rtol)  # the logits now hold their gradient


def test_strided_rows_and_int32_targets():
    wide, targets, g_logp, g_ent = _inputs(8, 150, torch.float32, seed=5)
    logits = wide[:, 13:110]  # row stride 150, 97 columns
    targets = (targets % 97).to(torch.int32)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    x = logits.detach().requires_grad_()  # a view with row stride 150
    assert x.stride(0) == 150
    logp, ent = token_logprobs(x, targets, return_entropy=True)
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    _close(logp, ref_logp, 1e-5, 1e-5)
    _close(ent, ref_ent, 1e-5, 1e-5)
    _close(x.grad, ref_grad, 1e-5, 1e-5)


def test_single_output_and_entropy_only_grads():
    logits, targets, g_logp, g_ent = _inputs(5, 97, torch.float32, seed=6)
    # log-prob only
    x = logits.detach().clone().requires_grad_()
    logp = token_logprobs(x, targets)
    assert isinstance(logp, torch.Tensor)
    (logp * g_logp).sum().backward()
    _close(x.grad, _reference(logits, targets, g_logp, None)[2], 1e-5, 1e-5)
    # entropy only: the log-prob output gets no gradient at all
    x = logits.detach().clone().requires_grad_()
    _, ent = token_logprobs(x, targets, return_entropy=True)
    (ent * g_ent).sum().backward()
    _close(x.grad, _reference(logits, targets, None, g_ent)[2], 1e-5, 1e-5)
    # no grad needed at all
    with torch.no_grad():
        _close(token_logprobs(logits, targets), _reference(logits, targets)[0], 1e-5, 1e-5)


# Compiles every kernel of the package for sm_90 (Triton -> PTX -> ptxas, no GPU needed): the
# interpreter accepts constructs the compiler rejects, so this is the CPU-side check of the GPU path.
_AOT = textwrap.dedent(
    """
    import sys
    import triton
    import uniopd_kernels  # noqa: F401
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    T = sys.modules["uniopd_kernels.token_logprobs"]
    A = sys.modules["uniopd_kernels.advantages"]
    f32, f64 = "*fp32", "*fp64"
    cases = []
    for dt in ("*bf16", "*fp16", "*fp32"):
        for stats in (True, False):
            cases.append((T._token_logprobs_fwd_kernel, [dt, "i64", "*i64", f32, f32, f32, f32, "i32", "i32"],
                          dict(BLOCK_V=8192, WITH_ENTROPY=True, WRITE_STATS=stats), 16))
        cases.append((T._token_logprobs_bwd_kernel, [dt, "i64", dt, "i64", "*i64", f32, f32, f32, f32, "i32", "i32"],
                      dict(BLOCK_V=8192, HAS_G_LOGP=True, HAS_G_ENT=True), 16))
    cases += [
        (A._sequence_returns_kernel, ["*bf16", f32, "*u8", "*i32", f32, f64], dict(SENTINEL=-100.0, BLOCK_T=256), 4),
        (A._group_stats_kernel, ["*i64", "*u8", f64, "i32", f64, f64], dict(BLOCK_N=1024), 4),
        (A._group_shift_kernel, [f64, f64, "i32", f64, f64, f64], dict(MINMAX=True, BLOCK_G=256), 4),
        (A._apply_shift_kernel, [f32, f32, "*u8", "*i32", "*i64", "*u8", f64, "fp32", "fp32", f32, f32, "*i1"],
         dict(SENTINEL=-100.0, BLOCK_T=256), 4),
    ]
    for fn, types, consts, warps in cases:
        names = [n for n in fn.arg_names if n not in consts]
        sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
        target = GPUTarget("cuda", 90, 32)
        kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps})
        assert kernel.asm["cubin"], fn.__name__
    print("compiled", len(cases))
    """
)


def test_kernels_compile_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 13" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: Qwen3 vocabulary, bf16 on device")
@pytest.mark.gpu
def test_gpu_qwen_vocab_bf16():
    n_rows, n_cols = 2048, 151_936
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n_rows, n_cols, device="cuda", generator=gen) * 4).bfloat16()
    targets = torch.randint(0, n_cols, (n_rows,), device="cuda", generator=gen)
    g_logp = torch.randn(n_rows, device="cuda", generator=gen)
    g_ent = torch.randn(n_rows, device="cuda", generator=gen)
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, g_logp, g_ent)
    logp, ent, grad = _run(token_logprobs, logits, targets, g_logp, g_ent)
    _close(logp, ref_logp, 1e-4, 1e-5)
    _close(ent, ref_ent, 1e-4, 1e-5)
    _close(grad, ref_grad, 1e-2, 1.6e-2)
    logp_t, ent_t, grad_t = _run(token_logprobs_torch, logits, targets, g_logp, g_ent)
    _close(logp_t, ref_logp, 1e-4, 1e-5)
    _close(grad_t, ref_grad, 1e-2, 1.6e-2)
