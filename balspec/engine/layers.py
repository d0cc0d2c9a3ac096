"""Decoder layers over balspec's KV cache, two ways: the lean forward and the generic path.

The generic path (`module_layer`) calls the model's own transformers decoder-layer module, with the position
embeddings and the mask the engine built for the rows, writing K/V into balspec's cache through the Cache
interface: any architecture transformers runs, and the reference for correctness.

The lean forward (`decoder_layer`) is one decoder layer of a Llama-family model with none of transformers'
per-call machinery. The engine runs it only where `has_lean_form` holds and, at start, one layer's lean
output equals its module's on random input in fp32 (Engine.check_lean).

The arithmetic is the layer's own, on its own weights: RMSNorm, q/k/v projections (with their biases where
the model has them), per-head q/k norms (Qwen3), rotary embedding, grouped-query attention, o projection,
gated MLP. What is left out is what a decode step pays for on every layer and never needs: module calls
and hooks, the attention-interface dispatch, keyword plumbing, and repeat_kv, which copies the whole cache
of a grouped-query layer whenever a mask is passed (every multi-row verify). Products go through the
engine's `linear`, the matrix-product form it measured fastest for few rows (skinny.py).

Lean forward measured by evals/layer_forward.py (default model, fp32, one row, 2-core CPU, interleaved): see
evals/results/layer_forward_cpu.json. Training does not come here: it runs the layers' own modules
(`module_layer`, `context_layer`) with autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Linear = Callable[..., torch.Tensor]  # (x, weight, bias=None) -> x @ weight^T + bias


_LEAN_FORM = {"": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},  # child modules, and
              "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"},  # nothing else
              "mlp": {"gate_proj", "up_proj", "down_proj", "act_fn"}}
_LEAN_NEEDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def module_layer(layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 mask: torch.Tensor | None, cache) -> torch.Tensor:
    """The generic path: hidden [b, q, hidden] -> [b, q, hidden] through the layer's own module, which appends
    its K/V to `cache` (slot = its layer_idx; None in training). mask: [b, 1, q, cached + q], boolean for sdpa
    attention, additive for eager; None only where the rows may see everything cached (one new token, no
    window) or, under sdpa without a cache, for a block attending causally over itself."""
    out = layer(hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache)
    return out[0] if isinstance(out, tuple) else out


def has_lean_form(layer: nn.Module) -> bool:
    """Is the layer built of exactly the modules the lean forward computes with (a pre-norm Llama-family
    layer: RMSNorms, q/k/v/o projections, optional per-head q/k norms, gated MLP)? The numeric check at engine
    start decides the rest (scalings, multipliers)."""
    for path, allowed in _LEAN_FORM.items():
        module = layer.get_submodule(path) if path else layer
        if not {name for name, _ in module.named_children()} <= allowed:
            return False
    try:
        needed = [layer.get_submodule(path) for path in _LEAN_NEEDS]
    except AttributeError:
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm,
             *(getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n))]
    attn = layer.self_attn
    return (all(isinstance(m, nn.Linear) for m in needed[:7])
            and all(hasattr(n, "variance_epsilon") and hasattr(n, "weight") for n in norms)
            and hasattr(attn, "head_dim") and hasattr(attn, "scaling")
            and getattr(attn, "attn_logit_softcapping", None) is None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def project(linear: Linear, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def decoder_layer(layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  mask: torch.Tensor | None, cache, linear: Linear = F.linear) -> torch.Tensor:
    """hidden [1, q, hidden] -> [1, q, hidden]; appends the layer's K/V to `cache` (slot = its layer_idx).

    rope: cos, sin [1, q, head_dim] at the rows' positions; mask: bool [1, 1, q, cached + q] or None for
    a row that may see everything cached (one new token).
    """
    attn = layer.self_attn
    x = rms_norm(layer.input_layernorm, hidden)
    key, value = cache.update(*_key_value(attn, x, rope, linear), attn.layer_idx)  # [1, kv_heads, cached + q, head_dim]
    return _attend_and_mlp(layer, hidden, _query(attn, x, rope, linear), key, value, mask, linear)


def key_value(layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
              linear: Linear = F.linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [b, kv_heads, q, head_dim] the layer's attention makes of `hidden` [b, q, hidden]
    at the rope positions, written nowhere: a verified-context balcony's K/V of verified positions."""
    return _key_value(layer.self_attn, rms_norm(layer.input_layernorm, hidden), rope, linear)


def context_layer(layer: nn.Module, hidden: torch.Tensor, context: list[torch.Tensor],
                  rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The layer's own module on `hidden` [b, q, hidden], its attention reading keys and values made of other
    hidden states: `context`, a list of [b, q, hidden] at the same positions, concatenated along the key axis.
    mask: [b, 1, q, len(context) * q], boolean (sdpa) or additive (eager). Training's path for verified-context
    balconies (autograd, no cache), any architecture: each position sees the full model's states of the
    positions it treats as verified and the balcony's own inputs of the rest."""
    recorder = _Recorder()
    for states in context:  # a module makes K/V only inside its forward: start one, stop it once they are made
        try:
            module_layer(layer, states, rope, None, recorder)
        except _Recorded:
            pass
    recorder.replay = True
    return module_layer(layer, hidden, rope, mask, recorder)


class _Recorded(Exception):
    """A pass of `context_layer` has made its K/V: the rest of it (attention, MLP) is not needed."""


class _Recorder:
    """Stands in for the cache in `context_layer`: keeps the K/V each pass makes, then gives the last pass all
    of them, in order, instead of its own."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.replay = False

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        if self.replay:
            return torch.cat(self.keys, 2), torch.cat(self.values, 2)  # [b, kv_heads, n * q, head_dim]
        self.keys.append(key)
        self.values.append(value)
        raise _Recorded

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope[0][:, None], rope[1][:, None]
    return x * cos + rotate_half(x) * sin


def _query(attn: nn.Module, x: torch.Tensor, rope, linear: Linear) -> torch.Tensor:
    """Normed input [b, q, hidden] -> rotated queries [b, heads, q, head_dim]."""
    query = project(linear, attn.q_proj, x).view(*x.shape[:2], -1, attn.head_dim)  # [b, q, heads, head_dim]
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before the rotation
        query = rms_norm(attn.q_norm, query)
    return _rotate(query.transpose(1, 2), rope)


def _key_value(attn: nn.Module, x: torch.Tensor, rope, linear: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed input [b, q, hidden] -> rotated keys and values [b, kv_heads, q, head_dim]."""
    shape = (*x.shape[:2], -1, attn.head_dim)
    key = project(linear, attn.k_proj, x).view(shape)
    value = project(linear, attn.v_proj, x).view(shape).transpose(1, 2)
    if hasattr(attn, "k_norm"):
        key = rms_norm(attn.k_norm, key)
    return _rotate(key.transpose(1, 2), rope), value


def _attend_and_mlp(layer: nn.Module, hidden: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, mask: torch.Tensor | None, linear: Linear) -> torch.Tensor:
    """Attention of `query` over key/value, o projection and residual, then the gated MLP and residual."""
    attn, mlp = layer.self_attn, layer.mlp
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    hidden = hidden + project(linear, attn.o_proj, out.transpose(1, 2).reshape(*hidden.shape[:2], -1))
    x = rms_norm(layer.post_attention_layernorm, hidden)
    gated = mlp.act_fn(project(linear, mlp.gate_proj, x)) * project(linear, mlp.up_proj, x)
    return hidden + project(linear, mlp.down_proj, gated)
