"""The ``gdpo`` command line: ``gdpo <command> [--config FILE] [key=value ...]``."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from gdpo.config import ConfigError, config_reference, load_config, to_dict

README = Path(__file__).resolve().parent.parent / "README.md"
_REF_BLOCK = re.compile(r"(<!-- config-reference:start -->\n)(.*?)(<!-- config-reference:end -->)", re.DOTALL)


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default=None, help="YAML preset (default: configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.prompts_per_step=8")
    return p


def cmd_sft(args) -> int:
    from gdpo.tasks.tiny_policy import ensure_tiny_policy

    cfg = load_config(args.config, args.overrides)
    path = ensure_tiny_policy(cfg.sft)
    stats = json.loads((path / "build.json").read_text())
    print(json.dumps({"path": str(path), **stats}, indent=2))
    return 0


def cmd_train(args) -> int:
    from gdpo.policy import resolve_model_path
    from gdpo.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resolve_model_path(cfg))
    print_summary(summary, cfg.trainer.output_dir)
    return 0


def print_summary(summary: dict, output_dir: str) -> None:
    base, final = summary["baseline"], summary["final"]
    print(f"\n{'held-out':<22}{'baseline':>12}{'final':>12}{'change':>12}")
    acc_change = 100 * (final["accuracy"] - base["accuracy"])
    tok_change = 100 * (final["mean_tokens"] / base["mean_tokens"] - 1) if base["mean_tokens"] else float("nan")
    print(f"{'accuracy':<22}{base['accuracy']:>12.1%}{final['accuracy']:>12.1%}{acc_change:>+11.1f}pt")
    print(f"{'mean tokens':<22}{base['mean_tokens']:>12.1f}{final['mean_tokens']:>12.1f}{tok_change:>+11.1f}%")
    print(f"{'p90 tokens':<22}{base['p90_tokens']:>12.1f}{final['p90_tokens']:>12.1f}")
    print(f"{'truncation rate':<22}{base['truncation_rate']:>12.1%}{final['truncation_rate']:>12.1%}")
    print(f"outputs: {output_dir} (summary.json, metrics.jsonl, final/, checkpoints/)")


def cmd_demo(args) -> int:
    """The main job: GDPO training of the tiny policy on the embedded default (SFT warm start on first run)."""
    return cmd_train(args)


def cmd_check_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_config_doc(args) -> int:
    ref = config_reference()
    if not args.write:
        print(ref, end="")
        return 0
    text = README.read_text()
    if not _REF_BLOCK.search(text):
        print(f"{README} has no <!-- config-reference:start/end --> block", file=sys.stderr)
        return 1
    README.write_text(_REF_BLOCK.sub(lambda m: m.group(1) + ref + m.group(3), text))
    print(f"updated the config reference in {README}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _with_config(sub.add_parser("train", help="GDPO/GRPO training on Ray (embedded Ray unless cluster.address)")).set_defaults(fn=cmd_train)
    _with_config(sub.add_parser("sft", help="build (or reuse) the tiny SFT policy")).set_defaults(fn=cmd_sft)
    _with_config(sub.add_parser("demo", help="the main job on the embedded default config")).set_defaults(fn=cmd_demo)
    _with_config(sub.add_parser("check-config", help="validate a config and print it resolved")).set_defaults(fn=cmd_check_config)
    doc = sub.add_parser("config-doc", help="print (or --write into README.md) the config reference")
    doc.add_argument("--write", action="store_true")
    doc.set_defaults(fn=cmd_config_doc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"gdpo: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
