"""Which drafts pay, priced by the engine's own measured cycle costs and replayed on the full model's answers:
speculation policies (the exit's drafts, the context's lookup drafts, both, or neither per cycle) compared
without generating once per policy, so that they can be tuned on held-out instructions rather than on the
bench's prompts. `balspec bench` then measures the chosen ones for real.

    python evals/spec_policy.py --data data/self4/eval.jsonl --num 320 --repeats 11 \
        --output evals/results/spec_policy_heldout_avx2_cpu.json
    python evals/spec_policy.py --prompts ../shared/data/spec_bench_questions.jsonl --skip 3 --num 26 --repeats 11 \
        --output evals/results/spec_policy_specbench_other_avx2_cpu.json

How: greedy speculation emits exactly the full model's greedy answer, so a cycle's outcome is fixed by the
answer: an exit draft chain is accepted as far as the exit's first choices (teacher-forced on the answer so
far; a draft-kind exit's as each cycle's first draft, so only its k = 1 policies are exact and run) equal the
answer's next tokens, and a lookup draft as far as it equals them. --data replays stored greedy
answers (one teacher-forced pass each); --prompts generates them with `full` first. Each kind of cycle is timed
on the engine (median of --repeats calls, after warm-up, at a mid-answer position); a policy's predicted time is
the sum of its cycles' costs, and its predicted speedup the full step's time per token over its own. Not
priced: the decode loop's own bookkeeping per cycle, the same for every policy.

--datastore FILE adds policies that, where the context has no match, read drafts from a fixed n-gram table of
the full model's own answers to other instructions (REST-style retrieval; `Datastore`), before the exit drafts:
    python evals/spec_policy.py --prompts ../shared/data/spec_bench_questions.jsonl --skip 3 --num 26 --exit 2 \
        --repeats 11 --datastore data/self10/train.jsonl --output evals/results/spec_policy_specbench_other_store10_epyc_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import balspec
from balspec.engine.lookup import NgramLookup
from balspec.engine.sampling import Sampling
from balspec.measure.costs import median_seconds
from balspec.measure.prompts import after_first, load_prompts, spread
from balspec.models import device_name

SIZES = tuple(range(8, 0, -1))  # n-gram sizes the simulator indexes, so that a policy may choose by match length
MAX_ROWS = 10  # lookup verifies are timed for 2..MAX_ROWS rows
HASH_BASE = 1_000_003  # n-gram keys: a polynomial hash mod 2**64, the same in numpy (uint64 wraps) and in Python
HASH_MASK = (1 << 64) - 1


def ngram_key(tokens) -> int:
    """The key of an n-gram (a sequence of token ids) in Datastore's tables. A collision only costs a wrong
    proposal, which the verify rejects."""
    key = 0
    for token in tokens:
        key = (key * HASH_BASE + token + 1) & HASH_MASK
    return key


class Datastore:
    """Drafts read from a fixed body of text (retrieval-based speculation, REST: He et al. 2024, arXiv
    2311.08252, here as an n-gram table): for every n-gram of `documents` (n in `sizes`, lists of token ids,
    e.g. the full model's own answers to other instructions), the token that most often followed it. A proposal
    follows the table greedily from the end of the history, longest matching n first, up to `count` tokens; an
    n-gram counts only if its most frequent follower came at least `min_count` times and is at least `min_share`
    of its occurrences. Free to propose (a few dictionary reads per token), so, like prompt lookup, its cycle is
    a verify alone; it is tried where the context itself has no match.

    Raises ValueError for empty sizes, min_count < 1 or min_share outside (0, 1]."""

    def __init__(self, documents: list[list[int]], sizes: tuple[int, ...] = (4, 3), min_count: int = 2,
                 min_share: float = 0.5):
        if not sizes or min(sizes) < 1 or min_count < 1 or not 0 < min_share <= 1:
            raise ValueError(f"Datastore: sizes {sizes} (each >= 1), min_count {min_count} (>= 1) and "
                             f"min_share {min_share} (in (0, 1]) are invalid")
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.tables: dict[int, dict[int, int]] = {}
        docs = [np.asarray(d, dtype=np.int64) for d in documents if len(d)]
        for n in self.sizes:
            keys, followers = [], []
            for doc in docs:
                if len(doc) <= n:
                    continue
                key = np.zeros(len(doc) - n, dtype=np.uint64)  # [windows]: the n-gram ending before doc[n:]
                with np.errstate(over="ignore"):
                    for j in range(n):
                        key = key * np.uint64(HASH_BASE) + (doc[j:len(doc) - n + j] + 1).astype(np.uint64)
                keys.append(key)
                followers.append(doc[n:])
            self.tables[n] = _most_frequent(np.concatenate(keys), np.concatenate(followers), min_count,
                                            min_share) if keys else {}

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def propose(self, history: list[int], count: int) -> list[int]:
        """Up to `count` tokens that followed the end of `history` (then of history + the tokens proposed so far)
        in the documents; [] when its last n tokens match no n-gram of the table."""
        tail = list(history[-self.sizes[0]:])
        out: list[int] = []
        while len(out) < count:
            for n in self.sizes:
                follower = self.tables[n].get(ngram_key(tail[-n:])) if len(tail) >= n else None
                if follower is not None:
                    break
            else:
                break
            out.append(follower)
            tail.append(follower)
        return out


def _most_frequent(keys, followers, min_count: int, min_share: float) -> dict[int, int]:
    """{key: its most frequent follower} over (key, follower) pairs [N], N >= 1, kept where that follower's count
    is >= min_count and >= min_share of the key's pairs."""
    order = np.lexsort((followers, keys))
    keys, followers = keys[order], followers[order]
    new_pair = np.ones(len(keys), dtype=bool)
    new_pair[1:] = (keys[1:] != keys[:-1]) | (followers[1:] != followers[:-1])
    first = np.flatnonzero(new_pair)  # one entry per distinct (key, follower), grouped by key
    counts = np.diff(np.append(first, len(keys)))
    pair_keys, pair_followers = keys[first], followers[first]
    by_count = np.lexsort((-counts, pair_keys))  # within a key, the most frequent follower first
    pair_keys, pair_followers, counts = pair_keys[by_count], pair_followers[by_count], counts[by_count]
    new_key = np.ones(len(pair_keys), dtype=bool)
    new_key[1:] = pair_keys[1:] != pair_keys[:-1]
    starts = np.flatnonzero(new_key)
    totals = np.add.reduceat(counts, starts)
    best = counts[starts]
    keep = (best >= min_count) & (best >= min_share * totals)
    return dict(zip(pair_keys[starts][keep].tolist(), pair_followers[starts][keep].tolist()))


@dataclass
class Answer:
    """One answer replayed: the prompt's ids, the answer's ids, and per answer row i (predicting answer[i + 1]
    from the pending token answer[i]) whether the exit's first choice is right and how sure it was."""

    prompt: list[int]
    answer: list[int]
    exit_right: list[bool]  # [A - 1]
    exit_top: list[float]  # [A - 1] the exit's top probability (softmax at temperature 1)
    exit_choice: list[int] = field(default_factory=list)  # [A - 1] the exit's first choice (policy "confirm")


def answers_from_data(bm, path: str, num: int, max_new: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for line in Path(path).read_text().splitlines()[:num]:
        messages = json.loads(line)["messages"]
        ids = bm.encode(messages[0]["content"])
        answer = bm.tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"][:max_new]
        out.append((ids, answer))
    return out


def answers_from_prompts(bm, path: str | None, num: int, max_new: int,
                         skip: int = 0) -> list[tuple[list[int], list[int]]]:
    """Greedy answers to `num` prompts spread over categories, after the first `skip` of each category (those
    `balspec bench --num-prompts` takes first), generated with `full`."""
    kept = after_first(load_prompts(path).prompts, skip)
    out = []
    for prompt in spread(kept, num):
        ids = bm.encode(prompt.text)
        out.append((ids, bm.generate(ids, mode="full", max_new_tokens=max_new).token_ids))
    return out


@torch.inference_mode()
def replay(bm, pairs, exit_layer: int) -> list[Answer]:
    """One teacher-forced pass over prompt + answer: the exit's first choice and top probability per answer row.
    Rows whose argmax disagrees with the stored answer (re-tokenised text) count as they are: a rare mismatch."""
    engine = bm.engine
    out = []
    for ids, answer in pairs:
        seq = torch.tensor([ids + answer], device=engine.device)
        if engine.is_draft_kind(exit_layer):  # every row as a cycle's first draft (Balcony.forward, r = 0)
            normed = first_drafts(bm, seq, exit_layer)
        else:
            engine.reset(seq.shape[1])
            normed = engine.run_balcony(exit_layer, engine.run_layers(engine.embed(seq), 0, exit_layer, 0), 0)
        rows = normed[0, len(ids):seq.shape[1] - 1]  # rows predicting answer[1:]
        logits = torch.stack([engine.draft_logits(row[None, None]) for row in rows])  # [A - 1, draft vocab]
        top = logits.float().softmax(-1).max(-1)
        choice = top.indices if engine.draft_vocab is None else engine.draft_vocab[top.indices]
        right = (choice == seq[0, len(ids) + 1:]).tolist()
        out.append(Answer(ids, answer, right, top.values.tolist(), choice.tolist()))
    return out


@torch.inference_mode()
def first_drafts(bm, seq: torch.Tensor, exit_layer: int) -> torch.Tensor:
    """A draft-kind exit's normed output [1, L, hidden] at every position of `seq` [1, L] as the first draft of a
    cycle: the full model's final states of all earlier positions verified (training's path, which
    tests/test_draft_exits.py checks against the engine's draft). A chain's later drafts see their own states
    instead, so policies with exit chains (k > 1) would be scored optimistically: main leaves them out."""
    from balspec.engine.architecture import architecture
    from balspec.exits import model_parts

    parts = model_parts(bm.model)
    arch = architecture(bm.model, parts.rotary, parts.num_layers)
    hidden = bm.model(seq, output_hidden_states=True, logits_to_keep=1).hidden_states
    positions = torch.arange(seq.shape[1], device=seq.device)[None]
    rope = arch.rotary(parts.rotary, hidden[exit_layer], positions, arch.balcony_kind)
    return bm.exit_modules[exit_layer](hidden[exit_layer], rope, hidden[-1], torch.zeros_like(seq))


@torch.inference_mode()
def cycle_costs(bm, ids: list[int], exit_layer: int, repeats: int) -> dict:
    """Median seconds of each kind of cycle, on the engine, at the end of `ids` (the pending token its last):
    full (a full step), full_balcony (a full step that also runs the exit's balcony, keeping its K/V),
    exit_k (a draft-verify cycle of k exit drafts), lookup_r (a lookup cycle of r rows: r - 1 drafts; the balcony
    filled for them) and verify_r (the full model over r rows alone, for policies that never draft with the exit)."""
    engine = bm.engine
    start = len(ids) - 1
    engine.reset(len(ids) + 2 * MAX_ROWS)
    prompt = torch.tensor([ids[:-1]], device=engine.device)
    engine.prefill(prompt, "speculative", exit_layer)
    token = torch.tensor([[ids[-1]]], device=engine.device)
    others = ids[-MAX_ROWS:]  # stand-in drafts: real tokens, mostly rejected

    def full():
        engine.step(token, start, "full", None).argmax(-1).tolist()

    def full_balcony():
        h = engine.run_layers(engine.embed(token), 0, exit_layer, start)
        engine.run_balcony(exit_layer, h, start)
        engine.full_logits(engine.run_layers(h, exit_layer, engine.num_layers, start)).argmax(-1).tolist()

    def exit_cycle(k):
        return lambda: engine.cycle(token, start, exit_layer, k, Sampling(), None)

    def lookup(r):
        return lambda: engine.lookup_cycle(token, start, exit_layer, others[:r - 1], Sampling(), None)

    def verify(r):
        rows = torch.tensor([[ids[-1]] + others[:r - 1]], device=engine.device)
        tree = engine.draft_tree(r - 1, 1)
        return lambda: engine.full_logits(engine.run_layers(engine.embed(rows), 0, engine.num_layers, start,
                                                            tree)).argmax(-1).tolist()

    kinds = {"full": full, "full_balcony": full_balcony, **{f"exit_{k}": exit_cycle(k) for k in (1, 2, 3)},
             **{f"lookup_{r}": lookup(r) for r in range(2, MAX_ROWS + 1)},
             **{f"verify_{r}": verify(r) for r in range(2, MAX_ROWS + 1)}}
    return median_seconds(engine, kinds, repeats, start)


@dataclass(frozen=True)
class Policy:
    """lengths: the lookup length by match size (n-gram size -> tokens; sizes tried longest first, a size
    missing is not tried); k: exit drafts when there is no lookup (0: a full step); gate: draft with the exit
    only while its acceptance over its last `window` cycles is at least this (else a full step that keeps the
    balcony's K/V; one probe draft every `probe` such steps); extend: an exit draft chain is followed, in the same
    verify, by up to this many tokens read from the context after it (matched on the answer's tokens, so where
    a draft is wrong whether read-on rows were added at all is a guess; they are priced either way)."""

    name: str
    lengths: tuple[tuple[int, int], ...] = ()
    k: int = 1
    gate: float = 0.0
    window: int = 8
    probe: int = 8
    extend: int = 0
    confirm: bool = False  # where the context proposes, the exit drafts too: lookup if it agrees, else its own draft
    store: str = ""  # where the context has no match: the datastore of this name (--datastore) proposes
    store_len: int = 0  # the most tokens it proposes
    store_confirm: bool = False  # the exit drafts too, and the datastore's chain is verified only if d_1 agrees


def simulate(policy: Policy, answers: list[Answer], cost: dict, stores: dict | None = None) -> dict:
    """Predicted seconds and cycles of `policy` over the answers, and the full model's seconds for them.
    `stores`: name -> Datastore, for policies with a datastore."""
    seconds = baseline = 0.0
    cycles = tokens = lookup_cycles = lookup_tokens = exit_cycles = store_cycles = store_tokens = 0
    sizes = tuple(n for n, _ in policy.lengths)
    length = dict(policy.lengths)
    uses_exit = policy.k > 0
    for a in answers:
        index = NgramLookup(a.prompt + a.answer[:1], SIZES)
        i, A = 0, len(a.answer)  # i: the pending token's row in the answer; answer[i + 1:] still to emit
        history: list[bool] = []  # exit acceptance of its recent cycles (gate)
        skipped = 0
        while i < A - 1:
            left = A - 1 - i
            n, where = index.match(sizes) if sizes else (0, -1)
            proposal = index.tokens[where:where + min(length.get(n, 0), left - 1)] if n else []
            stored = stores[policy.store].propose(index.tokens, min(policy.store_len, left - 1)) \
                if policy.store and not proposal else []
            if stored and policy.store_confirm and stored[0] != a.exit_choice[i]:
                stored = []  # the exit's own draft cycle below
            if stored:
                if policy.store_confirm:
                    seconds += cost["exit_1"] - cost["verify_2"]
                emitted = _prefix(stored, a.answer[i + 1:]) + 1
                seconds += cost[f"lookup_{len(stored) + 1}" if uses_exit else f"verify_{len(stored) + 1}"]
                store_cycles += 1
                store_tokens += emitted - 1
            elif proposal and policy.confirm and proposal[0] != a.exit_choice[i]:  # the exit disagrees: its draft
                emitted = 1 + a.exit_right[i]
                seconds += cost["exit_1"]
                exit_cycles += 1
            elif proposal:
                if policy.confirm:  # the exit agreed: its draft step, then the lookup's verify
                    seconds += cost["exit_1"] - cost["verify_2"]
                emitted = _prefix(proposal, a.answer[i + 1:]) + 1
                rows = len(proposal) + 1
                seconds += cost[f"lookup_{rows}" if uses_exit else f"verify_{rows}"]
                lookup_cycles += 1
                lookup_tokens += emitted - 1
            elif not uses_exit:
                emitted, seconds = 1, seconds + cost["full"]
            else:
                recent = history[-policy.window:]
                gated = policy.gate > 0 and len(recent) == policy.window and \
                    sum(recent) / len(recent) < policy.gate and skipped < policy.probe
                if gated:
                    emitted, skipped = 1, skipped + 1
                    seconds += cost["full_balcony"]
                elif left == 1:  # room for the bonus token only: the engine's k=0 cycle, a step with the balcony
                    emitted, seconds = 1, seconds + cost["full_balcony"]
                else:
                    skipped = 0
                    k = min(policy.k, left - 1)
                    n_acc = 0
                    while n_acc < k and a.exit_right[i + n_acc]:
                        n_acc += 1
                    history.append(n_acc > 0)
                    emitted = n_acc + 1
                    seconds += cost[f"exit_{k}"]
                    exit_cycles += 1
                    if policy.extend:  # read on after the chain (the drafts: right or not, priced alike)
                        m, w = index.match(sizes, a.answer[i + 1:i + 1 + k])
                        more = index.tokens[w:w + min(policy.extend, left - 1 - k)] if m else []
                        if more:
                            seconds += cost[f"verify_{k + 1 + len(more)}"] - cost[f"verify_{k + 1}"]
                            if n_acc == k:
                                emitted += _prefix(more, a.answer[i + 1 + k:])
            index.extend(a.answer[i + 1:i + 1 + emitted])
            i += emitted
            cycles += 1
            tokens += emitted
        baseline += (A - 1) * cost["full"]
    return {"policy": policy.name, "speedup": baseline / seconds, "tokens_per_cycle": tokens / cycles,
            "lookup_cycles": lookup_cycles, "lookup_tokens_per_cycle": lookup_tokens / max(lookup_cycles, 1),
            "exit_cycles": exit_cycles, "cycles": cycles, "store_cycles": store_cycles,
            "store_tokens_per_cycle": store_tokens / max(store_cycles, 1)}


def _prefix(drafts: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(drafts) and n < len(truth) and drafts[n] == truth[n]:
        n += 1
    return n


def policies() -> list[Policy]:
    """The grid: the shipped policy, the exit alone, lookup alone, and lookup by match size with each fallback."""
    shipped = ((4, 4), (3, 4), (2, 4))
    by_size = {
        "4,3,2:4": shipped,
        "4,3:4": ((4, 4), (3, 4)),
        "4:4": ((4, 4),),
        "8..2:4": tuple((n, 4) for n in range(8, 1, -1)),
        "4,3,2:6": ((4, 6), (3, 6), (2, 6)),
        "4,3,2:8": ((4, 8), (3, 8), (2, 8)),
        "4,3,2:3": ((4, 3), (3, 3), (2, 3)),
        "4,3,2:2": ((4, 2), (3, 2), (2, 2)),
        "4:6,3:4,2:2": ((4, 6), (3, 4), (2, 2)),
        "8..5:8,4:6,3:4,2:2": (*((n, 8) for n in range(8, 4, -1)), (4, 6), (3, 4), (2, 2)),
        "8..5:8,4:6,3:4": (*((n, 8) for n in range(8, 4, -1)), (4, 6), (3, 4)),
        "8..5:8,4:4,3:3,2:2": (*((n, 8) for n in range(8, 4, -1)), (4, 4), (3, 3), (2, 2)),
        "8..4:8,3:4,2:2": (*((n, 8) for n in range(8, 3, -1)), (3, 4), (2, 2)),
        "8..5:6,4:4,3:3,2:2": (*((n, 6) for n in range(8, 4, -1)), (4, 4), (3, 3), (2, 2)),
        "8..5:6,4:4,3:3": (*((n, 6) for n in range(8, 4, -1)), (4, 4), (3, 3)),
        "8..5:4,4:3,3:3,2:2": (*((n, 4) for n in range(8, 4, -1)), (4, 3), (3, 3), (2, 2)),
        "8..5:8,4:4,3:3,2:1": (*((n, 8) for n in range(8, 4, -1)), (4, 4), (3, 3), (2, 1)),
    }
    out = [Policy("full", k=0)] + [Policy(f"exit k={k}", k=k) for k in (1, 2, 3)]
    for name, lengths in by_size.items():
        out.append(Policy(f"lookup {name}, else full", lengths, k=0))
        out.append(Policy(f"lookup {name}, else exit k=1", lengths, k=1))
    for name in ("4,3,2:4", "8..5:8,4:6,3:4,2:2", "8..5:6,4:4,3:3,2:2"):
        lengths = by_size[name]
        for gate in (0.2, 0.3, 0.4):
            out.append(Policy(f"lookup {name}, else exit k=1 gated {gate}", lengths, k=1, gate=gate))
        for extend in (2, 4):
            out.append(Policy(f"lookup {name}, else exit k=1 + {extend} read on", lengths, k=1, extend=extend))
            out.append(Policy(f"lookup {name}, else exit k=2 + {extend} read on", lengths, k=2, extend=extend))
        out.append(Policy(f"lookup {name}, else exit k=2", lengths, k=2))
        out.append(Policy(f"lookup {name} where exit's d_1 agrees, else exit k=1", lengths, k=1, confirm=True))
    return out


STORE_GRID = [((4, 3), 1), ((4, 3), 2), ((4, 3), 4), ((4, 3, 2), 2), ((4, 3, 2), 4), ((5, 4, 3), 2)]
STORE_SHARES = (0.4, 0.6, 0.8)


def datastores(bm, paths: list[str]) -> dict:
    """name -> Datastore over the assistant answers of the JSONL files (each answer + end of turn), one
    per setting of STORE_GRID x STORE_SHARES."""
    docs = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            text = json.loads(line)["messages"][1]["content"]
            docs.append(bm.tokenizer(text, add_special_tokens=False)["input_ids"] + [bm.tokenizer.eos_token_id])
    print(f"datastore: {len(docs)} answers, {sum(map(len, docs))} tokens", file=sys.stderr)
    return {f"{','.join(map(str, sizes))} count>={count} share>={share}": Datastore(docs, sizes, count, share)
            for sizes, count in STORE_GRID for share in STORE_SHARES}


def store_policies(stores: dict) -> list[Policy]:
    """The shipped context lookup, then each datastore, then the exit's k=1 draft."""
    shipped = ((4, 3), (3, 3), (2, 3))
    return [Policy(f"lookup 4,3,2:3, else store [{name}]:{length}{' if d_1 agrees' if confirm else ''}, "
                   "else exit k=1", shipped, k=1, store=name, store_len=length, store_confirm=confirm)
            for name in stores for length in (1, 2, 4) for confirm in (False, True)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="JSONL of {messages: [user, assistant]}: the model's stored greedy answers")
    source.add_argument("--prompts", help="prompt file whose greedy answers are generated first (default: built-in)")
    parser.add_argument("--num", type=int, default=120, help="answers to replay")
    parser.add_argument("--skip", type=int, default=0,
                        help="--prompts: leave out the first SKIP prompts of each category (the bench's own)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--exit", type=int, default=8)
    parser.add_argument("--exits-path", default=None,
                        help="exits checkpoint holding --exit (default: the shipped exits)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per kind of cycle")
    parser.add_argument("--datastore", action="append", default=[],
                        help="JSONL of {messages: [user, assistant]} whose answers make the datastores tried")
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv)
    bm = balspec.load(exits=args.exits_path)
    pairs = answers_from_data(bm, args.data, args.num, args.max_new_tokens) if args.data else \
        answers_from_prompts(bm, args.prompts, args.num, args.max_new_tokens, args.skip)
    answers = replay(bm, pairs, args.exit)
    ids, answer = pairs[0]
    cost = cycle_costs(bm, ids + answer[:len(answer) // 2], args.exit, args.repeats)
    print("cycle costs (x full step): " + "  ".join(f"{k} {v / cost['full']:.2f}" for k, v in cost.items()))
    stores = datastores(bm, args.datastore) if args.datastore else {}
    grid = policies() + store_policies(stores)
    exact = [p for p in grid if p.k <= 1 or not bm.engine.is_draft_kind(args.exit)]  # see first_drafts
    rows = sorted((simulate(p, answers, cost, stores) for p in exact), key=lambda r: -r["speedup"])
    for r in rows:
        print(f"{r['speedup']:5.2f}x  {r['tokens_per_cycle']:.2f} tok/cycle  lookup {r['lookup_cycles']:5d} cycles "
              f"({r['lookup_tokens_per_cycle']:.2f} accepted)  store {r['store_cycles']:5d} "
              f"({r['store_tokens_per_cycle']:.2f})  exit {r['exit_cycles']:5d}  {r['policy']}")
    positions = sum(len(a.answer) - 1 for a in answers)
    exit_top1 = sum(sum(a.exit_right) for a in answers) / positions
    print(f"{len(answers)} answers, {positions} positions, exit {args.exit} top-1 {exit_top1:.3f}", file=sys.stderr)
    if args.output:
        doc = {"command": shlex.join(["python", *sys.argv]), "device": device_name(bm.device),
               "answers": len(answers), "positions": positions, "exit": args.exit, "exit_top1": exit_top1,
               "cycle_costs_s": cost, "policies": rows}
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
