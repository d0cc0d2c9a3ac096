"""Logits processing, greedy choice and speculative rejection sampling (Leviathan et al. 2023).

p is the full model's distribution, q the draft's. Temperature, top-k and top-p are applied to both
before the accept test, in fp32, so the output distribution is exactly the processed p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from balspec.errors import BalspecError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise BalspecError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BalspecError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BalspecError(f"--top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    """torch generators take seeds in [0, 2**64)."""
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise BalspecError(f"{flag} must lie in [0, 2**64), got {seed}")


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., vocab] logits -> fp32 probabilities after temperature, top-k and top-p.

    Any finite temperature > 0 is exact: the logits are shifted so their maximum is 0 before they are
    divided (in fp64, so that neither 1/T nor the quotient overflows for T down to 5e-324), which
    leaves softmax unchanged and, as T -> 0, gives the uniform distribution over the tied argmax.
    """
    logits = logits.float()
    shifted = (logits - logits.amax(-1, keepdim=True)).double()
    logits = (shifted / sampling.temperature).float()  # <= 0; underflow to -inf is the exact limit
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= sampling.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays (a top_p below fp32's range)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[n, vocab] logits -> [n] tokens: argmax when greedy, else a sample of the processed distribution."""
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, sampling), 1, generator=generator).squeeze(-1)


def accept_greedy(drafts: list[int], targets: list[int]) -> tuple[int, int]:
    """n = length of the prefix where d_i == argmax p_i; the next token is argmax p_{n+1}."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n, targets[n]


def accept_sampling(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[int, int, list[int]]:
    """Rejection sampling over k drafts with one host sync; returns (n accepted, next token, drafts).

    drafts: [k]; p: [k + 1, vocab] target probabilities; q: [k, vocab] draft probabilities.
    Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
    normalize(max(0, p_i - q_i)); when all k are accepted sample the bonus from p_{k+1}.
    """
    k = drafts.shape[0]
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, drafts] / q[rows, drafts]  # q(d_i) > 0: d_i was drawn from q
    accepted = torch.rand(k, device=p.device, generator=generator) < ratio  # [k]
    residual = (p[:k] - q).clamp_min(0)  # [k, vocab]
    mass = residual.sum(-1, keepdim=True)
    # p_i == q_i everywhere means d_i is always accepted; any row keeps multinomial well defined
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[:k])
    candidates = torch.multinomial(torch.cat([residual, p[k:]]), 1, generator=generator).squeeze(-1)  # [k + 1]
    host = torch.cat([accepted.long(), candidates, drafts]).tolist()
    flags, picks, drafted = host[:k], host[k:2 * k + 1], host[2 * k + 1:]
    n = flags.index(0) if 0 in flags else k
    return n, picks[n], drafted
