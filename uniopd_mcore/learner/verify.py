"""`uniopd-mcore verify-conversion HF_DIR --tp N --pp M`: Hugging Face vs Megatron-Core logits.

Starts tp*pp local processes (gloo on CPU, nccl on GPU), loads HF_DIR into the learner's
Megatron-Core GPTModel at that TP/PP layout (mbridge, `learner.hf_weights`), runs a few packed
sequences of random tokens through it, gathers the logits over TP on the last pipeline stage,
and compares them with Hugging Face transformers' logits for the same sequences (each run on its
own). Both sides run in float32 so that the difference measures the conversion, not precision.

Exit codes: 0 within tolerance, 1 beyond it (or not finite), 2 on errors (bad directory, a
worker failed). `--json` prints exactly one JSON line.

The tp*pp processes are started by `learner.parallel.run_local_processes` (spawned, not forked).

Checking the checker: a checkpoint file corrupted on disk is read identically by both sides, so
it cannot produce a disagreement. `UNIOPD_VERIFY_PERTURB="<megatron param name>=<delta>"` adds
`delta` to one Megatron parameter after loading (a simulated conversion bug) so that tests can
see the check fail.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

PERTURB_ENV = "UNIOPD_VERIFY_PERTURB"


class VerifyError(RuntimeError):
    """A problem that prevents the comparison (exit code 2)."""


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
    from uniopd_mcore.learner.parallel import run_local_processes

    seqs = random_packed_sequences(int(vocab), seq_len, seed)
    t0 = time.perf_counter()
    try:
        results = run_local_processes(_verify_worker, tp * pp, (str(path), tp, pp, seqs), timeout=timeout)
    except RuntimeError as e:  # a worker failed, or more processes than GPUs
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
