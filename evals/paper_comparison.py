"""The paper's comparisons at small scale: Balcony against Sorted fine-tuning (SoFT) and a shared-head exit, and
Balcony's own ablations, every row trained with `balspec train` at the same token budget on the same data.

Rows (each changes the recipe as shown; all start from the original model, exits.init_from cleared):
  balcony         the recipe as is: last-layer init, final norm, KL only, frozen base (the paper's default)
  random-init     exits.layer_init=random
  mlp-only        exits.module=mlp            attention-only   exits.module=attention
  kl-ce           loss.ce_weight=1.0          unfrozen         exits.train_base=true
  norm-next       exits.norm_init=next-input
  soft-ce         method=sorted (SoFT: the whole model fine-tuned, CE of every sub-model)
  soft-kl         method=sorted, loss.sorted_target=kl (KL to the original full model)
  shared-head     no training: the original model's final norm and head on h_e (LayerSkip-style exit)

Per row and exit: KL and top-1 agreement with the ORIGINAL full model on held-out answers (--answers, the
assistant positions), perplexity of the sub-model on human text (--text), the row's own full model's
perplexity there (it changes for SoFT and the unfrozen base) and, on the built-in prompts, greedy speculative
acceptance and tau (tokens per cycle) with balspec's engine. One table to stdout, one JSON to --results-dir.

    python evals/paper_comparison.py --steps 300                  # default model, recipes/smollm2-135m-answers.yaml
    python evals/paper_comparison.py --rows balcony,soft-ce --steps 100 --max-tokens 8192
    python evals/paper_comparison.py --tiny                       # end to end on the tiny random model (a test)

A finished row's run in <runs-dir>/<row> is reused, an interrupted one resumed (delete it to retrain).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
from exit_quality import balcony_output, heldout_blocks, measure  # noqa: E402

RESULTS_DIR = ROOT / "evals" / "results"
ROWS = {
    "balcony": [],
    "random-init": ["exits.layer_init=random"],
    "mlp-only": ["exits.module=mlp"],
    "attention-only": ["exits.module=attention"],
    "kl-ce": ["loss.ce_weight=1.0"],
    "unfrozen": ["exits.train_base=true"],
    "norm-next": ["exits.norm_init=next-input"],
    "soft-ce": ["method=sorted"],
    "soft-kl": ["method=sorted", "loss.sorted_target=kl"],
    "shared-head": None,  # not trained
}
PAPER = {  # the paper's finding per row, against the Balcony default (section 4.3, appendix B)
    "balcony": "reference", "random-init": "worse", "mlp-only": "worse", "attention-only": "worse",
    "kl-ce": "worse", "unfrozen": "worse", "norm-next": "(authors' code; no claim)", "soft-ce": "worse",
    "soft-kl": "worse", "shared-head": "worse"}
TINY = {"recipe": str(ROOT / "recipes" / "tiny.yaml"), "data": str(ROOT / "tests" / "data" / "tiny.txt"),
        "steps": 2, "max_tokens": 128, "num_prompts": 1, "max_new_tokens": 8, "positions": "all",
        "sets": ["train.eval_every=0", "train.save_every=0", "data.heldout_blocks=2"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2-135m-answers.yaml", help="the recipe every row changes")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="the budget: train.max_steps of every row (default: the recipe's)")
    parser.add_argument("--data", default=None, help="training data of every row (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every row, key=value")
    parser.add_argument("--answers", default=None, help="held-out answers (default: the recipe's data.heldout)")
    parser.add_argument("--positions", default="assistant", choices=["all", "assistant"],
                        help="positions of --answers scored (assistant: the answers only)")
    parser.add_argument("--text", default="data/corpus/heldout.jsonl", help="held-out human text, for perplexity")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens scored of --answers and of --text")
    parser.add_argument("--num-prompts", type=int, default=12, help="built-in prompts decoded per row")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--runs-dir", default="runs/paper_comparison")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model on the test text, tiny budgets: "
                        "a dry run of everything in seconds (flags given override its settings)")
    args = parser.parse_args(argv)
    if args.tiny:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])}
        args.recipe = TINY["recipe"] if "recipe" not in given else args.recipe
        for key in ("data", "steps", "max_tokens", "num_prompts", "max_new_tokens", "positions"):
            if key not in given:
                setattr(args, key, TINY[key])
        args.answers, args.text = args.answers or args.data, args.text if "text" in given else args.data
        args.set = [*TINY["sets"], *args.set]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown[0]!r}; choose from {', '.join(ROWS)}")
    return args


def row_sets(args: argparse.Namespace, row: str, run_dir: Path) -> list[str]:
    sets = [*args.set, f"train.output={run_dir}", "exits.init_from=null", *ROWS[row]]
    sets += [f"train.max_steps={args.steps}"] if args.steps is not None else []
    return sets + ([f"data.train={args.data}"] if args.data else [])


def train_row(args: argparse.Namespace, row: str, run_dir: Path) -> str:
    """Train one row in this process (a finished run is reused); returns the equivalent command."""
    from balspec.training.run import configure
    from balspec.training.train import train

    sets = row_sets(args, row, run_dir)
    command = shlex.join(["balspec", "train", "--recipe", args.recipe, *(x for s in sets for x in ("--set", s))])
    if (run_dir / "balspec.json").exists():
        print(f"reusing {run_dir}", file=sys.stderr)
        return command
    resume = (run_dir / "run.json").exists()  # an interrupted run goes on
    print(f"+ {command}{' --resume' if resume else ''}", file=sys.stderr, flush=True)
    train(*configure(args.recipe, sets, {}, resume))
    return command


def measure_row(args, row: str, run_dir: Path, original, tokenizer, layers: list[int], answers, text,
                prompts) -> list[dict]:
    """Per exit: quality against the original full model, perplexities, speculative acceptance and tau."""
    from balspec.checkpoint import load_exits, read_meta
    from balspec.exits import attach_exits, model_parts
    from balspec.generate import BalconyModel
    from balspec.measure.bench import BenchOptions, run_bench
    from balspec.models import load_model

    if ROWS[row] is None:
        model, exits, tokens = original, attach_exits(original, layers, module="shared-head"), 0
    else:
        meta = read_meta(run_dir)
        model = load_model(str(run_dir))[0] if meta.get("train_base") else original
        (exits, _), tokens = load_exits(model, run_dir), meta["training"]["tokens_seen"]
    head = model_parts(model).head
    heads = [("exit", e, lambda h, rope, deep, e=e: exits.arch.finish_logits(head(balcony_output(exits[e], h, rope,
                                                                                              deep))))
             for e in exits.exits]
    on_answers = {q.exit: q for q in measure(model, exits.arch, answers, heads, reference=original)}
    on_text = {q.exit: q for q in measure(model, exits.arch, text, heads, reference=original)}
    bm = BalconyModel(model, tokenizer, exits)
    opts = BenchOptions(exits=exits.exits, draft_lens=[args.draft_len], max_new_tokens=args.max_new_tokens,
                        warmup=0, early_exit=False, cost_repeats=1)
    speculative = {r.setting.exit: r.summary for r in run_bench(bm, prompts, opts).results}
    return [{"row": row, "exit": e, "trained_tokens": tokens, "kl": on_answers[e].kl,
             "top1_agreement": on_answers[e].top1_agreement, "perplexity": on_text[e].perplexity,
             "full_perplexity": on_text[None].perplexity, "full_kl": on_answers[None].kl,
             "acceptance_rate": speculative[e].acceptance_rate, "tau": speculative[e].mean_accepted_length,
             "greedy_mismatches": speculative[e].greedy_mismatches, "paper": PAPER[row]}
            for e in exits.exits]


def compare(rows: list[dict]) -> None:
    """Ours, per row and exit: better, worse or the same (within 1%) as the balcony row in KL to the original
    full model."""
    base = {r["exit"]: r["kl"] for r in rows if r["row"] == "balcony"}
    for r in rows:
        change = r["kl"] / base[r["exit"]] - 1 if base.get(r["exit"]) else None
        r["kl_vs_balcony"] = change
        r["ours"] = "reference" if r["row"] == "balcony" else None if change is None else \
            "same" if abs(change) < 0.01 else "worse" if change > 0 else "better"


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("row", "exit", "KL (nats)", "vs balcony", "top-1", "ppl", "full ppl", "accept", "tau", "paper", "ours")
    for col in columns:
        table.add_column(col, justify="left" if col in ("row", "paper", "ours") else "right")
    for r in sorted(rows, key=lambda r: (r["exit"], list(ROWS).index(r["row"]))):
        change = "" if r["kl_vs_balcony"] is None else f"{r['kl_vs_balcony']:+.1%}"
        accept = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        table.add_row(r["row"], str(r["exit"]), f"{r['kl']:.3f}", change, f"{r['top1_agreement']:.1%}",
                      f"{r['perplexity']:.2f}", f"{r['full_perplexity']:.2f}", accept, tau, r["paper"], r["ours"] or "")
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def main(argv=None) -> Path:
    from balspec.errors import BalspecError
    from balspec.measure.prompts import load_prompts
    from balspec.models import device_name, load_model
    from balspec.training.config import resolve_config

    args = parse_args(argv)
    try:
        config = resolve_config(args.recipe, row_sets(args, "balcony", Path(args.runs_dir) / "balcony"))
        answers_source = args.answers or config.data.heldout
        if answers_source is None:
            raise BalspecError("--answers: the recipe holds out part of its training text (data.heldout: null); "
                               "pass --answers FILE")
        commands = {row: train_row(args, row, Path(args.runs_dir) / row) if ROWS[row] is not None else None
                    for row in args.rows}
        original, tokenizer = load_model(config.model.name, config.model.dtype)
        seq_len = config.data.block_size
        answers = heldout_blocks(answers_source, tokenizer, seq_len, args.max_tokens, args.positions)
        text = heldout_blocks(args.text, tokenizer, seq_len, args.max_tokens)
        prompts = load_prompts(None, args.num_prompts)
        rows = []
        for row in args.rows:
            print(f"measuring {row}", file=sys.stderr, flush=True)
            rows += measure_row(args, row, Path(args.runs_dir) / row, original, tokenizer, config.exits.layers,
                                answers, text, prompts)
    except BalspecError as e:
        sys.exit(f"error: {e}")
    compare(rows)
    command = shlex.join(["python", "evals/paper_comparison.py", *(sys.argv[1:] if argv is None else argv)])
    print_table(rows, f"Balcony vs SoFT and ablations: {config.model.name}, {args.steps or config.train.max_steps} "
                      f"steps per row")
    meta = {"command": command, "device": device_name(original.device), "model": config.model.name,
            "recipe": args.recipe, "steps": args.steps or config.train.max_steps,
            "data": args.data or config.data.train,
            "answers": answers_source, "answer_positions": args.positions, "text": args.text,
            "seq_len": seq_len, "max_tokens": args.max_tokens, "prompts": len(prompts.prompts),
            "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len, "train_commands": commands}
    output = Path(args.results_dir) / f"paper_comparison_{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return output


if __name__ == "__main__":
    main()
