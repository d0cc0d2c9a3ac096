"""Build self-distillation data: instructions answered by the full default model itself.

    python recipes/build_corpus.py                                   # first: the openly licensed sources
    python recipes/build_self_distill.py --prompts 6000 --output data/self3 --batch-size 64
                                                                     # -> data/self3/{train,heldout}.jsonl

At generation time an exit must predict the full model's own answers, not human text; those answers are
easier (lower entropy) and differently distributed. So the training contexts here are the model's greedy
answers to a mix of instructions, written as chat records {"messages": [user, assistant]} that
`balspec train` renders with the model's chat template (its default system prompt included, as at
generation time). The instructions come from recipes/instructions.py (openly licensed text and templates;
none from the benchmark prompt sets), or, with --instructions, from a prompt file of your own (any format
`balspec bench --prompts` reads, e.g. prompts like your traffic's). Generation is batched (left padding) and
appends to a partial file, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import instructions  # noqa: E402  (recipes/, beside this script)

def generate(prompts: list[str], out: Path, max_new_tokens: int, batch_size: int, model_name: str | None,
             dtype: str = "float32", device: str = "cpu", deadline: float | None = None) -> int:
    """Append the full model's greedy answers to `out`, batch by batch; stop after the batch that passes
    `deadline` (a time.time() value). Returns the answer tokens generated."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from balspec.models import load_model

    done = set()
    if out.exists():
        done = {instruction(line) for line in open(out, encoding="utf-8") if line.strip()}
    todo = [p for p in prompts if p not in done]
    model, tokenizer = load_model(model_name, dtype, device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in todo]
    # similar lengths batch together, within windows of 8 batches so a stopped run still holds every kind
    window = 8 * batch_size
    order = [i for w in range(0, len(todo), window)
             for i in sorted(range(w, min(w + window, len(todo))), key=lambda i: len(encoded[i]))]
    generated = 0
    start = time.time()
    with open(out, "a", encoding="utf-8") as f, Progress(TextColumn("generating answers"), BarColumn(),
                                                         MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                                         TimeRemainingColumn(), console=None) as progress:
        task = progress.add_task("", total=len(todo), rate="")
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = tokenizer([encoded[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                # a static cache: growing a dynamic one by concatenation took a third of each decode step
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, cache_implementation="static")
            for row, i in enumerate(idx):
                answer_ids = output[row, batch["input_ids"].shape[1]:]
                answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
                generated += int((answer_ids != tokenizer.pad_token_id).sum())
                if answer:
                    f.write(json.dumps({"messages": [{"role": "user", "content": todo[i]},
                                                     {"role": "assistant", "content": answer}]},
                                       ensure_ascii=False) + "\n")
            f.flush()
            progress.update(task, advance=len(idx), rate=f"{generated / (time.time() - start):.0f} tok/s")
            if deadline is not None and time.time() > deadline:
                break
    return generated


def instruction(line: str) -> str | None:
    """The first user turn of a chat record (a .jsonl line)."""
    return next((m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"), None)


def own_instructions(path: Path, skip_per_category: int) -> list[str]:
    """The prompt texts of a prompt file (balspec.measure.prompts' formats), without the first `skip_per_category`
    of each category, in file order; exits with one line for an unreadable file."""
    from balspec.errors import BalspecError
    from balspec.measure.prompts import after_first, load_prompts

    try:
        loaded = load_prompts(str(path)).prompts
    except BalspecError as e:
        sys.exit(f"error: --instructions: {e}")
    return list(dict.fromkeys(p.text for p in after_first(loaded, skip_per_category)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1500, help="number of instructions to answer")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heldout-every", type=int, default=25, help="one answer in N goes to heldout.jsonl")
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--downloads", type=Path, default=ROOT / "data" / ".downloads")
    parser.add_argument("--output", type=Path, default=ROOT / "data" / "self")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="generation dtype (bfloat16: about 2x the tokens/s on a CPU with AMX/AVX512-BF16; "
                             "the answers are then the bf16 model's greedy answers)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after the batch that passes this many minutes from the start, model loading included "
                             "(the answers so far are kept)")
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="a chat .jsonl whose instructions must not be answered here (e.g. a held-out file); "
                             "repeatable")
    parser.add_argument("--instructions", type=Path, default=None,
                        help="answer the first turns of this prompt file (a format `balspec bench --prompts` reads) "
                             "instead of recipes/instructions.py's mix, in file order; --prompts caps their number")
    parser.add_argument("--skip-per-category", type=int, default=0,
                        help="--instructions: leave out the first N prompts of each category (those `balspec bench "
                             "--num-prompts` takes first, to bench on prompts never trained on)")
    parser.add_argument("--split-only", action="store_true",
                        help="generate nothing more: split the answers written so far into train/heldout")
    args = parser.parse_args()
    if args.skip_per_category < 0 or args.skip_per_category and args.instructions is None:
        sys.exit("error: --skip-per-category needs --instructions and a whole number >= 0")
    if args.instructions is not None:
        prompts = own_instructions(args.instructions, args.skip_per_category)[:args.prompts]
    elif not (args.corpus / "train.jsonl").exists():
        sys.exit(f"error: {args.corpus}/train.jsonl not found: run recipes/build_corpus.py first")
    else:
        prompts = instructions.build(args.corpus, args.downloads, args.prompts, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    excluded = {instruction(line) for path in args.exclude for line in open(path, encoding="utf-8") if line.strip()}
    if excluded:
        kept = [p for p in prompts if p not in excluded]
        print(f"excluded {len(prompts) - len(kept)} instructions found in {', '.join(map(str, args.exclude))}")
        prompts = kept
    partial = args.output / "answers.jsonl.partial"
    if not args.split_only:
        deadline = time.time() + 60 * args.minutes if args.minutes is not None else None
        generate(prompts, partial, args.max_new_tokens, args.batch_size, args.model, args.dtype, deadline=deadline)
    # answers of earlier runs into this directory (or --split-only) are filtered too
    records = [line for line in open(partial, encoding="utf-8") if instruction(line) not in excluded]
    random.Random(args.seed).shuffle(records)
    held = records[::args.heldout_every]
    train = [r for i, r in enumerate(records) if i % args.heldout_every]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        tmp = args.output / (name + ".tmp")
        tmp.write_text("".join(rows), encoding="utf-8")
        os.replace(tmp, args.output / name)
    print(f"wrote {args.output}/train.jsonl ({len(train)} answers) and heldout.jsonl ({len(held)})")


if __name__ == "__main__":
    main()
