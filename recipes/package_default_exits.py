"""Package a trained run as the exits shipped inside balspec (balspec/default_exits), in bf16.

Records the generation defaults chosen by measurement (`balspec bench --json` output) next to the
training summary, so `balspec.load()` and `balspec generate` start from the settings that won.

    python recipes/package_default_exits.py runs/default-exits --bench evals/results/bench-builtin.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from balspec.exits import load_exits, save_exits
from balspec.generate import DEFAULT_EXITS_DIR
from balspec.models import load_model


def choose_defaults(bench: dict) -> dict:
    """The fastest exact setting; `full` when no speculative setting beats the baseline."""
    exact = [r for r in bench["results"] if r["mode"] == "speculative" and r.get("greedy_mismatches") == 0]
    best = max(exact, key=lambda r: r["speedup"], default=None)
    chosen = {"mode": "full"} if best is None or best["speedup"] <= 1.0 else \
        {"mode": "speculative", "exit": best["exit"], "draft_len": best["draft_len"]}
    if best is not None:  # the best exit stays the default exit for --mode speculative / early-exit
        chosen.setdefault("exit", best["exit"])
        chosen.setdefault("draft_len", best["draft_len"])
    chosen["measured"] = {"command": bench["meta"].get("command"), "device": bench["meta"].get("device"),
                          "best_speculative_speedup": best and best["speedup"],
                          "best_acceptance_rate": best and best["acceptance_rate"]}
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="exits checkpoint directory written by balspec train")
    parser.add_argument("--bench", help="balspec bench --json output used to choose the defaults")
    parser.add_argument("--output", default=str(DEFAULT_EXITS_DIR))
    args = parser.parse_args()
    model, _ = load_model()
    exits, meta = load_exits(model, args.run)
    defaults = choose_defaults(json.loads(Path(args.bench).read_text())) if args.bench else None
    save_exits(exits, model, args.output, dtype=torch.bfloat16, training=meta.get("training"), defaults=defaults)
    print(args.output)


if __name__ == "__main__":
    main()
