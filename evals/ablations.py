"""The paper's ablations at small scale: train one exits checkpoint per variant with the real training
pipeline (`balspec train`), score each with evals/exit_quality.py on the same held-out text, compare.

Variants (each changes one setting of the recipe):
  baseline     the recipe as is (norm from the final norm, KL only, balcony = copy of the last layer)
  norm-next    exits.norm_init=next-input (the authors' code: copy trunk layer e+1's input norm)
  kl-ce        loss.ce_weight=1.0 (KL plus next-token cross-entropy; the paper found CE does not help)
  random-init  exits.layer_init=random (balcony re-initialised instead of copying the last layer)

    python evals/ablations.py --steps 300                        # default model, recipes/smollm2-135m.yaml
    python evals/ablations.py --variants baseline,kl-ce --set model.name=tiny-random --steps 20 --max-tokens 2048
    python evals/ablations.py --dry-run                          # print the commands only

Each variant's run lands in <runs-dir>/<variant>; a finished run is reused and an interrupted one resumed
(delete the run directory to retrain). The comparison table goes to stdout,
the JSON (every row, the commands, device) to evals/results/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "evals" / "results"
VARIANTS = {
    "baseline": [],
    "norm-next": ["exits.norm_init=next-input"],
    "kl-ce": ["loss.ce_weight=1.0"],
    "random-init": ["exits.layer_init=random"],
}


def train_command(args: argparse.Namespace, variant: str, run_dir: Path) -> list[str]:
    sets = [*args.set, f"train.output={run_dir}", *VARIANTS[variant]]
    if args.steps is not None:
        sets.append(f"train.max_steps={args.steps}")
    resume = ["--resume"] if (ROOT / run_dir / "run.json").exists() else []  # an interrupted run goes on
    return [sys.executable, "-m", "balspec.cli", "train", "--recipe", args.recipe,
            *(x for s in sets for x in ("--set", s)), *resume]


def quality_command(args: argparse.Namespace, config, run_dir: Path, output: Path) -> list[str]:
    """exit_quality.py on the run's final exits, with the recipe's model, dtype and block size."""
    return [sys.executable, str(ROOT / "evals" / "exit_quality.py"), "--exits-path", str(run_dir),
            "--model", config.model.name, "--dtype", config.model.dtype, "--data", args.data,
            "--seq-len", str(config.data.block_size), "--max-tokens", str(args.max_tokens), "--output", str(output)]


def finished(run_dir: Path) -> bool:
    """`balspec train` writes the final exits into the run directory itself when the run completes."""
    return all((ROOT / run_dir / f).exists() for f in ("balspec.json", "exits.safetensors"))


def run(cmd: list[str], dry_run: bool) -> None:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    if not dry_run:
        subprocess.run(cmd, cwd=ROOT, check=True)


def compare(results: dict[str, dict]) -> list[dict]:
    """One row per variant and exit: the trained balcony's KL / top-1 / perplexity, and the change of
    KL against the baseline variant."""
    rows = []
    for variant, doc in results.items():
        for r in doc["rows"]:
            if r["name"] == "balcony":
                rows.append({"variant": variant, "exit": r["exit"], "kl": r["kl"],
                             "top1_agreement": r["top1_agreement"], "perplexity": r["perplexity"]})
    base = {r["exit"]: r["kl"] for r in rows if r["variant"] == "baseline"}
    for r in rows:
        r["kl_vs_baseline"] = r["kl"] / base[r["exit"]] - 1 if base.get(r["exit"]) else None
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ablations: held-out quality of the trained balconies")
    for col in ("variant", "exit", "KL (nats)", "KL vs baseline", "top-1 agree", "perplexity"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in sorted(rows, key=lambda r: (r["exit"], list(VARIANTS).index(r["variant"]))):
        change = "" if r["kl_vs_baseline"] is None else f"{r['kl_vs_baseline']:+.1%}"
        table.add_row(r["variant"], str(r["exit"]), f"{r['kl']:.3f}", change, f"{r['top1_agreement']:.1%}",
                      f"{r['perplexity']:.2f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="train.max_steps for every variant (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[],
                        help="extra recipe override for every variant, key=value")
    parser.add_argument("--runs-dir", default="runs/ablations")
    parser.add_argument("--data", default=None,
                        help="held-out text for exit_quality.py (default: the recipe's data.heldout)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored per variant")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> None:
    from balspec.config import resolve_config
    from balspec.errors import BalspecError

    args = parse_args(argv)
    try:
        config = resolve_config(args.recipe, args.set)
    except BalspecError as e:
        sys.exit(f"error: {e}")
    args.data = args.data or config.data.heldout
    if args.data is None:
        sys.exit("error: the recipe holds out part of its training text (data.heldout: null); pass --data FILE")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results, commands = {}, {}
    for variant in args.variants:
        run_dir = Path(args.runs_dir) / variant
        train = train_command(args, variant, run_dir)
        if finished(run_dir):
            print(f"reusing {run_dir}", file=sys.stderr)
        else:
            run(train, args.dry_run)
        output = Path(args.results_dir) / "ablations" / f"{variant}_{stamp}.json"
        quality = quality_command(args, config, run_dir, output)
        run(quality, args.dry_run)
        commands[variant] = {"train": shlex.join(train), "exit_quality": shlex.join(quality)}
        if not args.dry_run:
            results[variant] = json.loads(output.read_text())
    if args.dry_run:
        return
    rows = compare(results)
    print_table(rows)
    summary = Path(args.results_dir) / f"ablations_{stamp}.json"
    first = next(iter(results.values()))["meta"]
    summary.write_text(json.dumps({"meta": {"device": first["device"], "model": first["model"],
                                            "data": args.data, "tokens": first["tokens"],
                                            "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])},
                                   "commands": commands, "rows": rows}, indent=2) + "\n")
    print(f"wrote {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
