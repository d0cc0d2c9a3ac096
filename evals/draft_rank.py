"""Where the full model's greedy token ranks among each exit's draft choices: the acceptance a draft of
width W could reach at its first position (top-W agreement), on the full model's own answers.

    python evals/draft_rank.py --num-prompts 14 --max-new-tokens 96 \
        --output evals/results/draft_rank_builtin_cpu.json

The full model answers each prompt greedily; then one pass over prompt + answer gives, at every answer
position, the full model's token and each exit's draft logits (through the reduced draft head when the exits
store one: a token outside it is never drafted). Prints top-1..4 agreement per exit. A draft-kind exit is
scored at every position as a cycle's first draft (the context before it verified).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from balspec.measure.prompts import load_prompts
from balspec.models import device_name
import balspec

sys.path.insert(0, str(Path(__file__).parent))
from exit_quality import balcony_output  # noqa: E402  (evals/, beside this script)

WIDTHS = (1, 2, 3, 4)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model",
                        help="base model: hub id, local directory or tiny-random (default: the embedded one)")
    parser.add_argument("--prompts", help="prompt file (default: the built-in set)")
    parser.add_argument("--num-prompts", type=int, default=14)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--exits-path", help="exits checkpoint (default: the shipped exits)")
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv)
    bm = balspec.load(model=args.model, exits=args.exits_path)
    engine = bm.engine
    ranks: dict[int, list[torch.Tensor]] = {e: [] for e in bm.exits}
    with torch.inference_mode():
        for prompt in load_prompts(args.prompts, args.num_prompts).prompts:
            ids = bm.encode(prompt.text)
            answer = bm.generate(ids, mode="full", max_new_tokens=args.max_new_tokens).token_ids
            seq = torch.tensor([ids + answer])  # [1, L]
            engine.reset(seq.shape[1])
            hidden, done, exit_hidden = engine.embed(seq), 0, {}
            for e in bm.exits:
                hidden = engine.run_layers(hidden, done, e, 0)
                exit_hidden[e], done = hidden, e
            final = engine.parts.norm(engine.run_layers(hidden, done, engine.num_layers, 0))  # [1, L, hidden]
            target = engine.head_logits(final)[0].argmax(-1)  # [L]
            answer_rows = slice(len(ids) - 1, seq.shape[1] - 1)  # rows that predict the answer's tokens
            arch = engine.arch  # a balcony rotates as the last layer (Gemma 3: that kind's own base)
            rope = arch.rotary(engine.parts.rotary, final, torch.arange(seq.shape[1], device=final.device)[None],
                               arch.balcony_kind)
            for e in bm.exits:
                if engine.is_draft_kind(e):  # every position as a cycle's first draft (training's path)
                    normed = balcony_output(bm.exit_modules[e], exit_hidden[e], rope, final)[0, answer_rows]
                else:
                    normed = engine.run_balcony(e, exit_hidden[e], 0)[0, answer_rows]  # [A, hidden]
                logits = torch.stack([engine.draft_logits(row[None, None]) for row in normed])  # [A, draft vocab]
                ranks[e].append(rank_of(logits, target[answer_rows], engine.draft_vocab))
    table = {e: {f"top{w}": float((torch.cat(r) < w).float().mean()) for w in WIDTHS} for e, r in ranks.items()}
    positions = int(sum(t.numel() for t in ranks[bm.exits[0]]))
    for e, row in table.items():
        print(f"exit {e:2d}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print(f"{positions} answer positions", file=sys.stderr)
    if args.output:
        doc = {"command": shlex.join(["python", *sys.argv]), "device": device_name(bm.device),
               "model": bm.model.config._name_or_path, "exits_path": args.exits_path or "shipped",
               "positions": positions, "agreement": table}
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")


def rank_of(logits: torch.Tensor, target: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    """Rank of each target token among the draft logits [A, V'] (0 = the draft's first choice); a large
    number when the reduced draft vocabulary lacks it."""
    if vocab is None:
        return (logits > logits.gather(1, target[:, None])).sum(-1)
    where = vocab[None, :] == target[:, None]  # [A, V']
    own = logits.gather(1, where.float().argmax(-1, keepdim=True))
    return torch.where(where.any(-1), (logits > own).sum(-1), torch.full_like(target, logits.shape[-1]))


if __name__ == "__main__":
    main()
