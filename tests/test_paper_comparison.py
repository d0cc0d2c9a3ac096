"""evals/paper_comparison.py end to end on the tiny random model (--tiny): every row trains at the same budget,
is measured against the original full model, and lands in one JSON."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_paper_comparison_dry_run_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    modules = {}
    for name in ("exit_quality", "paper_comparison"):  # the evals are scripts; the second imports the first
        spec = importlib.util.spec_from_file_location(name, ROOT / "evals" / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, modules[name])  # dataclasses look their module up
        spec.loader.exec_module(modules[name])
    comparison = modules["paper_comparison"]
    output = comparison.main(["--tiny", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)])

    doc = json.loads(output.read_text())
    rows = {(r["row"], r["exit"]): r for r in doc["rows"]}
    assert set(rows) == {(row, e) for row in comparison.ROWS for e in (2, 4)}
    trained = {r["trained_tokens"] for r in doc["rows"] if r["row"] != "shared-head"}
    assert trained == {2 * 4 * 64}  # the same budget for every trained row: 2 steps x 4 x 64 tokens
    assert all(r["greedy_mismatches"] == 0 for r in doc["rows"])  # speculative output is the full model's
    frozen = {r["full_perplexity"] for r in doc["rows"] if r["row"] not in ("soft-ce", "soft-kl", "unfrozen")}
    assert len(frozen) == 1  # a frozen base keeps the original's perplexity ...
    assert rows["soft-ce", 2]["full_perplexity"] not in frozen and rows["soft-ce", 2]["full_kl"] > 0  # ... SoFT not
    assert rows["balcony", 2]["full_kl"] == 0 and rows["balcony", 2]["ours"] == "reference"
    assert "python evals/paper_comparison.py --tiny" in doc["meta"]["command"]
    assert "soft-ce" in capsys.readouterr().out  # the table
