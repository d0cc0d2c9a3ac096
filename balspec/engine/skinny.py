"""Matrix products for a few rows on the CPU: decode steps (1 row), verify passes (k + 1 rows).

nn.Linear computes x @ W^T. For one to a few rows of x, MKL's kernels for that form can be far slower than
the same product written as W @ x^T, and its matrix-vector kernel (one row) slower than its matrix-matrix
kernel on two. Measured on this project's 2-core CPU (AMD EPYC, MKL, fp32, weights streamed from memory as
in a decode step): a SmolLM2 layer's matrices take 0.23 ms per product with F.linear for one row and 0.11 ms
as W @ [x; x]^T; for two to four rows 0.24-0.30 ms against 0.08-0.16 ms. Whether a machine behaves so is
measured once per engine (`prefer_skinny`), not assumed: the fast form is installed only where it wins.
"""

from __future__ import annotations

import contextlib
import os
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 6  # from 8 rows on, F.linear's own GEMM is as fast again
# MKL here computes two and four columns faster than one and three: over a SmolLM2 trunk's 210 matrices,
# 1 / 2 / 3 / 4 rows took 32 / 23 / 29 / 24 ms. One or three rows get a copy of the last row appended.
PADDED = (1, 3)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x with at most MAX_ROWS rows, as W @ x^T (1 or 3 rows padded by one)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    if rows in PADDED:
        flat = torch.cat([flat, flat[-1:]])
    out = torch.mm(weight, flat.T)[:, :rows].T.contiguous()
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """skinny_linear for at most MAX_ROWS rows of x, F.linear beyond (a prefill)."""
    if x.numel() > MAX_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    return skinny_linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():  # training keeps nn.Linear's own path
        return F.linear(x, self.weight, self.bias)
    return few_rows_linear(x, self.weight, self.bias)


def install(modules: list[nn.Module]) -> None:
    """Give every nn.Linear inside `modules` the few-rows forward above (an instance attribute, so the
    class and every other model are untouched; state dicts do not change)."""
    for module in modules:
        for sub in module.modules():
            if type(sub) is nn.Linear and "forward" not in sub.__dict__:
                sub.forward = types.MethodType(_forward, sub)


@contextlib.contextmanager
def suspended(module: nn.Module):
    """Run stock nn.Linear inside `module` for a while: peers in `bench` must measure transformers as shipped."""
    patched = [m for m in module.modules() if "forward" in m.__dict__ and type(m) is nn.Linear]
    saved = [m.__dict__.pop("forward") for m in patched]
    try:
        yield
    finally:
        for m, forward in zip(patched, saved):
            m.forward = forward


def prefer_skinny(weights: list[torch.Tensor], repeats: int = 3) -> bool:
    """Time F.linear against skinny_linear over these weights (streamed, as in a decode step) for one and
    four rows; True when the skinny form is clearly faster. BALSPEC_SKINNY_MATMUL=0/1 overrides."""
    forced = os.environ.get("BALSPEC_SKINNY_MATMUL")
    if forced in ("0", "1"):
        return forced == "1"
    if not weights:
        return False
    inputs = {(rows, w.shape[1]): torch.randn(rows, w.shape[1], dtype=w.dtype) for rows in (1, 4) for w in weights}
    totals = {F.linear: 0.0, skinny_linear: 0.0}
    with torch.inference_mode():
        for _ in range(repeats):
            for fn in totals:
                start = time.perf_counter()
                for rows in (1, 4):
                    for w in weights:
                        fn(inputs[rows, w.shape[1]], w)
                totals[fn] += time.perf_counter() - start
    return totals[skinny_linear] < 0.8 * totals[F.linear]
