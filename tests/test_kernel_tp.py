"""Vocab-parallel and data-parallel paths of the kernels in 2 gloo processes.

Every rank builds the same full-size inputs from a fixed seed, keeps its shard (vocab columns of
unequal sizes for the log-prob ops, a subset of sequences for the advantages), and compares what
the sharded call returns with the unsharded single-process result. One spawn runs every check, so
the interpreter and import start-up is paid once.
"""

from __future__ import annotations

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (children inherit it)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
VOCAB = 97
SHARDS = [(0, 40), (40, 97)]  # unequal: 40 and 57 columns


def _close(a, b, atol=1e-5, rtol=1e-5, msg=""):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=msg)


def _check_token_logprobs(rank, group):
    import uniopd_kernels.utils as kernel_utils
    from uniopd_kernels import token_logprobs
    from uniopd_kernels import token_logprobs_torch

    kernel_utils.MAX_FUSED_BLOCK = 16  # several blocks per shard, partial last block
    gen = torch.Generator().manual_seed(0)
    n_tok = 11
    full = torch.randn(n_tok, VOCAB, generator=gen) * 3
    targets = torch.randint(0, VOCAB, (n_tok,), generator=gen)
    targets[:4] = torch.tensor([0, 39, 40, 96])  # both edges of both shards
    g_logp, g_ent = torch.randn(n_tok, generator=gen), torch.randn(n_tok, generator=gen)

    x = full.double().requires_grad_()
    logsm = torch.log_softmax(x, -1)
    ref_logp = logsm.gather(1, targets.unsqueeze(1)).squeeze(1)
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    (ref_grad,) = torch.autograd.grad((ref_logp * g_logp + ref_ent * g_ent).sum(), x)

    lo, hi = SHARDS[rank]
    for fn, dtype, inplace, atol in [
        (token_logprobs, torch.float32, False, 1e-5),
        (token_logprobs, torch.float32, True, 1e-5),
        (token_logprobs, torch.bfloat16, False, 1.6e-2),
        (token_logprobs_torch, torch.float32, False, 1e-5),
    ]:
        base = full[:, lo:hi].to(dtype).requires_grad_()
        shard = base * 1  # non-leaf so that inplace_backward may reuse its buffer
        logp, ent = fn(shard, targets, vocab_start=lo, tp_group=group, inplace_backward=inplace, return_entropy=True)
        torch.autograd.backward([logp, ent], [g_logp, g_ent])
        tag = f"{fn.__name__} {dtype} inplace={inplace} rank={rank}"
        if dtype == torch.float32:
            _close(logp, ref_logp, msg=tag)
            _close(ent, ref_ent, msg=tag)
        else:  # bf16 inputs: compare with the exact result of the rounded logits
            _close(logp, torch.log_softmax(full.bfloat16().double(), -1).gather(1, targets[:, None])[:, 0], msg=tag)
        _close(base.grad, ref_grad[:, lo:hi], atol, atol, msg=tag)


def _check_linear(rank, group):
    from uniopd_kernels import linear_token_logprobs

    gen = torch.Generator().manual_seed(1)
    n_tok, hidden = 13, 16
    h = torch.randn(n_tok, hidden, generator=gen)
    w = torch.randn(VOCAB, hidden, generator=gen) / 2
    targets = torch.randint(0, VOCAB, (n_tok,), generator=gen)
    g = torch.randn(n_tok, generator=gen)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.log_softmax(hd @ wd.t(), -1).gather(1, targets[:, None])[:, 0]
    ref_dh, ref_dw = torch.autograd.grad((ref * g).sum(), (hd, wd))

    lo, hi = SHARDS[rank]
    hh, ww = h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
    out = linear_token_logprobs(hh, ww, targets, vocab_start=lo, tp_group=group, chunk_size=5)
    (out * g).sum().backward()
    _close(out, ref, msg=f"linear logp rank={rank}")
    _close(hh.grad, ref_dh, msg=f"linear dH rank={rank}")  # summed over the TP group
    _close(ww.grad, ref_dw[lo:hi], msg=f"linear dW rank={rank}")


def _check_advantages(rank, group):
    from test_kernel_advantages import assert_same
    from test_kernel_advantages import make_batch
    from uniopd_kernels import uniopd_advantages

    student, teacher, loss_mask, cu, group_ids, correct = make_batch(seed=7)
    n_seq = group_ids.numel()
    # Rank 0 takes the first 40% of the sequences, rank 1 the rest: groups straddle the ranks.
    split = (n_seq * 2) // 5
    a, b = (0, split) if rank == 0 else (split, n_seq)
    t0, t1 = int(cu[a]), int(cu[b])
    local = (student[t0:t1], teacher[t0:t1], loss_mask[t0:t1], (cu[a : b + 1] - t0).int(), group_ids[a:b], correct[a:b])
    try:
        from uniopd_mcore.recipe import advantages as recipe
    except ImportError:
        recipe = None
    for statistic in ("mean", "minmax"):
        for direction in ("both", "correct_up", "incorrect_down"):
            kw = dict(statistic=statistic, direction=direction)
            full = uniopd_advantages(student, teacher, loss_mask, cu, group_ids, correct, **kw)
            part = uniopd_advantages(*local, dp_group=group, **kw)
            sliced = full._replace(
                advantages=full.advantages[t0:t1], token_mask=full.token_mask[t0:t1], returns=full.returns[a:b],
                shifts=full.shifts[a:b], sequence_mask=full.sequence_mask[a:b],
            )  # fmt: skip
            assert_same(part, sliced, atol=1e-7)
            if recipe is not None:
                assert_same(part, recipe.uniopd_advantages(*local, dp_group=group, backend="torch", **kw), atol=1e-7)


def _worker(rank: int, init_file: str, tests_dir: str):
    import sys

    sys.path.insert(0, tests_dir)  # for the batch builder of test_kernel_advantages
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        _check_token_logprobs(rank, group)
        _check_linear(rank, group)
        _check_advantages(rank, group)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_vocab_and_data_parallel_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        # file:// rendezvous: no port to pick, so no clash with other tests running beside this one
        mp.spawn(_worker, args=(os.path.join(tmp, "rdzv"), os.path.dirname(__file__)), nprocs=WORLD, join=True)

