"""Independent float64 references for the recipe tests: plain Python loops over sequences and
groups, written from DESIGN.md section 1 (not from uniopd_mcore.recipe), plus a random packed
batch generator."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

SENTINEL = -100.0
TIE_EPS = 1e-9  # same near-tie rule as the recipe's greedy mask
COEF = {"both": (0.5, -0.5), "correct_up": (1.0, 0.0), "incorrect_down": (0.0, -1.0)}


# ---------------------------------------------------------------------------------------------
# Random packed batches


@dataclass
class Batch:
    student: torch.Tensor  # [T] float32
    teacher: torch.Tensor  # [T] float32, some -100
    loss_mask: torch.Tensor  # [T] int
    cu_seqlens: torch.Tensor  # [N+1] int32
    group_ids: torch.Tensor  # [N] int64
    correct: torch.Tensor  # [N] bool

    def args(self):
        return self.student, self.teacher, self.loss_mask, self.cu_seqlens, self.group_ids, self.correct


def random_batch(rng: random.Random, max_groups: int = 5, max_group_size: int = 6, max_len: int = 6) -> Batch:
    """Random packed batch with empty and one-token sequences, one-class groups, sentinel tokens,
    loss-mask holes, sparse group ids and sequences of a group not adjacent."""
    num_groups = rng.randint(0, max_groups)
    ids = rng.sample(range(50), num_groups)
    seqs = []  # (group id, correct, length)
    for gid in ids:
        size = rng.randint(1, max_group_size)
        kind = rng.random()
        for _ in range(size):
            if kind < 0.15:
                c = True  # all-correct group
            elif kind < 0.3:
                c = False  # all-incorrect group
            else:
                c = rng.random() < 0.5
            length = rng.choice([0, 1, rng.randint(2, max_len), rng.randint(2, max_len), rng.randint(2, max_len)])
            seqs.append((gid, c, length))
    rng.shuffle(seqs)
    lengths = [s[2] for s in seqs]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total = cu[-1]
    student, teacher, mask = [], [], []
    for n in lengths:
        for t in range(n):
            student.append(-3.0 * rng.random())
            teacher.append(SENTINEL if rng.random() < 0.1 else -3.0 * rng.random())
            # First token of a sequence has no log-prob: loss mask 0; some response holes too.
            mask.append(0 if t == 0 or rng.random() < 0.15 else 1)
    assert len(student) == total
    return Batch(
        student=torch.tensor(student, dtype=torch.float32),
        teacher=torch.tensor(teacher, dtype=torch.float32),
        loss_mask=torch.tensor(mask, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        group_ids=torch.tensor([s[0] for s in seqs], dtype=torch.int64),
        correct=torch.tensor([s[1] for s in seqs], dtype=torch.bool),
    )


def select_sequences(batch: Batch, index: list[int]) -> Batch:
    """Repack the sequences ``index`` (in that order) into a new packed batch."""
    cu = batch.cu_seqlens.tolist()
    tokens = [t for i in index for t in range(cu[i], cu[i + 1])]
    new_cu = [0]
    for i in index:
        new_cu.append(new_cu[-1] + cu[i + 1] - cu[i])
    take = torch.tensor(tokens, dtype=torch.long)
    seqs = torch.tensor(index, dtype=torch.long)
    return Batch(
        student=batch.student[take],
        teacher=batch.teacher[take],
        loss_mask=batch.loss_mask[take],
        cu_seqlens=torch.tensor(new_cu, dtype=torch.int32),
        group_ids=batch.group_ids[seqs],
        correct=batch.correct[seqs],
    )


# ---------------------------------------------------------------------------------------------
# Advantages (steps 1-5)


def token_rewards(student: list[float], teacher: list[float]) -> list[float]:
    """Step 1, with the subtraction in float32 as the recipe specifies for token math."""
    return [0.0 if t == SENTINEL else float(np.float32(t) - np.float32(s)) for s, t in zip(student, teacher)]


def ref_returns(batch: Batch) -> list[float]:
    r = token_rewards(batch.student.tolist(), batch.teacher.tolist())
    mask = batch.loss_mask.tolist()
    cu = batch.cu_seqlens.tolist()
    out = []
    for i in range(len(cu) - 1):
        toks = [t for t in range(cu[i], cu[i + 1]) if mask[t]]
        out.append(sum(r[t] for t in toks) / len(toks) if toks else 0.0)
    return out


def gap_of(pos: list[float], neg: list[float], statistic: str) -> float:
    if statistic == "mean":
        return sum(pos) / len(pos) - sum(neg) / len(neg)
    return min(pos) - max(neg)


def ref_greedy_group(pos: list[tuple[int, float]], neg: list[tuple[int, float]], statistic: str, margin: float,
                     ratio: float) -> set[int]:  # fmt: skip
    """Released greedy rule, one group: returns the dropped sequence indices."""
    pos = sorted(pos, key=lambda x: x[1])  # worst correct first (stable)
    neg = sorted(neg, key=lambda x: -x[1])  # best incorrect first (stable)
    min_pos = max(1, math.ceil(ratio * len(pos)))
    min_neg = max(1, math.ceil(ratio * len(neg)))
    dropped: set[int] = set()
    gap = gap_of([v for _, v in pos], [v for _, v in neg], statistic)
    while gap < margin:
        best, action = gap + TIE_EPS, None
        if len(pos) > min_pos:
            g = gap_of([v for _, v in pos[1:]], [v for _, v in neg], statistic)
            if g > best:
                best, action = g, "pos"
        if len(neg) > min_neg:
            g = gap_of([v for _, v in pos], [v for _, v in neg[1:]], statistic)
            if g > best + (TIE_EPS if action else 0.0):
                best, action = g, "neg"
        if action is None:
            break
        dropped.add((pos if action == "pos" else neg).pop(0)[0])
        gap = gap_of([v for _, v in pos], [v for _, v in neg], statistic)
    return dropped


def ref_advantages(batch: Batch, *, margin=0.4, statistic="mean", direction="both", calibration="shift",
                   min_retain_ratio=0.25) -> dict:  # fmt: skip
    student, teacher = batch.student.tolist(), batch.teacher.tolist()
    r = token_rewards(student, teacher)
    mask = batch.loss_mask.tolist()
    cu = batch.cu_seqlens.tolist()
    gids = batch.group_ids.tolist()
    correct = batch.correct.tolist()
    n = len(gids)
    G = ref_returns(batch)
    shifts = [0.0] * n
    keep = [True] * n
    checked = violated = 0
    applied = []
    for gid in sorted(set(gids)):
        members = [i for i in range(n) if gids[i] == gid]
        pos = [i for i in members if correct[i]]
        neg = [i for i in members if not correct[i]]
        if not pos or not neg:
            continue
        checked += 1
        gap = gap_of([G[i] for i in pos], [G[i] for i in neg], statistic)
        if gap >= margin:
            continue
        violated += 1
        if calibration == "shift":
            s = margin - gap
            applied.append(abs(s))
            up, down = COEF[direction]
            for i in pos:
                shifts[i] = s * up
            for i in neg:
                shifts[i] = s * down
        elif calibration == "greedy_mask":
            for i in ref_greedy_group([(i, G[i]) for i in pos], [(i, G[i]) for i in neg], statistic, margin,
                                      min_retain_ratio):  # fmt: skip
                keep[i] = False
    adv, tmask = [], []
    for i in range(n):
        for t in range(cu[i], cu[i + 1]):
            on = bool(mask[t]) and teacher[t] != SENTINEL and keep[i]
            tmask.append(on)
            adv.append(r[t] + shifts[i] if on else 0.0)
    return dict(advantages=adv, token_mask=tmask, returns=G, shifts=shifts, sequence_mask=keep,
                groups_checked=checked, groups_violated=violated,
                mean_shift=sum(applied) / len(applied) if applied else 0.0)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Loss (step 8)


def ref_policy_loss(logp, old, adv, loss_mask, cu, teacher, *, eps_low=0.2, eps_high=0.28, gap_clip=10.0,
                    num_sequences=None):  # fmt: skip
    """Loss, d loss / d logp (analytic) and metrics, float64 loops."""
    n = len(cu) - 1
    num_sequences = num_sequences or max(1, n)
    loss = 0.0
    grad = [0.0] * len(logp)
    n_tok = n_clip = n_mask = n_gap = 0
    kl = 0.0
    for i in range(n):
        toks = range(cu[i], cu[i + 1])
        denom = max(1, sum(1 for t in toks if loss_mask[t]))
        for t in toks:
            if not loss_mask[t]:
                continue
            n_mask += 1
            if teacher[t] == SENTINEL or abs(logp[t] - teacher[t]) >= gap_clip:
                n_gap += 1
                continue
            ratio = math.exp(logp[t] - old[t])
            unclipped = -ratio * adv[t]
            clipped = -min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[t]
            loss += max(unclipped, clipped) / denom / num_sequences
            # d/dlogp: the unclipped branch -ratio*A (also when both coincide); 0 when clipped wins.
            if unclipped >= clipped:
                grad[t] = -ratio * adv[t] / denom / num_sequences
            n_tok += 1
            n_clip += clipped > unclipped
            kl += old[t] - logp[t]
    metrics = dict(clip_frac=n_clip / max(1, n_tok), teacher_gap_clip_frac=n_gap / max(1, n_mask),
                   approx_kl=kl / max(1, n_tok), tokens=float(n_tok))  # fmt: skip
    return loss, grad, metrics


# ---------------------------------------------------------------------------------------------
# Balancing (steps 6, 7)


def ref_balance_quota(gids: list[int], correct: list[bool], ratio: float) -> dict[int, tuple[int, int]]:
    """Kept (correct, incorrect) count of every group under online balancing."""
    out = {}
    for gid in set(gids):
        nc = sum(1 for g, c in zip(gids, correct) if g == gid and c)
        ni = sum(1 for g, c in zip(gids, correct) if g == gid and not c)
        kc, ki = nc, ni
        if nc and ni:
            want_c = math.floor(ni * ratio) if ratio != math.inf else math.inf
            want_i = math.floor(nc / ratio) if ratio > 0 else math.inf
            if nc > want_c:
                kc = want_c
            elif ni > want_i:
                ki = want_i
        out[gid] = (kc, ki)
    return out


def ref_bin(rate: float, num_bins: int) -> int:
    if rate == 0.0:
        return 0
    if rate == 1.0:
        return num_bins - 1
    return 1 + min(math.floor(rate * (num_bins - 2)), num_bins - 3)


def ref_bin_copies(rates: list[float], num_bins: int, max_repeat: int) -> list[int]:
    """Total copies per bin after offline balancing."""
    counts = [0] * num_bins
    for r in rates:
        counts[ref_bin(r, num_bins)] += 1
    target = max(counts) if counts else 0
    return [c if b in (0, num_bins - 1) else min(target, c * max_repeat) for b, c in enumerate(counts)]
