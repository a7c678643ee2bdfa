"""Uni-OPD policy loss: DESIGN.md section 1, step 8 (PPO-clip on the calibrated token advantages).

``l_t = max(-ratio * A_t, -clip(ratio, 1 - eps_low, 1 + eps_high) * A_t)`` with
``ratio = exp(logp - logp_old)``; no advantage normalisation, no KL or entropy term. Tokens whose
current student log-prob is >= ``teacher_gap_clip`` away from the teacher's, and sentinel tokens,
get no loss. Reduction: per-sequence token mean (denominator = the sequence's loss-mask count),
then sum over sequences divided by the global number of sequences, so micro-batches called with
the global ``num_sequences`` add up to the full-batch loss and gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .advantages import TEACHER_SENTINEL
from .advantages import check_cu_seqlens
from .segments import sequence_sum


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    teacher_logprobs: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    teacher_gap_clip: float | None = 10.0,
    num_sequences: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss of DESIGN.md 1 step 8 and detached metrics.

    Args:
        logprobs: [T] current student log-probs (with grad), aligned with ``input_ids``.
        old_logprobs: [T] student log-probs at rollout time (``logp_old``).
        advantages: [T] token advantages (``AdvantageResult.advantages``).
        loss_mask: [T] 1 on response tokens; its per-sequence count is the token-mean denominator.
        cu_seqlens: [N+1] integer offsets of the sequences.
        teacher_logprobs: [T] teacher log-probs (-100 = failed) for the log-prob gap mask.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (0.2, 0.28 released).
        teacher_gap_clip: tokens with ``|logprobs - teacher| >= teacher_gap_clip`` get no loss;
            None disables the gap rule (sentinel tokens still get none).
        num_sequences: global number of sequences of the step (default: N of this call, at least 1).

    Returns:
        ``(loss, metrics)``; metrics are detached float scalars: ``clip_frac`` (loss tokens where
        the clipped branch is active), ``teacher_gap_clip_frac`` (loss-mask tokens removed by the
        teacher rule: gap or sentinel), ``approx_kl`` (mean of ``old - logp`` over loss tokens)
        and ``tokens`` (number of loss tokens).
    """
    num_tokens = logprobs.numel()
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("loss_mask", loss_mask),
                    ("teacher_logprobs", teacher_logprobs)):  # fmt: skip
        if t.dim() != 1 or t.numel() != num_tokens or logprobs.dim() != 1:
            raise ValueError(f"{name} must be 1-D with {num_tokens} entries like logprobs, got shape {tuple(t.shape)}")
    check_cu_seqlens(cu_seqlens, num_tokens)
    num_local = cu_seqlens.numel() - 1
    if num_sequences is None:
        num_sequences = max(1, num_local)
    if num_sequences < max(1, num_local):
        raise ValueError(f"num_sequences ({num_sequences}) must be >= the {num_local} sequences of this call and >= 1")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")

    logp = logprobs.float()
    old = old_logprobs.float()
    teacher = teacher_logprobs.float()
    in_loss = loss_mask != 0
    teacher_ok = teacher != TEACHER_SENTINEL
    if teacher_gap_clip is not None:
        # The gap is a mask, not part of the objective: measured on the current, detached log-prob.
        teacher_ok = teacher_ok & ((logp.detach() - teacher).abs() < teacher_gap_clip)
    mask = in_loss & teacher_ok

    # Masked tokens get ratio 1 and A = 0 before exp: padding log-probs of -inf would otherwise
    # turn into inf * 0 = nan in the forward or the backward.
    log_ratio = torch.where(mask, logp - old, 0.0)
    adv = torch.where(mask, advantages.float(), 0.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped_loss = -ratio * adv
    clipped_loss = -clipped_ratio * adv
    token_loss = torch.maximum(unclipped_loss, clipped_loss)

    # Per-sequence token mean over the loss-mask count (not the count left after the teacher
    # rule), then mean over the global batch of sequences.
    denom = sequence_sum(in_loss, cu_seqlens).clamp(min=1.0)
    per_seq = sequence_sum(torch.where(mask, token_loss, 0.0), cu_seqlens) / denom
    loss = (per_seq.sum() / num_sequences).float()

    with torch.no_grad():
        n_loss = mask.sum()
        n_mask = in_loss.sum()
        metrics = {
            "clip_frac": ((clipped_loss > unclipped_loss) & mask).sum() / n_loss.clamp(min=1),
            "teacher_gap_clip_frac": (in_loss & ~teacher_ok).sum() / n_mask.clamp(min=1),
            "approx_kl": torch.where(mask, old - logp, 0.0).sum() / n_loss.clamp(min=1),
            "tokens": n_loss.float(),
        }
    metrics = {k: v.detach().float() for k, v in metrics.items()}
    return loss, metrics
