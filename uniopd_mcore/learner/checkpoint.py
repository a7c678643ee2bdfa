"""Learner checkpoints in Megatron-Core's distributed format (`torch_dist`), reshardable.

    save_checkpoint(learner, "ckpt/step_000100", user_state={"step": 100, "cursor": 7})
    user = load_checkpoint(learner, "ckpt/step_000100")     # any TP/PP/DP layout
    latest_checkpoint("ckpt")                                # newest finished one, or None

What is saved, all through `megatron.core.dist_checkpointing`:
  model       `GPTModel.sharded_state_dict()`: every tensor with its place in the global tensor
              (TP slices, PP layer offsets, SwiGLU [gate; up] halves, vocabulary padding)
  optimizer   `optimizer.sharded_state_dict(model_sharded_state_dict)`: Adam moments (and the
              fp32 main params where they exist) sharded like the parameters they belong to; the
              distributed optimizer uses Megatron's `fully_reshardable` layout
  scheduler   the LR scheduler state, the learner's step counter and the caller's `user_state`
              (common state: written once, by global rank 0, so it must be the same on all ranks)
  rng         each rank's CPU/CUDA generator and Megatron's TP RNG-tracker states, one
              ShardedObject per (pp, tp, dp) rank

Resharding: model and optimizer load at any TP/PP/DP layout (Megatron maps the saved global
tensors onto the new shards). RNG states are per rank and have no meaning in another layout: they
are restored only when the layout is the same; otherwise every rank is reseeded the way
`init_distributed` seeds (same seed everywhere, Megatron derives the TP-rank tracker states) from
a seed drawn at save time, so a resumed run is deterministic but not bitwise equal to an
uninterrupted one. Changing `distributed_optimizer` between save and load is refused for the
optimizer state (the two formats differ); `load_optimizer=False` loads the rest.

Atomicity: everything is written into `<path>.tmp`; after every rank has finished, rank 0 writes
the completion marker (`uniopd_checkpoint.json`) and renames the directory to `<path>`. A run
killed while saving leaves a `.tmp` directory that `load_checkpoint` refuses and
`latest_checkpoint` skips; the previous checkpoint stays usable.

Writing happens in the calling process (see `_InProcessTorchDistSave`), one file per rank.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_finalize
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

MARKER = "uniopd_checkpoint.json"
FORMAT = "megatron-dist-torch_dist"
FORMAT_VERSION = 1
UNFINISHED_SUFFIXES = (".tmp", ".old")
# the distributed optimizer's layout that can be resharded over TP, PP and DP
DISTOPT_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


# ------------------------------------------------------------------------------------------------
# finding checkpoints


def is_finished(path: str | os.PathLike) -> bool:
    """A directory that a save completed: not a `.tmp`/`.old` leftover, with the marker."""
    p = Path(path)
    return p.is_dir() and not p.name.endswith(UNFINISHED_SUFFIXES) and (p / MARKER).is_file()


def list_checkpoints(root: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Finished checkpoints under `root` (matching `pattern`), sorted by name (oldest first for
    zero-padded step names such as step_000100)."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p for p in r.glob(pattern) if is_finished(p))


def latest_checkpoint(root: str | os.PathLike, pattern: str = "*") -> Path | None:
    found = list_checkpoints(root, pattern)
    return found[-1] if found else None


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The marker of a finished checkpoint: format, layout, num_steps, distributed_optimizer,
    params_dtype."""
    p = Path(path)
    if not is_finished(p):
        if p.name.endswith(UNFINISHED_SUFFIXES):
            raise FileNotFoundError(f"{p} is an unfinished save (a run stopped while writing it)")
        if p.is_dir() and any(p.glob("rank_*.pt")):
            raise ValueError(f"{p} is a per-rank torch.save checkpoint of an older version: not loadable")
        raise FileNotFoundError(f"{p} is not a finished learner checkpoint (no {MARKER})")
    return json.loads((p / MARKER).read_text())


# ------------------------------------------------------------------------------------------------
# writing in the calling process


class _InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """Megatron's torch_dist save strategy, with the files written by the calling process.

    Megatron's own writer hands the files to forked worker processes and collects their results
    through a `multiprocessing.Manager` queue (a spawned server process). Daemonic processes may
    not have children ("daemonic processes are not allowed to have children": test spawners,
    some launchers), and the workers need psutil for a debug log line. Writing here gives the same
    files and metadata; the only loss is the overlap of two writer processes per rank.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1, thread_count=1)

    def async_save(self, sharded_state_dict, checkpoint_dir):
        # prepare_write_data() asks for the Manager queue; an in-process queue does the same job
        original = filesystem_async._get_write_results_queue
        filesystem_async._get_write_results_queue = queue.Queue
        try:
            return super().async_save(sharded_state_dict, checkpoint_dir)
        finally:
            filesystem_async._get_write_results_queue = original

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret) -> AsyncRequest:
        def write() -> None:
            buckets = writer.preload_tensors(writer.write_buckets, non_blocking=False)
            results = {i: _write_bucket(writer, bucket) for i, bucket in enumerate(buckets)}
            if writer.results_queue is not None:
                writer.results_queue.put(results)

        return AsyncRequest(write, (), [lambda: save_state_dict_async_finalize(*save_state_dict_ret)])


def _write_bucket(writer, bucket) -> list:
    """What Megatron's worker process does for one file (FileSystemWriterAsync.write_preloaded_data)."""
    file_name, storage_key, (bytes_data, tensor_data) = bucket
    write_item = filesystem_async._write_item
    extra: dict[str, Any] = {}
    if "serialization_format" in inspect.signature(write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    transforms = [writer.transforms] if hasattr(writer, "transforms") else []
    results = []
    with open(file_name, "wb") as stream:
        for item, data in bytes_data:
            results.append(write_item(*transforms, stream, data, item, storage_key, **extra))
        for item, tensor in tensor_data:
            results.append(write_item(*transforms, stream, tensor.cpu(), item, storage_key, **extra))
        stream.flush()
        os.fsync(stream.fileno())
    return results


# ------------------------------------------------------------------------------------------------
# optimizer state helpers


def _adam_state_ready(opt: Any) -> None:
    """Give every parameter of a torch Adam/AdamW its state (zeros, step 0) if it has none.

    Megatron builds the optimizer's sharded state dict from the existing state; a fresh optimizer
    has none (torch creates it at the first step). On load Megatron allocates it only for Apex/TE
    optimizers, and the distributed optimizer's state_dict() needs torch Adam's per-parameter
    `step`. Zero moments with step 0 are exactly what the first Adam step would create.
    """
    inner = opt.optimizer
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    step = steps[0].detach().clone() if steps else torch.tensor(0.0)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if len(state) == 0:
                state["step"] = step.clone()
                state["exp_avg"] = torch.zeros_like(p.data)
                state["exp_avg_sq"] = torch.zeros_like(p.data)


def _keep_step_on_copy(opt: DistributedOptimizer) -> None:
    """Megatron 0.16 bug with torch Adam: loading the distributed optimizer's parameter state
    copies *every* key of the existing state (`step` included) from the loaded tensors, which
    leave `step` out (it travels separately, in the param groups) -> KeyError 'step'. Keep the
    step that load_state_dict() has just set."""
    if getattr(opt, "_uniopd_step_fix", False):
        return
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        state = opt.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"]}
        return original(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
    opt._uniopd_step_fix = True


def _unshare_steps(opt: Any) -> None:
    """Megatron 0.16 bug with torch Adam: the distributed optimizer's load_state_dict() gives
    every parameter the *same* `step` tensor, and torch Adam increments each parameter's step in
    place, so one optimizer step would advance the shared counter once per parameter (wrong bias
    correction from then on). Give each parameter its own copy."""
    inner = opt.optimizer
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].detach().clone()


# ------------------------------------------------------------------------------------------------
# RNG


def _layout(learner) -> dict[str, int]:
    return {"tp": learner.tp_size, "pp": learner.pp_size, "dp": learner.dp_size, "world": dist.get_world_size()}


def _rng_object(state: Any) -> ShardedObject:
    """This rank's RNG state, one cell of a (pp, tp, dp) grid."""
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _reseed_value() -> int:
    """A seed for resuming at another layout, drawn from a copy of rank 0's CPU generator
    (the generator itself does not advance)."""
    g = torch.Generator()
    g.set_state(torch.get_rng_state())
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# save / load


def _sharded_state(learner, *, is_loading: bool, optimizer: bool) -> dict[str, Any]:
    model_sd = learner.module.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer:
        for opt in learner._optimizers():
            _adam_state_ready(opt)
        metadata = DISTOPT_SHARDING if learner.parallel.distributed_optimizer else None
        state["optimizer"] = learner.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return state


def save_checkpoint(learner, path: str | os.PathLike, user_state: dict[str, Any] | None = None) -> Path:
    """Collective over all ranks. Writes `<path>.tmp`, then renames it to `path`."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was interrupted earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    layout = _layout(learner)
    state = _sharded_state(learner, is_loading=False, optimizer=True)
    state["scheduler"] = learner.scheduler.state_dict()
    state["num_steps"] = learner.num_steps
    state["user"] = dict(user_state or {})
    state["layout"] = layout
    state["distributed_optimizer"] = bool(learner.parallel.distributed_optimizer)
    state["reseed"] = _reseed_value() if rank == 0 else 0  # only rank 0's common state is kept
    state["rng_state"] = _rng_object(_rng_state())
    dist_checkpointing.save(
        state, str(tmp), sharded_strategy=_InProcessTorchDistSave(),
        # the reseed value is rank 0's only; everything else in the common state must agree
        preprocess_common_before_consistancy_check=lambda common: {k: v for k, v in common.items() if k != "reseed"},
    )
    dist.barrier()  # every rank's files are written (save() also ends with a barrier)
    if rank == 0:
        info = {
            "format": FORMAT, "version": FORMAT_VERSION, "layout": layout, "num_steps": learner.num_steps,
            "distributed_optimizer": state["distributed_optimizer"],
            "params_dtype": str(learner.config.params_dtype).removeprefix("torch."), "saved_at": time.time(),
        }
        with open(tmp / MARKER, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # overwriting: the old copy goes only after the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    learner, path: str | os.PathLike, *, load_optimizer: bool = True, load_rng: bool = True
) -> dict[str, Any]:
    """Collective over all ranks. Restores what save_checkpoint wrote, at any TP/PP/DP layout;
    returns the user state. `load_optimizer=False` restores only the model, the step counter and
    the RNG (e.g. to export weights, where the optimizer settings may differ from training's)."""
    p = Path(path)
    info = read_info(p)
    if info.get("format") != FORMAT:
        raise ValueError(f"{p}: unknown checkpoint format {info.get('format')!r}")
    saved_distopt = bool(info.get("distributed_optimizer", False))
    if load_optimizer and saved_distopt != bool(learner.parallel.distributed_optimizer):
        raise ValueError(
            f"{p}: optimizer state saved with distributed_optimizer={saved_distopt}, the learner has "
            f"distributed_optimizer={learner.parallel.distributed_optimizer}; the formats differ "
            "(load with load_optimizer=False for the model alone)"
        )
    same_layout = info["layout"] == _layout(learner)
    state = _sharded_state(learner, is_loading=True, optimizer=load_optimizer)
    if load_rng and same_layout:
        state["rng_state"] = _rng_object(_rng_state())
    if load_optimizer:
        for opt in learner._optimizers():
            if isinstance(opt, DistributedOptimizer):
                _keep_step_on_copy(opt)
    loaded = dist_checkpointing.load(state, str(p))
    learner.module.load_state_dict(loaded["model"], strict=True)
    if load_optimizer:
        learner.optimizer.load_state_dict(loaded["optimizer"])
        for opt in learner._optimizers():
            _unshare_steps(opt)
        learner.scheduler.load_state_dict(loaded["scheduler"])
    learner.num_steps = int(loaded["num_steps"])
    if load_rng:  # last, so that nothing above consumes the restored streams
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        else:
            _reseed(int(loaded["reseed"]))
    dist.barrier()
    return dict(loaded["user"])
