"""The report over eval directories and a training run: tables, embedded images, errors."""

import base64
import io
import json
from html.parser import HTMLParser

import pytest

from gdpo.eval import report
from gdpo.eval.metrics import against_base, summarize


def _eval_dir(path, correct, tokens, base=None):
    path.mkdir(parents=True)
    metrics = summarize(correct, tokens, [t >= 100 for t in tokens], [i // 2 for i in range(len(tokens))], [1])
    base_metrics = json.loads((base / "results.json").read_text())["metrics"] if base else None
    results = {
        "metrics": metrics,
        "against_base": against_base(metrics, base_metrics) if base else None,
        "base": str(base.resolve()) if base else None,
        "data": "task:chain_arith",
    }
    (path / "results.json").write_text(json.dumps(results))
    (path / "samples.jsonl").write_text("".join(json.dumps({"tokens": t}) + "\n" for t in tokens))
    return path


def _run_dir(path):
    path.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "reward/accuracy/mean": 0.6 + 0.01 * s,
            "reward/length_budget/mean": 0.1 * s,
            "tokens/mean": 70 - s,
            "tokens/p90": 90 - s,
        }
        for s in range(1, 11)
    ]
    rows[4].update({"eval/accuracy": 0.9, "eval/mean_tokens": 60.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(
        json.dumps(
            {
                "baseline": {"accuracy": 0.95, "mean_tokens": 74.0, "p90_tokens": 90, "truncation_rate": 0.0},
                "final": {
                    "accuracy": 0.94,
                    "mean_tokens": 41.0,
                    "p90_tokens": 50,
                    "truncation_rate": 0.0,
                    "floor_tokens": 20.5,
                    "tokens_over_floor": 2.0,
                    "shortcut_rate": 0.005,
                },
                "steps": 10,
            }
        )
    )
    return path


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.cells = 0, [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def test_report_has_tables_and_decodable_embedded_images(tmp_path):
    from PIL import Image

    base = _eval_dir(tmp_path / "base", [True, True, True, False], [70, 80, 75, 100])
    final = _eval_dir(tmp_path / "final", [True, True, False, False], [40, 35, 50, 45], base=base)
    run = _run_dir(tmp_path / "run")
    page_path = report.write_report([str(base), str(final), str(run)], str(tmp_path / "out"))
    page = _Page()
    page.feed(page_path.read_text())
    assert page.tables == 2
    assert len(page.images) == 3  # pareto, curves, lengths
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.size[0] > 300 and img.size[1] > 200
    assert "-47.7%" in page.cells and "-25.0pt" in page.cells  # final vs base: 42.5 vs 81.25 tokens, 50% vs 75%
    assert "95.0% -> 94.0%" in page.cells  # the run's baseline -> final
    assert "2.00" in page.cells and "0.5%" in page.cells  # its final tokens over the floor and shortcut share
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| eval | samples | accuracy |" in md and "![Accuracy vs mean completion tokens](pareto.png)" in md
    for png in ("pareto.png", "curves.png", "lengths.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_report_rejects_a_directory_it_cannot_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="empty: neither an eval directory"):
        report.write_report([str(tmp_path / "empty")], str(tmp_path / "out"))
    with pytest.raises(report.ReportError, match="nowhere: no such directory"):
        report.write_report([str(tmp_path / "nowhere")], str(tmp_path / "out"))


def test_the_run_table_shows_the_floor_where_the_task_knows_it(capsys):
    from gdpo.cli import print_summary

    row = {"accuracy": 0.97, "mean_tokens": 76.6, "p90_tokens": 90.0, "truncation_rate": 0.0}
    floor = {"floor_tokens": 21.51, "tokens_over_floor": 1.25, "shortcut_rate": 0.005}
    print_summary({"baseline": {**row, **floor, "tokens_over_floor": 3.56}, "final": {**row, **floor}}, "out")
    lines = capsys.readouterr().out.splitlines()
    assert next(ln for ln in lines if ln.startswith("x floor (21.5 tok)")).split()[-2:] == ["3.56", "1.25"]
    assert next(ln for ln in lines if ln.startswith("shortcut rate")).split()[-1] == "0.5%"
    print_summary({"baseline": row, "final": row}, "out")  # data without a floor: no floor rows
    assert "floor" not in capsys.readouterr().out
