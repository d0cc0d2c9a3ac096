"""What the engine must know about a decoder-only model besides its modules (exits.Parts): the formulas its
own forward applies around the decoder layers, and each layer's kind of attention.

Around the layers: an embedding multiplier (Granite; Gemma's sqrt(hidden) scaling lives inside its embedding
module), a logit divisor (Granite) and a final logit soft-cap (Gemma 2/3). Per layer: full causal attention,
or attention over a sliding window of the last `window` positions (Mistral, Phi-3 and Qwen2 with a window on
all layers; Gemma 2/3 and Qwen2/3's `layer_types` per layer). The engine builds the masks itself: the
window is applied there, never left to the attention kernel. What balspec cannot run exactly is refused in
one line naming the model type; whatever else a model's forward might do is caught by the engine's check
against the model's own forward at start (Engine.check_forward).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from balspec.errors import BalspecError

FULL, SLIDING = "full_attention", "sliding_attention"
ATTENTION = ("sdpa", "eager")  # implementations whose mask balspec builds: boolean (sdpa) or additive (eager)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layer_kinds: tuple[str, ...]  # attention kind of each trunk layer; a balcony takes the last layer's
    windows: dict[str, int | None]  # kind -> sliding window in positions (None: every earlier position)
    rotary_by_kind: bool  # the rotary embedding takes the layer kind (Gemma 3: a base per kind)
    embed_multiplier: float | None  # Granite: embeddings times this
    logits_divisor: float | None  # Granite: logits divided by this
    logit_softcap: float | None  # Gemma 2/3: logits -> cap * tanh(logits / cap)
    additive_masks: bool  # the attention adds its mask to the scores (eager) instead of taking a boolean one

    @property
    def balcony_kind(self) -> str:
        """A balcony copies the last layer, and keeps its kind of attention (window, rotary base)."""
        return self.layer_kinds[-1]

    def rotary(self, rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor, kind: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [b, q, rotary dim] for positions [b, q] as the model rotates layers of this kind (x: any
        tensor of the model's dtype and device)."""
        return rotary(x, positions, kind) if self.rotary_by_kind else rotary(x, positions)

    def mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A boolean mask (True: may attend) as the model's attention takes it: boolean for sdpa, additive
        (0 or the dtype's minimum) for eager."""
        if not self.additive_masks:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                             torch.finfo(dtype).min)

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The LM head's product [..., vocab] -> the model's logits: Granite's divisor, Gemma's soft-cap."""
        if self.logits_divisor is not None:
            logits = logits / self.logits_divisor
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def causal_mask(length: int, window: int | None, device) -> torch.Tensor:
    """bool [length, length]: each position sees itself and the earlier ones, or only the `window` - 1 before
    it under a sliding window."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return allowed if window is None else allowed.triu(1 - window)


def architecture(model: nn.Module, rotary: nn.Module, num_layers: int) -> Architecture:
    """Describe `model` for the engine, or refuse it (BalspecError naming the model type)."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise BalspecError(f"model type {model_type} is an encoder-decoder model; balspec runs decoder-only "
                           "causal LMs")
    if getattr(config, "use_bidirectional_attention", False):
        raise BalspecError(f"model type {model_type}: bidirectional attention is not supported (balspec "
                           "decodes causally)")
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ATTENTION:
        raise BalspecError(f"model type {model_type}: attention implementation {implementation!r} is not "
                           f"supported; load the model with attn_implementation one of {', '.join(ATTENTION)}")
    kinds = tuple(getattr(config, "layer_types", None) or [SLIDING if _window(config) else FULL] * num_layers)
    unknown = sorted(set(kinds) - {FULL, SLIDING})
    if unknown:
        raise BalspecError(f"model type {model_type}: layers of kind {unknown[0]} are not supported "
                           f"(balspec runs {FULL} and {SLIDING} layers)")
    if SLIDING in kinds and not _window(config):
        raise BalspecError(f"model type {model_type}: sliding-window layers without a sliding_window size")
    return Architecture(
        model_type=model_type, layer_kinds=kinds[:num_layers],
        windows={kind: _window(config) if kind == SLIDING else None for kind in set(kinds)},
        rotary_by_kind="layer_type" in inspect.signature(rotary.forward).parameters,
        embed_multiplier=_factor(getattr(model.model, "embedding_multiplier", None)),
        logits_divisor=_factor(getattr(config, "logits_scaling", None)),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        additive_masks=implementation == "eager")


def _window(config) -> int | None:
    return getattr(config, "sliding_window", None) or None


def _factor(value) -> float | None:
    """A multiplier that changes the arithmetic, or None where it is absent or 1."""
    return None if value is None or float(value) == 1.0 else float(value)
