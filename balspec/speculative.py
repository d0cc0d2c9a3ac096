"""The engine: the frozen trunk, its balconies and one KV cache, and the speculative cycle.

Because the trunk is frozen and shared, a draft's run of layers 1..e IS the full model's run of those
layers: the verify pass starts from the buffered exit hidden states and runs only layers e+1..N.
Steps are numbered as in DESIGN.md section 3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from balspec import skinny
from balspec.cache import KVCache
from balspec.exits import Exits, model_parts
from balspec.sampling import Sampling, accept_greedy, accept_sampling, choose, probabilities

AUTO_MAX_DRAFT = 8  # "auto" drafts until the draft is unsure, at most this many tokens
AUTO_MIN_CONFIDENCE = 0.6  # ... where unsure means top probability below this (0.4/0.6/0.8 measured: 0.6 won)


@dataclass
class Cycle:
    """What one draft-verify cycle did: the emitted tokens are drafts[:accepted] + [next_token]."""

    tokens: list[int]
    drafts: list[int]  # all k drafted tokens: drafts[:accepted] were kept
    accepted: int


class Engine:
    """Runs ranges of decoder layers of a frozen causal LM and its balconies over one KV cache."""

    def __init__(self, model: torch.nn.Module, exits: Exits | None = None, draft_vocab: torch.Tensor | None = None):
        self.model = model
        self.parts = model_parts(model)
        self.exits = exits
        self.num_layers = self.parts.num_layers
        self.trunk_slots = range(self.num_layers)
        weight = self.parts.head.weight.detach()
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = weight.shape[0]
        # CPU: products over a few rows run as W @ x^T where this machine measures that faster (skinny.py)
        trunk_weights = [m.weight for m in self.parts.layers.modules() if type(m) is torch.nn.Linear]
        self.skinny = self.device.type == "cpu" and skinny.prefer_skinny(trunk_weights)
        if self.skinny:
            skinny.install([self.parts.layers, self.parts.head, *([exits] if exits is not None else [])])
        # a draft head over the most frequent tokens only: q is zero elsewhere, so exactness holds
        self.draft_vocab = draft_vocab.to(self.device, torch.long) if draft_vocab is not None else None
        self.draft_weight = weight[self.draft_vocab].contiguous() if draft_vocab is not None else None
        self.draft_linear = skinny.skinny_linear if self.skinny else torch.nn.functional.linear
        self.cache: KVCache | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- storage -----------------------------------------------------------------------------------
    def reset(self, max_len: int) -> None:
        """Empty every cache slot; storage and rotary tables are re-allocated only when they must grow."""
        if self.cache is None or self.cache.max_len < max_len:
            config = self.model.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            slots = self.exits.num_cache_slots if self.exits is not None else self.num_layers
            self.cache = KVCache(slots, max_len, config.num_key_value_heads, head_dim, self.dtype, self.device)
            positions = torch.arange(max_len, device=self.device)[None]  # [1, max_len]
            probe = torch.zeros(1, 1, config.hidden_size, device=self.device, dtype=self.dtype)
            self._rope = self.parts.rotary(probe, positions)  # cos, sin: [1, max_len, head_dim]
        self.cache.rollback(range(len(self.cache.lengths)), 0)

    def rope(self, start: int, length: int):
        cos, sin = self._rope
        return cos[:, start:start + length], sin[:, start:start + length]

    def mask(self, start: int, length: int) -> torch.Tensor | None:
        """Causal mask with an offset for `length` new tokens after `start` cached ones; None for one token."""
        if length == 1:
            return None
        allowed = torch.ones(length, start + length, dtype=torch.bool, device=self.device).tril(start)
        return allowed[None, None]  # [1, 1, length, start + length]

    # -- passes --------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.parts.embed(tokens)  # [1, q] -> [1, q, hidden]

    def run_layers(self, hidden: torch.Tensor, first: int, last: int, start: int) -> torch.Tensor:
        """Trunk layers first+1..last (1-based, as in the paper) over hidden states at positions start.."""
        length = hidden.shape[1]
        rope, mask = self.rope(start, length), self.mask(start, length)
        for layer in self.parts.layers[first:last]:
            out = layer(hidden, attention_mask=mask, past_key_values=self.cache, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def run_balcony(self, exit_layer: int, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Balcony layers and norm of one exit on its trunk hidden states (appends the balcony's KV)."""
        length = hidden.shape[1]
        return self.exits[exit_layer](hidden, self.rope(start, length), self.mask(start, length), self.cache)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.head(self.parts.norm(hidden))  # [1, q, vocab]

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Balcony output [1, 1, hidden] -> draft logits [vocab], or [draft_vocab] with a reduced head."""
        if self.draft_vocab is None:
            return self.parts.head(normed)[0, -1]
        return self.draft_linear(normed[0, -1:], self.draft_weight)[0]

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

    # -- the three modes -------------------------------------------------------------------------------
    def prefill(self, prompt: torch.Tensor, mode: str, exit_layer: int | None) -> torch.Tensor:
        """Run the prompt [1, P] through every layer the mode uses; return the logits of its last position."""
        hidden = self.embed(prompt)
        if mode == "full":
            return self.full_logits(self.run_layers(hidden, 0, self.num_layers, 0)[:, -1:])[0]
        exit_hidden = self.run_layers(hidden, 0, exit_layer, 0)
        normed = self.run_balcony(exit_layer, exit_hidden, 0)
        if mode == "early-exit":
            return self.parts.head(normed[:, -1:])[0]
        return self.full_logits(self.run_layers(exit_hidden, exit_layer, self.num_layers, 0)[:, -1:])[0]

    def step(self, token: torch.Tensor, start: int, mode: str, exit_layer: int | None) -> torch.Tensor:
        """One token [1, 1] at position `start` through the full model or the exit's sub-model -> [1, vocab]."""
        if mode == "full":
            return self.full_logits(self.run_layers(self.embed(token), 0, self.num_layers, start))[0]
        normed = self.run_balcony(exit_layer, self.run_layers(self.embed(token), 0, exit_layer, start), start)
        return self.parts.head(normed)[0]

    def cycle(self, token: torch.Tensor, start: int, exit_layer: int, draft_len: int, sampling: Sampling,
              generator: torch.Generator | None, adaptive: bool = False) -> Cycle:
        """One draft-verify cycle. `token` [1, 1] is the pending token t at position `start`."""
        e, n_layers = exit_layer, self.num_layers
        exit_hidden, drafts, q_rows = [], [], []
        x, unsure = token, False
        # 1. Draft: layers 1..e on t, d_1, .., d_{k-1} (their KV stays), then balcony_e, norm_e, head.
        #    Adaptive: a draft the exit is unsure of is dropped, not verified (the choice depends on q alone,
        #    so exactness holds); its input already ran layers 1..e and the balcony. k may be 0.
        for i in range(draft_len):
            h = self.run_layers(self.embed(x), 0, e, start + i)
            exit_hidden.append(h)
            logits = self.draft_logits(self.run_balcony(e, h, start + i))
            d, q = self.pick_draft(logits, sampling, generator)
            if adaptive and _top_probability(logits, q) < AUTO_MIN_CONFIDENCE:
                unsure = True
                break
            drafts.append(d)
            q_rows.append(q)
            x = d.view(1, 1)
        k = len(drafts)
        # 2. Verify: layers 1..e on d_k alone, then layers e+1..N on all k + 1 exit hidden states at once.
        if not unsure:
            exit_hidden.append(self.run_layers(self.embed(x), 0, e, start + k))
        p_logits = self.full_logits(self.run_layers(torch.cat(exit_hidden, 1), e, n_layers, start))[0]  # [k + 1, vocab]
        # 3. Accept: p_i scores d_i; p_{k+1} gives the bonus token.
        if sampling.greedy:
            host = torch.cat([*drafts, p_logits.argmax(-1)]).tolist()  # the cycle's one host sync
            drafted = host[:k]
            n, next_token = accept_greedy(drafted, host[k:])
        elif k:
            n, next_token, drafted = accept_sampling(torch.cat(drafts), probabilities(p_logits, sampling),
                                                     torch.stack(q_rows), generator)
        else:
            n, next_token, drafted = 0, choose(p_logits, sampling, generator).item(), []
        # 4. Roll back every store to t plus the n accepted drafts.
        self.cache.rollback(self.trunk_slots, start + n + 1)
        self.cache.rollback(self.exits.cache_slots(e), start + n + 1)
        # 5. All k accepted: the balcony has no KV for d_k yet (unless the dropped draft ran it); h_e is at hand.
        if n == k and not unsure:
            self.run_balcony(e, exit_hidden[k], start + k)
        return Cycle(tokens=drafted[:n] + [next_token], drafts=drafted, accepted=n)

def _top_probability(logits: torch.Tensor, q: torch.Tensor | None) -> float:
    """The draft's confidence, for adaptive drafting (one host sync per draft token)."""
    return (q if q is not None else logits.float().softmax(-1)).max().item()


def pass_costs(bm, prompt_ids: list[int], exit_layer: int, draft_len: int, repeats: int = 10) -> dict:
    """Measured seconds of one full decode step, one draft step and one verify of k + 1 tokens."""
    engine = bm.engine
    prompt = torch.tensor([prompt_ids], device=engine.device)
    start = len(prompt_ids)
    engine.reset(start + draft_len + 2)
    with torch.inference_mode():
        engine.prefill(prompt, "speculative", exit_layer)
        token = prompt[:, -1:]
        everything = list(range(len(engine.cache.lengths)))

        def full_step():
            engine.step(token, start, "full", None).argmax(-1).tolist()

        def draft_step():
            h = engine.run_layers(engine.embed(token), 0, exit_layer, start)
            engine.pick_draft(engine.draft_logits(engine.run_balcony(exit_layer, h, start)), Sampling())

        def verify():
            h = engine.run_layers(engine.embed(token), 0, exit_layer, start)
            hidden = h.expand(1, draft_len + 1, h.shape[-1])  # stands in for the k + 1 buffered exit states
            engine.full_logits(engine.run_layers(hidden, exit_layer, engine.num_layers, start)).argmax(-1).tolist()

        costs = {}
        for name, fn in (("full_step_s", full_step), ("draft_step_s", draft_step), ("verify_s", verify)):
            times = []
            for i in range(repeats + 2):
                sync_device(engine.device)
                t0 = time.perf_counter()
                fn()
                sync_device(engine.device)
                times.append(time.perf_counter() - t0)
                engine.cache.rollback(everything, start)
            costs[name] = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up calls
    return costs


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
