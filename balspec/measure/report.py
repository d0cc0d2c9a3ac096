"""Bench reports for people and programs: rich tables on stdout, one JSON document, a PNG plot.

The JSON document (`to_json`) is the contract that scripts read:
{"meta": {...}, "baseline": {"mode": "full", "tokens_per_second", ...},
 "results": [{"mode", "name", "exit", "draft_len", "draft_width", "lookup_len", "acceptance_rate",
              "mean_accepted_length", "accepted_hist", "lookup_share", "lookup_acceptance_rate",
              "tokens_per_second", "speedup", "ttft_s", "decode_tokens_per_second", "decode_speedup",
              "greedy_mismatches", "mismatches_per_1000_tokens", "cost_model", "per_category"}, ...]}
"speedup" is end to end (prefill included); "decode_speedup" counts the tokens after the first against the time
after it, which is all that speculation changes (peers: null, their time to first token is not measured).
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from balspec.errors import BalspecError
from balspec.measure.bench import BenchReport, Result, Summary, label


def result_dict(result: Result) -> dict:
    s = result.setting
    return {"mode": s.mode, "name": s.name, "exit": s.exit, "draft_len": s.draft_len, "draft_width": s.draft_width,
            "lookup_len": s.lookup_len,
            **asdict(result.summary),
            "cost_model": asdict(result.cost_model) if result.cost_model is not None else None,
            "per_category": {c: asdict(v) for c, v in result.per_category.items()}}


def report_dict(report: BenchReport) -> dict:
    return {"meta": report.meta, "baseline": result_dict(report.baseline),
            "results": [result_dict(r) for r in report.results]}


def to_json(report: BenchReport) -> str:
    # NaN and inf are not JSON: they become null
    return json.dumps(json_safe(report_dict(report)), indent=2, allow_nan=False)


def write_json(report: BenchReport, path: str | Path) -> None:
    try:
        Path(path).write_text(to_json(report) + "\n")
    except OSError as e:
        raise BalspecError(f"--output: cannot write {path} ({e.strerror})") from None


def print_tables(report: BenchReport, console=None) -> None:
    """The results table, then speedups per prompt category (when there is more than one)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)  # files and pipes: no wrapping
    meta = report.meta
    base = report.baseline.summary
    table = Table(title=f"balspec bench: {meta['model']} on {meta['device']}, {meta['dtype']}, "
                        f"{meta['prompts']['count']} prompts ({meta['prompts']['source']}), "
                        f"<= {meta['max_new_tokens']} new tokens, temperature {meta['temperature']}")
    for name in ("mode", "exit", "k", "w", "accept", "lookup (cycles, accept)", "tau", "hist (cycles by accepted 0..k)",
                 "tok/s", "speedup", "decode", "bound", "eff", "accept for 1.5x", "mismatch"):
        table.add_column(name, justify="left" if name.startswith(("mode", "hist")) else "right")
    table.add_row("full (baseline)", *[""] * 7, f"{base.tokens_per_second:.1f}", "1.00x",
                  "1.00x" if base.decode_tokens_per_second else "", *[""] * 4)
    for r in report.results:
        s, c = r.summary, r.cost_model
        mismatch = "" if s.greedy_mismatches is None else str(s.greedy_mismatches)
        if s.greedy_mismatches:  # exactness is broken (or bf16 broke a near-tie): make it impossible to miss
            mismatch = f"[bold red]{mismatch} ({s.mismatches_per_1000_tokens:.1f}/1k tok)[/]"
        width = _text(r.setting.draft_width) if r.setting.mode == "speculative" else ""
        name = r.setting.name + (f" +lookup{r.setting.lookup_len}" if r.setting.lookup_len else "")
        table.add_row(name, _text(r.setting.exit), _text(r.setting.draft_len), width,
                      _num(s.acceptance_rate, "{:.2f}"), _lookup(s), _num(s.mean_accepted_length, "{:.2f}"),
                      _hist(s.accepted_hist), f"{s.tokens_per_second:.1f}", _num(s.speedup, "{:.2f}x"),
                      _num(s.decode_speedup, "{:.2f}x"), _num(c.bound if c else None, "{:.2f}x"),
                      _num(c.efficiency if c else None, "{:.0%}"), _needed(c), mismatch)
    if base.ttft_s is not None:
        table.caption = (f"speedup: end to end; decode: after the first token (what speculation changes); "
                         f"mean time to first token {base.ttft_s:.2f} s in full mode")
    console.print(table)
    categories = list(report.baseline.per_category)
    if len(categories) > 1:
        by_cat = Table(title="speedup (tau) per category")
        by_cat.add_column("setting")
        for cat in categories:
            by_cat.add_column(cat, justify="right")
        by_cat.add_row("full tok/s", *(f"{report.baseline.per_category[c].tokens_per_second:.1f}" for c in categories))
        for r in report.results:
            by_cat.add_row(label(r.setting), *(_cell(r.per_category.get(c)) for c in categories))
        console.print(by_cat)


def _lookup(s) -> str:
    if s.lookup_share is None:
        return ""
    return f"{s.lookup_share:.0%}, {s.lookup_acceptance_rate:.2f}"


def plot(report: BenchReport, path: str | Path) -> None:
    """Speedup and tau per exit: one line per draft length, plus early exit and the peers' speedups."""
    plt = require_matplotlib()
    fig, (ax_speed, ax_tau) = plt.subplots(1, 2, figsize=(11, 4.2))
    spec = [r for r in report.results if r.setting.mode == "speculative"]
    for k, w, n in dict.fromkeys((r.setting.draft_len, r.setting.draft_width, r.setting.lookup_len) for r in spec):
        rows = [r for r in spec if (r.setting.draft_len, r.setting.draft_width, r.setting.lookup_len) == (k, w, n)]
        exits = [r.setting.exit for r in rows]
        name = f"k={k}" + (f" w={w}" if w > 1 else "") + (f" lookup={n}" if n else "")
        ax_speed.plot(exits, [r.summary.speedup for r in rows], "o-", label=f"speculative {name}")
        ax_tau.plot(exits, [r.summary.mean_accepted_length for r in rows], "o-", label=name)
    early = [r for r in report.results if r.setting.mode == "early-exit"]
    if early:
        ax_speed.plot([r.setting.exit for r in early], [r.summary.speedup for r in early], "s--", label="early-exit")
    per_exit_peers = [r for r in report.results if r.setting.mode == "peer" and r.setting.exit is not None]
    for name in dict.fromkeys(r.setting.name for r in per_exit_peers):
        rows = [r for r in per_exit_peers if r.setting.name == name]
        ax_speed.plot([r.setting.exit for r in rows], [r.summary.speedup for r in rows], "x", color="gray",
                      label=name)
    for r in report.results:
        if r.setting.mode == "peer" and r.setting.exit is None:
            ax_speed.axhline(r.summary.speedup, color="gray", linestyle=":", linewidth=1)
            ax_speed.annotate(r.setting.name, (0.01, r.summary.speedup), xycoords=("axes fraction", "data"),
                              fontsize=7, color="gray")
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set(xlabel="exit layer", ylabel="speedup over full", title="wall-clock speedup")
    ax_tau.set(xlabel="exit layer", ylabel="tokens per cycle (tau)", title="mean accepted length")
    exits = sorted({r.setting.exit for r in report.results if r.setting.exit is not None})
    for ax in (ax_speed, ax_tau):
        ax.set_xticks(exits)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = report.meta
    fig.suptitle(f"{meta['model']}, {meta['device']}, {meta['prompts']['count']} prompts", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise BalspecError(f"--plot: cannot write {path} ({e.strerror})") from None
    finally:
        plt.close(fig)


def require_matplotlib():
    """pyplot with a file-only backend; a clear error when the optional extra is missing."""
    try:
        import matplotlib
    except ImportError:
        raise BalspecError("--plot needs matplotlib: pip install 'balspec[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def progress_bar() -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on stderr (stdout stays clean for results); yields on_step(done, total, label)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    if not console.is_terminal:  # a log file: a live bar would show nothing, so one line per step
        yield lambda done, total, text: print(f"[{done}/{total}] {text}", file=sys.stderr, flush=True)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("bench", total=None)

        def on_step(done: int, total: int, text: str) -> None:
            progress.update(task, completed=done, total=total, description=text)

        yield on_step


def _cell(s: Summary | None) -> str:
    if s is None or s.speedup is None:
        return ""
    return f"{s.speedup:.2f}x" + (f" ({s.mean_accepted_length:.2f})" if s.mean_accepted_length is not None else "")


def _hist(hist: list[int] | None) -> str:
    return " ".join(map(str, hist)) if hist else ""


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _needed(cost) -> str:
    """The acceptance a setting's chain would need for 1.5x at its measured pass costs; "-" when out of reach."""
    if cost is None:
        return ""
    return "-" if cost.acceptance_for_1_5x is None else f"{cost.acceptance_for_1_5x:.2f}"


def _text(x) -> str:
    return "" if x is None else str(x)


def json_safe(x):
    """NaN and infinity (a diverged loss, say) are not JSON: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x
