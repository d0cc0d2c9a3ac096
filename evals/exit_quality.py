"""How close each exit's sub-model is to the full model on held-out text.

A draft-kind exit (DESIGN.md 3b) is scored at every position as the first draft of a cycle: it reads the
full model's final states of every earlier position, as right after a verify.

Per exit: KL(p_full || q_exit) in nats per token, top-1 agreement with the full model (the greedy
acceptance rate of a one-token draft) and perplexity on the text itself. Rows for the trained balcony
(--exits-path or the shipped exits), the untrained balcony (attach_exits initialisation only) and a
shared-head early exit (final norm + LM head on h_e, no balcony: LayerSkip-style exit on a model never
trained for it), plus the full model. Prints a table; writes JSON (with device and command) to
evals/results/.

    python evals/exit_quality.py                                  # default model, shipped exits
    python evals/exit_quality.py --model tiny-random --exits-path runs/tiny/exits --max-tokens 2048
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from balspec.checkpoint import load_exits, read_draft_vocab
from balspec.engine.architecture import Architecture
from balspec.errors import BalspecError
from balspec.exits import attach_exits, model_parts, parse_exits
from balspec.generate import default_exits_path
from balspec.models import default_device, load_model
from balspec.training.train import draft_vocab_path

DEFAULT_DATA = "data/corpus/heldout.jsonl"  # written by recipes/build_corpus.py
RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Quality:
    name: str  # "full", "balcony", "balcony (untrained)", "shared head"
    exit: int | None
    kl: float  # mean KL(p_full || q) over positions, nats
    top1_agreement: float
    perplexity: float
    tokens: int
    top1_draft_vocab: float | None = None  # agreement of the exit's choice within the draft vocabulary (if one)


def heldout_blocks(source: str, tokenizer, seq_len: int, max_tokens: int, positions: str = "all"):
    """Held-out text read and packed exactly as training reads it (balspec.training.data: chat records through the
    chat template, EOS between documents), cut into blocks of seq_len tokens, up to max_tokens. A list of
    (ids [1, seq_len], counted positions [seq_len] bool or None: all)."""
    from balspec.training.config import DataConfig
    from balspec.training.data import pack, read_records

    config = DataConfig(train=source, heldout=None, block_size=seq_len, train_on=positions)
    blocks = pack(*read_records(source, config, "--data"), tokenizer, config)
    if len(blocks) == 0:
        raise BalspecError(f"--data: {source} gives no block of --seq-len {seq_len} tokens; give more text "
                           "or a smaller --seq-len")
    rows = blocks.select(range(min(len(blocks), max(1, max_tokens // seq_len))))
    masks = rows["loss_mask"] if positions == "assistant" else [None] * len(rows)
    return [(torch.tensor([ids]), None if m is None else torch.tensor(m))
            for ids, m in zip(rows["input_ids"], masks)]


# (h_e [1, L, hidden], rope of the balcony's attention kind, the full model's final normed states [1, L, hidden])
# -> the model's logits [1, L, vocab] (its soft-cap or divisor applied, as the full model's)
Head = Callable[[torch.Tensor, tuple, torch.Tensor], torch.Tensor]


def balcony_output(balcony, h: torch.Tensor, rope, deep: torch.Tensor) -> torch.Tensor:
    """A sub-model balcony on h_e; a draft-kind one scored as every position's first draft of a cycle (the
    context before it verified: what the engine drafts right after a verify)."""
    if balcony.kind == "draft":
        return balcony(h, rope, deep, torch.zeros(h.shape[:2], dtype=torch.long, device=h.device))
    return balcony(h, rope)


def heads_for(model, trained, untrained, exits: list[int]) -> list[tuple[str, int, Head]]:
    parts = model_parts(model)

    def logits(normed):  # Granite's divisor, Gemma's soft-cap: q is compared with the model's own p
        return untrained.arch.finish_logits(parts.head(normed))

    out = []
    for e in exits:
        if trained is not None:
            out.append(("balcony", e, lambda h, rope, deep, e=e: logits(balcony_output(trained[e], h, rope, deep))))
        out.append(("balcony (untrained)", e,
                    lambda h, rope, deep, e=e: logits(balcony_output(untrained[e], h, rope, deep))))
        out.append(("shared head", e, lambda h, rope, deep: logits(parts.norm(h))))
    return out


@torch.inference_mode()
def measure(model, arch: Architecture, seqs: list[torch.Tensor], heads: list[tuple[str, int, Head]],
            draft_vocab: torch.Tensor | None = None, reference=None) -> list[Quality]:
    """One full forward per sequence gives p and every h_e; each head then runs on its h_e only. arch: the
    model's (Exits.arch), for the balconies' rotary embedding (Architecture.balcony_kind).
    draft_vocab [V] token ids: also score each exit's top choice within it (what a reduced draft head proposes)
    against the full model's over the whole vocabulary.
    reference: the model p comes from (default: `model` itself). Given another (the original of a fine-tuned
    `model`), every head's KL and agreement, and those of `model`'s own full output (row "full"), are
    measured against it; perplexities are always the heads' and `model`'s own."""
    parts = model_parts(model)
    device = parts.head.weight.device
    vocab = draft_vocab.to(device) if draft_vocab is not None else None
    sums = {key: [0.0, 0.0, 0.0, 0.0] for key in [("full", None)] + [(n, e) for n, e, _ in heads]}  # kl, top1, nll,
    # top-1 within the draft vocabulary
    tokens = 0
    for ids, counted in seqs:
        ids = ids.to(device)
        # positions scored: each has a next token in the block; with a mask, only the counted ones
        keep = torch.ones(ids.shape[1] - 1, dtype=torch.bool, device=device) if counted is None \
            else counted[:-1].to(device)
        out = model(ids, output_hidden_states=True)
        log_f = F.log_softmax(out.logits[0, :-1][keep].float(), -1)  # [scored, vocab]: the model's own output
        log_p = log_f if reference is None else F.log_softmax(reference(ids).logits[0, :-1][keep].float(), -1)
        top_p = log_p.argmax(-1)
        target = ids[0, 1:][keep]
        positions = torch.arange(ids.shape[1], device=device)[None]
        rope = arch.rotary(parts.rotary, out.hidden_states[0], positions, arch.balcony_kind)  # Gemma 3: its base
        tokens += len(target)
        _add(sums[("full", None)], log_f, log_p, top_p, target)
        for name, e, head in heads:
            # hidden_states[e] is the residual stream after trunk layer e (hidden_states[0]: embeddings)
            logits = head(out.hidden_states[e], rope, out.hidden_states[-1])
            log_q = F.log_softmax(logits[0, :-1][keep].float(), -1)
            _add(sums[(name, e)], log_q, log_p, top_p, target)
            if vocab is not None:
                sums[(name, e)][3] += (vocab[log_q.index_select(1, vocab).argmax(-1)] == top_p).sum().item()
    return [Quality(name, e, kl / tokens, top1 / tokens, math.exp(nll / tokens), tokens,
                    None if vocab is None or e is None else in_vocab / tokens)
            for (name, e), (kl, top1, nll, in_vocab) in sums.items()]


def _add(acc: list[float], log_q: torch.Tensor, log_p: torch.Tensor, top_p: torch.Tensor, target: torch.Tensor):
    """Add one sequence's KL(p || q), top-1 agreements and NLL of the targets (log_q, log_p [scored, vocab])."""
    acc[0] += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
    acc[1] += (log_q.argmax(-1) == top_p).sum().item()
    acc[2] += -log_q.gather(-1, target[:, None]).sum().item()


def print_table(rows: list[Quality], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    in_vocab = any(r.top1_draft_vocab is not None for r in rows)
    for col in ("sub-model", "exit", "KL (nats)", "top-1 agree", *(["top-1 via draft vocab"] if in_vocab else []),
                "perplexity"):
        table.add_column(col, justify="left" if col == "sub-model" else "right")
    for r in sorted(rows, key=lambda r: (10**9 if r.exit is None else r.exit, r.name)):
        via = ([f"{r.top1_draft_vocab:.1%}" if r.top1_draft_vocab is not None else ""] if in_vocab else [])
        table.add_row(r.name, "" if r.exit is None else str(r.exit), f"{r.kl:.3f}", f"{r.top1_agreement:.1%}",
                      *via, f"{r.perplexity:.2f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--exits-path", default=None, help="trained exits (default: the shipped exits, if any)")
    parser.add_argument("--exits", default=None, help="exits to evaluate (default: the checkpoint's), e.g. 8,12,16")
    parser.add_argument("--data", default=DEFAULT_DATA, help="held-out text: .jsonl/.json records "
                        "({\"messages\": [...]} or {\"text\": ...}), .txt, .parquet, a directory or a glob")
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens to read")
    parser.add_argument("--positions", choices=("all", "assistant"), default="all",
                        help="positions scored: all, or those whose next token is in an assistant turn "
                        "(what an exit drafts at generation time)")
    parser.add_argument("--draft-vocab", default=None,
                        help="also score each exit's top choice within a draft vocabulary: an exits directory "
                        "that holds one, or \"default\" (the shipped one); by default the checkpoint's own, if any")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None,
                        help="JSON file (default: evals/results/exit_quality_<model>_<time>.json)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    device = args.device or default_device()
    model, tokenizer = load_model(args.model, args.dtype, device)
    exits_path = args.exits_path or default_exits_path(args.model)
    trained, meta = load_exits(model, exits_path) if exits_path else (None, {})
    exits = parse_exits(args.exits) if args.exits else (trained.exits if trained is not None else None)
    if not exits:
        raise BalspecError("--exits: no exits checkpoint loaded; name the exits to evaluate, e.g. --exits 8,12,16")
    for e in exits if trained is not None else []:
        trained[e]  # a clear error for an exit the checkpoint lacks
    drafts = [e for e in exits if trained is not None and trained.kinds[e] == "draft"]
    untrained = attach_exits(model, exits, meta.get("norm_init", "final"), meta.get("layer_init", "last"),
                             draft_exits=drafts)
    untrained.requires_grad_(False).eval()
    seqs = heldout_blocks(args.data, tokenizer, args.seq_len, args.max_tokens, args.positions)
    t0 = time.perf_counter()
    vocab_source = args.draft_vocab or (str(exits_path) if trained is not None and trained.draft_vocab is not None
                                        else None)
    vocab = read_draft_vocab(model, draft_vocab_path(vocab_source), "--draft-vocab") if vocab_source else None
    rows = measure(model, untrained.arch, seqs, heads_for(model, trained, untrained, exits), vocab)
    import transformers

    from balspec import __version__
    from balspec.models import device_name

    name = model.config._name_or_path
    doc = {"meta": {"device": device_name(device), "dtype": args.dtype, "model": name,
                    "exits_checkpoint": str(exits_path) if exits_path else None,
                    "norm_init": meta.get("norm_init"), "data": args.data, "positions": args.positions,
                    "draft_vocab": vocab_source, "draft_vocab_size": None if vocab is None else len(vocab),
                    "tokens": rows[0].tokens,
                    "seq_len": args.seq_len, "seconds": round(time.perf_counter() - t0, 1),
                    "versions": {"balspec": __version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__},
                    "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])},
           "rows": [asdict(r) for r in rows]}
    scored = "held-out tokens" if args.positions == "all" else "held-out assistant tokens"
    print_table(rows, f"exit quality: {name}, {rows[0].tokens} {scored} of {args.data}")
    output = Path(args.output) if args.output else \
        RESULTS_DIR / f"exit_quality_{Path(name).name}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return doc


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except BalspecError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: launched processes printing together do not interleave
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
