"""torch.distributed + Megatron-Core parallel state, on CPU (gloo) or GPU (nccl).

`init_distributed(tp, pp)` works under torchrun (RANK/WORLD_SIZE/MASTER_* from the environment),
under a test spawner that sets the same variables, or as a plain single process (world size 1,
127.0.0.1 and a free port). The data-parallel size is world_size / (tp * pp).

`run_local_processes(fn, world_size, args)` is that spawner: fn(rank, world_size, *args) in
`world_size` local processes forming a torch.distributed world on 127.0.0.1, used by the tests,
`uniopd-mcore verify-conversion` and `uniopd-mcore export`. Megatron is imported only inside the
functions that use it, so that a parent which only starts the processes does not load it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from uniopd_mcore.learner import cpu_compat
from uniopd_mcore.utils.net import free_port


@dataclass(frozen=True)
class ParallelInfo:
    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelInfo:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.install()  # no-op with CUDA
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = os.environ.get("MASTER_PORT")
        if port is None:
            if world != 1:
                raise RuntimeError("MASTER_PORT must be set when WORLD_SIZE > 1")
            # a private port, not written to os.environ: child processes must not inherit it
            port = str(free_port())
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same seed everywhere for the default generator (identical init on all DP ranks);
    # Megatron derives the per-TP-rank tracker states from it.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return info()


def info() -> ParallelInfo:
    from megatron.core import parallel_state

    return ParallelInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# local launcher


def _local_process(fn: Callable, rank: int, world_size: int, port: int, args: Sequence, out, threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(threads)
        # pickled here (by value, no shared memory) so that an unpicklable result is reported
        # instead of dying silently in the queue's feeder thread
        out.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


def run_local_processes(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
                        timeout: float | None = None, start_method: str | None = "spawn",
                        check_gpus: bool = True) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` local processes; their results, by rank.

    Each process has RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT
    in its environment, so `init_distributed()` just works. `fn` must be a module-level function
    and its result picklable. If a rank fails (or `timeout` seconds pass), the others are stopped
    and a RuntimeError carries every failing rank's traceback.

    start_method: "spawn" works from any parent (a forked child cannot use its parent's CUDA
    context or process group, and forking a multi-threaded process is fragile); None means "fork"
    where that is safe (Linux, no process group, CUDA not initialised), which is much faster
    because the children do not re-import torch/Megatron (the tests). The processes are not
    daemonic so that they may start processes of their own. check_gpus: with CUDA, refuse more
    processes than visible GPUs (init_distributed gives each rank its own).
    """
    if check_gpus and torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise RuntimeError(f"{world_size} processes need {world_size} GPUs, {torch.cuda.device_count()} visible")
    if start_method is None:
        fork_ok = sys.platform.startswith("linux") and not dist.is_initialized() and not torch.cuda.is_initialized()
        start_method = "fork" if fork_ok else "spawn"
    ctx = mp.get_context(start_method)
    # The processes share the cores. A forked child keeps one thread: growing the OpenMP pool the
    # parent already used can deadlock after fork (seen: a test hanging after HF models ran).
    threads = 1 if start_method == "fork" else max(1, (os.cpu_count() or 1) // world_size)
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_local_process, args=(fn, r, world_size, port, tuple(args), out, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, bytes] = {}
    errors: dict[int, str] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    grace = None  # after a failure: a few seconds for the other ranks' reports
    try:
        while len(results) + len(errors) < world_size:
            now = time.monotonic()
            if errors and grace is None:
                grace = now + 5.0
            if grace is not None and now > grace:
                break  # the rest are probably blocked in a collective with a failed rank
            if deadline is not None and now > deadline:
                errors[-1] = f"timed out after {timeout:.0f} s"
                break
            try:
                rank, ok, payload = out.get(timeout=1.0)
                (results if ok else errors)[rank] = payload
            except queue.Empty:
                for r, p in enumerate(procs):  # a rank that died without reporting (segfault, os._exit)
                    if not p.is_alive() and r not in results and r not in errors:
                        try:  # its message may still be in flight
                            rank, ok, payload = out.get(timeout=1.0)
                            (results if ok else errors)[rank] = payload
                        except queue.Empty:
                            errors[r] = f"rank {r} exited with code {p.exitcode} without a result"
    finally:
        for p in procs:
            p.join(timeout=2.0 if errors else 30.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"a local process failed:\n{msg}")
    return [pickle.loads(results[r]) for r in range(world_size)]
