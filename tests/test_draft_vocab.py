"""Reduced draft vocabulary (exact output, drafts from it, stored with the checkpoint); few-row CPU matmuls."""

import pytest
import torch
import torch.nn.functional as F

from balspec.checkpoint import load_exits, save_exits
from balspec.engine import skinny
from balspec.engine.sampling import Sampling
from balspec.engine.skinny import skinny_linear
from balspec.errors import BalspecError
from balspec.exits import attach_exits, frequent_tokens
from tests.test_engine import EXITS, make_bm, sharp_model

EVEN = torch.arange(0, 259, 2)  # half of the tiny vocabulary: many of the full model's tokens are outside


def test_greedy_output_is_exact_and_drafts_come_from_the_draft_vocabulary():
    bm, reference = make_bm(draft_vocab=EVEN), make_bm()
    ids = [5, 9, 14, 30, 31]
    full = reference.generate(ids, mode="full", max_new_tokens=30, eos=False)
    rejected = []
    for exit_layer in EXITS:
        for k in (1, 3, "auto"):
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=k, max_new_tokens=30, eos=False,
                              on_cycle=lambda tokens, missed: rejected.extend(missed))
            assert out.token_ids == full.token_ids, (exit_layer, k)
    assert rejected and all(d % 2 == 0 or d == 1 for d in rejected)  # EVEN and the control tokens 0, 1, 2
    assert any(t % 2 for t in full.token_ids)  # the full model does emit tokens the drafts cannot


def test_draft_logits_are_the_full_heads_rows():
    bm, reference = make_bm(draft_vocab=EVEN), make_bm()
    normed = torch.randn(1, 1, bm.model.config.hidden_size)
    with torch.no_grad():
        rows = bm.engine.draft_vocab  # EVEN and the control token 1
        assert torch.allclose(bm.engine.draft_logits(normed), reference.engine.draft_logits(normed)[rows], atol=1e-5)
        token, q = bm.engine.pick_draft(bm.engine.draft_logits(normed), Sampling(temperature=1.0),
                                        torch.Generator().manual_seed(0))
    assert q.shape == (259,) and q[3::2].sum() == 0 and abs(q.sum().item() - 1) < 1e-5 and token.item() in rows


def test_checkpoint_round_trip(tmp_path):
    model = sharp_model()
    exits = attach_exits(model, EXITS)
    exits.draft_vocab = EVEN
    save_exits(exits, model, tmp_path, draft_vocab_info={"coverage": 0.5})
    loaded, meta = load_exits(model, tmp_path)
    assert torch.equal(loaded.draft_vocab, EVEN)
    assert meta["draft_vocab"] == {"size": len(EVEN), "coverage": 0.5}
    exits.draft_vocab = None
    save_exits(exits, model, tmp_path)
    assert load_exits(model, tmp_path)[0].draft_vocab is None


def test_bad_draft_vocabulary_in_a_checkpoint_is_refused(tmp_path):
    model = sharp_model()
    exits = attach_exits(model, EXITS)
    exits.draft_vocab = torch.tensor([3, 3, 500])
    save_exits(exits, model, tmp_path)
    with pytest.raises(BalspecError, match="draft vocabulary"):
        load_exits(model, tmp_path)


def test_frequent_tokens_counts_and_covers():
    ids, coverage = frequent_tokens([[5, 5, 5, 7, 7, 9], [5, 7, 11]], vocab_size=20, size=2)
    assert ids.tolist() == [5, 7] and coverage == pytest.approx(7 / 9)
    ids, coverage = frequent_tokens([[5, 5, 5, 7, 7, 9], [5, 7, 11]], vocab_size=20, size=3, always=[2])
    assert ids.tolist() == [2, 5, 7] and coverage == pytest.approx(7 / 9)


def test_the_draft_vocabulary_always_holds_the_eos_and_control_tokens():
    """A draft vocabulary without the EOS can never draft the end of a reply (a checkpoint's stored one
    may lack it: the shipped one did)."""
    bm = make_bm(draft_vocab=EVEN)
    vocab = bm.engine.draft_vocab.tolist()
    assert {0, 1, 2} <= set(vocab) and vocab == sorted(vocab) and len(vocab) == len(EVEN) + 1
    assert 2 in bm.eos_ids
    with pytest.raises(BalspecError):
        frequent_tokens([[1, 2]], vocab_size=4, size=4)


def test_skinny_linear_equals_linear():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    for shape in [(1, 1, 32), (1, 2, 32), (1, 6, 32), (3, 32)]:
        x = torch.randn(*shape, generator=generator)
        assert torch.allclose(skinny_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
        assert torch.allclose(skinny_linear(x, weight), F.linear(x, weight), atol=1e-5)


@pytest.mark.parametrize("forced", ["0", "1"])
def test_engine_is_exact_with_either_matmul_form(forced, monkeypatch):
    monkeypatch.setenv("BALSPEC_SKINNY_MATMUL", forced)
    bm = make_bm(draft_vocab=EVEN)
    assert bm.engine.skinny == (forced == "1")
    assert any("forward" in m.__dict__ for m in bm.model.modules()) == (forced == "1")
    with skinny.suspended(bm.model):  # transformers as shipped, for the peers in bench
        assert not any("forward" in m.__dict__ for m in bm.model.modules())
    assert any("forward" in m.__dict__ for m in bm.model.modules()) == (forced == "1")
    full = bm.generate([5, 9, 14], mode="full", max_new_tokens=24, eos=False)
    with torch.no_grad():
        reference = bm.model(torch.tensor([[5, 9, 14]])).logits[0, -1].argmax().item()
    assert full.token_ids[0] == reference
    for k in (1, 4):
        out = bm.generate([5, 9, 14], mode="speculative", exit=3, draft_len=k, max_new_tokens=24, eos=False)
        assert out.token_ids == full.token_ids


def test_few_rows_products_take_the_skinny_form_only_for_the_chosen_row_counts(monkeypatch):
    """The choice is per row count (one row: a decode step; several: a verify): a machine where only several
    rows gain keeps F.linear's one-row kernel, and the other way round."""
    calls = []
    real = skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda x, w, b=None: calls.append(x.shape[0]) or real(x, w, b))
    linear, weight = skinny.FewRows(skinny.SEVERAL), torch.randn(8, 4)
    for rows in (1, 2, 4, 7):
        x = torch.randn(rows, 4)
        assert torch.allclose(linear(x, weight), F.linear(x, weight), atol=1e-6)
    assert calls == [2, 4]
    monkeypatch.setenv("BALSPEC_SKINNY_MATMUL", "1")
    assert skinny.prefer_skinny([weight]) == skinny.ONE | skinny.SEVERAL
    monkeypatch.setenv("BALSPEC_SKINNY_MATMUL", "0")
    assert skinny.prefer_skinny([weight]) == frozenset()


def test_the_few_rows_choice_follows_the_median_round_so_one_slow_round_does_not_flip_it():
    """A shared VM runs single rounds up to twice as long: summed, the one slow round of the skinny form below
    would make F.linear look faster for one row; the medians keep the skinny form (and keep F.linear where
    skinny is not 10% faster)."""
    times = {("linear", 1): [0.047, 0.042, 0.047], ("skinny", 1): [0.031, 0.029, 0.090],
             ("linear", 2): [0.082, 0.084, 0.068], ("skinny", 2): [0.031, 0.029, 0.032],
             ("linear", 4): [0.060, 0.061, 0.059], ("skinny", 4): [0.038, 0.038, 0.037]}
    assert sum(times["skinny", 1]) > 0.9 * sum(times["linear", 1])  # what a sum over rounds would conclude
    assert skinny.decide(times) == skinny.ONE | skinny.SEVERAL
    slower_one_row = {**times, ("skinny", 1): [0.045, 0.044, 0.046]}  # within 10% of F.linear: keep the library's
    assert skinny.decide(slower_one_row) == skinny.SEVERAL
    fifteen_percent = {**times, ("skinny", 1): [0.040, 0.040, 0.040]}  # 0.85 of F.linear's 0.047: faster by over 10%
    assert skinny.decide(fifteen_percent) == skinny.ONE | skinny.SEVERAL
    with pytest.raises(ValueError, match="at least one timed round"):
        skinny.prefer_skinny([torch.randn(4, 4)], repeats=0)
