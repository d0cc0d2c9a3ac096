"""The benchmark: the same prompts decoded in `full` mode (the baseline), in `speculative` mode for every
exit and draft length, in `early-exit` mode per exit, and by peer methods from transformers.

Every prompt is decoded under every setting before the next prompt starts, so the runs that a speedup
compares are close in time: on a shared machine, load drifts over minutes and would otherwise bias
whichever setting ran last. Wall time is taken the same way for the engine and the peers: device
synchronised, around the whole call (prefill included), prompt already tokenised.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from balspec.engine import skinny
from balspec.engine.sampling import Sampling, check_seed
from balspec.engine.speculative import MAX_DRAFT_LEN, MAX_DRAFT_WIDTH, sync_device
from balspec.errors import BalspecError
from balspec.exits import validate_exits
from balspec.measure.costs import pass_costs
from balspec.measure.prompts import Prompt, PromptSet
from balspec.models import device_name

PEERS = ("hf", "hf-early-exit", "prompt-lookup")
PEER_DRAFT_LEN = 4  # drafts per cycle for the peers when --draft-len gives no fixed number


@dataclass(frozen=True)
class BenchOptions:
    exits: list[int]
    draft_lens: list[int | str]  # whole numbers >= 1 or "auto"
    draft_widths: list[int] = field(default_factory=lambda: [1])  # > 1: siblings of the first draft (greedy)
    lookup_lens: list[int] = field(default_factory=lambda: [0])  # > 0: drafts read from the context first
    max_new_tokens: int = 128
    temperature: float = 0.0
    warmup: int = 1  # untimed runs of the first prompt per setting (kernel choice, allocator, caches)
    seed: int = 0
    peers: list[str] = field(default_factory=list)
    eos: bool = True  # False decodes exactly max_new_tokens per prompt
    cost_repeats: int = 10
    early_exit: bool = True  # also time each exit's sub-model alone


@dataclass(frozen=True)
class Setting:
    """One way of decoding the prompts."""

    mode: str  # "full", "speculative", "early-exit" or "peer"
    name: str
    exit: int | None = None
    draft_len: int | str | None = None
    draft_width: int = 1
    lookup_len: int = 0  # speculative: up to this many drafts read from the context where it repeats (0: none)


@dataclass
class Run:
    """One prompt decoded under one setting."""

    prompt: Prompt
    token_ids: list[int]
    seconds: float
    drafted: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    cycle_tokens: int = 0  # tokens emitted by verify cycles (GenerationStats' counting convention)
    lookup_cycles: int = 0  # cycles that verified drafts read from the context
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    prefill_seconds: float | None = None  # balspec's own modes: time to first token, within `seconds`
    decode_seconds: float | None = None  # ... and the decoding after it (GenerationStats.seconds - prefill)


@dataclass
class Summary:
    """Runs of one setting aggregated: totals over prompts, never a mean of per-prompt ratios."""

    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    speedup: float | None = None  # over the baseline on the same prompts, end to end (prefill included)
    ttft_s: float | None = None  # mean time to first token (the prompt's pass): balspec's modes only
    decode_tokens_per_second: float | None = None  # tokens after the first / seconds after it
    decode_speedup: float | None = None  # decode_tokens_per_second over the baseline's, on the same prompts
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None  # tau: tokens per cycle, bonus included
    accepted_hist: list[int] | None = None  # [n] = cycles that accepted n drafts
    lookup_share: float | None = None  # with --lookup-len: the share of cycles that verified drafts from the context
    lookup_acceptance_rate: float | None = None  # ... and accepted / drafted over those drafts alone
    greedy_mismatches: int | None = None  # prompts whose greedy tokens differ from the baseline's
    # first differences per 1000 tokens decoded in agreement with the baseline (up to and including the first
    # difference): 0 in fp32; in bf16 the verify pass's rounding may break a near-tie differently
    mismatches_per_1000_tokens: float | None = None


@dataclass
class CostModel:
    """DESIGN.md 3: T = k * c_draft + c_verify(k + 1); bound = tau * c_full / T."""

    draft_len: float  # mean drafts per cycle (equals k unless k is "auto" or cut by the budget)
    draft_width: int
    full_step_s: float
    draft_step_s: float
    verify_s: float
    cycle_s: float
    bound: float
    efficiency: float  # measured speedup / bound
    # the per-draft acceptance a chain of round(draft_len) drafts would need, at these pass costs, for the bound to
    # reach 1.0x and 1.5x (each draft accepted with the same probability; None: out of reach even at 1.0)
    acceptance_for_parity: float | None = None
    acceptance_for_1_5x: float | None = None


@dataclass
class Result:
    setting: Setting
    summary: Summary
    per_category: dict[str, Summary]
    cost_model: CostModel | None = None


@dataclass
class BenchReport:
    meta: dict
    baseline: Result
    results: list[Result]


def parse_draft_lens(text: str) -> list[int | str]:
    """`4` or `2,4,6,auto` -> [2, 4, 6, "auto"]."""
    out: list[int | str] = []
    for item in (x.strip() for x in str(text).split(",")):
        if item == "auto":
            out.append(item)
            continue
        try:
            k = int(item)
        except ValueError:
            raise BalspecError(f"--draft-len: expected whole numbers >= 1 or 'auto' like 2,4,auto, "
                               f"got {text!r}") from None
        if not 1 <= k <= MAX_DRAFT_LEN:
            raise BalspecError(f"--draft-len: draft lengths must lie in 1..{MAX_DRAFT_LEN}, got {k}")
        out.append(k)
    if len(set(out)) != len(out):
        raise BalspecError(f"--draft-len: duplicated value in {text!r}")
    return out


def _whole_numbers(text: str, flag: str, low: int, high: int, example: str) -> list[int]:
    """`1,3` -> [1, 3]: distinct whole numbers in low..high, else BalspecError naming the flag."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BalspecError(f"{flag}: expected whole numbers >= {low} like {example}, got {text!r}") from None
    if not out or min(out) < low or max(out) > high or len(set(out)) != len(out):
        raise BalspecError(f"{flag}: expected distinct whole numbers in {low}..{high} like {example}, got {text!r}")
    return out


def parse_draft_widths(text: str, temperature: float = 0.0) -> list[int]:
    """`1` or `1,3` -> [1, 3]; widths above 1 verify siblings of the first draft, which needs greedy decoding."""
    out = _whole_numbers(text, "--draft-width", 1, MAX_DRAFT_WIDTH, "1,3")
    if max(out) > 1 and temperature > 0:
        raise BalspecError("--draft-width > 1 needs greedy decoding (--temperature 0)")
    return out


def parse_lookup_lens(text: str) -> list[int]:
    """`0` or `0,4` -> [0, 4]: the most drafts a cycle reads from the context (0: the exit drafts every cycle)."""
    return _whole_numbers(text, "--lookup-len", 0, MAX_DRAFT_LEN, "0,4")


def parse_peers(text: str | None) -> list[str]:
    peers = [p.strip() for p in (text or "").split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise BalspecError(f"--peers: unknown peer {bad[0]!r}; choose from {', '.join(PEERS)}")
    return list(dict.fromkeys(peers))


def check_exits(exits: list[int], available: list[int]) -> None:
    missing = [e for e in exits if e not in available]
    if missing:
        raise BalspecError(f"--exits: {','.join(map(str, missing))} not in the exits checkpoint "
                           f"(it has {','.join(map(str, available))})")


def check_options(bm, opts: BenchOptions) -> None:
    """Refuse what the loaded model and checkpoint cannot run, before any timing starts."""
    if not bm.exits:
        raise BalspecError("bench needs exits: pass --exits-path (train them with `balspec train`)")
    validate_exits(list(opts.exits), bm.engine.num_layers,
                   [e for e, kind in bm.exit_modules.kinds.items() if kind == "draft"])
    check_exits(opts.exits, bm.exits)
    if bm.engine.static:
        draft_kind = [e for e in opts.exits if bm.exit_modules.kinds[e] == "draft"]
        if draft_kind:
            raise BalspecError(f"exit(s) {','.join(map(str, draft_kind))}: draft-kind exits run only with the dynamic "
                               "cache: drop --static-cache/--compile or bench sub-model exits")
    check_numbers(opts)
    context = getattr(bm.model.config, "max_position_embeddings", None)
    if context is not None and opts.max_new_tokens >= context:
        raise BalspecError(f"--max-new-tokens ({opts.max_new_tokens}) must be below the model's context of "
                           f"{context} tokens (prompts need room too)")


def check_numbers(opts: BenchOptions) -> None:
    """The numeric options that need no model: checked before anything is loaded."""
    if opts.max_new_tokens < 1:
        raise BalspecError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    Sampling(opts.temperature)  # finite and >= 0
    if opts.warmup < 0:
        raise BalspecError(f"--warmup must be >= 0, got {opts.warmup}")
    check_seed(opts.seed)


def settings(opts: BenchOptions, sub_model_exits: list[int]) -> list[Setting]:
    """Baseline first, then speculative per exit and draft length, early-exit per exit that has a sub-model
    (a draft-kind exit has none), peers."""
    out = [Setting("full", "full")]
    out += [Setting("speculative", "speculative", e, k, w, n) for e in opts.exits for k in opts.draft_lens
            for w in opts.draft_widths for n in opts.lookup_lens]
    out += [Setting("early-exit", "early-exit", e) for e in opts.exits if e in sub_model_exits] \
        if opts.early_exit else []
    k = peer_draft_len(opts)
    for peer in opts.peers:
        if peer == "hf":
            out.append(Setting("peer", peer))
        elif peer == "hf-early-exit":
            out += [Setting("peer", peer, e, k) for e in opts.exits]
        else:
            out.append(Setting("peer", peer, None, k))
    return out


def peer_draft_len(opts: BenchOptions) -> int:
    fixed = [k for k in opts.draft_lens if k != "auto"]
    return fixed[0] if fixed else PEER_DRAFT_LEN


def run_bench(bm, prompt_set: PromptSet, opts: BenchOptions, command: str = "", exits_checkpoint: str | None = None,
              on_step: Callable[[int, int, str], None] | None = None) -> BenchReport:
    """Decode every prompt under every setting; on_step(done, total, label) reports progress."""
    check_options(bm, opts)
    plan = settings(opts, bm.exit_modules.sub_model_exits)
    ids = [bm.encode(p.text) for p in prompt_set.prompts]
    total = len(plan) * (opts.warmup + len(ids)) + sum(s.mode == "speculative" for s in plan)
    done = 0
    if bm.engine.static:  # storage for the longest prompt now: growing it later would re-capture every graph
        bm.engine.reset(max(map(len, ids)) + opts.max_new_tokens + MAX_DRAFT_LEN + max(opts.draft_widths) + 1)

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        if on_step:
            on_step(done, total, label)

    for setting in plan:
        for _ in range(opts.warmup):
            decode(bm, setting, ids[0], prompt_set.prompts[0], opts, opts.seed)
            tick(f"warm-up {label(setting)}")
    runs: dict[Setting, list[Run]] = {s: [] for s in plan}
    for i, (prompt, prompt_ids) in enumerate(zip(prompt_set.prompts, ids)):
        seed = (opts.seed + i) % 2 ** 64  # a --seed near the top of torch's range wraps around
        for setting in plan:
            runs[setting].append(decode(bm, setting, prompt_ids, prompt, opts, seed))
            tick(f"prompt {i + 1}/{len(ids)} {label(setting)}")
    baseline_runs = runs[plan[0]]
    greedy = opts.temperature == 0
    baseline = Result(plan[0], summarize(baseline_runs), categorize(baseline_runs, None, False))
    results = []
    for setting in plan[1:]:
        compare = greedy and setting.mode != "early-exit"  # early exit is another model: it may differ
        result = Result(setting, summarize(runs[setting], baseline_runs, compare),
                        categorize(runs[setting], baseline_runs, compare))
        if setting.mode == "speculative":
            result.cost_model = model_costs(bm, ids[0], setting, result.summary, runs[setting], opts)
            tick(f"pass costs {label(setting)}")
        results.append(result)
    return BenchReport(describe(bm, prompt_set, opts, command, exits_checkpoint), baseline, results)


def label(setting: Setting) -> str:
    parts = [setting.name]
    if setting.exit is not None:
        parts.append(f"e{setting.exit}")
    if setting.draft_len is not None:
        parts.append(f"k{setting.draft_len}")
    if setting.draft_width > 1:
        parts.append(f"w{setting.draft_width}")
    if setting.lookup_len:
        parts.append(f"lookup{setting.lookup_len}")
    return " ".join(parts)


def decode(bm, setting: Setting, prompt_ids: list[int], prompt: Prompt, opts: BenchOptions, seed: int) -> Run:
    if setting.mode == "peer":
        return decode_peer(bm, setting, prompt_ids, prompt, opts, seed)
    sync_device(bm.device)
    t0 = time.perf_counter()
    width = setting.draft_width if setting.mode == "speculative" else None
    out = bm.generate(prompt_ids, mode=setting.mode, exit=setting.exit, draft_len=setting.draft_len,
                      draft_width=width, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                      seed=seed, eos=opts.eos, lookup_len=setting.lookup_len if setting.mode == "speculative" else 0)
    sync_device(bm.device)
    seconds = time.perf_counter() - t0
    s = out.stats
    return Run(prompt, list(out.token_ids), seconds, s.drafted, s.accepted, list(s.accepted_lengths), s.cycle_tokens,
               s.lookup_cycles, s.lookup_drafted, s.lookup_accepted, s.prefill_seconds, s.seconds - s.prefill_seconds)


def decode_peer(bm, setting: Setting, prompt_ids: list[int], prompt: Prompt, opts: BenchOptions,
                seed: int) -> Run:
    """transformers' own `generate()`: plain, LayerSkip-style early-exit drafting, or prompt lookup."""
    from transformers.utils import logging as hf_logging

    config = copy.deepcopy(bm.model.generation_config)
    # an empty EOS list, not None: None falls back to the model's own generation config
    config.update(max_new_tokens=opts.max_new_tokens, min_new_tokens=None, do_sample=opts.temperature > 0,
                  eos_token_id=sorted(bm.eos_ids) if opts.eos else [])
    if opts.temperature > 0:
        config.update(temperature=opts.temperature, top_k=0, top_p=1.0)
    if config.pad_token_id is None:
        config.pad_token_id = bm.tokenizer.pad_token_id if bm.tokenizer.pad_token_id is not None else 0
    if setting.name == "hf-early-exit":
        # a fixed k and no confidence cut-off, so it drafts like balspec's speculative mode
        config.update(assistant_early_exit=setting.exit, num_assistant_tokens=setting.draft_len,
                      num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    elif setting.name == "prompt-lookup":
        config.update(prompt_lookup_num_tokens=setting.draft_len)
    inputs = torch.tensor([prompt_ids], device=bm.device)  # [1, P]
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # assisted decoding warns about its own internal arguments
    try:
        sync_device(bm.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), skinny.suspended(bm.model):
            out = bm.model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
        sync_device(bm.device)
        seconds = time.perf_counter() - t0
    finally:
        hf_logging.set_verbosity(verbosity)
    return Run(prompt, out[0, len(prompt_ids):].tolist(), seconds)


def summarize(runs: list[Run], baseline: list[Run] | None = None, compare: bool = False) -> Summary:
    tokens = sum(len(r.token_ids) for r in runs)
    seconds = sum(r.seconds for r in runs)
    tps = tokens / seconds if seconds > 0 else 0.0
    summary = Summary(len(runs), tokens, seconds, tps)
    if runs and all(r.prefill_seconds is not None and r.decode_seconds is not None for r in runs):
        summary.ttft_s = sum(r.prefill_seconds for r in runs) / len(runs)
        summary.decode_tokens_per_second = _decode_rate(runs)
    if baseline is not None:
        base_tokens, base_seconds = sum(len(r.token_ids) for r in baseline), sum(r.seconds for r in baseline)
        summary.speedup = tps / (base_tokens / base_seconds) if base_tokens and base_seconds > 0 else None
        base_rate = _decode_rate(baseline) if all(r.decode_seconds is not None for r in baseline) else None
        if summary.decode_tokens_per_second and base_rate:
            summary.decode_speedup = summary.decode_tokens_per_second / base_rate
        if compare:
            summary.greedy_mismatches = sum(r.token_ids != b.token_ids for r, b in zip(runs, baseline))
            compared = sum(agreeing_tokens(r.token_ids, b.token_ids) for r, b in zip(runs, baseline))
            summary.mismatches_per_1000_tokens = 1000 * summary.greedy_mismatches / compared if compared else None
    lengths = [n for r in runs for n in r.accepted_lengths]
    if lengths:
        drafted = sum(r.drafted for r in runs)
        summary.acceptance_rate = sum(r.accepted for r in runs) / drafted if drafted else None
        summary.mean_accepted_length = sum(r.cycle_tokens for r in runs) / len(lengths)
        counts = Counter(lengths)
        summary.accepted_hist = [counts[n] for n in range(max(lengths) + 1)]
        lookup_drafted = sum(r.lookup_drafted for r in runs)
        if lookup_drafted:
            summary.lookup_share = sum(r.lookup_cycles for r in runs) / len(lengths)
            summary.lookup_acceptance_rate = sum(r.lookup_accepted for r in runs) / lookup_drafted
    return summary


def _decode_rate(runs: list[Run]) -> float | None:
    """Tokens after each run's first / the seconds after it, totals over the runs."""
    tokens = sum(max(len(r.token_ids) - 1, 0) for r in runs)
    seconds = sum(r.decode_seconds for r in runs)
    return tokens / seconds if tokens and seconds > 0 else None


def agreeing_tokens(tokens: list[int], reference: list[int]) -> int:
    """Tokens compared until the first difference, that one included (all of the shorter when none)."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i + 1
    return min(len(tokens), len(reference)) + (len(tokens) != len(reference))


def categorize(runs: list[Run], baseline: list[Run] | None, compare: bool) -> dict[str, Summary]:
    """Per-category summaries; each compares with the baseline's runs of the same prompts."""
    categories = list(dict.fromkeys(r.prompt.category for r in runs))
    out = {}
    for c in categories:
        pick = [i for i, r in enumerate(runs) if r.prompt.category == c]
        base = [baseline[i] for i in pick] if baseline is not None else None
        out[c] = summarize([runs[i] for i in pick], base, compare)
    return out


def model_costs(bm, prompt_ids: list[int], setting: Setting, summary: Summary, runs: list[Run],
                opts: BenchOptions) -> CostModel | None:
    """Pass costs measured on the first prompt, turned into the speedup bound the engine should reach."""
    cycles = sum(len(r.accepted_lengths) for r in runs)
    if not cycles or summary.mean_accepted_length is None or setting.lookup_len or bm.engine.compiled:
        return None  # the model knows no lookup cycles, and pass_costs times a compiled engine's verify eagerly
    k_mean = sum(r.drafted for r in runs) / cycles
    k = max(1, round(k_mean))
    costs = pass_costs(bm, prompt_ids, setting.exit, k, setting.draft_width, repeats=opts.cost_repeats)
    cycle_s = k_mean * costs["draft_step_s"] + costs["verify_s"]
    bound = summary.mean_accepted_length * costs["full_step_s"] / cycle_s
    efficiency = summary.speedup / bound if summary.speedup is not None else math.nan
    needed = [acceptance_needed(target, k, costs["full_step_s"], k * costs["draft_step_s"] + costs["verify_s"])
              for target in (1.0, 1.5)]
    return CostModel(k_mean, setting.draft_width, costs["full_step_s"], costs["draft_step_s"], costs["verify_s"],
                     cycle_s, bound, efficiency, *needed)


def acceptance_needed(speedup: float, k: int, full_step_s: float, cycle_s: float) -> float | None:
    """The acceptance alpha at which k drafts per cycle reach `speedup`: tau(alpha) * c_full / T = speedup, with
    tau = 1 + alpha + .. + alpha^k tokens per cycle. None when even alpha = 1 falls short."""
    def bound(alpha: float) -> float:
        return sum(alpha ** i for i in range(k + 1)) * full_step_s / cycle_s

    if bound(1.0) < speedup:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):  # bound() grows with alpha: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if bound(mid) < speedup else (low, mid)
    return high


def describe(bm, prompt_set: PromptSet, opts: BenchOptions, command: str, exits_checkpoint: str | None) -> dict:
    import transformers

    from balspec import __version__

    return {"device": device_name(bm.device), "dtype": str(bm.engine.dtype).replace("torch.", ""),
            "logits_dtype": bm.engine.logits_dtype,
            "model": getattr(bm.model.config, "_name_or_path", "") or type(bm.model).__name__,
            "exits_checkpoint": exits_checkpoint,
            "draft_vocab": None if bm.engine.draft_vocab is None else int(bm.engine.draft_vocab.numel()),
            "skinny_matmul": bm.engine.skinny, "skinny_rows": sorted(bm.engine.skinny_rows), "layer_path": bm.engine.layer_path,
            "static_cache": bm.engine.static, "compile": bm.engine.compiled,
            "versions": {"balspec": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "prompts": {"source": prompt_set.source, "count": len(prompt_set.prompts),
                        "categories": prompt_set.categories},
            "exits": opts.exits, "exit_kinds": {str(e): bm.exit_modules.kinds[e] for e in opts.exits},
            "draft_lens": opts.draft_lens, "draft_widths": opts.draft_widths, "lookup_lens": opts.lookup_lens,
            "max_new_tokens": opts.max_new_tokens,
            "temperature": opts.temperature, "seed": opts.seed, "warmup": opts.warmup, "eos": opts.eos,
            "peer_draft_len": peer_draft_len(opts) if opts.peers else None, "command": command}


