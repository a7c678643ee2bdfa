"""policy_loss (DESIGN.md section 1, step 8): a hand-computed batch, a float64 loop reference for
loss, gradient and metrics, micro-batch additivity and argument errors."""

from __future__ import annotations

import math
import random

import pytest
import torch

from _recipe_ref import SENTINEL, random_batch, ref_policy_loss
from uniopd_mcore.recipe import policy_loss

LN2 = math.log(2.0)


def hand_batch():
    """Two sequences of 4 tokens (first token untrained), logp = -1 everywhere.

    seq 0: t1 ratio 1, A 0.5 -> -0.5; t2 ratio 2, A 1 -> max(-2, -1.28) = -1.28 (clipped, no grad);
           t3 ratio 0.5, A 1 -> max(-0.5, -0.8) = -0.5; per sequence -2.28 / 3 = -0.76.
    seq 1: t5 ratio 2, A -1 -> max(2, 1.28) = 2; t6 |logp - teacher| = 11 >= 10 and t7 sentinel:
           no loss, but they stay in the denominator: 2 / 3.
    loss = (-0.76 + 2/3) / 2 = -0.0466667.
    """
    logp = torch.full((8,), -1.0, requires_grad=True)
    old = torch.tensor([-1, -1, -1 - LN2, -1 + LN2, -1, -1 - LN2, -1, -1])
    adv = torch.tensor([0, 0.5, 1, 1, 0, -1, 5, 5])
    loss_mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1])
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    teacher = torch.tensor([-1.5, -1.5, -1.5, -1.5, -1.5, -1.5, -12.0, SENTINEL])
    return logp, old, adv, loss_mask, cu, teacher


def test_hand_computed_loss_gradient_and_metrics():
    logp, *rest = hand_batch()
    loss, metrics = policy_loss(logp, *rest)
    assert loss.item() == pytest.approx((-0.76 + 2 / 3) / 2, abs=1e-6)
    loss.backward()
    # d/dlogp = -ratio * A / 3 / 2 on unclipped tokens: t1 -0.5/6, t3 -0.5/6, t5 +2/6.
    expected = torch.tensor([0, -0.5 / 6, 0, -0.5 / 6, 0, 2 / 6, 0, 0])
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip_frac"].item() == pytest.approx(1 / 4)
    assert metrics["teacher_gap_clip_frac"].item() == pytest.approx(2 / 6)
    assert metrics["approx_kl"].item() == pytest.approx(-LN2 / 4, abs=1e-6)
    assert metrics["tokens"].item() == 4
    assert all(not m.requires_grad and m.dtype == torch.float32 for m in metrics.values())


def test_num_sequences_is_the_denominator_and_gap_boundary():
    logp, old, adv, loss_mask, cu, teacher = hand_batch()
    loss, _ = policy_loss(logp, old, adv, loss_mask, cu, teacher, num_sequences=4)
    assert loss.item() == pytest.approx((-0.76 + 2 / 3) / 4, abs=1e-6)
    # |logp - teacher| == 10 exactly is already masked (>=); the gap uses the current logp.
    teacher = teacher.clone()
    teacher[1] = -11.0
    loss, metrics = policy_loss(logp, old, adv, loss_mask, cu, teacher)
    assert loss.item() == pytest.approx((-1.78 / 3 + 2 / 3) / 2, abs=1e-6)
    assert metrics["teacher_gap_clip_frac"].item() == pytest.approx(3 / 6)
    # None disables the gap rule (the sentinel token still gets none).
    loss, _ = policy_loss(logp, old, adv, loss_mask, cu, teacher, teacher_gap_clip=None)
    assert loss.item() == pytest.approx((-0.76 + (2 - 5) / 3) / 2, abs=1e-6)


def test_padding_minus_inf_is_harmless():
    logp, old, adv, loss_mask, cu, teacher = hand_batch()
    logp = logp.detach().clone()
    logp[0] = old[0] = -math.inf  # untrained first token
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, old, adv, loss_mask, cu, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(m) for m in metrics.values())


def random_loss_inputs(rng: random.Random):
    batch = random_batch(rng, max_len=8)
    t = batch.student.numel()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    logp = -3 * torch.rand(t, generator=gen)
    old = logp + 0.4 * torch.randn(t, generator=gen)  # ratios on both sides of the clip range
    adv = torch.randn(t, generator=gen)
    teacher = batch.teacher.clone()
    far = torch.rand(t, generator=gen) < 0.1
    teacher[far & (teacher != SENTINEL)] = -25.0  # |gap| >= 10
    return logp.requires_grad_(True), old, adv, batch.loss_mask, batch.cu_seqlens, teacher


def test_matches_reference_on_random_batches():
    rng = random.Random("loss")
    for _ in range(30):
        logp, old, adv, loss_mask, cu, teacher = random_loss_inputs(rng)
        num_sequences = rng.choice([None, cu.numel() - 1 + 3])
        loss, metrics = policy_loss(logp, old, adv, loss_mask, cu, teacher, num_sequences=num_sequences)
        loss.backward()
        ref_loss, ref_grad, ref_metrics = ref_policy_loss(
            logp.tolist(), old.tolist(), adv.tolist(), loss_mask.tolist(), cu.tolist(), teacher.tolist(),
            num_sequences=num_sequences,
        )  # fmt: skip
        assert loss.item() == pytest.approx(ref_loss, abs=1e-6, rel=1e-5)
        torch.testing.assert_close(logp.grad, torch.tensor(ref_grad, dtype=torch.float32), atol=1e-6, rtol=1e-5)
        for name, value in ref_metrics.items():
            assert metrics[name].item() == pytest.approx(value, abs=1e-6), name


def test_micro_batches_add_up_to_the_full_batch():
    rng = random.Random("micro")
    for _ in range(12):
        logp, old, adv, loss_mask, cu, teacher = random_loss_inputs(rng)
        n = cu.numel() - 1
        if n == 0:
            continue
        full, _ = policy_loss(logp, old, adv, loss_mask, cu, teacher)
        (full_grad,) = torch.autograd.grad(full, logp)

        # Split at sequence boundaries into up to 3 micro-batches, each told the global N.
        cuts = sorted({0, n, *(rng.randint(0, n) for _ in range(2))})
        total = torch.zeros(())
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo, hi = int(cu[a]), int(cu[b])
            part, _ = policy_loss(logp[lo:hi], old[lo:hi], adv[lo:hi], loss_mask[lo:hi], cu[a : b + 1] - cu[a],
                                  teacher[lo:hi], num_sequences=max(1, n))  # fmt: skip
            total = total + part
        (micro_grad,) = torch.autograd.grad(total, logp, allow_unused=True)
        assert total.item() == pytest.approx(full.item(), abs=1e-6)
        torch.testing.assert_close(micro_grad if micro_grad is not None else torch.zeros_like(logp), full_grad)


def test_bad_arguments():
    logp, old, adv, loss_mask, cu, teacher = hand_batch()
    with pytest.raises(ValueError, match="advantages must be 1-D with 8 entries"):
        policy_loss(logp, old, adv[:7], loss_mask, cu, teacher)
    with pytest.raises(ValueError, match="num_sequences"):
        policy_loss(logp, old, adv, loss_mask, cu, teacher, num_sequences=1)
    with pytest.raises(ValueError, match="end at the number of tokens"):
        policy_loss(logp, old, adv, loss_mask, torch.tensor([0, 4, 7], dtype=torch.int32), teacher)
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(logp, old, adv, loss_mask, cu, teacher, eps_low=-0.1)
