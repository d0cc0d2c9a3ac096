"""What a draft-verify cycle costs at each exit depth, for the kinds of exit balspec has: untrained balconies
(the costs do not depend on the weights), a draft-kind exit (verified-context balcony) at shallow layers and a
sub-model exit, timed on the embedded default model with evals/spec_policy.py's cycle timer, in full steps.
It answers how cheap a draft can get on this machine, before any training: the acceptance a trained exit at
that depth must reach to pay (a k=1 cycle of cost c yields 1 + acceptance tokens: it pays above c - 1).

    python evals/draft_cycle_costs.py --draft-exits 1,2,4 --sub-exits 8 \
        --output evals/results/draft_cycle_costs_avx2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import balspec
from balspec.exits import attach_exits
from balspec.generate import BalconyModel
from balspec.measure.prompts import load_prompts
from balspec.models import device_name

sys.path.insert(0, str(Path(__file__).parent))
from spec_policy import cycle_costs  # noqa: E402  (evals/, beside this script)

KINDS = ("exit_1", "exit_2", "lookup_4", "verify_2")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft-exits", default="1,2,4")
    parser.add_argument("--sub-exits", default="8")
    parser.add_argument("--prompts", default="../shared/data/spec_bench_questions.jsonl",
                        help="the second prompt of this file, with 32 tokens of its greedy answer, is the context")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    draft = [int(e) for e in args.draft_exits.split(",") if e]
    sub = [int(e) for e in args.sub_exits.split(",") if e]
    shipped = balspec.load()
    exits = attach_exits(shipped.model, sorted(draft + sub), draft_exits=draft).requires_grad_(False).eval()
    bm = BalconyModel(shipped.model, shipped.tokenizer, exits, draft_vocab=shipped.exit_modules.draft_vocab)
    ids = bm.encode(load_prompts(args.prompts, 2).prompts[1].text)
    ids += bm.generate(ids, mode="full", max_new_tokens=32).token_ids
    rows = {}
    for e in sorted(draft + sub):
        cost = cycle_costs(bm, ids, e, args.repeats)
        rows[e] = {"kind": "draft" if e in draft else "sub-model",
                   **{k: cost[k] / cost["full"] for k in KINDS}, "full_step_s": cost["full"]}
        print(f"exit {e:2d} ({rows[e]['kind']}): " + "  ".join(f"{k} {rows[e][k]:.2f}" for k in KINDS)
              + f"  (full step {1000 * cost['full']:.1f} ms)", flush=True)
    if args.output:
        doc = {"command": shlex.join(["python", *sys.argv]), "device": device_name(bm.device),
               "unit": "full decode steps", "context_tokens": len(ids), "exits": rows}
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
