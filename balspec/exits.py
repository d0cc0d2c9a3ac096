"""Balcony exits: model surgery and initialisation (checkpoint.py saves and loads them).

A balcony for exit e is one (or a few) extra decoder layer(s) of the base architecture plus a norm. The
sub-model of exit e is `embed -> trunk layers 1..e -> balcony_e -> norm_e -> lm_head` with the base's
own head, shared and frozen. The base model is never modified: balconies live in their own module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from balspec.engine.architecture import Architecture, architecture, causal_mask
from balspec.engine.layers import has_lean_form
from balspec.errors import BalspecError

NORM_INITS = ("final", "next-input")  # copy of the final norm, or of the input norm of trunk layer e + 1
LAYER_INITS = ("last", "random")  # copy of the base's last decoder layer (paper), or re-initialised
KINDS = ("sub-model", "draft")  # a standalone sub-model (paper), or a verified-context draft (DESIGN.md 3b)
# What a balcony layer is (paper appendix B): a whole decoder layer, its MLP half or its attention half. Or no
# balcony at all, "shared-head": the model's own final norm and head on h_e (LayerSkip-style; method sorted).
MODULES = ("layer", "mlp", "attention", "shared-head")


@dataclass(frozen=True)
class Parts:
    """The pieces of a decoder-only causal LM that balspec runs one by one (architecture.py: what else it needs)."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def model_parts(model: nn.Module) -> Parts:
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise BalspecError(f"model type {model_type} ({type(model).__name__}) is not supported: balspec runs "
                           "decoder-only causal LMs with rotary attention layers (embed_tokens, layers, norm, "
                           "rotary_emb, lm_head)")
    return Parts(inner.embed_tokens, inner.layers, inner.norm, model.lm_head, inner.rotary_emb)


def validate_exits(exits: list[int], num_layers: int, draft_exits=()) -> list[int]:
    """Exit layers must be distinct integers in 1..N-1 (exit N is the full model itself); a draft-kind exit may
    also be 0, a balcony on the token embeddings (it reads no trunk layer: EAGLE's form of draft, DESIGN.md 3b)."""
    if not exits:
        raise BalspecError("--exits: give at least one exit layer, e.g. --exits 8,12,16")
    if len(set(exits)) != len(exits):
        raise BalspecError(f"--exits: duplicated exit layer in {exits}")
    bad = [e for e in exits if not (1 <= e < num_layers or (e == 0 and e in draft_exits))]
    if bad:
        zero = " (0 only for a draft-kind exit)" if 0 in bad else ""
        raise BalspecError(f"--exits: {bad} out of range; this model has {num_layers} layers, "
                           f"so exits must lie in 1..{num_layers - 1}{zero}")
    return sorted(exits)


class HalfLayer(nn.Module):
    """Half of a decoder layer (its own modules, not copies), with the residual: the balcony of exits.module mlp
    or attention. Called like a transformers decoder layer, so the engine's generic path runs it as one."""

    def __init__(self, layer: nn.Module, half: str):
        super().__init__()
        needed = ("input_layernorm", "self_attn") if half == "attention" else ("post_attention_layernorm", "mlp")
        if not has_lean_form(layer):  # a pre-norm Llama-family layer: x + attn(norm(x)), then x + mlp(norm(x))
            raise BalspecError(f"exits.module: an {half}-only balcony takes the {' and '.join(needed)} of a "
                               f"pre-norm decoder layer, and {type(layer).__name__} has another form; use layer")
        self.half = half
        for name in needed:
            setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        """[b, q, hidden] -> [b, q, hidden]; the attention half appends its K/V to `past_key_values`."""
        if self.half == "mlp":
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                position_embeddings=position_embeddings, past_key_values=past_key_values, **kwargs)
        return hidden_states + out


def parse_exits(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BalspecError(f"--exits: expected comma-separated layer numbers like 8,12,16, got {text!r}") from None


class Balcony(nn.Module):
    """Decoder layer(s) of the base architecture, then a norm; the LM head is the base's.

    kind "draft" (DESIGN.md 3b): a verified-context balcony. Its attention over verified positions reads
    K/V made of the full model's final normed hidden states there (`deep`), and its input at the first
    drafted position also gets `fuse(deep of the previous position)` (zero-initialised, so training starts
    from the plain balcony). It has no standalone sub-model: early-exit and export refuse it.
    """

    def __init__(self, layers: list[nn.Module], norm: nn.Module, arch: Architecture, kind: str = "sub-model",
                 shared_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if shared_norm:  # a shared-head exit: the model's own final norm, not a balcony weight (no state dict entry)
            object.__setattr__(self, "norm", norm)
        else:
            self.norm = norm
        self.kind = kind
        self.arch = arch  # the base's: a balcony attends as its last layer (window, mask format)
        self.window = arch.windows[arch.balcony_kind]
        if kind == "draft":
            hidden = norm.weight.shape[0]
            self.fuse = nn.Linear(hidden, hidden, bias=False)
            nn.init.zeros_(self.fuse.weight)

    def forward(self, hidden: torch.Tensor, position_embeddings, deep: torch.Tensor | None = None,
                unverified: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of trunk layer e over a whole block [b, L, hidden] -> normed balcony output [b, L,
        hidden], ready for the LM head. Training's path (no cache, the layers' own modules); the engine runs the
        layers itself. position_embeddings: cos, sin [b, L, rotary dim] of the base's last layer's kind of
        attention (Architecture.rotary with Architecture.balcony_kind).

        A sub-model balcony attends causally over its own states, within the last layer's sliding window if it
        has one, as in the engine. A draft balcony needs `deep` (the full model's final normed states [b, L,
        hidden]) and `unverified` [b, L] (long): r, how many positions before each one are drafted but not yet
        verified when it is drafted (0 for the first draft of a cycle, i for the (i+1)-th). Position i then
        sees deep K/V at positions <= i - r - 1, and its own inputs at i - r .. i: the one at i - r (the cycle's
        pending token) carries fuse(deep[i - r - 1]), the later ones (drafts) carry nothing, exactly as the
        engine drafts a chain; under a window, only keys less than the window behind i. Its further layers (two or
        more balcony layers) each read deep K/V made of `deep` below i and their own input at i: r must be 0
        there (exits.draft_chain 1), the only case they are trained for.
        """
        from balspec.engine.layers import context_layer, module_layer

        length = hidden.shape[1]
        if self.kind == "sub-model":
            mask = None  # sdpa without a window: its own causal kernel
            if self.window is not None or self.arch.additive_masks:
                mask = self.arch.mask(causal_mask(length, self.window, hidden.device)[None, None], hidden.dtype)
            for layer in self.layers:
                hidden = module_layer(layer, hidden, position_embeddings, mask, None)
            return self.norm(hidden)
        previous = F.pad(deep[:, :-1], (0, 0, 1, 0))  # deep state of position i - 1, zero at i = 0
        pending = hidden + self.fuse(previous)  # a cycle's first drafted row: [b, L, hidden]
        position = torch.arange(length, device=hidden.device)
        r = torch.minimum(unverified, position)  # position 0 is always a prompt token
        first_own = (position - r)[..., None]  # [b, L, 1]: the cycle's pending token
        key = position.view(1, 1, -1)
        near = None if self.window is None else key > position[:, None] - self.window  # [1, L, L]
        mask = torch.cat([key < first_own, key == first_own, (key > first_own) & (key <= position[:, None])], -1)
        if near is not None:  # keys at the same positions in each of the three blocks
            mask &= near.repeat(1, 1, 3)
        query = torch.where((r == 0)[..., None], pending, hidden)
        out = context_layer(self.layers[0], query, [deep, pending, hidden], position_embeddings,
                            self.arch.mask(mask[:, None], hidden.dtype))
        # Further layers assume r = 0 everywhere (Distiller and the config refuse exits.draft_chain > 1 with them;
        # not checked here, which would cost a host sync per step): deep K/V below i, its own input at i.
        if len(self.layers) > 1:
            mask = torch.cat([key < position[:, None], key == position[:, None]], -1)  # [1, L, 2L]
            if near is not None:
                mask &= near.repeat(1, 1, 2)
            mask = self.arch.mask(mask.expand(hidden.shape[0], -1, -1)[:, None], hidden.dtype)
            for layer in self.layers[1:]:
                out = context_layer(layer, out, [deep, out], position_embeddings, mask)
        return self.norm(out)


class Exits(nn.Module):
    """All balconies of one base model. Holds no base weights: its state dict is the checkpoint."""

    def __init__(self, balconies: dict[int, Balcony], num_base_layers: int, norm_init: str, layer_init: str,
                 arch: Architecture, module: str = "layer"):
        super().__init__()
        self.arch = arch  # the base model's formulas around its layers: the loss's logits are the model's
        self.module = module
        self.exits = sorted(balconies)
        self.balconies = nn.ModuleDict({str(e): balconies[e] for e in self.exits})
        self.num_base_layers = num_base_layers
        self.norm_init = norm_init
        self.layer_init = layer_init
        self.balcony_layers = len(next(iter(balconies.values())).layers)
        self.kinds = {e: balconies[e].kind for e in self.exits}
        self.draft_vocab: torch.Tensor | None = None  # token ids of a reduced draft head, stored with the exits

    def __getitem__(self, exit_layer: int) -> Balcony:
        if exit_layer not in self.exits:
            raise BalspecError(f"--exit: exit {exit_layer} is not in the loaded checkpoint "
                               f"(it has {','.join(map(str, self.exits))})")
        return self.balconies[str(exit_layer)]

    def check_sub_model(self, exit_layer: int, what: str) -> None:
        """Refuse `what` (early-exit, export) for a draft-kind exit: it has no standalone sub-model."""
        if self[exit_layer].kind == "draft":
            raise no_sub_model_error(exit_layer, what, self.sub_model_exits)

    @property
    def sub_model_exits(self) -> list[int]:
        return [e for e in self.exits if self.kinds[e] == "sub-model"]

    def cache_slots(self, exit_layer: int) -> list[int]:
        """KV-cache slots of this exit's balcony layers; slots 0..N-1 belong to the trunk."""
        first = self.num_base_layers + self.exits.index(exit_layer) * self.balcony_layers
        return list(range(first, first + self.balcony_layers))

    @property
    def num_cache_slots(self) -> int:
        return self.num_base_layers + len(self.exits) * self.balcony_layers

    def num_parameters(self, exit_layer: int) -> int:
        return sum(p.numel() for p in self[exit_layer].parameters())


def attach_exits(model: nn.Module, exits: list[int], norm_init: str = "final", layer_init: str = "last",
                 balcony_layers: int = 1, seed: int = 0, draft_exits: list[int] = (), module: str = "layer") -> Exits:
    """Build balconies for `exits` on a frozen `model`, initialised from its own weights; those in
    `draft_exits` are of the draft kind (verified-context). module (MODULES): each balcony layer is a
    copy of the last decoder layer, of its MLP half or of its attention half; "shared-head": no balcony, the
    exit is the model's own final norm and head (zero balcony layers, no weights)."""
    parts = model_parts(model)
    arch = architecture(model, parts.rotary, parts.num_layers)  # refuses what balspec cannot run, in one line
    exits = validate_exits(list(exits), parts.num_layers, draft_exits)
    if norm_init not in NORM_INITS:
        raise BalspecError(f"exits.norm_init: {norm_init!r} is not one of {', '.join(NORM_INITS)}")
    if layer_init not in LAYER_INITS:
        raise BalspecError(f"exits.layer_init: {layer_init!r} is not one of {', '.join(LAYER_INITS)}")
    if balcony_layers < 1 and module != "shared-head":
        raise BalspecError("exits.balcony_layers: must be at least 1")
    if module not in MODULES:
        raise BalspecError(f"exits.module: {module!r} is not one of {', '.join(MODULES)}")
    if draft_exits and module != "layer":
        raise BalspecError("exits.draft: a draft-kind exit is a whole decoder layer; use exits.module=layer")
    if set(draft_exits) - set(exits):
        raise BalspecError(f"draft exits {sorted(set(draft_exits) - set(exits))} are not among the exits {exits}")
    if norm_init == "next-input" and not hasattr(parts.layers[0], "input_layernorm"):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise BalspecError(f"exits.norm_init: next-input copies a layer's input norm, and model type {model_type} "
                           "has none (its norms follow attention and MLP); use final")
    if module == "shared-head":
        balconies = {e: Balcony([], parts.norm, arch, shared_norm=True) for e in exits}
        return Exits(balconies, parts.num_layers, "final", layer_init, arch, module)
    generator = torch.Generator().manual_seed(seed)
    balconies = {}
    for e in exits:
        layers = [copy.deepcopy(parts.layers[-1]) for _ in range(balcony_layers)]
        if layer_init == "random":
            for layer in layers:
                _reinit(layer, model.config, generator)
        if module != "layer":
            layers = [HalfLayer(layer, module) for layer in layers]
        source_norm = parts.norm if norm_init == "final" else parts.layers[e].input_layernorm
        balconies[e] = Balcony(layers, copy.deepcopy(source_norm), arch, "draft" if e in draft_exits else "sub-model")
    out = Exits(balconies, parts.num_layers, norm_init, layer_init, arch, module)
    for e in exits:  # a deep copy keeps the last trunk layer's cache slot: give each balcony its own
        for layer, slot in zip(out[e].layers, out.cache_slots(e)):
            if hasattr(layer, "self_attn"):  # an MLP-only balcony has no attention and writes no K/V
                layer.self_attn.layer_idx = slot
    out.requires_grad_(True)
    return out.to(parts.head.weight.device)


def _reinit(layer: nn.Module, config, generator: torch.Generator) -> None:
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight") or "norm" in name:
                p.fill_(1.0)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.zero_()


def identity_layer(layer: nn.Module) -> None:
    """Zero the projections a decoder layer adds to its residual stream (attention's output, the MLP's down
    projection): the layer then passes its input through unchanged, and learns from there (ReZero-style)."""
    outputs = [getattr(getattr(layer, "self_attn", None), "o_proj", None),
               getattr(getattr(layer, "mlp", None), "down_proj", None)]
    if any(o is None for o in outputs):
        raise BalspecError(f"a {type(layer).__name__} has no self_attn.o_proj and mlp.down_proj to start as the "
                           "identity from; init from a checkpoint with as many balcony layers")
    with torch.no_grad():
        for linear in outputs:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def frequent_tokens(sequences, vocab_size: int, size: int, always=()) -> tuple[torch.Tensor, float]:
    """A reduced draft vocabulary (`exits.draft_vocab`): the token ids in `always` (EOS and chat-control
    tokens, which answers end with but texts rarely hold), then the most frequent ids in `sequences` (lists
    of ids) up to `size` ids in all, sorted; and the share of all tokens in `sequences` they cover."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(torch.as_tensor(seq, dtype=torch.long), minlength=vocab_size)
    if size >= vocab_size or counts.sum() == 0:
        raise BalspecError(f"a draft vocabulary of {size} tokens needs a vocabulary larger than that "
                           f"({vocab_size}) and some text to count")
    forced = sorted(set(always))
    ranked = counts.clone()
    ranked[forced] = counts.max() + 1  # first, in their own order (a stable sort keeps it)
    top = ranked.argsort(descending=True, stable=True)[:max(size, len(forced))]
    return top.sort().values, counts[top].sum().item() / counts.sum().item()


def with_control_tokens(draft_vocab: torch.Tensor, control: list[int] | set[int]) -> torch.Tensor:
    """draft_vocab [n] token ids -> the sorted union with `control` (EOS and chat-control ids): a draft
    vocabulary that lacks the EOS can never draft the end of a reply, so every reply's last cycle is lost."""
    missing = sorted(set(control) - set(draft_vocab.tolist()))
    if not missing:
        return draft_vocab
    return torch.cat([draft_vocab, torch.tensor(missing, dtype=draft_vocab.dtype)]).sort().values


def no_sub_model_error(exit_layer: int, what: str, sub_model_exits: list[int]) -> BalspecError:
    """The one-line error for `what` (early-exit, export) asked of a draft-kind exit."""
    return BalspecError(f"--exit: exit {exit_layer} is a draft-kind exit (it reads the full model's verified states), "
                        f"so it has no standalone sub-model for {what}; use it with --mode speculative, or pick a "
                        f"sub-model exit ({','.join(map(str, sub_model_exits)) or 'the checkpoint has none'})")
