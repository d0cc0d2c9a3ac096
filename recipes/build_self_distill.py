"""Build self-distillation data: instructions answered by the full default model itself.

    python recipes/build_corpus.py                      # first: the openly licensed sources
    python recipes/build_self_distill.py --prompts 1500 # -> data/self/{train,heldout}.jsonl

At generation time an exit must predict the full model's own answers, not human text; those answers are
easier (lower entropy) and differently distributed. So the training contexts here are the model's greedy
answers to a mix of instructions, written as chat records {"messages": [user, assistant]} that
`balspec train` renders with the model's chat template (its default system prompt included, as at
generation time). The instructions are built from openly licensed text only (the sources of
build_corpus.py) plus templates written for this script:
  - chitchat-dataset (MIT): the opening turns of human dialogues, as they are;
  - fortunes (BSD-style): quotes to explain, summarise, translate, rewrite or continue;
  - python3.11-doc (PSF-2.0): passages to summarise or answer questions about, modules to explain;
  - arithmetic word problems and general-knowledge topics generated from templates here.
None of them is drawn from the benchmark prompt sets (the built-in prompts, Spec-Bench).
Generation is batched (left padding) and appends to a partial file, so an interrupted run resumes.
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

TOPICS = ["photosynthesis", "the water cycle", "volcanoes", "the moon's phases", "how vaccines work", "black holes",
          "the printing press", "compound interest", "recycling", "the human heart", "bees", "electric cars",
          "the Roman Empire", "climate and weather", "sleep", "the internet", "tides", "earthquakes",
          "the immune system", "solar panels", "coffee", "the French Revolution", "rainbows", "glaciers",
          "how airplanes fly", "DNA", "the stock market", "coral reefs", "antibiotics", "the Great Wall of China",
          "renewable energy", "how a refrigerator works", "the solar system", "bread baking", "the Olympic Games",
          "machine learning", "inflation", "deserts", "the telephone", "migration of birds", "nutrition",
          "the pyramids of Egypt", "magnets", "clouds", "friendship", "public libraries", "time zones",
          "the piano", "chess", "gardening", "rivers", "the metric system", "penguins", "lightning",
          "the first moon landing", "composting", "exercise", "mountains", "the ocean", "trees", "robots"]

TOPIC_TEMPLATES = ["Explain {t} in simple terms.", "Give me three interesting facts about {t}.",
                   "Write a short paragraph about {t} for a school newsletter.",
                   "What should a beginner know about {t}?",
                   "Why is {t} important? Answer in a few sentences.", "Write a short poem about {t}.",
                   "Describe {t} to a ten-year-old.", "List the pros and cons of {t}."]

QUOTE_TEMPLATES = ["What does this quote mean?\n\n{q}", "Summarize the following in one sentence:\n\n{q}",
                   "Translate into French:\n\n{q}", "Translate into Spanish:\n\n{q}", "Translate into German:\n\n{q}",
                   "Rewrite this in plain, simple English:\n\n{q}", "Write a short story that begins with:\n\n{q}",
                   "Do you agree with this? Explain briefly.\n\n{q}"]

PASSAGE_TEMPLATES = ["Summarize the following passage in a few sentences:\n\n{p}",
                     "Explain this passage to a beginner:\n\n{p}",
                     "{p}\n\nBased on the text above, what is the main point?",
                     "Read the text and list its key points:\n\n{p}"]

MODULE_TEMPLATES = ["What is the Python module `{m}` used for? Give a short example.",
                    "Write a short Python program that uses the `{m}` module.",
                    "Explain when I would use Python's `{m}` module."]

MATH_TEMPLATES = [
    "A shop sells pencils for ${a} each. Sam buys {b} pencils and pays with a ${c} bill. How much change does he get?",
    "A train travels {a} km in {b} hours. What is its average speed? Show your steps.",
    "What is {a} times {b}? Explain how you got the answer.",
    "Anna has {a} apples. She gives {b} to her friend and buys {c} more. How many apples does she have now?",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "If {b} workers build a wall in {a} days, how long would {c} workers take at the same pace?",
    "Solve for x: {b}x + {a} = {c}.",
    "A recipe needs {a} grams of flour for {b} cookies. How much flour is needed for {c} cookies?"]


def build_prompts(corpus_dir: Path, downloads: Path, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chat, quotes, passages = [], [], []
    for line in open(corpus_dir / "train.jsonl", encoding="utf-8"):
        record = json.loads(line)
        if "messages" in record:
            first = record["messages"][0]["content"].strip()
            if 20 <= len(first) <= 400:
                chat.append(first)
        elif record.get("text"):
            text = record["text"].strip()
            if 40 <= len(text) <= 300 and text.count("\n") < 6:
                quotes.append(text)  # fortunes: short quotes, not reST pages
            elif len(text) > 2000:
                paragraphs = [p.strip() for p in text.split("\n\n") if 300 <= len(p.strip()) <= 900
                              and not p.lstrip().startswith(("..", ":", "*", "=", "-", ">>>"))]
                passages += paragraphs
    library = downloads / "python3.11-doc/usr/share/doc/python3.11/html/_sources/library"
    modules = sorted(p.name.removesuffix(".rst.txt") for p in library.glob("*.rst.txt")
                     if not p.name.startswith(("_", "index")))
    kinds = [
        lambda: rng.choice(chat),
        lambda: rng.choice(TOPIC_TEMPLATES).format(t=rng.choice(TOPICS)),
        lambda: rng.choice(QUOTE_TEMPLATES).format(q=rng.choice(quotes)),
        lambda: rng.choice(PASSAGE_TEMPLATES).format(p=rng.choice(passages)),
        lambda: rng.choice(MODULE_TEMPLATES).format(m=rng.choice(modules)),
        lambda: rng.choice(MATH_TEMPLATES).format(a=rng.randint(2, 90), b=rng.randint(2, 12), c=rng.randint(20, 200)),
    ]
    weights = [3, 2, 2, 2, 1, 2]
    prompts, seen = [], set()
    while len(prompts) < count:
        prompt = rng.choices(kinds, weights)[0]()
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def generate(prompts: list[str], out: Path, max_new_tokens: int, batch_size: int, model_name: str | None) -> None:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from balspec.models import load_model

    done = set()
    if out.exists():
        done = {json.loads(line)["messages"][0]["content"] for line in open(out, encoding="utf-8")}
    todo = [p for p in prompts if p not in done]
    model, tokenizer = load_model(model_name, "float32", "cpu")
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
            batch = tokenizer([encoded[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
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
    parser.add_argument("--split-only", action="store_true",
                        help="generate nothing more: split the answers written so far into train/heldout")
    args = parser.parse_args()
    if not (args.corpus / "train.jsonl").exists():
        sys.exit(f"error: {args.corpus}/train.jsonl not found: run recipes/build_corpus.py first")
    args.output.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args.corpus, args.downloads, args.prompts, args.seed)
    partial = args.output / "answers.jsonl.partial"
    if not args.split_only:
        generate(prompts, partial, args.max_new_tokens, args.batch_size, args.model)
    records = [line for line in open(partial, encoding="utf-8")]
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
