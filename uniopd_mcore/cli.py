"""`uniopd-mcore`: the command line.

    uniopd-mcore demo  [--run-dir runs/demo]                       the embedded CPU example, end to end
    uniopd-mcore train --config CFG.yaml [key.sub=value ...] [--resume]
    uniopd-mcore sft   --config CFG.yaml --out DIR [key.sub=value ...]
    uniopd-mcore plot  RUN_DIR [--out PNG]
    uniopd-mcore export CKPT_DIR --hf-template HF_DIR --out OUT_DIR
    uniopd-mcore verify-conversion HF_DIR --tp N --pp M [--json]
    uniopd-mcore balance-data --config CFG.yaml --out FILE [--k 8]

Multi-process runs start under torchrun, e.g.
    torchrun --nproc-per-node 8 -m uniopd_mcore.cli train --config examples/configs/qwen3_30b_a3b_to_4b.yaml
"""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file (examples/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML")


def cmd_train(args) -> int:
    from uniopd_mcore.config import load_config
    from uniopd_mcore.run import run_train

    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    run_train(cfg)
    return 0


def cmd_sft(args) -> int:
    from uniopd_mcore.config import load_config
    from uniopd_mcore.run import run_sft

    cfg = load_config(args.config, list(args.overrides))
    run_sft(cfg, args.out)
    return 0


def cmd_demo(args) -> int:
    from uniopd_mcore.demo import run_demo

    summary = run_demo(args.run_dir, fast=args.fast)
    print(f"[demo] summary written to {args.run_dir}/summary.json: {summary}")
    return 0


def cmd_plot(args) -> int:
    from uniopd_mcore.metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_export(args) -> int:
    from uniopd_mcore.run import run_export

    run_export(args.checkpoint, args.hf_template, args.out, tp=args.tp, pp=args.pp)
    return 0


def cmd_verify_conversion(args) -> int:
    from uniopd_mcore.learner.verify import verify_conversion_cli

    return verify_conversion_cli(args.hf_dir, tp=args.tp, pp=args.pp, as_json=args.json,
                                 tolerance=args.tolerance, seq_len=args.seq_len)


def cmd_balance_data(args) -> int:
    from uniopd_mcore.config import load_config
    from uniopd_mcore.run import run_balance_data

    cfg = load_config(args.config, list(args.overrides))
    run_balance_data(cfg, args.out, k=args.k)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniopd-mcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run Uni-OPD training")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="supervised fine-tuning with the same learner (NLL loss)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="directory for the fine-tuned Hugging Face checkpoint")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("demo", help="the embedded CPU example end to end (what `make demo` runs)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="tiny sizes, for tests (not a meaningful result)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="draw a run's metrics to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export", help="learner checkpoint -> Hugging Face safetensors")
    p.add_argument("checkpoint")
    p.add_argument("--hf-template", required=True, help="HF dir whose config/tokenizer describe the model")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify-conversion", help="HF vs Megatron logits on random tokens")
    p.add_argument("hf_dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON line with max_abs_logit_diff")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=64)
    p.set_defaults(func=cmd_verify_conversion)

    p = sub.add_parser("balance-data", help="offline difficulty-aware balancing of a prompt file")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="balanced JSONL to write (a PNG histogram goes beside it)")
    p.add_argument("--k", type=int, default=8, help="student rollouts per prompt to estimate pass rates")
    p.set_defaults(func=cmd_balance_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    from uniopd_mcore.config import ConfigError
    from uniopd_mcore.data.prompts import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as exc:
        # bad configuration or data: the message names the key / file, row and field
        print(f"uniopd-mcore {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
