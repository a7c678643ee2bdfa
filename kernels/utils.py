"""Small helpers shared by the kernels: block sizes, the can-run check, int64 row offsets."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Largest vocab block one program holds in registers. 8K values over 16 warps is 16 per thread:
# ptxas (sm_90) gives the forward 40 registers and no spills, so 3 such programs fit on an SM and
# one program's reductions overlap another's loads; 16K would use 72 registers and leave a single
# program per SM. (Chosen from the register counts, not yet from a timing: see benchmarks/.)
# Tests monkeypatch this to a tiny value so that the multi-block loop and the tail mask run.
MAX_FUSED_BLOCK = 8192
# Token block of the per-sequence loops of the advantage kernels (1-byte masks, fp32 values).
TOKEN_BLOCK = 1024


def interpreting() -> bool:
    """True when Triton simulates kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_triton(device: torch.device | str | None = None) -> bool:
    """Whether a Triton kernel can run for tensors on ``device``.

    On CUDA tensors a GPU build runs them; on CPU tensors only the interpreter can, and the
    interpreter has to be selected before ``triton`` is first imported.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None:
        return torch.cuda.is_available() or interpreting()
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interpreting()


def vocab_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row loop over ``n_cols`` vocab entries."""
    block = min(triton.next_power_of_2(max(int(n_cols), 1)), MAX_FUSED_BLOCK)
    block = max(block, 16)
    if block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block, num_warps


def token_block(n: int) -> int:
    """Block of a loop over segments of about ``n`` tokens (power of two, 16..TOKEN_BLOCK)."""
    return max(16, min(triton.next_power_of_2(max(int(n), 1)), TOKEN_BLOCK))


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit stride along the last dimension."""
    if x.dim() >= 1 and x.size(-1) > 1 and x.stride(-1) != 1:
        return x.contiguous()
    return x


@triton.jit
def row_offset(row, stride):
    """int64 element offset of a row: T * V exceeds 2**31 at T = 65,536, V = 151,936 (9.96e9)."""
    return row.to(tl.int64) * stride


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` [R, C] from every rank of ``group`` into [world, R, C] (one collective).

    NCCL has a single-tensor all-gather; gloo only the list form, so fall back to it there.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)
