"""The engine: the frozen trunk, its balconies and one KV cache, and the speculative cycle.

Because the trunk is frozen and shared, a draft's run of layers 1..e IS the full model's run of those
layers: the verify pass starts from the buffered exit hidden states and runs only layers e+1..N.
Steps are numbered as in DESIGN.md section 3.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from balspec.engine import graphs, skinny
from balspec.engine.architecture import architecture, causal_mask
from balspec.engine.cache import KVCache, StaticWrites
from balspec.engine.layers import decoder_layer, has_lean_form, key_value, module_layer
from balspec.engine.sampling import Sampling, accept_greedy, accept_sampling, choose, probabilities
from balspec.engine.tree import DraftTree, Rows
from balspec.errors import BalspecError
from balspec.exits import Exits, HalfLayer, model_parts

LOGITS_DTYPES = ("float32", "model")
AUTO_MAX_DRAFT = 8  # "auto" drafts until the draft is unsure, at most this many tokens
MAX_DRAFT_LEN = 64  # --draft-len bound: acceptance^k makes longer chains worthless, and the cache holds k rows
MAX_DRAFT_WIDTH = 64  # --draft-width bound: each sibling is one more verify row
AUTO_MIN_CONFIDENCE = 0.6  # ... where unsure means top probability below this (0.4/0.6/0.8 measured: 0.6 won)
LAYER_PATHS = ("lean", "generic")  # layers.py: balspec's own forward of a Llama-family layer, or the model's module


def parse_layer_path(value: str | None) -> str | None:
    """--layer-path: "auto" or None (the engine chooses by its check at start) -> None; "lean" or "generic" ->
    itself. Anything else: BalspecError naming the flag."""
    if value in (None, "auto"):
        return None
    if value not in LAYER_PATHS:
        raise BalspecError(f"--layer-path: choose one of auto, {', '.join(LAYER_PATHS)}; got {value!r}")
    return value


@dataclass
class Cycle:
    """What one draft-verify cycle did: the emitted tokens are drafts[:accepted] + [next_token]."""

    tokens: list[int]
    drafts: list[int]  # all k drafted tokens: drafts[:accepted] were kept
    accepted: int


class Engine:
    """Runs ranges of decoder layers of a frozen causal LM and its balconies over one KV cache.

    layer_path: "lean" or "generic" (layers.py); "auto" or None takes the lean forward where the check at start
    shows it computes this model's layers exactly, else the generic path. Either way the engine's full-mode logits are
    checked against the model's own forward at start (check_forward): nothing runs a formula that differs.
    logits_dtype: "float32" (the full model's LM head in fp32 for bf16/fp16 models) or "model".
    static_cache: every pass over a few rows has static shapes: the rows write their K/V at cache indices given as
    a device tensor and attend over the whole cache under a position mask (gpt-fast's form), so nothing about a
    pass's shapes depends on where in the sequence it runs. Slower on a CPU (attention over max_len keys); it
    exists so that compile can capture the passes.
    compile: None, or static_cache plus each draft step, balcony pass, verify (per k and width) and full step
    captured once per shape: "reduce-overhead" (torch.compile: inductor's kernels, replayed as a CUDA graph on
    a GPU; minutes to compile the default model's shapes) or "cuda-graphs" (CUDA only: the eager kernels
    captured with torch.cuda.graph on the first call of each shape, then replayed; weights and cache are used in
    place). Prefills stay eager (their length varies). A CUDA graph replays one launch instead of a few hundred
    kernels. Measured against eager by the GPU plan. A bad value, or cuda-graphs off CUDA: BalspecError.
    """

    def __init__(self, model: torch.nn.Module, exits: Exits | None = None, draft_vocab: torch.Tensor | None = None,
                 logits_dtype: str = "model", layer_path: str | None = None, static_cache: bool = False,
                 compile: str | None = None):
        self.model = model
        graphs.check_compile(compile)
        self.static, self.compiled = static_cache or compile is not None, compile
        self._graph_pool = None  # cuda-graphs: one memory pool for every captured pass (replayed one at a time)
        self._passes: dict[tuple, Callable] = {}  # static passes by their shape, compiled or not (_static_pass)
        self.compiled_passes = 0  # how many pass shapes were handed to torch.compile
        self.parts = model_parts(model)
        self.exits = exits
        self.num_layers = self.parts.num_layers
        self.arch = architecture(model, self.parts.rotary, self.num_layers)
        self.trunk_slots = range(self.num_layers)
        weight = self.parts.head.weight.detach()
        self.device, self.dtype = weight.device, weight.dtype
        if compile == "cuda-graphs" and self.device.type != "cuda":
            raise BalspecError(f"--compile cuda-graphs needs a CUDA device; the model is on {self.device.type} "
                               "(--compile reduce-overhead runs anywhere)")
        self.vocab_size = weight.shape[0]
        # The full model's logits (every mode's and the verify's): "float32" computes the LM head's product in
        # fp32 on the final normed states when the model runs in bf16/fp16, so two tokens are never tied by
        # bf16 rounding of the logits. "model" (default) keeps the model's dtype: measured on the default model
        # in bf16 (evals/bf16_exactness.py), fp32 logits did not make the verify pass agree with a one-row
        # full step more often; the differences come from the trunk's rounding. fp32 models: no difference.
        if logits_dtype not in LOGITS_DTYPES:
            raise BalspecError(f"--logits-dtype must be one of {', '.join(LOGITS_DTYPES)}, got {logits_dtype!r}")
        self.logits_dtype = "model" if self.dtype == torch.float32 else logits_dtype
        head_bias = getattr(self.parts.head, "bias", None)
        self.head32 = (weight.float(), None if head_bias is None else head_bias.detach().float()) \
            if self.logits_dtype == "float32" else None
        self._kinds = list(self.arch.layer_kinds)  # attention kind per trunk layer; a balcony takes the last's
        self.cache: KVCache | None = None
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # kind -> cos, sin [1, max_len, head_dim]
        self.lean = False  # until the check below: it runs the modules as the generic path does
        self.layer_path = self._choose_path(layer_path)
        self.lean = self.layer_path == "lean"
        # CPU: products over a few rows run as W @ x^T where this machine measures that faster (skinny.py)
        trunk_weights = [m.weight for m in self.parts.layers.modules() if type(m) is torch.nn.Linear]
        self.skinny_rows = skinny.prefer_skinny(trunk_weights) if self.device.type == "cpu" else frozenset()
        self.skinny = bool(self.skinny_rows)
        few_rows = skinny.FewRows(self.skinny_rows)
        if self.skinny:  # the lean forward's products go through self.linear (layers.py), the modules' through this
            skinny.install([self.parts.head] if self.lean else
                           [self.parts.head, self.parts.layers, *([exits] if exits is not None else [])], few_rows)
        # a draft head over the most frequent tokens only: q is zero elsewhere, so exactness holds
        self.draft_vocab = draft_vocab.to(self.device, torch.long) if draft_vocab is not None else None
        self.draft_weight = weight[self.draft_vocab].contiguous() if draft_vocab is not None else None
        self.linear = few_rows if self.skinny else torch.nn.functional.linear  # for every few-row product
        self.previous_deep: torch.Tensor | None = None  # draft-kind exits: final normed state [1, 1, hidden]
        #                                                 of the position before the pending token
        self._trees: dict[tuple[int, int], DraftTree] = {}
        self.check_forward()

    # -- which path, and checks at start -----------------------------------------------------------------
    def _choose_path(self, requested: str | None) -> str:
        requested = parse_layer_path(requested)
        if requested == "generic":
            return "generic"
        if self.check_lean():
            return "lean"
        if requested == "lean":
            raise BalspecError(f"model type {self.arch.model_type}: balspec's lean layer forward does not compute "
                               "this model's decoder layers exactly; use the generic path")
        return "generic"

    def check_lean(self) -> bool:
        """Does the lean forward compute this model's layers exactly? The layers must have its form, and the
        first layer of each attention kind and the last (which balconies copy), in fp32 copies, must give the
        same output as their own module on random input over a few positions (a causal mask, a window where
        the kind has one shorter than the probe)."""
        layers = self.parts.layers
        firsts = {kind: i for i, kind in reversed(list(enumerate(self._kinds)))}
        probes = sorted({*firsts.values(), self.num_layers - 1})
        if not all(has_lean_form(layers[i]) for i in probes):
            return False
        rows, generator = 6, torch.Generator().manual_seed(0)
        config = self.model.config

        def fresh_cache() -> KVCache:
            return KVCache(1, rows, config.num_key_value_heads, self._head_dim(), torch.float32, self.device)

        with torch.inference_mode():
            rope = self._rope_tables(rows)
            for i in probes:
                layer = copy.deepcopy(layers[i]).float()
                layer.self_attn.layer_idx = 0
                hidden = torch.randn(1, rows, config.hidden_size, generator=generator).to(self.device) * 4
                kind_rope = tuple(t.float() for t in rope[self._kinds[i]])
                allowed = causal_mask(rows, self.arch.windows[self._kinds[i]], self.device)
                own = module_layer(layer, hidden, kind_rope, self._mask_format(allowed[None, None], torch.float32),
                                   fresh_cache())
                try:
                    lean = decoder_layer(layer, hidden, kind_rope, allowed[None, None], fresh_cache())
                except RuntimeError:  # shapes the lean forward does not handle (a partial rotary, say)
                    return False
                if not torch.allclose(lean, own, atol=1e-5, rtol=1e-4):
                    return False
        return True

    def check_forward(self) -> None:
        """The engine's full-mode logits over a few tokens must equal the model's own forward (to rounding):
        a model-level formula balspec does not know of (an embedding or logit scaling, say) is refused here
        rather than run wrong."""
        ids = (torch.arange(1, 7, device=self.device) * 37 % self.vocab_size)[None]  # [1, 6]
        with torch.inference_mode():
            self.reset(ids.shape[1])
            ours = self.full_logits(self.run_layers(self.embed(ids), 0, self.num_layers, 0)).float()
            theirs = self.model(input_ids=ids, use_cache=False).logits.float()
            self.cache.rollback(range(len(self.cache.lengths)), 0)
        error = ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6)).item()
        if not error <= (1e-4 if self.dtype == torch.float32 else 3e-2):
            raise BalspecError(f"model type {self.arch.model_type} is not supported: balspec's engine does not "
                               f"reproduce its forward pass (relative logit difference {error:.1e})")

    # -- storage -----------------------------------------------------------------------------------
    def reset(self, max_len: int) -> None:
        """Empty every cache slot; storage and rotary tables are re-allocated only when they must grow (static
        shapes: to a power of two, at least 1024, since new storage means new graphs)."""
        if self.static:
            max_len = max(1024, 1 << (max_len - 1).bit_length())
        if self.cache is None or self.cache.max_len < max_len:
            slots = self.exits.num_cache_slots if self.exits is not None else self.num_layers
            self.cache = KVCache(slots, max_len, self.model.config.num_key_value_heads, self._head_dim(), self.dtype,
                                 self.device)
            self._rope = self._rope_tables(max_len)
            self._key_index = torch.arange(max_len, device=self.device)  # static passes: every cache index
            self._passes.clear()  # their graphs hold the old storage
            if self.compiled == "reduce-overhead":  # what its graphs read in place rather than copy per replay
                for table in (self.cache.keys, self.cache.values, self._key_index,
                              *(t for rope in self._rope.values() for t in rope)):
                    torch._dynamo.mark_static_address(table)
        self.cache.rollback(range(len(self.cache.lengths)), 0)

    def _head_dim(self) -> int:
        config = self.model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def _rope_tables(self, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Attention kind -> cos, sin [1, length, rotary dim] at positions 0..length-1."""
        positions = torch.arange(length, device=self.device)[None]  # [1, length]
        probe = torch.zeros(1, 1, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
        # Gemma 3: local and global layers rotate with their own bases
        return {kind: self.arch.rotary(self.parts.rotary, probe, positions, kind) for kind in self.arch.windows}

    def _mask_format(self, allowed: torch.Tensor | None, dtype: torch.dtype | None = None,
                     lean: bool | None = None) -> torch.Tensor | None:
        """A boolean mask as the layers take it: boolean for the lean forward and sdpa, additive for eager.
        lean: for the lean forward (default: the engine's path) or, False, for the modules."""
        if allowed is None or (self.lean if lean is None else lean) or not self.arch.additive_masks:
            return allowed
        return self.arch.mask(allowed, dtype or self.dtype)

    def rows(self, start: int, length: int, tree: DraftTree | None = None, first: int = 0) -> Rows:
        """Rotary tables and masks, per attention kind, for `length` new rows after `start` cached positions.
        Without a tree the rows are consecutive tokens; with one they are rows first.. of the cycle's tree, whose
        root (the pending token) sits at cache position `start`; each sees the cache before the root and its own
        ancestors. A sliding-window layer's rows see, of those, only the keys less than its window behind them."""
        if self.static:
            return self._static_rows(self._position(start), length, tree, first)
        if tree is None:
            positions = slice(start, start + length)
            allowed = None if length == 1 else \
                torch.ones(length, start + length, dtype=torch.bool, device=self.device).tril(start)
        else:
            positions = tree.depth[first:first + length] + start
            before = torch.ones(length, start, dtype=torch.bool, device=self.device)
            allowed = torch.cat([before, tree.allowed[first:first + length, :first + length]], 1)
        views = {}
        for kind, window in self.arch.windows.items():
            cos, sin = self._rope[kind]
            mask = allowed
            if window is not None and start + length > window:  # some row has keys beyond its window
                mask = self._window(mask, window, start, length, tree, first)
            views[kind] = ((cos[:, positions], sin[:, positions]),
                           None if mask is None else self._mask_format(mask[None, None]))  # [1, 1, rows, keys]
        return Rows(views)

    def _position(self, start: int) -> torch.Tensor:
        """A cache position as a 0-d device tensor, made by a fill (no host-to-device copy, no sync)."""
        return torch.full((), start, dtype=torch.long, device=self.device)

    def _static_rows(self, start: torch.Tensor, length: int, tree: DraftTree | None, first: int) -> Rows:
        """rows() in static shapes: `start` a 0-d device tensor, masks [1, 1, rows, max_len] over the whole cache.
        Row r of the cycle (tree row, or r-th consecutive token) writes at cache index start + r; it sees every
        index below start (all verified), the indices of its ancestors and itself, and nothing else: entries
        left behind by rejected drafts sit at higher indices or off its path."""
        if tree is None:
            offsets = torch.arange(length, device=self.device)
            ancestry = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
            depth, size = offsets, length
        else:
            offsets = torch.arange(first, first + length, device=self.device)
            ancestry, depth, size = tree.allowed[first:first + length], tree.depth[first:first + length], tree.size
        relative = self._key_index - start  # [max_len]
        inside = (relative >= 0) & (relative < size)
        allowed = (relative < 0) | (inside & ancestry[:, relative.clamp(0, size - 1)])  # [rows, max_len]
        positions = start + depth  # [rows]
        views = {}
        for kind, window in self.arch.windows.items():
            cos, sin = self._rope[kind]
            mask = allowed if window is None else allowed & (self._key_index > positions[:, None] - window)
            views[kind] = ((cos[:, positions], sin[:, positions]), self._mask_format(mask[None, None]))
        return Rows(views, start + offsets)

    def _static_pass(self, layers: tuple[int, int] | int, length: int, tree: DraftTree | None, first: int
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The pass (hidden [1, length, hidden], start: 0-d device tensor) -> hidden, through trunk layers
        (first, last) or the balcony of exit `layers` (then its norm too). Compiled where its shape repeats
        (one row, or a cycle's tree rows); its output is cloned, since a CUDA graph's next replay overwrites it."""
        key = (layers, length, None if tree is None else (tree.k, tree.width), first)
        run = self._passes.get(key)
        if run is None:
            if isinstance(layers, tuple):
                modules, kinds, norm = self.parts.layers[layers[0]:layers[1]], self._kinds[layers[0]:layers[1]], None
            else:
                modules, norm = self.exits[layers].layers, self.exits[layers].norm
                kinds = self._kinds[-1:] * len(modules)

            def forward(hidden: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
                out = self._through(modules, kinds, hidden, self._static_rows(start, length, tree, first))
                return out if norm is None else norm(out)

            run = forward
            if self.compiled and (tree is not None or length == 1):
                if self.compiled == "cuda-graphs" and self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                run = graphs.capture(forward, self.compiled, self._graph_pool)
                self.compiled_passes += 1
            self._passes[key] = run
        return run

    def _window(self, allowed: torch.Tensor | None, window: int, start: int, length: int, tree: DraftTree | None,
                first: int) -> torch.Tensor:
        """allowed [rows, keys] (None: all) less the keys `window` or more positions behind their row. Cache
        entries before `start` sit at their positions; a tree's rows at the root's position plus their depth."""
        if tree is None:
            queries = torch.arange(start, start + length, device=self.device)
            keys = torch.arange(start + length, device=self.device)
        else:
            queries = tree.depth[first:first + length] + start
            keys = torch.cat([torch.arange(start, device=self.device), tree.depth[:first + length] + start])
        near = keys[None] > queries[:, None] - window  # [rows, keys]
        return near if allowed is None else allowed & near

    def draft_tree(self, k: int, width: int) -> DraftTree:
        key = (k, width)
        if key not in self._trees:
            self._trees[key] = DraftTree.build(k, width, self.device)
            if self.compiled == "reduce-overhead":
                torch._dynamo.mark_static_address(self._trees[key].depth)
                torch._dynamo.mark_static_address(self._trees[key].allowed)
        return self._trees[key]

    # -- passes --------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.parts.embed(tokens)  # [1, q] -> [1, q, hidden]; Gemma's scaling is inside its module
        return hidden if self.arch.embed_multiplier is None else hidden * self.arch.embed_multiplier  # Granite

    def run_layers(self, hidden: torch.Tensor, first: int, last: int, start: int, tree: DraftTree | None = None,
                   tree_first: int = 0) -> torch.Tensor:
        """Trunk layers first+1..last (1-based, as in the paper) over hidden states [1, rows, hidden] at positions
        start.., or over rows tree_first.. of a cycle's tree whose root sits at `start`."""
        length = hidden.shape[1]
        if first == last:  # exit 0's draft (a balcony on the embeddings): no trunk layer
            return hidden
        if self.static:
            self._check_room(start + tree_first + length)
            return self._static_pass((first, last), length, tree, tree_first)(hidden, self._position(start))
        return self._through(self.parts.layers[first:last], self._kinds[first:last], hidden,
                             self.rows(start, length, tree, tree_first))

    def _check_room(self, end: int) -> None:
        if end > self.cache.max_len:  # a static pass writes by index: an overflow would fail inside a kernel
            raise RuntimeError(f"KV cache overflow: {end} > {self.cache.max_len} positions")

    def run_balcony(self, exit_layer: int, hidden: torch.Tensor, start: int, pending: bool = False) -> torch.Tensor:
        """Balcony layers and norm of one exit on its trunk hidden states (appends the balcony's KV).
        pending: the row is a cycle's pending token, whose input a draft-kind balcony adds fuse(deep state of
        the previous position) to."""
        balcony = self.exits[exit_layer]
        if pending and balcony.kind == "draft":
            hidden = hidden + self.linear(self.previous_deep, balcony.fuse.weight)
        if self.static:
            self._check_room(start + hidden.shape[1])
            return self._static_pass(exit_layer, hidden.shape[1], None, 0)(hidden, self._position(start))
        kinds = self._kinds[-1:] * len(balcony.layers)  # a copy of the last layer keeps its kind of attention
        return balcony.norm(self._through(balcony.layers, kinds, hidden, self.rows(start, hidden.shape[1])))

    def write_deep(self, exit_layer: int, final: torch.Tensor, start: int) -> None:
        """Draft-kind exit: make its balcony's K/V at positions start.. of the full model's final normed
        states `final` [1, rows, hidden] of verified tokens, replacing whatever it held there."""
        layers = self.exits[exit_layer].layers
        self.cache.rollback(self.exits.cache_slots(exit_layer), start)
        rows = self.rows(start, final.shape[1])
        for layer in layers:  # every balcony layer reads the verified positions' K/V made of their final states
            if self.lean:
                rope = rows.views[self._kinds[-1]][0]
                self.cache.update(*key_value(layer, final, rope, self.linear), layer.self_attn.layer_idx)
            else:  # the module makes its K/V only inside a whole pass: run one, keep the K/V it wrote
                self._through([layer], self._kinds[-1:], final, rows)
        self.previous_deep = final[:, -1:]

    def _through(self, layers, kinds: list[str], hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        cache = self.cache if rows.index is None else StaticWrites(self.cache, rows.index)
        for layer, kind in zip(layers, kinds):
            rope, mask = rows.views[kind]
            if self.lean and isinstance(layer, HalfLayer):  # a half balcony runs as its modules, on their mask
                hidden = module_layer(layer, hidden, rope, self._mask_format(mask, lean=False), cache)
            elif self.lean:
                hidden = decoder_layer(layer, hidden, rope, mask, cache, self.linear)
            else:
                hidden = module_layer(layer, hidden, rope, mask, cache)
        return hidden

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last trunk layer's output [1, q, hidden] -> the full model's logits [1, q, vocab]."""
        return self.head_logits(self.parts.norm(hidden))

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final normed states [1, q, hidden] -> the full model's logits [1, q, vocab] (fp32 under the
        "float32" policy, else the model's dtype)."""
        return self.logits(normed, full_model=True)

    def logits(self, normed: torch.Tensor, weight: torch.Tensor | None = None, full_model: bool = False) -> torch.Tensor:
        """The LM head on normed states [..., hidden] -> [..., vocab] (or rows of `weight`, a reduced draft head),
        with the model's own logit scaling and soft-capping: the shared head's logits equal the model's.
        full_model: the full model's logits, whose product runs in fp32 under the "float32" policy."""
        if full_model and self.head32 is not None:
            logits = self.linear(normed.float(), *self.head32)
        else:
            logits = self.parts.head(normed) if weight is None else self.linear(normed, weight)
        return self.arch.finish_logits(logits)  # Granite's divisor, Gemma's soft-cap

    def is_draft_kind(self, exit_layer: int) -> bool:
        return self.exits[exit_layer].kind == "draft"

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Balcony output [1, 1, hidden] -> draft logits [vocab], or [draft_vocab] with a reduced head."""
        if self.draft_vocab is None:
            return self.logits(normed)[0, -1]
        return self.logits(normed[0, -1:], self.draft_weight)[0]

    def pick_draft(self, logits: torch.Tensor, sampling: Sampling,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft logits -> (token [1], q over the full vocabulary, or None when greedy)."""
        if sampling.greedy:
            index, q = logits.argmax(-1, keepdim=True), None
        else:
            q = probabilities(logits, sampling)
            index = torch.multinomial(q, 1, generator=generator)
        if self.draft_vocab is None:
            return index, q
        if q is not None:
            q = torch.zeros(self.vocab_size, device=self.device, dtype=q.dtype).index_copy_(0, self.draft_vocab, q)
        return self.draft_vocab[index], q

    def alternatives(self, logits: torch.Tensor, width: int) -> torch.Tensor:
        """The draft's 2nd..width-th most likely tokens [width - 1] (greedy drafting only)."""
        index = logits.topk(width, sorted=True).indices[1:]
        return self.draft_vocab[index] if self.draft_vocab is not None else index

    # -- the three modes -------------------------------------------------------------------------------
    def prefill(self, prompt: torch.Tensor, mode: str, exit_layer: int | None) -> torch.Tensor:
        """Run the prompt [1, P] through every layer the mode uses; return the logits of its last position."""
        hidden = self.embed(prompt)
        if self.static and mode == "speculative" and self.is_draft_kind(exit_layer):
            raise BalspecError(f"exit {exit_layer} is a draft-kind exit (it reads the verified context), which runs "
                               "only with the dynamic cache: drop --static-cache/--compile")
        if mode == "full":
            return self.full_logits(self.run_layers(hidden, 0, self.num_layers, 0)[:, -1:])[0]
        exit_hidden = self.run_layers(hidden, 0, exit_layer, 0)
        if mode == "speculative" and self.is_draft_kind(exit_layer):  # its balcony reads the verified states
            final = self.parts.norm(self.run_layers(exit_hidden, exit_layer, self.num_layers, 0))  # [1, P, hidden]
            self.write_deep(exit_layer, final, 0)
            return self.head_logits(final[:, -1:])[0]
        normed = self.run_balcony(exit_layer, exit_hidden, 0)
        if mode == "early-exit":
            return self.logits(normed[:, -1:])[0]
        return self.full_logits(self.run_layers(exit_hidden, exit_layer, self.num_layers, 0)[:, -1:])[0]

    def step(self, token: torch.Tensor, start: int, mode: str, exit_layer: int | None) -> torch.Tensor:
        """One token [1, 1] at position `start` through the full model or the exit's sub-model -> [1, vocab]."""
        if mode == "full":
            return self.full_logits(self.run_layers(self.embed(token), 0, self.num_layers, start))[0]
        normed = self.run_balcony(exit_layer, self.run_layers(self.embed(token), 0, exit_layer, start), start)
        return self.logits(normed)[0]

    def cycle(self, token: torch.Tensor, start: int, exit_layer: int, draft_len: int, sampling: Sampling,
              generator: torch.Generator | None, adaptive: bool = False, width: int = 1) -> Cycle:
        """One draft-verify cycle. `token` [1, 1] is the pending token t at position `start`.

        width > 1 (greedy only): the draft's 2nd..width-th choices for the first position are verified beside
        the chain, as siblings of d_1 (a tree). Rows added to a pass cost far less than a pass: on this
        project's CPU a pass over four rows took 0-20% longer than over one.
        """
        e, n_layers = exit_layer, self.num_layers
        deep = self.is_draft_kind(e)
        exit_hidden, drafts, q_rows = [], [], []
        x, dropped, siblings = token, False, None
        # 1. Draft: layers 1..e on t, d_1, .., d_{k-1} (their KV stays), then balcony_e, norm_e, head.
        #    Adaptive: a draft the exit is unsure of ends the chain. Without siblings it is dropped, not
        #    verified (the choice depends on q alone, so exactness holds; its input already ran layers 1..e
        #    and the balcony; k may be 0). With siblings it is kept: it rides in their verify rows.
        #    A draft-kind balcony attends over the full model's states of the verified positions < start.
        for i in range(draft_len):
            h = self.run_layers(self.embed(x), 0, e, start + i)
            exit_hidden.append(h)
            logits = self.draft_logits(self.run_balcony(e, h, start + i, pending=i == 0))
            d, q = self.pick_draft(logits, sampling, generator)
            if i == 0 and width > 1:
                siblings = self.alternatives(logits, width)
            sure = not adaptive or _confidence(logits, q, sampling) >= AUTO_MIN_CONFIDENCE
            if not sure and siblings is None:
                dropped = True
                break
            drafts.append(d)
            q_rows.append(q)
            x = d.view(1, 1)
            if not sure:
                break
        k = len(drafts)
        # 2. Verify: layers 1..e on d_k (unless it ran as the input of a dropped draft) and on the siblings,
        #    then layers e+1..N on every row at once. Rows, in cache order: t, d_1..d_k, siblings.
        tree = self.draft_tree(k, width if siblings is not None else 1)
        first = len(exit_hidden)  # the first row whose layers 1..e have not run yet
        if first < tree.size:
            pending = ([] if dropped else [x]) + ([siblings.view(1, -1)] if siblings is not None else [])
            exit_hidden.append(self.run_layers(self.embed(torch.cat(pending, 1)), 0, e, start, tree, first))
        final = self.parts.norm(self.run_layers(torch.cat(exit_hidden, 1), e, n_layers, start, tree))  # [1, rows, hidden]
        p_logits = self.head_logits(final)[0]  # [rows, vocab]
        # 3. Accept: p_i scores d_i; p_{k+1} gives the bonus token. A rejected d_1 may be replaced by the
        #    sibling the full model chose, whose own row then gives the bonus token.
        sibling = None
        if sampling.greedy:
            chosen = p_logits.argmax(-1)  # [rows]
            host = torch.cat([*drafts, *([siblings] if siblings is not None else []), chosen]).tolist()  # one sync
            drafted, others, targets = host[:k], host[k:tree.size - 1], host[tree.size - 1:]
            n, next_token = accept_greedy(drafted, targets)
            if n == 0 and targets[0] in others:
                sibling = 1 + k + others.index(targets[0])  # its row
                drafted, n, next_token = [targets[0], *drafted[1:]], 1, targets[sibling]
        elif k:
            n, next_token, drafted = accept_sampling(torch.cat(drafts), probabilities(p_logits, sampling),
                                                     torch.stack(q_rows), generator)
        else:
            n, next_token, drafted = 0, choose(p_logits, sampling, generator).item(), []
        # 4. Roll back every store to t plus the n accepted drafts; an accepted sibling's K/V first move into
        #    the place of d_1. A draft-kind balcony's K/V of the accepted rows are made anew of their final
        #    states (its own rows, drafted, were only stand-ins), which also leaves nothing for step 5.
        balcony_slots = self.exits.cache_slots(e)
        if sibling is not None:
            self.cache.move(self.trunk_slots, start + sibling, start + 1)
        self.cache.rollback(self.trunk_slots, start + n + 1)
        if deep:
            self.write_deep(e, final[:, [0, sibling]] if sibling is not None else final[:, :n + 1], start)
            return Cycle(tokens=drafted[:n] + [next_token], drafts=drafted, accepted=n)
        self.cache.rollback(balcony_slots, start + n + 1)
        # 5. The balcony has no KV for the last accepted token when it is d_k (unless a dropped draft ran it)
        #    or a sibling; its h_e is at hand from step 2.
        last = None
        if sibling is not None:
            last = exit_hidden[-1][:, sibling - first:sibling - first + 1]
        elif n == k and not dropped:
            last = exit_hidden[k][:, :1]
        if last is not None:
            self.cache.rollback(balcony_slots, start + n)
            self.run_balcony(e, last, start + n)
        return Cycle(tokens=drafted[:n] + [next_token], drafts=drafted, accepted=n)


    def lookup_cycle(self, token: torch.Tensor, start: int, exit_layer: int, drafted: list[int],
                     sampling: Sampling, generator: torch.Generator | None) -> Cycle:
        """One verify of drafts read from the context (lookup.NgramLookup), with no draft pass. `token` [1, 1] is
        the pending token at position `start`; `drafted` the k >= 1 proposed tokens after it.

        Rows t, d_1..d_k run layers 1..N in one pass (1..e then e+1..N, keeping the exit's hidden states).
        Greedy accepts the prefix the full model agrees with; sampling treats each draft as drawn from a point
        mass (q = 1 on it), which keeps the output distribution exactly p (Leviathan et al. 2023). The exit's
        balcony did not run on these rows: its K/V for the accepted ones are made from their layer-e states (a
        draft-kind exit's from their final states), so the next balcony draft sees them as after any cycle.
        """
        e, k = exit_layer, len(drafted)
        tree = self.draft_tree(k, 1)
        drafts = torch.tensor(drafted, device=self.device)  # [k]
        exit_hidden = self.run_layers(self.embed(torch.cat([token, drafts[None]], 1)), 0, e, start, tree)
        final = self.parts.norm(self.run_layers(exit_hidden, e, self.num_layers, start, tree))  # [1, k + 1, hidden]
        p_logits = self.head_logits(final)[0]  # [k + 1, vocab]
        if sampling.greedy:
            n, next_token = accept_greedy(drafted, p_logits.argmax(-1).tolist())
        else:
            q = torch.zeros(k, self.vocab_size, device=self.device).scatter_(1, drafts[:, None], 1.0)
            n, next_token, _ = accept_sampling(drafts, probabilities(p_logits, sampling), q, generator)
        self.cache.rollback(self.trunk_slots, start + n + 1)
        if self.is_draft_kind(e):
            self.write_deep(e, final[:, :n + 1], start)
        else:
            self.cache.rollback(self.exits.cache_slots(e), start)
            self.run_balcony(e, exit_hidden[:, :n + 1], start)
        return Cycle(tokens=drafted[:n] + [next_token], drafts=drafted, accepted=n)


def _confidence(logits: torch.Tensor, q: torch.Tensor | None, sampling: Sampling) -> float:
    """The draft's confidence, for adaptive drafting (one host sync per draft token): the top probability of the
    draft distribution at temperature max(T, 1), with the sampling's top-k and top-p (greedy: at temperature 1).
    Temperature 1 is the one the exit was trained at (KL to the full model), where its top probability tracks
    how often the full model agrees; below it q is sharper than the exit's knowledge (near T = 0 one-hot, so
    every draft looked sure and each cycle drafted AUTO_MAX_DRAFT tokens that the full model mostly rejected)."""
    if sampling.greedy:
        return logits.float().softmax(-1).max().item()
    if sampling.temperature >= 1:
        return q.max().item()
    return probabilities(logits, Sampling(1.0, sampling.top_k, sampling.top_p)).max().item()


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
