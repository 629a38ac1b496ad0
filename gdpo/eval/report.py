"""``gdpo report``: turn eval directories and training runs into report.md, a self-contained report.html and PNGs.

Inputs are told apart by their files: an eval directory holds ``results.json`` (``gdpo eval``), a
training run holds ``metrics.jsonl`` and ``summary.json`` (``gdpo train``). Plots:
- ``pareto.png``: accuracy against mean completion tokens; one point per evaluation (a run's periodic
  held-out evaluations, its baseline and final; each eval directory), base models marked with a star.
- ``curves.png``: per training step, each reward component's mean and the mean and p90 completion tokens.
- ``lengths.png``: completion-length histograms of eval directories, base against final where an
  eval names its base.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gdpo.fileio import atomic_write_text, read_json_object
from gdpo.metrics import read_rows


class ReportError(ValueError):
    """An input directory the report cannot use; the message names it."""


@dataclass
class EvalDir:
    path: Path
    results: dict
    tokens: list[int] = field(default_factory=list)  # [N] completion tokens of every sample

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class RunDir:
    path: Path
    rows: list[dict]  # metrics.jsonl
    summary: dict  # summary.json (baseline, final, steps)

    @property
    def name(self) -> str:
        return self.path.name

    def eval_points(self) -> list[tuple[int, float, float]]:
        """``(step, accuracy, mean tokens)`` of every held-out evaluation, baseline (step 0) and final included."""
        pts = []
        if "baseline" in self.summary:
            pts.append((0, self.summary["baseline"]["accuracy"], self.summary["baseline"]["mean_tokens"]))
        pts += [(r["step"], r["eval/accuracy"], r["eval/mean_tokens"]) for r in self.rows if "eval/accuracy" in r]
        if "final" in self.summary:
            pts.append(
                (
                    self.summary.get("steps", self.rows[-1]["step"] if self.rows else 0),
                    self.summary["final"]["accuracy"],
                    self.summary["final"]["mean_tokens"],
                )
            )
        return pts


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as err:
        raise ReportError(str(err)) from None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return read_rows(path, log=lambda msg: None) if path.is_file() else []
    except (OSError, ValueError) as err:
        raise ReportError(str(err)) from None


EVAL_METRICS = ("accuracy", "mean_tokens", "prompts", "samples_per_prompt")  # what the tables and plots read
RUN_METRICS = ("accuracy", "mean_tokens")


def _require_numbers(path: Path, obj: dict, where: str, keys: tuple[str, ...]) -> None:
    for k in keys:
        if k not in obj:
            raise ReportError(f"{path}: '{where}' has no '{k}' (a report needs {', '.join(keys)})")
        if isinstance(obj[k], bool) or not isinstance(obj[k], (int, float)):
            raise ReportError(f"{path}: '{where}.{k}' is {obj[k]!r}, not a number")


def load_inputs(dirs: list[str]) -> tuple[list[EvalDir], list[RunDir]]:
    evals, runs = [], []
    for d in dirs:
        p = Path(d)
        if (p / "results.json").is_file():
            results = _read_json(p / "results.json")
            if not isinstance(results.get("metrics"), dict):
                raise ReportError(f"{p / 'results.json'}: not a gdpo eval results file (no 'metrics')")
            _require_numbers(p / "results.json", results["metrics"], "metrics", EVAL_METRICS)
            try:
                tokens = (
                    [
                        int(json.loads(line)["tokens"])
                        for line in (p / "samples.jsonl").read_text(encoding="utf-8").splitlines()
                        if line.strip()
                    ]
                    if (p / "samples.jsonl").is_file()
                    else []
                )
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
                raise ReportError(f"{p / 'samples.jsonl'}: unreadable ({type(err).__name__}: {err})") from None
            evals.append(EvalDir(p, results, tokens))
        elif (p / "metrics.jsonl").is_file() or (p / "summary.json").is_file():
            summary = _read_json(p / "summary.json") if (p / "summary.json").is_file() else {}
            for part in ("baseline", "final"):
                if part in summary:
                    if not isinstance(summary[part], dict):
                        raise ReportError(f"{p / 'summary.json'}: '{part}' is not an object")
                    _require_numbers(p / "summary.json", summary[part], part, RUN_METRICS)
            runs.append(RunDir(p, _read_jsonl(p / "metrics.jsonl"), summary))
        elif not p.exists():
            raise ReportError(f"{p}: no such directory")
        else:
            raise ReportError(
                f"{p}: neither an eval directory (results.json) nor a training run (metrics.jsonl / summary.json)"
            )
    if not evals and not runs:
        raise ReportError("nothing to report: give eval directories and/or training runs")
    return evals, runs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(evals: list[EvalDir], runs: list[RunDir], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    bases = {e.results.get("base") for e in evals if e.results.get("base")}
    for run in runs:
        pts = run.eval_points()
        if not pts:
            continue
        (line,) = ax.plot(
            [p[2] for p in pts],
            [100 * p[1] for p in pts],
            "o-",
            alpha=0.7,
            markersize=4,
            label=f"{run.name} (run's held-out evals)",
        )
        for step, acc, tok in (pts[0], pts[-1]):
            ax.annotate(f"step {step}", (tok, 100 * acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if pts[0][0] == 0:
            ax.plot([pts[0][2]], [100 * pts[0][1]], "*", color=line.get_color(), markersize=16)
    for e in evals:
        m = e.results["metrics"]
        is_base = str(e.path.resolve()) in bases
        smp = e.results.get("sampling", {})
        how = f"{m['samples_per_prompt']}x, T={smp['temperature']:g}" if "temperature" in smp else "eval"
        ax.plot(
            [m["mean_tokens"]],
            [100 * m["accuracy"]],
            "*" if is_base else "s",
            markersize=16 if is_base else 9,
            label=f"{e.name}{' (base)' if is_base else ''} ({how})",
        )
    ax.set_xlabel("mean completion tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs mean tokens (upper left is better; star = base)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.text(
        0.01,
        0.01,
        "runs: the trainer's periodic held-out evaluations (rollout.eval_temperature); "
        "eval dirs: their own sampling, in the legend",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: list[RunDir], path: Path) -> bool:
    runs = [r for r in runs if r.rows]
    if not runs:
        return False
    plt = _plt()
    rewards = sorted(
        {
            k.split("/")[1]
            for r in runs
            for row in r.rows
            for k in row
            if k.startswith("reward/") and k.endswith("/mean")
        }
    )
    panels = [(f"reward/{name}/mean", f"reward: {name} (mean)") for name in rewards]
    panels += [("tokens/mean", "completion tokens (mean)"), ("tokens/p90", "completion tokens (p90)")]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for run in runs:
            pts = [(row["step"], row[key]) for row in run.rows if key in row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=run.name, linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_lengths(evals: list[EvalDir], path: Path) -> bool:
    with_tokens = [e for e in evals if e.tokens]
    if not with_tokens:
        return False
    by_path = {str(e.path.resolve()): e for e in with_tokens}
    pairs = [(by_path[e.results["base"]], e) for e in with_tokens if e.results.get("base") in by_path]
    shown = [x for pair in pairs for x in pair] if pairs else with_tokens
    shown = list({id(e): e for e in shown}.values())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(max(e.tokens) for e in shown)
    bins = min(60, max(10, top // 4 + 1))
    bases = {b.results.get("base") for b in with_tokens}
    for e in shown:
        base = str(e.path.resolve()) in bases
        label = f"{e.name}{' (base)' if base else ''}: mean {sum(e.tokens) / len(e.tokens):.1f}"
        if base:  # filled; the others as outlines so several finals stay readable over it
            ax.hist(e.tokens, bins=bins, range=(0, top + 1), alpha=0.35, color="gray", label=label)
        else:
            ax.hist(e.tokens, bins=bins, range=(0, top + 1), histtype="step", linewidth=1.4, label=label)
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("samples")
    ax.set_title("completion lengths" + (": base vs final" if pairs else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


EVAL_COLUMNS = [
    ("accuracy", "accuracy", "{:.1%}"),
    ("mean_tokens", "mean tok", "{:.1f}"),
    ("median_tokens", "median tok", "{:.1f}"),
    ("p90_tokens", "p90 tok", "{:.1f}"),
    ("mean_tokens_correct", "tok correct", "{:.1f}"),
    ("mean_tokens_incorrect", "tok incorrect", "{:.1f}"),
    ("truncation_rate", "truncated", "{:.1%}"),
    ("accuracy_per_1k_tokens", "acc / 1k tok", "{:.2f}"),
    ("floor_tokens", "floor tok", "{:.1f}"),
    ("tokens_over_floor", "x floor", "{:.2f}"),
    ("shortcut_rate", "shortcuts", "{:.1%}"),
]


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def eval_table(evals: list[EvalDir]) -> tuple[list[str], list[list[str]]]:
    ks = sorted(
        {k for e in evals for k in e.results["metrics"] if k.startswith("pass@") and k != "pass@1"},
        key=lambda k: int(k[5:]),
    )
    head = ["eval", "samples"] + [c[1] for c in EVAL_COLUMNS] + ks + ["tokens vs base", "acc vs base", "AES"]
    body = []
    for e in evals:
        m, vs = e.results["metrics"], e.results.get("against_base") or {}
        body.append(
            [e.name, f"{m['prompts']}x{m['samples_per_prompt']}"]
            + [_fmt(f, m.get(k)) for k, _, f in EVAL_COLUMNS]
            + [_fmt("{:.1%}", m.get(k)) for k in ks]
            + [
                _fmt("{:+.1f}%", -vs["token_reduction_pct"]) if vs else "-",
                _fmt("{:+.1f}pt", vs.get("accuracy_change_pt")),
                _fmt("{:+.3f}", vs.get("aes")),
            ]
        )
    return head, body


def run_table(runs: list[RunDir]) -> tuple[list[str], list[list[str]]]:
    head = [
        "run",
        "steps",
        "accuracy base -> final",
        "mean tokens base -> final",
        "token change",
        "x floor final",
        "shortcuts final",
        "truncated final",
    ]
    body = []
    for r in runs:
        b, f = r.summary.get("baseline"), r.summary.get("final")
        if not (b and f):
            body.append([r.name, str(r.rows[-1]["step"] if r.rows else 0), "(unfinished)"] + ["-"] * 5)
            continue
        change = 100 * (f["mean_tokens"] / b["mean_tokens"] - 1) if b["mean_tokens"] else float("nan")
        body.append(
            [
                r.name,
                str(r.summary.get("steps", "-")),
                f"{b['accuracy']:.1%} -> {f['accuracy']:.1%}",
                f"{b['mean_tokens']:.1f} -> {f['mean_tokens']:.1f}",
                _fmt("{:+.1f}%", change),
                _fmt("{:.2f}", f.get("tokens_over_floor")),
                _fmt("{:.1%}", f.get("shortcut_rate")),
                _fmt("{:.1%}", f.get("truncation_rate")),
            ]
        )
    return head, body


def _md_table(head, body) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _html_table(head, body) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def write_report(
    dirs: list[str],
    out: str,
    title: str = "gdpo token-efficiency report",
    tables: Optional[list[tuple[str, list[str], list[list[str]], str]]] = None,
) -> Path:
    """Write OUT/report.md, OUT/report.html and the PNGs; ``tables`` adds (heading, head, body, note) first."""
    evals, runs = load_inputs(dirs)
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise ReportError(f"--out {out}: is a file, not a directory")
    try:
        o.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {out}: cannot create it ({err.strerror})") from None
    images = []
    plot_pareto(evals, runs, o / "pareto.png")
    images.append(("pareto.png", "Accuracy vs mean completion tokens"))
    if plot_curves(runs, o / "curves.png"):
        images.append(("curves.png", "Training curves"))
    if plot_lengths(evals, o / "lengths.png"):
        images.append(("lengths.png", "Completion lengths"))
    sections = list(tables or [])
    if evals:
        sections.append(
            (
                "Evaluations",
                *eval_table(evals),
                "AES: accuracy-efficiency score against the eval's base (O1-Pruner): "
                "a·ΔL + b·ΔA if ΔA >= 0 else a·ΔL + g·ΔA, with ΔL, ΔA relative; a=1, b=3, g=5.",
            )
        )
    if runs:
        sections.append(
            ("Training runs", *run_table(runs), "Held-out evaluation at the start and the end of each run.")
        )
    md = [f"# {title}", ""]
    body_html = [f"<h1>{html.escape(title)}</h1>"]
    for heading, head, rows, note in sections:
        md += [f"## {heading}", "", _md_table(head, rows), "", note, ""]
        body_html += [f"<h2>{html.escape(heading)}</h2>", _html_table(head, rows), f"<p>{html.escape(note)}</p>"]
    md += ["## Plots", ""]
    body_html.append("<h2>Plots</h2>")
    for file, caption in images:
        md += [f"![{caption}]({file})", ""]
        data = base64.b64encode((o / file).read_bytes()).decode()
        body_html.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    md += ["## Inputs", ""] + [f"- `{p}`" for p in dirs]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body_html)}</body></html>\n"
    )
    atomic_write_text(o / "report.md", "\n".join(md) + "\n")
    atomic_write_text(o / "report.html", page)
    return o / "report.html"
