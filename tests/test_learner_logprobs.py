"""Vocab-parallel token log-probs (values and gradients) against a float64 log_softmax."""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed
from uniopd_mcore.learner.logprobs import (
    align_to_tokens,
    shift_targets,
    torch_token_logprobs,
    vocab_parallel_token_logprobs,
)


def _reference(logits, targets):
    return logits.double().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("shape", [(1, 7), (9, 41), (33, 341)])
def test_single_rank_values_and_grads(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, shape[1], (shape[0],), generator=g)
    lp = torch_token_logprobs(logits, targets)
    assert lp.dtype == torch.float32
    ref_logits = logits.detach().double().requires_grad_()
    ref = _reference(ref_logits, targets)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(shape[0], generator=g)
    (lp * w).sum().backward()
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-5, rtol=1e-5)


def test_bf16_logits_are_computed_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g).bfloat16()
    targets = torch.randint(0, 50, (5,), generator=g)
    lp = vocab_parallel_token_logprobs(logits, targets)
    torch.testing.assert_close(lp.double(), _reference(logits.float(), targets), atol=1e-5, rtol=1e-5)


def test_callable_backend():
    calls = []

    def backend(logits, targets, *, vocab_start, tp_group):
        calls.append(vocab_start)
        return torch_token_logprobs(logits, targets, vocab_start=vocab_start, tp_group=tp_group)

    logits, targets = torch.randn(3, 10), torch.tensor([1, 2, 3])
    vocab_parallel_token_logprobs(logits, targets, vocab_start=0, backend=backend)
    assert calls == [0]
    with pytest.raises(ValueError):
        vocab_parallel_token_logprobs(logits, targets, backend="nope")


def test_alignment_convention():
    # next-token log-probs computed at t move to t+1; first token of every sequence is 0
    ids = torch.tensor([10, 11, 12, 20, 21])
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert shift_targets(ids).tolist() == [11, 12, 20, 21, 10]
    nxt = torch.tensor([-1.0, -2.0, -9.0, -3.0, -9.0])  # -9: cross-sequence garbage
    assert align_to_tokens(nxt, cu).tolist() == [0.0, -1.0, -2.0, 0.0, -3.0]


def test_triton_backend_matches_torch():
    if not _have_kernels():
        pytest.skip("uniopd_kernels not importable")
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(9, 41, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, 41, (9,), generator=g)
    w = torch.randn(9, generator=g)
    lp_t = vocab_parallel_token_logprobs(logits, targets, backend="triton")
    (lp_t * w).sum().backward()
    grad_t, logits.grad = logits.grad, None
    lp = vocab_parallel_token_logprobs(logits, targets, backend="torch")
    (lp * w).sum().backward()
    torch.testing.assert_close(lp_t, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_t, logits.grad, atol=1e-5, rtol=1e-5)


def _tp_worker(rank, world, logits, targets, weights, splits, backend="torch"):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    start = sum(splits[:rank])
    local = logits[:, start : start + splits[rank]].clone().requires_grad_()
    lp = vocab_parallel_token_logprobs(local, targets, vocab_start=start, tp_group=dist.group.WORLD, backend=backend)
    (lp * weights).sum().backward()
    return lp.detach(), local.grad


def _have_kernels() -> bool:
    try:
        import uniopd_kernels  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_tp_ranks_match_full_vocab(backend):
    if backend == "triton" and not _have_kernels():
        pytest.skip("uniopd_kernels not importable")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 37, generator=g) * 2
    targets = torch.randint(0, 37, (11,), generator=g)
    weights = torch.randn(11, generator=g)
    # uneven split, including a rank with an empty slice (all-padding vocabulary shard)
    for splits in ([20, 17], [37, 0]):
        results = run_distributed(_tp_worker, 2, args=(logits, targets, weights, splits, backend))
        ref_logits = logits.double().requires_grad_()
        ref = _reference(ref_logits, targets)
        (ref * weights.double()).sum().backward()
        grads = torch.cat([results[0][1], results[1][1]], dim=-1)
        for lp, _ in results:
            torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads.double(), ref_logits.grad, atol=1e-5, rtol=1e-5)
