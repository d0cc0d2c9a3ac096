"""Matrix products for a few rows on the CPU: decode steps (1 row), verify passes (k + 1 rows).

nn.Linear computes x @ W^T. For one to a few rows of x, MKL's kernels for that form can be far slower than
the same product written as W @ x^T, and its matrix-vector kernel (one row) slower than its matrix-matrix
kernel on two. Measured on this project's 2-core CPU (AMD EPYC, MKL, fp32, weights streamed from memory as
in a decode step): a SmolLM2 layer's matrices take 0.23 ms per product with F.linear for one row and 0.11 ms
as W @ [x; x]^T; for two to four rows 0.24-0.30 ms against 0.08-0.16 ms. Whether a machine behaves so is
measured once per engine (`prefer_skinny`, medians of 5 rounds), not assumed, for one row and for several
apart: the fast form is used only for the row counts where it wins. They can differ: on the 2-core AVX2 VM
F.linear's one-row kernel ran as fast as W @ [x; x]^T (30 against 34-38 ms over the trunk's matrices) while
for two rows it took 53-56 ms against 31-38, and a single yes/no over both (the rule before) came out "no"
there, leaving every verify on the slow form (speculation at 0.77x of `full` where it reached 1.15x with the
skinny verify).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
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


class FewRows:
    """F.linear(x, weight, bias), computed as skinny_linear when x has one of the row counts in `rows` (a subset
    of 1..MAX_ROWS): the engine's product for decode steps and verify passes (`Engine.linear`)."""

    def __init__(self, rows: frozenset[int]):
        self.rows = rows

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() // x.shape[-1] in self.rows:
            return skinny_linear(x, weight, bias)
        return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor, linear: FewRows) -> torch.Tensor:
    if torch.is_grad_enabled():  # training keeps nn.Linear's own path
        return F.linear(x, self.weight, self.bias)
    return linear(x, self.weight, self.bias)


def install(modules: list[nn.Module], linear: FewRows) -> None:
    """Give every nn.Linear inside `modules` the few-rows forward `linear` (an instance attribute, so the
    class and every other model are untouched; state dicts do not change)."""
    for module in modules:
        for sub in module.modules():
            if type(sub) is nn.Linear and "forward" not in sub.__dict__:
                sub.forward = types.MethodType(functools.partial(_forward, linear=linear), sub)


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


ONE, SEVERAL = frozenset({1}), frozenset(range(2, MAX_ROWS + 1))


# the two forms prefer_skinny times, by the names decide() reads
FORMS = {"linear": F.linear, "skinny": skinny_linear}


def prefer_skinny(weights: list[torch.Tensor], repeats: int = 5) -> frozenset[int]:
    """The row counts for which skinny_linear is clearly faster (by 10%) than F.linear over these weights
    (streamed, as in a decode step), timed apart for one row (a decode step) and for two and four (a verify):
    one untimed round, then `repeats` rounds that take every form and row count in turn; `decide` compares
    the medians. BALSPEC_SKINNY_MATMUL=0/1 overrides (none / every count up to MAX_ROWS)."""
    forced = os.environ.get("BALSPEC_SKINNY_MATMUL")
    if forced in ("0", "1"):
        return ONE | SEVERAL if forced == "1" else frozenset()
    if repeats < 1:
        raise ValueError(f"prefer_skinny needs at least one timed round, got repeats={repeats}")
    if not weights:
        return frozenset()
    inputs = {(rows, w.shape[1]): torch.randn(rows, w.shape[1], dtype=w.dtype) for rows in (1, 2, 4) for w in weights}
    times: dict[tuple[str, int], list[float]] = {(form, rows): [] for form in FORMS for rows in (1, 2, 4)}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for form, rows in times:
                start = time.perf_counter()
                for w in weights:
                    FORMS[form](inputs[rows, w.shape[1]], w)
                if round_:  # the first round warms caches and kernels up
                    times[form, rows].append(time.perf_counter() - start)
    return decide(times)


def decide(times: dict[tuple[str, int], list[float]], margin: float = 0.9) -> frozenset[int]:
    """Row counts to run as skinny_linear, from seconds per round {(form, rows): [s, ...]} with form "linear" or
    "skinny" and rows 1, 2, 4: one row when skinny's median is under `margin` times F.linear's, two to MAX_ROWS
    when the sum of its medians for 2 and 4 rows is. Medians, not sums: on a shared 2-core VM single rounds
    run up to twice as long, and with three summed rounds one such outlier flipped the choice between runs (on
    a 2-core AMD EPYC VM one row went through F.linear's slow kernel, which made `full` mode 67 ms a step against
    50 ms for a two-row verify and bench's speedups 1.3x too high: its `skinny_rows` lacks 1 in
    evals/results/bench_builtin14_e2-answers5_k12auto_sumrule_epyc_cpu.json)."""
    median = {key: statistics.median(values) for key, values in times.items()}

    def wins(counts: tuple[int, ...]) -> bool:
        return sum(median["skinny", r] for r in counts) < margin * sum(median["linear", r] for r in counts)

    return (ONE if wins((1,)) else frozenset()) | (SEVERAL if wins((2, 4)) else frozenset())
