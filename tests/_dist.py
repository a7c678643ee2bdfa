"""Run a function in N local processes that form a torch.distributed world (gloo on 127.0.0.1).

    from _dist import run_distributed
    results = run_distributed(fn, world_size=2, args=(...,))   # fn(rank, world_size, *args)

Each process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT in
its environment (so `init_distributed()` / `dist.init_process_group("gloo")` just work), runs
`fn`, and sends back its (picklable) return value. If any rank raises, the others are stopped
and a RuntimeError with every failing rank's traceback is raised in the caller. `fn` must be a
module-level function (it is pickled with "spawn"). "fork" is the default on Linux and is faster
because the children do not re-import torch/Megatron; "spawn" is used instead when the parent
has already initialised torch.distributed or CUDA, which a forked child cannot reuse.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, args: Sequence, env: dict, out) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(1)  # N processes share few cores
        result = fn(rank, world_size, *args)
        # pickle here (by value, no shared memory) so that an unpicklable result is reported
        # instead of dying silently in the queue's feeder thread
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _fork_is_safe() -> bool:
    """A forked child inherits the parent's process group and CUDA context, and can use
    neither: then fall back to "spawn" (slower: the children re-import torch)."""
    if not sys.platform.startswith("linux"):
        return False
    import torch
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) and not torch.cuda.is_initialized()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    timeout: float = 300.0,
    start_method: str | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` processes; return results ordered by rank."""
    method = start_method or ("fork" if _fork_is_safe() else "spawn")
    ctx = mp.get_context(method)
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, tuple(args), dict(env or {}), out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            errors.setdefault(-1, f"timed out after {timeout:.0f}s")
            break
        try:
            rank, ok, payload = out.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in errors]
            # a rank that died without reporting (segfault, os._exit)
            for r in dead:
                time.sleep(0.5)  # its message may still be in flight
                try:
                    rank, ok, payload = out.get_nowait()
                    (results if ok else errors)[rank] = payload
                except queue.Empty:
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
            continue
        if ok:
            results[rank] = payload
        else:
            errors[rank] = payload
            # peers are probably blocked in a collective with the failed rank: give them a moment
            grace = time.monotonic() + 5.0
            while len(results) + len(errors) < world_size and time.monotonic() < grace:
                try:
                    r2, ok2, p2 = out.get(timeout=0.5)
                    (results if ok2 else errors)[r2] = p2
                except queue.Empty:
                    pass
            break
    for p in procs:
        p.join(timeout=5.0)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5.0)
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"distributed run failed:\n{msg}")
    return [pickle.loads(results[r]) for r in range(world_size)]
