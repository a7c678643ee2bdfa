"""Learner throughput: forward+backward tokens/s and MFU of the Megatron-Core learner against
Hugging Face transformers, on the same packed batches.

    python benchmarks/learner.py            # on a GPU: Qwen3-1.7B shape -> benchmarks/results/<device>-learner.json
    python benchmarks/learner.py --smoke    # tiny Qwen3 on CPU (automatic without CUDA) -> cpu-smoke-learner.json

Model: a Qwen3Config of the 1.7B shape (hidden 2048, 28 layers, 16 heads / 8 KV heads, head_dim
128, intermediate 6144, vocab 151,936), random weights drawn once by transformers and saved, so that
both sides hold the *same* weights (the first micro-batch's loss is compared as a sanity check).
`--num-layers` shrinks it when the full model does not fit.

Batches: micro-batches of exactly `--tokens` (8192) tokens, each packed from sequences of random
lengths in [256, 4096] (the last one cut to fit); `--micro-batches` of them per iteration, bf16.

Providers (each iteration = every micro-batch forward + backward, grads accumulated):
  megatron_fwd_bwd     the learner's schedule (`get_forward_backward_func`) with its packed THD
                       attention (TE or flash-attn varlen when installed) and its vocab-parallel
                       log-prob loss; gradients into Megatron's fp32 main-grad buffers
  megatron_train_step  the same plus gradient clipping and the Adam step (`Learner.train_step`)
  hf_fa2_packed        transformers with flash_attention_2, the packed batch as one row with
                       position_ids restarting per sequence (padding-free); when flash-attn is installed
  hf_sdpa_padded       transformers with SDPA on the sequences padded to the longest one
The HF loss is the same mean token log-prob (float32 log_softmax + gather).

MFU = model FLOPs / time / peak: 6 * N * tokens (N = parameters of every matmul, LM head included,
embedding lookup excluded) + causal attention 6 * layers * heads * head_dim * sum(L_i^2) for
forward+backward; the peak is the device's dense bf16 rate (H100 SXM 989 TFLOP/s; `--peak-tflops`
overrides). Padding is not counted as useful work. Timing: CUDA events around each iteration after
`--warmup` iterations, median of `--repeats`; memory: torch.cuda.max_memory_allocated during them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

QWEN3_1_7B = dict(
    vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)  # fmt: skip
FULL = dict(model=QWEN3_1_7B, tokens=8192, min_len=256, max_len=4096, micro_batches=2, warmup=3, repeats=10)
SMOKE = dict(
    model=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    tokens=64, min_len=8, max_len=32, micro_batches=2, warmup=1, repeats=2,
)  # fmt: skip

# dense bf16 peak TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("H200", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# batches and FLOPs


def make_micro_batches(cfg: dict, vocab: int, seed: int = 0) -> list[list[list[int]]]:
    """Each micro-batch: sequences of random lengths in [min_len, max_len] totalling `tokens`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cfg["micro_batches"]):
        seqs, left = [], cfg["tokens"]
        while left > 0:
            n = min(left, int(torch.randint(cfg["min_len"], cfg["max_len"] + 1, (1,), generator=g)))
            seqs.append(torch.randint(0, vocab, (n,), generator=g).tolist())
            left -= n
        out.append(seqs)
    return out


def matmul_params(m: dict) -> int:
    """Parameters that take part in a matmul per token: attention and MLP projections, LM head."""
    h, d, kv, hidden, inter = (m["num_attention_heads"], m["head_dim"], m["num_key_value_heads"],
                               m["hidden_size"], m["intermediate_size"])  # fmt: skip
    per_layer = hidden * h * d + 2 * hidden * kv * d + h * d * hidden + 3 * hidden * inter
    return m["num_hidden_layers"] * per_layer + hidden * m["vocab_size"]


def train_flops(m: dict, micro_batches: list[list[list[int]]]) -> float:
    """Forward+backward model FLOPs of one iteration (causal attention: half the score matrix)."""
    n = matmul_params(m)
    tokens = sum(len(s) for mb in micro_batches for s in mb)
    sq = sum(len(s) ** 2 for mb in micro_batches for s in mb)
    attn = 6.0 * m["num_hidden_layers"] * m["num_attention_heads"] * m["head_dim"] * sq
    return 6.0 * n * tokens + attn


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# ------------------------------------------------------------------------------------------------
# timing


class Timer:
    """Median time of `fn()` over repeats after warm-up; CUDA events on GPU, perf_counter on CPU.
    Also the peak allocated memory during the repeats (GPU)."""

    def __init__(self, cuda: bool, warmup: int, repeats: int):
        self.cuda, self.warmup, self.repeats = cuda, warmup, repeats

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return {"seconds": statistics.median(times), "peak_mem_gb": peak}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Hugging Face


def hf_loss_packed(model, seqs: list[list[int]], device) -> torch.Tensor:
    """Mean token log-prob loss of one packed row (position_ids restart per sequence)."""
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    pos = torch.cat([torch.arange(len(s), device=device) for s in seqs])
    logits = model(input_ids=ids[None], position_ids=pos[None]).logits[0]
    first = torch.zeros(ids.numel(), dtype=torch.bool, device=device)
    first[torch.tensor([0] + [len(s) for s in seqs[:-1]], device=device).cumsum(0)] = True
    # the next token of position t is t+1 unless t+1 starts a new sequence
    lp = logits[:-1].float().log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
    keep = ~first[1:]
    return -(lp * keep).sum() / ids.numel()


def hf_loss_padded(model, seqs: list[list[int]], device) -> torch.Tensor:
    """The same loss with the sequences right-padded to the longest, with an attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -(lp * mask[:, 1:]).sum() / sum(len(s) for s in seqs)


def bench_hf(hf_dir: str, attn: str, packed: bool, micro_batches, timer: Timer, dtype, device) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation=attn).to(device)
    model.train()
    loss_fn = hf_loss_packed if packed else hf_loss_padded
    first_loss = float(loss_fn(model, micro_batches[0], device).detach())

    def step():
        model.zero_grad(set_to_none=True)
        for mb in micro_batches:
            loss_fn(model, mb, device).backward()

    try:
        return {**timer(step), "first_loss": first_loss}
    finally:
        del model
        _free_memory()


# ------------------------------------------------------------------------------------------------
# Megatron


def _packed(seqs):
    from uniopd_mcore.data.packing import pack_sequences

    return pack_sequences(seqs, loss_mask=[[1.0] * len(s) for s in seqs])


def _mean_logprob_loss(logprobs, batch, *, total: int):
    # the learner's log-probs are aligned with the tokens (0 at each sequence's first token)
    return -(logprobs * batch["loss_mask"]).sum() / total, {}


def bench_megatron(hf_dir: str, micro_batches, timer: Timer, dtype, logprob_backend: str) -> list[dict]:
    from uniopd_mcore.learner import Learner, init_distributed
    from uniopd_mcore.learner.spec import resolve_backend

    init_distributed(1, 1)
    learner = Learner(hf_dir, params_dtype=dtype, logprob_backend=logprob_backend)
    batches = [_packed(mb) for mb in micro_batches]
    first_loss = float(learner.compute_logprobs([batches[0]])[0].sum().neg() / batches[0].num_tokens)
    loss_fn = partial(_mean_logprob_loss, total=batches[0].num_tokens)
    rows = []
    backend = resolve_backend("auto")

    def fwd_bwd():
        for m in learner.model:
            m.train()
            m.zero_grad_buffer()
        learner._run(batches, partial(learner._loss_func, loss_fn, len(batches)), forward_only=False)

    rows.append({"provider": "megatron_fwd_bwd", "layer_backend": backend, **timer(fwd_bwd), "first_loss": first_loss})
    rows.append({"provider": "megatron_train_step", "layer_backend": backend,
                 **timer(lambda: learner.train_step(batches, loss_fn)), "first_loss": first_loss})
    del learner
    _free_memory()
    return rows


# ------------------------------------------------------------------------------------------------
# report


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("megatron-core", "transformers", "transformer-engine", "flash-attn", "triton", "mbridge"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def markdown(rows: list[dict]) -> str:
    cols = ["provider", "tokens_per_s", "ms_per_iter", "tflops", "mfu", "peak_mem_gb", "first_loss", "error"]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _guard(fn) -> dict | list:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - an OOM or a missing kernel is a result too
        _free_memory()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (automatic without CUDA)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers when the model does not fit")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (default 8192)")
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak bf16 TFLOP/s")
    parser.add_argument("--skip", nargs="*", default=[], help="providers to skip")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if not cuda:  # tiny CPU ops: several threads on a shared machine only add spin-waiting
        torch.set_num_threads(1)
    cfg = json.loads(json.dumps(SMOKE if smoke else FULL))  # a copy
    for key in ("tokens", "micro_batches", "warmup", "repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.num_layers:
        cfg["model"]["num_hidden_layers"] = args.num_layers
    # bf16 on the GPU; the CPU learner computes in float32 (no bf16 fast path there)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device_name, args.peak_tflops)
    timer = Timer(cuda, cfg["warmup"], cfg["repeats"])

    from transformers import AutoModelForCausalLM, Qwen3Config

    model_cfg = cfg["model"]
    micro_batches = make_micro_batches(cfg, model_cfg["vocab_size"])
    flops = train_flops(model_cfg, micro_batches)
    tokens = sum(len(s) for mb in micro_batches for s in mb)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="uniopd_bench_") as hf_dir:
        # one set of random weights for both sides (drawn on the device: fast), saved once
        torch.manual_seed(0)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(Qwen3Config(**model_cfg), dtype=dtype)
        hf.save_pretrained(hf_dir)
        del hf
        _free_memory()

        if "megatron" not in args.skip:
            got = _guard(lambda: bench_megatron(hf_dir, micro_batches, timer, dtype, "triton" if cuda else "torch"))
            rows += got if isinstance(got, list) else [{"provider": "megatron_fwd_bwd", **got}]
        hf_providers = []
        if cuda and importlib.util.find_spec("flash_attn") is not None:
            hf_providers.append(("hf_fa2_packed", "flash_attention_2", True))
        hf_providers.append(("hf_sdpa_padded", "sdpa", False))
        for name, attn, packed in hf_providers:
            if name in args.skip:
                continue
            rows.append({"provider": name, **_guard(
                lambda: bench_hf(hf_dir, attn, packed, micro_batches, timer, dtype, device))})

    for r in rows:
        if "seconds" in r:
            r["ms_per_iter"] = r["seconds"] * 1e3
            r["tokens_per_s"] = tokens / r["seconds"]
            r["tflops"] = flops / r["seconds"] / 1e12  # the train_step row includes the optimizer's time
            r["mfu"] = r["tflops"] / peak if peak else None
    by = {r["provider"]: r for r in rows if "tokens_per_s" in r}
    ref = by.get("hf_fa2_packed") or by.get("hf_sdpa_padded")
    summary = {}
    if "megatron_fwd_bwd" in by and ref:
        summary["speedup_megatron_vs_" + ref["provider"]] = by["megatron_fwd_bwd"]["tokens_per_s"] / ref["tokens_per_s"]
        # same weights, same tokens: the two losses agree up to bf16 rounding
        summary["first_loss_rel_diff"] = abs(by["megatron_fwd_bwd"]["first_loss"] - ref["first_loss"]) / abs(
            ref["first_loss"])

    result = {
        "device": device_name,
        "smoke": smoke,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "config": {**{k: v for k, v in cfg.items() if k != "model"}, "model": model_cfg,
                   "matmul_params": matmul_params(model_cfg), "tokens_per_iter": tokens,
                   "sequences_per_micro_batch": [len(mb) for mb in micro_batches],
                   "flops_per_iter": flops, "peak_bf16_tflops": peak},
        "rows": rows,
        "summary": summary,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cpu-smoke" if not cuda else device_name.replace(" ", "_").replace("/", "_") + ("-smoke" if smoke else "")
    path = args.out_dir / f"{stem}-learner.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"{device_name}: {model_cfg['num_hidden_layers']} layers, hidden {model_cfg['hidden_size']}, "
          f"{cfg['micro_batches']} x {cfg['tokens']} packed tokens, {result['dtype']}")
    print(markdown(rows))
    if summary:
        print(json.dumps(summary))
    print(f"\nwrote {path}", file=sys.stderr)
    _teardown()
    return result


def _teardown() -> None:
    try:
        from uniopd_mcore.learner.parallel import destroy

        destroy()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
