"""`uniopd-mcore verify-conversion HF_DIR --tp N --pp M`: Hugging Face vs Megatron-Core logits.

Starts tp*pp local processes (gloo on CPU, nccl on GPU), loads HF_DIR into the learner's
Megatron-Core GPTModel at that TP/PP layout (mbridge, `learner.hf_weights`), runs a few packed
sequences of random tokens through it, gathers the logits over TP on the last pipeline stage,
and compares them with Hugging Face transformers' logits for the same sequences (each run on its
own). Both sides run in float32 so that the difference measures the conversion, not precision.

Exit codes: 0 within tolerance, 1 beyond it (or not finite), 2 on errors (bad directory, a
worker failed). `--json` prints exactly one JSON line.

`run_local_processes(fn, world_size, args)` is the launcher used here and by `uniopd-mcore
export`: fn(rank, world_size, *args) in fresh ("spawn") non-daemonic processes that form a
torch.distributed world on 127.0.0.1.

Checking the checker: a checkpoint file corrupted on disk is read identically by both sides, so
it cannot produce a disagreement. `UNIOPD_VERIFY_PERTURB="<megatron param name>=<delta>"` adds
`delta` to one Megatron parameter after loading (a simulated conversion bug) so that tests can
see the check fail.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

PERTURB_ENV = "UNIOPD_VERIFY_PERTURB"


class VerifyError(RuntimeError):
    """A problem that prevents the comparison (exit code 2)."""


# ------------------------------------------------------------------------------------------------
# local launcher


def _free_port() -> int:
    # (not parallel.free_port: that module imports Megatron, which the parent does not need)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, args: Sequence, out) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch

        if not torch.cuda.is_available():  # the processes share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        out.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_local_processes(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                        *, timeout: float | None = None) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` fresh local processes; results by rank.

    `fn` must be importable (module level). If a rank fails, the others are stopped and
    VerifyError carries the failing rank's traceback. "spawn" because a forked child cannot reuse
    CUDA or a process group of its parent; non-daemonic so that the workers may start processes
    of their own.
    """
    import torch

    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise VerifyError(f"{world_size} processes need {world_size} GPUs, {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, tuple(args), out)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size and not errors:
            if deadline is not None and time.monotonic() > deadline:
                errors[-1] = f"timed out after {timeout:.0f} s"
                break
            try:
                rank, ok, payload = out.get(timeout=1.0)
                (results if ok else errors)[rank] = payload
            except queue.Empty:
                for r, p in enumerate(procs):
                    if not p.is_alive() and r not in results and r not in errors:
                        try:  # its message may still be in flight
                            rank, ok, payload = out.get(timeout=2.0)
                            (results if ok else errors)[rank] = payload
                        except queue.Empty:
                            errors[r] = f"rank {r} exited with code {p.exitcode} without a result"
    finally:
        for p in procs:  # peers of a failed rank are stuck in a collective
            p.join(timeout=2.0 if errors else 30.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise VerifyError(f"a worker process failed:\n{msg}")
    return [results[r] for r in range(world_size)]


# ------------------------------------------------------------------------------------------------
# the comparison


def check_hf_dir(hf_dir: str | os.PathLike) -> Path:
    """A directory with config.json and safetensors weights, or VerifyError naming the path."""
    p = Path(hf_dir)
    if not p.exists():
        raise VerifyError(f"{p}: no such directory")
    if not p.is_dir():
        raise VerifyError(f"{p}: not a directory")
    if not (p / "config.json").is_file():
        raise VerifyError(f"{p}: not a Hugging Face model directory (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise VerifyError(f"{p}: no *.safetensors weights (only safetensors checkpoints are converted)")
    return p


def random_packed_sequences(vocab_size: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Three sequences of different lengths (seq_len, 2/3 and 1/3 of it), uniform random tokens."""
    import torch

    lengths = sorted({max(1, seq_len), max(1, (2 * seq_len) // 3), max(1, seq_len // 3)}, reverse=True)
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _perturb(module) -> None:
    spec = os.environ.get(PERTURB_ENV)
    if not spec:
        return
    import torch

    name, delta = spec.rsplit("=", 1)
    params = dict(module.named_parameters())
    if name in params:  # only on the stage/rank that holds it
        with torch.no_grad():
            params[name].add_(float(delta))


def _verify_worker(rank: int, world: int, hf_dir: str, tp: int, pp: int, seqs: list[list[int]]) -> dict | None:
    import gc

    import torch
    from megatron.core import parallel_state

    from uniopd_mcore.data.packing import pack_sequences
    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(tp, pp)
    learner = Learner(hf_dir, params_dtype=torch.float32)
    _perturb(learner.module)
    logits = learner.full_logits([pack_sequences(seqs)])  # [T, V] on the last stage, else None
    holder = logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
    del learner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not holder:
        return None
    # the reference runs after the Megatron model is gone, in the process holding its logits
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        ref = torch.cat([model(torch.tensor(s, device=device)[None]).logits[0].float().cpu() for s in seqs])
    got = logits[0].float()
    if got.shape != ref.shape:
        raise VerifyError(f"logit shapes differ: Megatron {tuple(got.shape)}, HF {tuple(ref.shape)}")
    diff = (got - ref).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(ref.abs().max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def verify_conversion(hf_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1, tolerance: float = 1e-3,
                      seq_len: int = 64, seed: int = 0, timeout: float | None = None) -> dict[str, Any]:
    """Run the comparison; returns the report (VerifyError when it cannot be made)."""
    if tp < 1 or pp < 1:
        raise VerifyError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp})")
    if seq_len < 1:
        raise VerifyError(f"--seq-len must be >= 1 (got {seq_len})")
    path = check_hf_dir(hf_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path / 'config.json'}: unreadable ({e})") from e
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not vocab:
        raise VerifyError(f"{path / 'config.json'}: no vocab_size")
    num_layers = config.get("num_hidden_layers")
    if num_layers is not None and pp > num_layers:
        raise VerifyError(f"--pp {pp} is larger than the model's {num_layers} layers")
    seqs = random_packed_sequences(int(vocab), seq_len, seed)
    t0 = time.perf_counter()
    try:
        results = run_local_processes(_verify_worker, tp * pp, (str(path), tp, pp, seqs), timeout=timeout)
    except VerifyError as e:
        # first line: the summary (the last line of the worker's traceback); then the details
        last = str(e).strip().splitlines()[-1]
        raise VerifyError(f"{path} at TP={tp} PP={pp}: {last}\n{e}") from None
    found = [r for r in results if r is not None]
    if len(found) != 1:
        raise VerifyError(f"expected logits from one process, got {len(found)}")
    report = found[0]
    diff = report["max_abs_logit_diff"]
    report.update(
        ok=bool(math.isfinite(diff) and diff <= tolerance), tp=tp, pp=pp, tolerance=tolerance,
        hf_dir=str(path), seq_lens=[len(s) for s in seqs], num_tokens=sum(len(s) for s in seqs),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return report


def verify_conversion_cli(hf_dir: str, *, tp: int = 1, pp: int = 1, as_json: bool = False,
                          tolerance: float = 1e-3, seq_len: int = 64) -> int:
    """`uniopd-mcore verify-conversion`: prints the result, returns the exit code."""
    try:
        report = verify_conversion(hf_dir, tp=tp, pp=pp, tolerance=tolerance, seq_len=seq_len)
    except VerifyError as e:
        msg = str(e)
        print(f"verify-conversion: {msg}", file=sys.stderr)
        if as_json:
            print(json.dumps({"ok": False, "error": msg.splitlines()[0], "max_abs_logit_diff": None, "tp": tp, "pp": pp,
                              "tolerance": tolerance, "hf_dir": str(hf_dir)}))
        return 2
    if as_json:
        print(json.dumps(report))
    else:
        verdict = "OK" if report["ok"] else "MISMATCH"
        print(f"{verdict}: max |logit diff| = {report['max_abs_logit_diff']:.3e} "
              f"(tolerance {tolerance:g}), mean {report['mean_abs_logit_diff']:.3e}, "
              f"argmax agreement {report['argmax_agreement']:.4f}, max |logit| {report['max_abs_logit']:.2f}")
        print(f"  {report['hf_dir']} at TP={tp} PP={pp}, sequences {report['seq_lens']} packed, "
              f"on {report['device']}, {report['seconds']} s")
    return 0 if report["ok"] else 1
