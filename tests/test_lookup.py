"""Drafts read from the context (prompt lookup): the n-gram index, and lookup cycles mixed with exit drafts in
greedy decoding (output equal to full, balcony caches kept right) and in sampling (the full model's
distribution, chi-square)."""

import random

import pytest
import torch

from balspec.engine.lookup import NgramLookup
from balspec.engine.sampling import Sampling
from balspec.errors import BalspecError
from balspec.exits import attach_exits
from balspec.generate import BalconyModel
from balspec.tiny import tiny_tokenizer
from tests.test_engine import EXITS, make_bm, sharp_model
from tests.test_sampling import chi2, chi2_critical, two_token_joint


def test_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = NgramLookup([1, 2, 3, 4, 9, 9, 2, 3, 4, 5, 6, 7])
    assert lookup.propose(3) == []  # "5 6 7", "6 7": never seen before
    lookup.extend([2, 3, 4])  # "2 3 4" followed 5 (latest), earlier 9
    assert lookup.propose(3) == [5, 6, 7] and lookup.propose(0) == []
    lookup.extend([5, 6, 7, 8])  # "6 7 8" unseen, "7 8" unseen
    assert lookup.propose(2) == []
    lookup.extend([1, 2])  # only the bigram "1 2" matches (at the start): followed by 3
    assert lookup.propose(5) == [3, 4, 9, 9, 2]
    assert lookup.propose(100)[-1] == 2  # never past the end of the history


def test_lookup_match_reports_the_size_and_reads_on_after_tokens_not_added():
    lookup = NgramLookup([1, 2, 3, 4, 5, 1, 2], sizes=tuple(range(8, 0, -1)))
    assert lookup.match(lookup.sizes) == (2, 2)  # "1 2" followed by 3 (index 2); "5 1 2" never seen
    assert lookup.match(lookup.sizes, after=[3]) == (3, 3)  # "1 2 3" followed by 4
    assert lookup.match((2,), after=[9]) == (0, -1) and lookup.tokens == [1, 2, 3, 4, 5, 1, 2]


def test_lookup_tokens_after_the_prompts_end_are_proposed():
    lookup = NgramLookup([7, 8, 9, 10, 7, 8])
    assert lookup.propose(4) == [9, 10, 7, 8]


class Scripted:
    """Stands in for NgramLookup.propose: from the second cycle on, every other proposal is the full model's
    own continuation with one token changed at a random place (or none), so lookup cycles accept 0..k drafts;
    the other cycles propose nothing and draft with the exit."""

    def __init__(self, full: list[int], prompt_len: int, seed: int = 0):
        self.full, self.prompt_len, self.rng, self.calls = full, prompt_len, random.Random(seed), 0

    def __call__(self, lookup: NgramLookup, count: int) -> list[int]:
        self.calls += 1
        if self.calls % 2 or count < 1:
            return []
        done = len(lookup.tokens) - self.prompt_len
        proposal = list(self.full[done:done + count])
        wrong = self.rng.randrange(len(proposal) + 1) if proposal else 0
        if wrong < len(proposal):
            proposal[wrong] = (proposal[wrong] + 1) % 200 + 3
        return proposal


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_greedy_with_lookup_cycles_equals_full(monkeypatch, static_cache):
    """Lookup cycles interleaved with exit drafts (chains, auto, siblings), every exit, dynamic and static
    shapes: the output equals full."""
    from balspec import generate as generate_module

    model = sharp_model()
    modules = attach_exits(model, EXITS).requires_grad_(False).eval()
    bm = BalconyModel(model, tiny_tokenizer(), modules, static_cache=static_cache)
    prompt = list(range(30, 41))
    full = bm.generate(prompt, mode="full", max_new_tokens=40, eos=False).token_ids
    lookups = accepted = 0
    for e in EXITS:
        for k, width in ((1, 1), (3, 1), ("auto", 1), (2, 3)):
            scripted = Scripted(full, len(prompt), seed=e)
            monkeypatch.setattr(generate_module.NgramLookup, "propose", lambda self, n, s=scripted: s(self, n))
            out = bm.generate(prompt, mode="speculative", exit=e, draft_len=k, draft_width=width, lookup_len=4,
                              max_new_tokens=40, eos=False)
            assert out.token_ids == full, (e, k, width)
            lookups, accepted = lookups + out.stats.lookup_cycles, accepted + out.stats.accepted
    assert lookups > 20 and accepted > 0


def test_lookup_counts_are_kept_apart_from_the_exits(monkeypatch):
    """Stats split the looked-up drafts from the exit's. A script cycles through: nothing (the exit drafts), the
    full model's own next tokens (all accepted), a wrong first token (none accepted); the lookup counts must
    be exactly those of the scripted proposals, and the rest of drafted/accepted the exit's."""
    from balspec import generate as generate_module

    bm = make_bm()
    prompt = list(range(30, 41))
    full = bm.generate(prompt, mode="full", max_new_tokens=30, eos=False).token_ids
    proposed = {"right": [], "wrong": []}
    calls = []

    def propose(lookup, count):
        done = len(lookup.tokens) - len(prompt)
        proposal = list(full[done:done + min(count, 2)])
        kind = ("none", "right", "wrong")[len(calls) % 3]
        calls.append(kind)
        if kind == "none" or not proposal:
            return []
        if kind == "wrong":
            proposal[0] = (proposal[0] + 1) % 200 + 3  # never the full model's token: rejected at once
        proposed[kind].append(proposal)
        return proposal

    monkeypatch.setattr(generate_module.NgramLookup, "propose", propose)
    out = bm.generate(prompt, mode="speculative", exit=3, draft_len=1, lookup_len=2, max_new_tokens=30, eos=False)
    s = out.stats
    assert out.token_ids == full
    lookups = proposed["right"] + proposed["wrong"]
    assert s.lookup_cycles == len(lookups) and 0 < s.lookup_cycles < s.cycles
    assert s.lookup_drafted == sum(map(len, lookups)) and s.lookup_accepted == sum(map(len, proposed["right"]))
    exit_cycles = s.cycles - s.lookup_cycles
    assert s.drafted - s.lookup_drafted in (exit_cycles, exit_cycles - 1)  # k=1 each; the last may have no room
    assert 0 <= s.accepted - s.lookup_accepted <= s.drafted - s.lookup_drafted
    assert s.lookup_acceptance_rate == s.lookup_accepted / s.lookup_drafted
    assert out.to_dict()["stats"]["lookup_acceptance_rate"] == s.lookup_acceptance_rate


def test_lookup_cycle_keeps_the_balcony_cache_as_a_plain_run_makes_it():
    """After a lookup cycle accepts t, d_1..d_n, the exit's balcony K/V at those positions equal what running
    the balcony over the whole accepted sequence gives."""
    bm = make_bm()
    engine, e = bm.engine, 3
    prompt = list(range(30, 41))
    full = bm.generate(prompt, mode="full", max_new_tokens=8, eos=False).token_ids
    engine.reset(64)
    with torch.inference_mode():
        engine.prefill(torch.tensor([prompt]), "speculative", e)
        cycle = engine.lookup_cycle(torch.tensor([[full[0]]]), len(prompt), e, full[1:4] + [7], Sampling(), None)
        assert cycle.accepted == 3 and cycle.tokens == full[1:5]
        slot = engine.exits.cache_slots(e)[0]
        got = engine.cache.keys[slot, :, :, :len(prompt) + 4].clone()
        engine.reset(64)
        seq = torch.tensor([prompt + full[:4]])
        engine.prefill(seq, "speculative", e)
        want = engine.cache.keys[slot, :, :, :len(prompt) + 4]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_speculative_sampling_with_lookup_drafts_matches_full_model_distribution():
    """Drafts from the context are point masses (q = 1 on the draft): accepted with probability p(d), else the
    next token is drawn from p without d. The first two tokens after the pending one follow the full model's
    joint distribution, with a draft chain that is sometimes right."""
    bm = make_bm()
    engine, e = bm.engine, 4
    ids, pending, sampling = [40, 41, 42, 43], 44, Sampling(temperature=1.3, top_k=3)
    exact = two_token_joint(bm.model, ids + [pending], sampling)
    first, second = divmod(int(exact.argmax()), exact.shape[1])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(exact)
    start, accepted = len(ids), 0
    engine.reset(32)
    with torch.inference_mode():
        engine.prefill(torch.tensor([ids]), "speculative", e)
        everything = range(len(engine.cache.lengths))
        for _ in range(3000):
            cycle = engine.lookup_cycle(torch.tensor([[pending]]), start, e, [first, second, 5], sampling, gen)
            emitted, accepted = cycle.tokens, accepted + cycle.accepted
            if len(emitted) == 1:  # rejected at once: one more (exit-drafted) cycle from the emitted token
                emitted += engine.cycle(torch.tensor([emitted]), start + 1, e, 1, sampling, gen).tokens
            counts[emitted[0], emitted[1]] += 1
            engine.cache.rollback(everything, start)
    stat, df = chi2(counts.flatten(), exact.flatten())
    assert stat < chi2_critical(df), (stat, df)
    assert 300 < accepted < 3000 * 3


def test_lookup_len_is_checked():
    bm = make_bm()
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(BalspecError, match="--lookup-len"):
            bm.generate([5, 6, 7], mode="speculative", exit=3, lookup_len=bad, max_new_tokens=4)
