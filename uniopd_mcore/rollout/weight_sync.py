"""Moving the learner's HF-named weights into SGLang servers (reference/anchors.md 1.4 and 8.2).

The learner streams (hf_name, tensor) pairs; they are grouped into buckets of about 512 MB, one
dtype per bucket, and each bucket travels as ONE flat tensor (the concatenation of its flattened
tensors, in order) plus metadata (name, shape, dtype, offsets). One flat tensor per bucket means
one NCCL broadcast or one CUDA-IPC handle per bucket instead of one per parameter, which is what
brought slime's sync time down (anchors.md section 9).

The layout is SGLang's "flattened_bucket" format: on `/update_weights_from_distributed` the server
allocates empty tensors from (names, dtypes, shapes), concatenates them the same way and receives
the broadcast into that buffer, so the sender's concatenation order must be the request's order,
and a bucket must hold a single dtype (a concatenation of mixed dtypes would be promoted).

Three transports use these buckets (selected in rollout/sglang.py):
- distributed: a process group with the trainer as rank 0 and every engine TP rank after it,
  created once through `init_weight_update_group`; one broadcast per bucket.
- tensor (colocated): the flat CUDA tensor is shared with the server through a CUDA-IPC handle
  made by SGLang's MultiprocessingSerializer (lazy import: SGLang is a GPU-node extra).
- disk: safetensors files the server reads with `/update_weights_from_disk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch
from torch import Tensor

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a flat bucket: flat[start:end].view(shape)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


def tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling SGLang resolves with getattr(torch, name)."""
    return str(dtype).removeprefix("torch.")


# ---- bucketing ------------------------------------------------------------------------------


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, Tensor]]]:
    """Group a stream of (name, tensor) into buckets of at most `bucket_bytes`, one dtype each.

    Streaming: at most one open bucket per dtype is held (models have one or two dtypes), so the
    whole model is never materialised. A tensor of `bucket_bytes` or more travels alone, at once.
    Within a bucket the stream order is kept.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    open_buckets: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
    open_bytes: dict[torch.dtype, int] = {}
    for name, tensor in named_tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
        size = tensor_bytes(tensor)
        if size >= bucket_bytes:
            yield [(name, tensor)]
            continue
        dtype = tensor.dtype
        if open_buckets.get(dtype) and open_bytes[dtype] + size > bucket_bytes:
            yield open_buckets[dtype]
            open_buckets[dtype] = []  # assigned, not popped: the dict keeps first-seen order
        if not open_buckets.get(dtype):
            open_buckets[dtype] = []
            open_bytes[dtype] = 0
        open_buckets[dtype].append((name, tensor))
        open_bytes[dtype] += size
    for bucket in open_buckets.values():  # dicts keep insertion order: first-seen dtype first
        if bucket:
            yield bucket


def flatten_bucket(
    bucket: list[tuple[str, Tensor]], device: torch.device | str | None = None
) -> tuple[Tensor, list[TensorMeta]]:
    """One 1-D tensor holding the bucket's tensors back to back, and where each one lives.

    device: where the flat tensor is built (e.g. "cuda" for NCCL / CUDA IPC); None keeps the
    tensors' own device (they must then all be on one device).
    """
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    dtype = bucket[0][1].dtype
    parts: list[Tensor] = []
    metadata: list[TensorMeta] = []
    offset = 0
    for name, tensor in bucket:
        if tensor.dtype != dtype:
            raise ValueError(f"a bucket holds one dtype: {name!r} is {tensor.dtype}, the bucket {dtype}")
        tensor = tensor.detach()
        if device is not None:
            tensor = tensor.to(device, non_blocking=True)
        parts.append(tensor.reshape(-1))
        metadata.append(TensorMeta(name, tuple(tensor.shape), dtype, offset, offset + tensor.numel()))
        offset += tensor.numel()
    # cat always allocates a fresh buffer: the flat tensor never aliases a learner parameter.
    return torch.cat(parts), metadata


def unflatten_bucket(flat: Tensor, metadata: list[TensorMeta]) -> list[tuple[str, Tensor]]:
    """Inverse of flatten_bucket: views into `flat`, in bucket order."""
    if flat.dim() != 1:
        raise ValueError(f"a flat bucket is 1-D, got shape {tuple(flat.shape)}")
    total = metadata[-1].end if metadata else 0
    if flat.numel() != total:
        raise ValueError(f"flat bucket has {flat.numel()} elements, metadata describes {total}")
    out = []
    for meta in metadata:
        if meta.dtype != flat.dtype:
            raise ValueError(f"{meta.name!r} is {meta.dtype} but the flat bucket is {flat.dtype}")
        out.append((meta.name, flat[meta.start : meta.end].view(meta.shape)))
    return out


def bucket_request_fields(metadata: list[TensorMeta]) -> dict[str, list]:
    """names / dtypes / shapes of a bucket as /update_weights_from_distributed takes them."""
    return {
        "names": [m.name for m in metadata],
        "dtypes": [dtype_name(m.dtype) for m in metadata],
        "shapes": [list(m.shape) for m in metadata],
    }


# ---- distributed (NCCL) transport -----------------------------------------------------------


def init_weight_update_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int = 0,
    group_name: str = "uniopd_weight_update",
    backend: str = "nccl",
    timeout_s: float = 600.0,
):
    """Join (rank 0: host) the weight-update process group that SGLang servers join through
    /init_weights_update_group, outside of (and alongside) the learner's default process group.

    It must build the group exactly as the servers do: a TCP rendezvous at master_address:port
    (rank 0 hosts the store), a store prefixed by the group name, then torch's internal group
    constructor, which torch.distributed.new_group cannot replace because it needs an already
    initialised default group spanning every member. The group is registered in torch's tables
    so torch.distributed.broadcast(..., group=g) works on it.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def broadcast_from_trainer(tensor: Tensor, group) -> None:
    """Send `tensor` from rank 0 of the weight-update group to every engine rank.

    Synchronous on purpose: the caller frees or reuses the buffer right after.
    """
    import torch.distributed as dist

    try:
        work = dist.broadcast(tensor, group=group, group_src=0, async_op=True)
    except TypeError:  # torch < 2.6 has no group_src; the group's rank table maps global 0 to 0
        work = dist.broadcast(tensor, src=0, group=group, async_op=True)
    work.wait()


def destroy_weight_update_group(group) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(group)
    except Exception:  # already gone (e.g. a peer died): nothing left to release
        pass


# ---- CUDA-IPC (colocated) transport ---------------------------------------------------------


def sglang_flattened_metadata(metadata: list[TensorMeta]) -> list:
    """Our metadata as SGLang's FlattenedTensorMetadata objects: the server unpickles the
    payload, so it must contain SGLang's classes, not ours (the server cannot import ours)."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError:  # older SGLang kept it next to the model runner
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata  # type: ignore
    return [
        FlattenedTensorMetadata(
            name=m.name,
            shape=torch.Size(m.shape),
            dtype=m.dtype,
            start_idx=m.start,
            end_idx=m.end,
            numel=m.numel,
        )
        for m in metadata
    ]


def serialize_bucket_for_ipc(flat: Tensor, metadata: list[TensorMeta]) -> str:
    """A flattened bucket as the string /update_weights_from_tensor takes with
    load_format="flattened_bucket": CUDA-IPC handles, not the bytes, so `flat` must be a CUDA
    tensor that stays alive (and unmodified) until the server has copied it."""
    if not flat.is_cuda:
        raise ValueError("CUDA-IPC weight transfer needs the flat bucket on a CUDA device")
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        from sglang.srt.patch_torch import monkey_patch_torch_reductions  # type: ignore
    from sglang.srt.utils import MultiprocessingSerializer

    # SGLang's patch makes IPC handles name the GPU by UUID, so a receiver whose
    # CUDA_VISIBLE_DEVICES numbers GPUs differently still opens the right one.
    monkey_patch_torch_reductions()
    payload = {"flattened_tensor": flat, "metadata": sglang_flattened_metadata(metadata)}
    return MultiprocessingSerializer.serialize(payload, output_str=True)
