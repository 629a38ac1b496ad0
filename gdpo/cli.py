"""The ``gdpo`` command line: ``gdpo <command> [--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from gdpo.config import ConfigError, config_reference, load_config, to_dict
from gdpo.data import DataError

README = Path(__file__).resolve().parent.parent / "README.md"
_REF_BLOCK = re.compile(r"(<!-- config-reference:start -->\n)(.*?)(<!-- config-reference:end -->)", re.DOTALL)


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default=None, help="YAML file or preset name (configs/; default: tiny_cpu)")
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
    from gdpo.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
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
    if "tokens_over_floor" in final:  # the task knows each problem's shortest correct solution
        label = f"x floor ({final['floor_tokens']:.1f} tok)"
        print(f"{label:<22}{base['tokens_over_floor']:>12.2f}{final['tokens_over_floor']:>12.2f}")
        print(f"{'shortcut rate':<22}{base['shortcut_rate']:>12.1%}{final['shortcut_rate']:>12.1%}")
    print(f"outputs: {output_dir} (summary.json, metrics.jsonl, final/, checkpoints/)")


def cmd_demo(args) -> int:
    """The main job: GDPO training of the tiny policy on the embedded default (SFT warm start on first run)."""
    return cmd_train(args)


def cmd_eval(args) -> int:
    from gdpo.eval.evaluate import EvalSettings, evaluate_model

    cfg = load_config(args.config, args.overrides)
    try:
        ks = tuple(int(k) for k in args.pass_k.split(",") if k.strip()) if args.pass_k else (1,)
    except ValueError:
        print(f"gdpo eval: --pass-k must be comma-separated integers, got {args.pass_k!r}", file=sys.stderr)
        return 2
    settings = EvalSettings(
        model=args.model,
        data=args.data,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        limit=args.limit,
        seed=args.seed,
        base=args.base,
        pass_ks=ks,
        lora=args.lora,
    )
    results = evaluate_model(settings, cfg, args.out)
    print_eval(results, args.out)
    return 0


def print_eval(results: dict, out: str) -> None:
    m, vs = results["metrics"], results["against_base"]
    rows = [("pass@1 (accuracy)", f"{m['accuracy']:.1%}")]
    rows += [(k, f"{v:.1%}") for k, v in m.items() if k.startswith("pass@") and k != "pass@1"]
    rows += [
        ("mean / median / p90 tokens", f"{m['mean_tokens']:.1f} / {m['median_tokens']:.1f} / {m['p90_tokens']:.1f}"),
        ("tokens correct / incorrect", f"{m['mean_tokens_correct']:.1f} / {m['mean_tokens_incorrect']:.1f}"),
        ("truncation rate", f"{m['truncation_rate']:.1%}"),
        ("accuracy per 1k tokens", f"{m['accuracy_per_1k_tokens']:.2f}"),
    ]
    if vs:
        c = vs["aes_coefficients"]
        rows += [
            ("token reduction vs base", f"{vs['token_reduction_pct']:+.1f}%"),
            ("accuracy change vs base", f"{vs['accuracy_change_pt']:+.1f}pt"),
            (f"AES (a={c['alpha']:g}, b={c['beta']:g}, g={c['gamma']:g})", f"{vs['aes']:+.3f}"),
        ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{m['prompts']} prompts x {m['samples_per_prompt']} samples of {results['data']}")
    for name, value in rows:
        print(f"{name:<{width}}{value:>16}")
    print(f"outputs: {out} (results.json, samples.jsonl)")


def cmd_report(args) -> int:
    from gdpo.eval.report import write_report

    page = write_report(args.dirs, args.out, title=args.title)
    print(f"report: {page} (and report.md, PNGs in {args.out})")
    return 0


def cmd_compare(args) -> int:
    from gdpo.eval.compare import compare, parse_arms

    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    joint = [j.strip() for j in args.joint.split(",") if j.strip()] if args.joint else []
    summary = compare(
        args.config,
        args.overrides,
        parse_arms(estimators, args.arm or []),
        args.seeds,
        args.out,
        args.samples_per_prompt,
        joint,
    )
    head, body = summary["table"]["head"], summary["table"]["body"]
    widths = [max(len(r[i]) for r in [head, *body]) + 2 for i in range(len(head))]
    for row in [head, *body]:
        print("".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"{summary['seconds'] / 60:.1f} min; report: {args.out}/report.html")
    return 0


def cmd_compress(args) -> int:
    from gdpo.compress import CompressSettings, results_table, run_compress

    cfg = load_config(args.config, args.overrides)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    settings = CompressSettings(
        model=args.model,
        out=args.out,
        pipeline=args.pipeline,
        bits=args.bits,
        calib=args.calib,
        calib_samples=args.calib_samples,
        eval_data=args.eval_data,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        methods=methods,
        lm_head=args.lm_head,
        embedding=args.embedding,
        seed=args.seed,
        grid_points=args.grid_points,
        grid_act_points=args.grid_act_points,
        grid_rounds=args.grid_rounds,
        rank=args.rank,
        factor_bits=args.factor_bits,
        target=args.target,
    )
    results = run_compress(settings, cfg)
    table = results_table(results)
    widths = [max(len(r[i]) for r in table) + 2 for i in range(len(table[0]))]
    what = results.get("setting") or results["pipeline"]
    print(f"\n{what} on {results['held_out']['prompts']} held-out prompts of {results['held_out']['data']}")
    for row in table:
        print("".join(c.rjust(w) for c, w in zip(row, widths)))
    for name, row in results.get("variants", {}).items():
        print(f"  {name}: {row['ran']}")
    export = results.get("export")
    if export:
        b = export["bytes"]
        print(
            f"served checkpoint: {export['path']} ({export['format']}); quantized layers {b['quantized'] / 1e6:.3f} MB "
            f"on disk = {b['quantized_ratio']:.3f}x bf16"
            + ("" if export["served_here"]["ok"] else f"; {export['served_here']['why']}")
        )
    outputs = (
        "results.json, report/, evals/, compressed/, served/, adapters/"
        if "variants" in results
        else "results.json, samples.jsonl, model/"
    )
    print(f"{results['seconds'] / 60:.1f} min; outputs: {args.out} ({outputs})")
    return 0


def cmd_ofq(args) -> int:
    from compression.ofq.experiment import load_ofq_config, run_ofq

    cfg = load_ofq_config(args.config, args.overrides)
    results = run_ofq(cfg, args.out)
    print(f"\nfull precision: {results['full_precision']['test_accuracy']:.1%} test accuracy")
    print(f"{'run':>12}{'accuracy':>10}{'oscillation rate':>18}{'near boundary':>15}")
    for name, r in results["runs"].items():
        print(
            f"{name:>12}{r['test_accuracy']:>10.1%}{r['final_oscillation_rate']:>18.2e}{r['final_near_boundary']:>15.1%}"
        )
    print(f"{results['seconds'] / 60:.1f} min; outputs: {args.out} (results.json, ofq.png, fp/)")
    return 0


def cmd_check_config(args) -> int:
    """The config resolved and validated, then the preflight ``gdpo train`` runs before any worker starts
    (model, tokenizer, data, templates, context, rewards' fields)."""
    from gdpo.preflight import check_run

    cfg = load_config(args.config, args.overrides)
    check_run(cfg, log=lambda msg: print(f"gdpo check-config: {msg}", file=sys.stderr))
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
    _with_config(
        sub.add_parser("train", help="GDPO/GRPO training on Ray (embedded Ray unless cluster.address)")
    ).set_defaults(fn=cmd_train)
    _with_config(sub.add_parser("sft", help="build (or reuse) the tiny SFT policy")).set_defaults(fn=cmd_sft)
    _with_config(sub.add_parser("demo", help="the main job on the embedded default config")).set_defaults(fn=cmd_demo)
    _with_config(sub.add_parser("check-config", help="validate a config and print it resolved")).set_defaults(
        fn=cmd_check_config
    )
    ev = _with_config(sub.add_parser("eval", help="token-efficiency evaluation of a model on vLLM"))
    ev.add_argument("--model", required=True, help="HF model dir, a run dir or its final/, or builtin:tiny-chain-arith")
    ev.add_argument(
        "--data", required=True, help="task:chain_arith, a JSONL file (e.g. GSM8K's), or hf:NAME[:CONFIG]:SPLIT"
    )
    ev.add_argument("--samples-per-prompt", type=int, default=1, help="n samples per prompt (pass@1 is their mean)")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--out", required=True, help="output directory (results.json, samples.jsonl)")
    ev.add_argument("--base", default=None, help="eval directory of the base model, to report changes against")
    ev.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default: rollout.eval_temperature for 1 sample, rollout.temperature for more",
    )
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--limit", type=int, default=0, help="prompts to use (0 = all; a task gives data.eval_size)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--pass-k", default="1", help="comma-separated k for pass@k besides pass@n")
    ev.add_argument("--lora", default=None, help="a LoRA adapter directory (peft layout) to serve on top of --model")
    ev.set_defaults(fn=cmd_eval)
    rep = sub.add_parser("report", help="report.md / report.html / PNGs over eval dirs and training runs")
    rep.add_argument("dirs", nargs="+", help="eval directories (gdpo eval) and/or training run directories")
    rep.add_argument("--out", required=True)
    rep.add_argument("--title", default="gdpo token-efficiency report")
    rep.set_defaults(fn=cmd_report)
    cmp_ = _with_config(sub.add_parser("compare", help="train and evaluate each estimator over seeds, then report"))
    cmp_.add_argument(
        "--estimators",
        default="grpo,gdpo",
        help="arms: grpo, gdpo, grpo-matched (GRPO with reward weights divided by their spread on the base)",
    )
    cmp_.add_argument("--arm", action="append", help="another arm: 'NAME: key=value ...' (repeatable)")
    cmp_.add_argument("--joint", default="", help="comma-separated rewards that must all reach 1 for a joint success")
    cmp_.add_argument("--seeds", type=int, default=3)
    cmp_.add_argument("--samples-per-prompt", type=int, default=4, help="samples per held-out prompt in the evals")
    cmp_.add_argument("--out", required=True)
    cmp_.set_defaults(fn=cmd_compare)
    cp = _with_config(
        sub.add_parser("compress", help="post-training compression (LLM-FP4, pruning, EoRA) against full precision")
    )
    cp.add_argument(
        "--model",
        "--policy",
        dest="model",
        required=True,
        help="HF model dir, a run dir or its final/, or builtin:tiny-chain-arith",
    )
    cp.add_argument(
        "--pipeline",
        default="fp4",
        help="fp4 (compare quantizers), or a compressor (fp4, gptq, prune24, prune50) followed by eora",
    )
    cp.add_argument("--rank", type=int, default=32, help="EoRA / SVD compensation rank")
    cp.add_argument("--factor-bits", type=int, default=None, help="quantize compensation factors to 4 or 8 bits")
    cp.add_argument(
        "--bits", default=None, help="w4a4 (the fp4 default), w4a8, w8a8, or weight-only w4 / w8 (the gptq default: w4)"
    )
    cp.add_argument(
        "--target",
        default=None,
        help="fp4 deployment format the search must fit and the pipeline exports: vllm-w4a16 (default for a "
        "pipeline), nvfp4, mxfp4, or sim (the research path; default for --pipeline fp4)",
    )
    cp.add_argument("--calib", default="task:chain_arith", help="calibration data spec (its train split)")
    cp.add_argument("--calib-samples", type=int, default=128)
    cp.add_argument("--eval-data", default=None, help="held-out data spec (its eval split); default: --calib's")
    cp.add_argument(
        "--eval-limit", type=int, default=0, help="held-out prompts (0 = data.eval_size for a task, else all)"
    )
    cp.add_argument("--max-new-tokens", type=int, default=128)
    cp.add_argument(
        "--methods",
        default="minmax_int,minmax_fp,search",
        help="quantizers to compare: minmax_int, minmax_fp, search, search_pertensor",
    )
    cp.add_argument("--lm-head", action="store_true", help="quantize the output head too")
    cp.add_argument("--embedding", action="store_true", help="quantize the input embedding (weight-only)")
    cp.add_argument("--grid-points", type=int, default=100, help="search: weight max-value candidates per format")
    cp.add_argument("--grid-act-points", type=int, default=50, help="search: activation candidates per format")
    cp.add_argument("--grid-rounds", type=int, default=3, help="search: activation/weight alternations")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--out", required=True)
    cp.set_defaults(fn=cmd_compress)
    oq = sub.add_parser("ofq", help="OFQ vs LSQ quantization-aware training of a vision transformer")
    oq.add_argument("--config", default="ofq_digits_cpu", help="YAML file or preset name (configs/)")
    oq.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    oq.add_argument("--out", required=True)
    oq.set_defaults(fn=cmd_ofq)
    doc = sub.add_parser("config-doc", help="print (or --write into README.md) the config reference")
    doc.add_argument("--write", action="store_true")
    doc.set_defaults(fn=cmd_config_doc)
    return parser


def _input_errors() -> tuple[type, ...]:
    """Errors that mean bad input (a key, flag, file or sample the message names): exit code 2."""
    from gdpo.compress import CompressError
    from gdpo.eval.evaluate import EvalError
    from gdpo.eval.report import ReportError
    from rewards import RewardError

    return ConfigError, DataError, RewardError, EvalError, ReportError, CompressError


def _run_failures() -> tuple[type, ...]:
    """A run that started and then stopped for a reason its message gives (exit code 1)."""
    try:
        from actors.cluster import LearnerFailed, WorkerFailed
    except ImportError:  # no Ray installed: no run could have started
        return ()
    return LearnerFailed, WorkerFailed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _input_errors() as err:
        kind = {"ConfigError": "config error", "DataError": "data error"}.get(type(err).__name__, "error")
        print(f"gdpo {args.command}: {kind}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except _run_failures() as err:
        print(f"gdpo {args.command}: the run stopped: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
