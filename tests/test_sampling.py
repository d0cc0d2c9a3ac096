"""Accept/reject logic with hand-written distributions, and distribution preservation (chi-square)."""

import math

import pytest
import torch

from balspec.engine.sampling import Sampling, accept_greedy, accept_sampling, choose, probabilities
from balspec.errors import BalspecError
from tests.test_engine import make_bm


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is a 0.1% false-alarm rate."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with zero probability was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def two_token_joint(model, context: list[int], sampling: Sampling) -> torch.Tensor:
    """The full model's exact joint distribution [vocab, vocab] of the next two tokens after `context`."""
    with torch.no_grad():
        p1 = probabilities(model(torch.tensor([context])).logits[0, -1], sampling)
        exact = torch.zeros(p1.shape[0], p1.shape[0])
        for a in torch.nonzero(p1).flatten().tolist():
            exact[a] = p1[a] * probabilities(model(torch.tensor([context + [a]])).logits[0, -1], sampling)
    return exact


def test_accept_greedy_none_some_all():
    assert accept_greedy([5, 6, 7], [1, 6, 7, 9]) == (0, 1)
    assert accept_greedy([5, 6, 7], [5, 6, 2, 9]) == (2, 2)
    assert accept_greedy([5, 6, 7], [5, 6, 7, 9]) == (3, 9)
    assert accept_greedy([], [4]) == (0, 4)


def test_accept_sampling_all_when_draft_equals_target():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.0, 1.0]])
    n, token, drafts = accept_sampling(torch.tensor([1, 0]), p, p[:2].clone(), torch.Generator().manual_seed(0))
    assert (n, drafts) == (2, [1, 0]) and token == 1  # the bonus comes from p_3, which is all on token 1


def test_accept_sampling_rejects_token_target_never_emits():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    n, token, _ = accept_sampling(torch.tensor([1]), p, q, torch.Generator().manual_seed(0))
    assert n == 0 and token == 0  # rejected; the residual max(0, p - q) is all on token 0


def test_accept_sampling_some():
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    n, token, _ = accept_sampling(torch.tensor([1, 1]), p, q, torch.Generator().manual_seed(0))
    assert (n, token) == (1, 0)


def test_top_k_top_p_processing():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_k=2)), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_p=0.7)), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_p=0.5)), torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 5e-324, 1e-300])
def test_a_tiny_temperature_samples_the_tied_argmax(temperature):
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, 0.25, 4.0, float("-inf")]])
    p = probabilities(logits, Sampling(temperature))
    torch.testing.assert_close(p, torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 1.0, 0]]))
    tokens = choose(logits, Sampling(temperature), torch.Generator().manual_seed(0))
    assert tokens[0] in (1, 2) and tokens[1] == 2


def test_huge_temperature_top_k_and_top_p_at_their_bounds():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(probabilities(logits, Sampling(1e308)), torch.full((4,), 0.25))
    torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_k=10**9)), torch.exp(logits))
    for top_p in (1e-300, 5e-324, 1e-7):
        torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_p=top_p)), torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_p=1.0)), torch.exp(logits))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1e-45])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(bad):
    with pytest.raises(BalspecError, match="--temperature must be a finite number >= 0"):
        Sampling(bad)


def test_rejection_sampling_preserves_target_distribution():
    """The first emitted token of a cycle follows p_1 exactly, whatever q is."""
    gen = torch.Generator().manual_seed(1)
    vocab, k, trials = 6, 3, 20000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, -1)
    counts = torch.zeros(vocab)
    for _ in range(trials):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(k)])
        n, token, drafted = accept_sampling(drafts, p, q, gen)
        counts[drafted[0] if n > 0 else token] += 1
    stat, df = chi2(counts, p[0])
    assert stat < chi2_critical(df), (stat, counts / trials, p[0])


@pytest.mark.parametrize("draft_vocab, adaptive", [(None, False), (torch.arange(0, 259, 2), False), (None, True)],
                         ids=["full-draft-head", "reduced-vocab", "adaptive"])
def test_speculative_sampling_matches_full_model_distribution(draft_vocab, adaptive):
    """End to end on a tiny model under temperature and top-k: the first two tokens that draft-verify
    cycles emit after the pending token follow the full model's joint distribution, computed exactly.
    With a reduced draft vocabulary q is zero on half the tokens: the residual must supply them. Adaptive
    drafting drops unsure drafts (cycles with 0 to k drafts)."""
    bm = make_bm(draft_vocab=draft_vocab)
    engine, e, k = bm.engine, 4, 3
    ids, pending, sampling = [40, 41, 42, 43], 44, Sampling(temperature=1.3, top_k=3)
    exact = two_token_joint(bm.model, ids + [pending], sampling)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(exact)
    start = len(ids)
    engine.reset(32)
    with torch.inference_mode():
        engine.prefill(torch.tensor([ids]), "speculative", e)
        everything = range(len(engine.cache.lengths))
        for _ in range(3000):
            emitted = engine.cycle(torch.tensor([[pending]]), start, e, k, sampling, gen, adaptive).tokens
            if len(emitted) == 1:  # rejected at once: one more cycle from the emitted token
                emitted += engine.cycle(torch.tensor([emitted]), start + 1, e, k, sampling, gen, adaptive).tokens
            counts[emitted[0], emitted[1]] += 1
            engine.cache.rollback(everything, start)
    stat, df = chi2(counts.flatten(), exact.flatten())
    assert stat < chi2_critical(df), (stat, df)


def test_sampling_is_reproducible_with_a_seed():
    bm = make_bm()
    a = bm.generate([3, 4, 5], mode="speculative", exit=3, temperature=0.9, top_p=0.9, seed=7,
                    max_new_tokens=12, eos=False)
    b = bm.generate([3, 4, 5], mode="speculative", exit=3, temperature=0.9, top_p=0.9, seed=7,
                    max_new_tokens=12, eos=False)
    assert a.token_ids == b.token_ids
