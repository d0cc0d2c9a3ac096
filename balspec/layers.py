"""One decoder layer of a Llama-family model over balspec's KV cache, with none of transformers' per-call
machinery.

The arithmetic is the layer's own, on its own weights: RMSNorm, q/k/v projections (with their biases where
the model has them), per-head q/k norms (Qwen3), rotary embedding, grouped-query attention, o projection,
gated MLP. What is left out is what a decode step pays for on every layer and never needs: module calls
and hooks, the attention-interface dispatch, keyword plumbing, and repeat_kv, which copies the whole cache
of a grouped-query layer whenever a mask is passed (every multi-row verify). Products go through the
engine's `linear`, the matrix-product form it measured fastest for few rows (skinny.py).

Measured by evals/layer_forward.py (default model, fp32, one row, 2-core CPU, interleaved): see
evals/results/layer_forward_cpu.json. Training does not come here: it runs the layers as transformers
ships them (autograd, causal SDPA).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Linear = Callable[..., torch.Tensor]  # (x, weight, bias=None) -> x @ weight^T + bias


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
    attn, mlp = layer.self_attn, layer.mlp
    x = rms_norm(layer.input_layernorm, hidden)
    q_len = x.shape[1]
    shape = (1, q_len, -1, attn.head_dim)
    query = project(linear, attn.q_proj, x).view(shape)  # [1, q, heads, head_dim]
    key = project(linear, attn.k_proj, x).view(shape)
    value = project(linear, attn.v_proj, x).view(shape).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before the rotation
        query, key = rms_norm(attn.q_norm, query), rms_norm(attn.k_norm, key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # [1, heads, q, head_dim]
    cos, sin = rope[0][:, None], rope[1][:, None]
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    key, value = cache.update(key, value, attn.layer_idx)  # [1, kv_heads, cached + q, head_dim]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    hidden = hidden + project(linear, attn.o_proj, out.transpose(1, 2).reshape(1, q_len, -1))
    x = rms_norm(layer.post_attention_layernorm, hidden)
    gated = mlp.act_fn(project(linear, mlp.gate_proj, x)) * project(linear, mlp.up_proj, x)
    return hidden + project(linear, mlp.down_proj, gated)
