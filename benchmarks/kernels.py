"""Kernel benchmarks: time and peak memory of the Triton kernels against their baselines.

    python benchmarks/kernels.py              # on a GPU: full shapes -> benchmarks/results/<device>.json/.png
    python benchmarks/kernels.py --smoke      # tiny shapes through the Triton interpreter (default without CUDA)

Three benchmarks, each a list of rows {bench, provider, shape..., fwd_ms, fwdbwd_ms, peak_mb}:
- token_logprobs: T in {8192, 32768, 65536}, V = 151,936, bf16 logits, forward + backward with a
  random per-token upstream gradient; providers: ours, ours with inplace_backward, torch eager
  (fp32 log_softmax + gather), torch.compile of the same, Liger cross entropy when installed.
  The HBM floor is bytes moved / measured device-to-device copy bandwidth, for our 3-pass design
  (forward reads the logits, backward reads them again and writes the gradient) and for the
  2-pass lower bound of any design (read once, write the gradient once).
- advantages: 1M tokens, 4096 sequences, 256 groups: ours vs the recipe's torch function.
- linear: LM head H = 2560 fused (ours, chunked) vs unfused (h @ W^T, then our row kernel) and
  Liger's fused linear cross entropy when installed.
Timing: CUDA events, warm-up runs, median of repeats; memory: torch.cuda.max_memory_allocated after
a reset, minus what was allocated before the step (inputs). Goals are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402

from uniopd_kernels import linear_token_logprobs  # noqa: E402
from uniopd_kernels import token_logprobs  # noqa: E402
from uniopd_kernels import uniopd_advantages  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(
    token_T=[8192, 32768, 65536], vocab=151_936, adv_tokens=1 << 20, adv_seqs=4096, adv_groups=256,
    linear_T=[8192, 32768], hidden=2560, warmup=3, repeats=10,
)  # fmt: skip
SMOKE = dict(
    token_T=[8, 16], vocab=1000, adv_tokens=2000, adv_seqs=32, adv_groups=8,
    linear_T=[16], hidden=32, warmup=1, repeats=2,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(median ms, extra peak MB or None on CPU) of ``fn()``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the practical HBM ceiling."""
    n = (1 << 30) if device == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = measure(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * n / (ms * 1e-3)


def _guard(fn):
    """Run one measurement; an OOM or a missing dependency becomes a note in the row."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - a baseline failing must not stop the others
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


# ------------------------------------------------------------------------------------------------
# token_logprobs
# ------------------------------------------------------------------------------------------------


def _torch_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def setup_token_logprobs(provider: str, n_tok: int, vocab: int, device: str, dtype):
    """-> (forward fn, forward+backward fn) for one provider on fresh inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n_tok, vocab, device=device, generator=gen) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n_tok,), device=device, generator=gen)
    grad = torch.randn(n_tok, device=device, generator=gen)
    if provider == "triton":
        fn = token_logprobs
    elif provider == "triton_inplace":
        fn = lambda x, y: token_logprobs(x, y, inplace_backward=True)  # noqa: E731
    elif provider == "torch_eager":
        fn = _torch_logprobs
    elif provider == "torch_compile":
        fn = torch.compile(_torch_logprobs, dynamic=False)
    elif provider == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss  # lazily: optional dependency

        loss = LigerCrossEntropyLoss(reduction="sum")  # grad computed in its forward
        fn = lambda x, y: -loss(x, y)  # noqa: E731 - a scalar: Liger's reduction="none" backward varies by version
    else:
        raise ValueError(provider)

    def forward():
        with torch.no_grad():
            fn(logits, targets)

    def forward_backward():
        logits.grad = None
        out = fn(logits, targets)
        out.backward(grad if out.dim() else None)

    return forward, forward_backward


def bench_token_logprobs(cfg, device, bandwidth, providers):
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for n_tok in cfg["token_T"]:
        nbytes = n_tok * cfg["vocab"] * torch.tensor([], dtype=dtype).element_size()
        floor3, floor2 = 3 * nbytes / bandwidth * 1e3, 2 * nbytes / bandwidth * 1e3
        for provider in providers:
            def run():
                fwd, step = setup_token_logprobs(provider, n_tok, cfg["vocab"], device, dtype)
                fwd_ms, _ = measure(fwd, device, cfg["warmup"], cfg["repeats"])
                ms, peak = measure(step, device, cfg["warmup"], cfg["repeats"])
                return {"fwd_ms": fwd_ms, "fwdbwd_ms": ms, "peak_mb": peak}

            row = {"bench": "token_logprobs", "provider": provider, "T": n_tok, "V": cfg["vocab"],
                   "dtype": str(dtype).replace("torch.", ""), "floor_3pass_ms": floor3,
                   "floor_2pass_ms": floor2}  # fmt: skip
            row.update(_guard(run))
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------


def advantage_inputs(n_tok: int, n_seq: int, n_groups: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    cuts = torch.sort(torch.randint(0, n_tok + 1, (n_seq - 1,), device=device, generator=gen)).values
    cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), n_tok)]).to(torch.int32)
    student = -torch.rand(n_tok, device=device, generator=gen) * 4
    teacher = -torch.rand(n_tok, device=device, generator=gen) * 4
    teacher[torch.rand(n_tok, device=device, generator=gen) < 0.01] = -100.0
    loss_mask = torch.rand(n_tok, device=device, generator=gen) < 0.9
    group_ids = torch.arange(n_seq, device=device) * n_groups // n_seq
    correct = torch.rand(n_seq, device=device, generator=gen) < 0.5
    return student, teacher, loss_mask, cu, group_ids, correct


def bench_advantages(cfg, device):
    args = advantage_inputs(cfg["adv_tokens"], cfg["adv_seqs"], cfg["adv_groups"], device)
    shape = {"T": cfg["adv_tokens"], "N": cfg["adv_seqs"], "groups": cfg["adv_groups"]}
    rows = []
    providers = {"triton": lambda: uniopd_advantages(*args)}
    try:
        from uniopd_mcore.recipe.advantages import uniopd_advantages as recipe  # lazily: not a kernel dependency

        providers["recipe_torch"] = lambda: recipe(*args, backend="torch")
    except ImportError as exc:
        rows.append({"bench": "advantages", "provider": "recipe_torch", **shape, "error": str(exc)})
    for name, fn in providers.items():
        row = {"bench": "advantages", "provider": name, **shape}
        timed = lambda fn=fn: measure(fn, device, cfg["warmup"], cfg["repeats"])  # noqa: E731
        row.update(_guard(lambda: dict(zip(("fwd_ms", "peak_mb"), timed()))))
        row["fwd_us"] = row["fwd_ms"] * 1e3 if "fwd_ms" in row else None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# fused linear
# ------------------------------------------------------------------------------------------------


def setup_linear(provider: str, n_tok: int, hidden: int, vocab: int, device: str, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n_tok, hidden, device=device, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=gen) / hidden**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n_tok,), device=device, generator=gen)
    g = torch.randn(n_tok, device=device, generator=gen)
    if provider == "fused_triton":
        fn = linear_token_logprobs
    elif provider == "unfused_triton":
        fn = lambda a, b, c: token_logprobs(a @ b.t(), c)  # noqa: E731
    elif provider == "unfused_torch":
        fn = lambda a, b, c: _torch_logprobs(a @ b.t(), c)  # noqa: E731
    elif provider == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # lazily: optional

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        fn = lambda a, b, c: -loss(b, a, c)  # noqa: E731
    else:
        raise ValueError(provider)

    def step():
        h.grad = w.grad = None
        out = fn(h, w, y)
        out.backward(g if out.dim() else None)

    return step


def bench_linear(cfg, device, providers):
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab = cfg["vocab"] if device == "cuda" else 97
    for n_tok in cfg["linear_T"]:
        for provider in providers:
            def run():
                step = setup_linear(provider, n_tok, cfg["hidden"], vocab, device, dtype)
                ms, peak = measure(step, device, max(1, cfg["warmup"] - 1), max(2, cfg["repeats"] // 2))
                return {"fwdbwd_ms": ms, "peak_mb": peak}

            row = {"bench": "linear", "provider": provider, "T": n_tok, "H": cfg["hidden"], "V": vocab,
                   "dtype": str(dtype).replace("torch.", "")}  # fmt: skip
            row.update(_guard(run))
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _get(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and "error" not in r:
            return r
    return None


def goals(rows) -> dict:
    """The targets of the issue, evaluated on the largest shapes measured (None when not measured)."""
    out = {}
    tok = [r for r in rows if r["bench"] == "token_logprobs"]
    big = max((r["T"] for r in tok), default=None)
    ours = _get(rows, bench="token_logprobs", provider="triton", T=big)
    if ours:
        eager = _get(rows, bench="token_logprobs", provider="torch_eager", T=big)
        comp = _get(rows, bench="token_logprobs", provider="torch_compile", T=big)
        out["token_logprobs_vs_floor_3pass (goal <= 1.15)"] = ours["fwdbwd_ms"] / ours["floor_3pass_ms"]
        out["token_logprobs_vs_floor_2pass"] = ours["fwdbwd_ms"] / ours["floor_2pass_ms"]
        out["token_logprobs_speedup_vs_eager (goal >= 3)"] = eager and eager["fwdbwd_ms"] / ours["fwdbwd_ms"]
        out["token_logprobs_speedup_vs_compile (goal >= 1.5)"] = comp and comp["fwdbwd_ms"] / ours["fwdbwd_ms"]
    adv = _get(rows, bench="advantages", provider="triton")
    if adv:
        ref = _get(rows, bench="advantages", provider="recipe_torch")
        out["advantages_us (goal < 100)"] = adv["fwd_us"]
        out["advantages_speedup_vs_torch (goal >= 20)"] = ref and ref["fwd_ms"] / adv["fwd_ms"]
    lin = [r for r in rows if r["bench"] == "linear"]
    big = max((r["T"] for r in lin), default=None)
    fused = _get(rows, bench="linear", provider="fused_triton", T=big)
    unfused = _get(rows, bench="linear", provider="unfused_triton", T=big)
    if fused and unfused:
        mem = fused["peak_mb"] / unfused["peak_mb"] if fused["peak_mb"] and unfused["peak_mb"] else None
        out["linear_memory_ratio (goal <= 0.125)"] = mem
        out["linear_time_ratio (goal <= 1.1)"] = fused["fwdbwd_ms"] / unfused["fwdbwd_ms"]
    return out


def markdown(rows, goal) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = ["bench", "provider", "T", "V", "H", "N", "fwd_ms", "fwdbwd_ms", "peak_mb", "floor_3pass_ms", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "| goal | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in goal.items()]
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = [r for r in rows if r["bench"] == "token_logprobs" and "error" not in r]
    providers = sorted({r["provider"] for r in tok})
    sizes = sorted({r["T"] for r in tok})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        xs = [j + i * width for j, t in enumerate(sizes) if _get(tok, provider=p, T=t)]
        for ax, key in zip(axes, ("fwdbwd_ms", "peak_mb")):
            ys = [(_get(tok, provider=p, T=t) or {}).get(key) or 0.0 for t in sizes if _get(tok, provider=p, T=t)]
            ax.bar(xs, ys, width, label=p)
    floors = [(j, _get(tok, T=t)["floor_3pass_ms"]) for j, t in enumerate(sizes) if _get(tok, T=t)]
    if floors:
        axes[0].plot(*zip(*floors), "k_", markersize=30, label="HBM floor (3 passes)")
    for ax, title in zip(axes, ("token_logprobs fwd+bwd (ms)", "extra peak memory (MB)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"T={t}" for t in sizes])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (automatic without CUDA)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--skip", nargs="*", default=[], help="benchmarks to skip: token_logprobs advantages linear")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke or device == "cpu"
    cfg = SMOKE if smoke else FULL
    # torch.compile on CPU needs a C++ toolchain and minutes: the smoke run leaves it out.
    token_providers = ["triton", "triton_inplace", "torch_eager"] + ([] if smoke else ["torch_compile", "liger"])
    linear_providers = ["fused_triton", "unfused_triton", "unfused_torch"] + ([] if smoke else ["liger_flce"])

    bandwidth = copy_bandwidth(device)
    rows = []
    if "token_logprobs" not in args.skip:
        rows += bench_token_logprobs(cfg, device, bandwidth, token_providers)
    if "advantages" not in args.skip:
        rows += bench_advantages(cfg, device)
    if "linear" not in args.skip:
        rows += bench_linear(cfg, device, linear_providers)
    goal = goals(rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = {
        "device": name,
        "smoke": smoke,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "config": cfg,
        "rows": rows,
        "goals": goal,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cpu-smoke" if device == "cpu" else name.replace(" ", "_").replace("/", "_") + ("-smoke" if smoke else "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(rows, args.out_dir / f"{stem}.png")
    print(markdown(rows, goal))
    print(f"\nwrote {args.out_dir / (stem + '.json')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
