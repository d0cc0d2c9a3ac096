"""The three modes of inference and the public Python API.

    import balspec
    bm = balspec.load()                                   # default model and its shipped exits
    out = bm.generate("Hi!", mode="speculative", exit=12, draft_len=4, max_new_tokens=128)
    out.text, out.token_ids, out.stats.acceptance_rate, out.stats.tokens_per_second
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from balspec.checkpoint import load_exits
from balspec.engine.lookup import NgramLookup
from balspec.engine.sampling import Sampling, check_seed, choose
from balspec.engine.speculative import AUTO_MAX_DRAFT, MAX_DRAFT_LEN, MAX_DRAFT_WIDTH, Cycle, Engine, sync_device
from balspec.errors import BalspecError
from balspec.exits import Exits, with_control_tokens
from balspec.models import DEFAULT_ALIASES, default_device, load_model

MODES = ("full", "early-exit", "speculative")
DEFAULT_EXITS_DIR = Path(__file__).parent / "default_exits"


@dataclass
class GenerationStats:
    mode: str
    exit: int | None
    draft_len: int | str | None
    draft_width: int | None = None
    lookup_len: int | None = None  # speculative: the most tokens a cycle verifies from the context (0: none)
    prompt_tokens: int = 0
    new_tokens: int = 0
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # accepted drafts per cycle
    cycle_tokens: int = 0  # tokens emitted by verify cycles (all but the prefill's token)
    lookup_cycles: int = 0  # cycles whose drafts came from the context (their drafts count as drafted too)
    lookup_drafted: int = 0  # of `drafted`, those read from the context
    lookup_accepted: int = 0  # of `accepted`, those read from the context
    seconds: float = 0.0  # wall time of prefill + decoding, device-synchronised
    prefill_seconds: float = 0.0  # of `seconds`, time to first token: the prompt's pass and the first token

    # Counting convention (the same in `generate` and `bench`): only what reaches the output counts. In the
    # cycle where the output ends (EOS or a stop string among accepted drafts), the drafts after the end
    # count neither as drafted nor as accepted, and the cycle's tokens are those up to the end.

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / drafted tokens, counting drafts up to the end of the output."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def lookup_acceptance_rate(self) -> float | None:
        """Accepted / drafted over the drafts read from the context (lookup cycles) alone."""
        return self.lookup_accepted / self.lookup_drafted if self.lookup_drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """tau: tokens emitted per verify cycle, the bonus token included."""
        return self.cycle_tokens / self.cycles if self.cycles else None

    @property
    def tokens_per_second(self) -> float:
        """New tokens / seconds, prefill included (end to end)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first / seconds after the first token: the decode rate alone (the inverse of
        vLLM's time per output token), which is what speculation changes; None for a one-token output."""
        decode_s = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "lookup_acceptance_rate": self.lookup_acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length, "tokens_per_second": self.tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # the generated tokens only, not the prompt
    stats: GenerationStats
    stop_reason: str  # "eos", "stop" (a stop string) or "length"

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "stop_reason": self.stop_reason,
                "stats": self.stats.to_dict()}


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a reply: the generation config's EOS (one or a list) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def control_token_ids(model, tokenizer) -> set[int]:
    """The EOS and chat-control ids: a draft vocabulary must hold them, or no draft can end a reply."""
    vocab = model.config.vocab_size
    return {t for t in eos_token_ids(model, tokenizer) | set(tokenizer.all_special_ids) if 0 <= t < vocab}


def default_exits_path(model_name: str | None) -> Path | None:
    """The exits shipped inside the package for the embedded default model, or those saved beside a model that
    was trained with them (method sorted, exits.train_base: the run directory holds both), if any."""
    if model_name in DEFAULT_ALIASES and (DEFAULT_EXITS_DIR / "balspec.json").exists():
        return DEFAULT_EXITS_DIR
    if model_name is not None and all((Path(model_name) / f).is_file() for f in ("config.json", "balspec.json")):
        return Path(model_name)
    return None


def load(model: str | None = None, exits: str | Path | None = None, dtype: str = "float32",
         device: str | None = None, draft_vocab: bool = True, logits_dtype: str = "model",
         layer_path: str | None = None, static_cache: bool = False, compile: str | None = None) -> "BalconyModel":
    """Load a base model (default: the embedded SmolLM2-135M-Instruct) and an exits checkpoint.

    exits=None loads the shipped exits of the default model; other models run `full` mode only until
    given an exits checkpoint (train one with `balspec train`). draft_vocab=False drafts with the full
    LM head even when the checkpoint stores a reduced draft vocabulary (the output is the same).
    logits_dtype="float32" computes the full model's LM head in fp32 when dtype is bfloat16 or float16
    ("model", the default: in dtype; measured, fp32 logits did not reduce bf16 mismatches: README).
    layer_path: "lean" or "generic" forces how the engine runs decoder layers (speculative.Engine); "auto" or
    None chooses by a check at start. A bad value, or "lean" where it is not exact: BalspecError.
    static_cache / compile: static-shape passes, and those captured once per shape ("cuda-graphs", CUDA only, or
    torch.compile's "reduce-overhead"); speculative.Engine says more.
    """
    hf_model, tokenizer = load_model(model, dtype, device or default_device())
    path = Path(exits) if exits is not None else default_exits_path(model)
    exit_modules, meta = load_exits(hf_model, path) if path is not None else (None, None)
    vocab = exit_modules.draft_vocab if draft_vocab and exit_modules is not None else None
    return BalconyModel(hf_model, tokenizer, exit_modules, meta, vocab, logits_dtype, layer_path, static_cache, compile)


class BalconyModel:
    """A frozen causal LM, its balcony exits and the engine that decodes with them (batch size 1)."""

    def __init__(self, model, tokenizer, exits: Exits | None = None, meta: dict | None = None,
                 draft_vocab: torch.Tensor | None = None, logits_dtype: str = "model",
                 layer_path: str | None = None, static_cache: bool = False, compile: str | None = None):
        self.model, self.tokenizer, self.exit_modules, self.meta = model, tokenizer, exits, meta or {}
        self.eos_ids = eos_token_ids(model, tokenizer)
        if draft_vocab is not None:  # whatever the checkpoint stored, the drafts can end a reply
            draft_vocab = with_control_tokens(draft_vocab, control_token_ids(model, tokenizer))
        self.engine = Engine(model, exits, draft_vocab, logits_dtype=logits_dtype, layer_path=layer_path,
                             static_cache=static_cache, compile=compile)
        self.device = self.engine.device

    @property
    def exits(self) -> list[int]:
        return self.exit_modules.exits if self.exit_modules is not None else []

    @property
    def defaults(self) -> dict:
        """Generation defaults recorded with the exits (chosen by measurement), else a middle exit, k = 4."""
        recorded = self.meta.get("defaults", {})
        middle = self.exits[len(self.exits) // 2] if self.exits else None
        return {"mode": recorded.get("mode", "speculative" if self.exits else "full"),
                "exit": recorded.get("exit", middle), "draft_len": recorded.get("draft_len", 4),
                "draft_width": recorded.get("draft_width", 1), "lookup_len": recorded.get("lookup_len", 0)}

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        if not prompt or not prompt.strip():
            raise BalspecError("the prompt is empty")
        check_utf8(prompt, "the prompt")
        if chat and self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def generate(self, prompt: str | list[int], mode: str | None = None, exit: int | None = None,
                 draft_len: int | str | None = None, draft_width: int | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = True,
                 stop: list[str] | None = None, eos: bool = True,
                 on_cycle: Callable[[list[int], list[int]], None] | None = None,
                 lookup_len: int | None = None) -> GenerationOutput:
        """Generate from `prompt` (text, chat-formatted unless chat=False, or token ids).

        draft_width > 1 (greedy only) also verifies the exit's 2nd..width-th choices for the first drafted
        position in the same pass; None takes the recorded default when decoding greedily, else 1.
        lookup_len > 0 (speculative mode): where the last tokens occurred earlier in the prompt or output, the
        cycle verifies up to lookup_len tokens that followed them instead of drafting with the exit (prompt
        lookup: lookup.NgramLookup, Engine.lookup_cycle); 0 drafts with the exit only; None takes the recorded
        default (0 where none is recorded).
        on_cycle(tokens, rejected_drafts) is called as tokens are decided, for streaming: `tokens` are the new
        tokens of `token_ids`, never one past the end of the output (EOS, a stop string or the budget), and
        rejected_drafts the drafts the verifier threw away in that cycle (none in the cycle where the output
        ends). `stream.TokenStreamer` turns them into text that equals `text` once finished.
        """
        mode = mode or self.defaults["mode"]
        if mode not in MODES:
            raise BalspecError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        exit_layer = self._check_exit(mode, exit)
        k, adaptive = self._check_draft_len(mode, draft_len)
        sampling = Sampling(temperature, top_k, top_p)
        width = self._check_draft_width(draft_width, sampling)
        lookup_len = self._check_lookup_len(lookup_len)
        if max_new_tokens < 1:
            raise BalspecError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        check_seed(seed)
        for text in stop or []:
            check_utf8(text, "--stop: a stop string")
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BalspecError("the prompt is empty")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and len(ids) + max_new_tokens > context:
            raise BalspecError(f"prompt ({len(ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds "
                               f"the model's context of {context} tokens")
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        speculative = mode == "speculative"
        stats = GenerationStats(mode, exit_layer, ("auto" if adaptive else k) if speculative else None,
                                width if speculative else None, lookup_len if speculative else None,
                                prompt_tokens=len(ids))
        stopper = _Stopper(self.tokenizer, self.eos_ids if eos else set(), stop or [], max_new_tokens)
        with torch.inference_mode():
            self._decode(ids, mode, exit_layer, k, adaptive, width, sampling, generator, stats, stopper, on_cycle,
                         lookup_len)
        stats.new_tokens = len(stopper.tokens)
        return GenerationOutput(stopper.text(), stopper.tokens, stats, stopper.reason)

    def _decode(self, ids, mode, exit_layer, k, adaptive, width, sampling, generator, stats, stopper, on_cycle,
                lookup_len):
        engine = self.engine
        engine.reset(len(ids) + stopper.budget + max(k, AUTO_MAX_DRAFT, lookup_len) + width + 1)
        prompt = torch.tensor([ids], device=self.device)  # [1, P]
        sync_device(self.device)
        t0 = time.perf_counter()
        first = choose(engine.prefill(prompt, mode, exit_layer), sampling, generator).item()  # .item(): synced
        stats.prefill_seconds = time.perf_counter() - t0
        stopper.add([first])
        lookup = NgramLookup(ids + [first]) if mode == "speculative" and lookup_len else None
        callback_s = 0.0  # time spent in on_cycle (printing) is not decoding time
        if on_cycle:
            t1 = time.perf_counter()
            on_cycle([first], [])
            callback_s += time.perf_counter() - t1
        while not stopper.done:
            start = len(ids) + len(stopper.tokens) - 1  # position of the pending token
            pending = torch.tensor([[stopper.tokens[-1]]], device=self.device)
            looked_up = lookup.propose(min(lookup_len, stopper.remaining - 1)) if lookup else []
            if looked_up:
                cycle = engine.lookup_cycle(pending, start, exit_layer, looked_up, sampling, generator)
                stats.lookup_cycles += 1
            elif mode == "speculative":
                cycle = engine.cycle(pending, start, exit_layer, min(k, stopper.remaining - 1), sampling,
                                     generator, adaptive, width)
            else:
                token = choose(engine.step(pending, start, mode, exit_layer), sampling, generator).item()
                cycle = Cycle(tokens=[token], drafts=[], accepted=0)
            kept = stopper.add(cycle.tokens)  # < len(cycle.tokens) when the output ends inside the cycle
            if lookup:
                lookup.extend(cycle.tokens[:kept])
            cut = kept < len(cycle.tokens)
            if mode == "speculative":
                drafted, accepted = (kept, kept) if cut else (len(cycle.drafts), cycle.accepted)
                stats.cycles += 1
                stats.cycle_tokens += kept
                stats.drafted += drafted
                stats.accepted += accepted
                stats.accepted_lengths.append(accepted)
                if looked_up:
                    stats.lookup_drafted += drafted
                    stats.lookup_accepted += accepted
            if on_cycle:
                t1 = time.perf_counter()
                on_cycle(cycle.tokens[:kept], [] if cut else cycle.drafts[cycle.accepted:])
                callback_s += time.perf_counter() - t1
        sync_device(self.device)
        stats.seconds = time.perf_counter() - t0 - callback_s

    def _check_exit(self, mode: str, exit_layer: int | None) -> int | None:
        if mode == "full":
            return None
        if not self.exits:
            raise BalspecError(f"--mode {mode} needs exits: pass --exits-path (train them with `balspec train`)")
        default = self.defaults["exit"]
        if exit_layer is None and mode == "early-exit" and self.exit_modules.kinds.get(default) == "draft":
            raise BalspecError(f"--mode early-exit: the checkpoint's default exit {default} is a "
                               "draft-kind exit, with no sub-model of its own; pass --exit with a sub-model exit "
                               f"({','.join(map(str, self.exit_modules.sub_model_exits)) or 'it has none'})")
        exit_layer = exit_layer if exit_layer is not None else default
        self.exit_modules[exit_layer]  # raises a clear error for an exit the checkpoint lacks
        if mode == "early-exit":
            self.exit_modules.check_sub_model(exit_layer, "--mode early-exit")
        return exit_layer

    def _check_draft_len(self, mode: str, draft_len: int | str | None) -> tuple[int, bool]:
        draft_len = draft_len if draft_len is not None else self.defaults["draft_len"]
        if draft_len == "auto":
            return AUTO_MAX_DRAFT, True
        try:
            k = int(draft_len)
        except (TypeError, ValueError):
            raise BalspecError(f"--draft-len must be a whole number >= 1 or 'auto', got {draft_len!r}") from None
        if not 1 <= k <= MAX_DRAFT_LEN:
            raise BalspecError(f"--draft-len must lie in 1..{MAX_DRAFT_LEN} (or be 'auto'), got {k}")
        return k, False

    def _check_lookup_len(self, lookup_len: int | None) -> int:
        if lookup_len is None:
            return self.defaults["lookup_len"]
        if not isinstance(lookup_len, int) or isinstance(lookup_len, bool) or not 0 <= lookup_len <= MAX_DRAFT_LEN:
            raise BalspecError(f"--lookup-len must be a whole number in 0..{MAX_DRAFT_LEN}, got {lookup_len!r}")
        return lookup_len

    def _check_draft_width(self, draft_width: int | None, sampling: Sampling) -> int:
        if draft_width is None:
            return self.defaults["draft_width"] if sampling.greedy else 1
        if not isinstance(draft_width, int) or isinstance(draft_width, bool) or not 1 <= draft_width <= MAX_DRAFT_WIDTH:
            raise BalspecError(f"--draft-width must be a whole number in 1..{MAX_DRAFT_WIDTH}, got {draft_width!r}")
        if draft_width > 1 and not sampling.greedy:
            raise BalspecError("--draft-width > 1 needs greedy decoding (--temperature 0); "
                               "sampling drafts a single chain")
        return draft_width


def check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes of argv or a file arrive as lone surrogates
        raise BalspecError(f"{what} is not valid UTF-8 text (at character {e.start})") from None


class _Stopper:
    """Collects emitted tokens and decides when to stop: EOS, a stop string or the token budget.

    EOS or a stop string may arrive inside a cycle's accepted drafts: everything after it is cut.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop: list[str], budget: int):
        self.tokenizer, self.eos_ids, self.stop, self.budget = tokenizer, eos_ids, [s for s in stop if s], budget
        # a token decodes to at least one byte, so a stop string spans at most as many tokens as it has bytes
        # (not characters: a character may take several tokens)
        self._window = max(len(s.encode()) for s in self.stop) + 8 if self.stop else 0
        self.tokens: list[int] = []
        self.reason = "length"
        self.done = False
        self._cut: int | None = None  # text length where a stop string begins

    @property
    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    def add(self, new: list[int]) -> int:
        """Append tokens up to the end of the output; returns how many of `new` were kept."""
        for i, token in enumerate(new):
            if self.done:
                return i
            self.tokens.append(token)
            if token in self.eos_ids:
                self.reason, self.done = "eos", True
            elif self.stop and self._hit_stop():
                self.reason, self.done = "stop", True
            elif len(self.tokens) >= self.budget:
                self.done = True
        return len(new)

    def _hit_stop(self) -> bool:
        tail = self.tokenizer.decode(self.tokens[-self._window:], skip_special_tokens=True)
        if not any(s in tail for s in self.stop):
            return False
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self._cut = min(text.find(s) for s in self.stop if s in text)
        return True

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return text[:self._cut] if self._cut is not None else text
