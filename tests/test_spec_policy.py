"""evals/spec_policy.py: the replay of greedy answers under draft policies (no model: hand-made answers and
costs), so its predicted tokens per cycle follow the engine's rules."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("spec_policy", ROOT / "evals" / "spec_policy.py")
sp = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sp  # dataclasses look their module up while the file runs
spec.loader.exec_module(sp)

ROWS = range(2, sp.MAX_ROWS + 1)
COSTS = {"full": 1.0, "full_balcony": 1.0, **{f"exit_{k}": 1.0 for k in (1, 2, 3)},
         **{f"lookup_{r}": 1.0 for r in ROWS}, **{f"verify_{r}": 1.0 for r in ROWS}}


def answer(exit_right):
    # the prompt ends with 1 2 3 4 5; the answer repeats it and goes on: 1 2 3 4 5 6
    return sp.Answer(prompt=[9, 1, 2, 3, 4, 5], answer=[1, 2, 3, 4, 5, 6], exit_right=exit_right,
                     exit_top=[0.9] * 5)


def test_a_lookup_verifies_what_followed_and_keeps_a_bonus_token():
    # after the pending "1": the 1-gram "1" followed by 2 3 4 5 in the prompt; 4 accepted, the bonus is 6
    out = sp.simulate(sp.Policy("lookup", ((1, 4),), k=0), [answer([False] * 5)], COSTS)
    assert (out["cycles"], out["tokens_per_cycle"], out["lookup_cycles"]) == (1, 5.0, 1)
    assert out["speedup"] == 5.0  # 5 tokens for the price of one full step


def test_a_lookup_is_cut_so_that_a_verify_gives_the_last_token():
    # the prompt holds the whole answer after "1": a proposal of all five would be right, but the output's last
    # token must be a verify's own (bonus) token, so four are proposed over five rows
    costs = {**COSTS, **{f"verify_{r}": r / 2 for r in range(2, sp.MAX_ROWS + 1)}}
    whole = sp.Answer(prompt=[9, 1, 2, 3, 4, 5, 6], answer=[1, 2, 3, 4, 5, 6], exit_right=[False] * 5,
                      exit_top=[0.9] * 5)
    out = sp.simulate(sp.Policy("lookup", ((1, 8),), k=0), [whole], costs)
    assert (out["cycles"], out["tokens_per_cycle"]) == (1, 5.0) and out["speedup"] == 5 / 2.5


def test_exit_chains_accept_the_exits_right_prefix():
    # k=2: rows 0, 1 right -> 3 tokens; then room for one draft: row 3 wrong -> 1 token; then the last token
    # alone: the engine's k=0 cycle (a full step that runs the balcony), not an exit draft
    costs = {**COSTS, "exit_2": 1.5, "full_balcony": 1.1}
    out = sp.simulate(sp.Policy("exit", k=2), [answer([True, True, True, False, True])], costs)
    assert out["cycles"] == 3 and out["exit_cycles"] == 2 and out["tokens_per_cycle"] == 5 / 3
    assert out["speedup"] == 5 / (1.5 + 1.0 + 1.1)


def test_a_gated_exit_steps_alone_while_its_drafts_are_rejected():
    policy = sp.Policy("gated", k=1, gate=0.5, window=1, probe=8)
    out = sp.simulate(policy, [answer([False] * 5)], COSTS)
    assert out["exit_cycles"] == 1 and out["cycles"] == 5  # one rejected draft, then full steps


def test_confirm_verifies_the_lookup_only_where_the_exits_draft_agrees():
    # pending "1": the context proposes 2 3 4 5 but the exit drafts 7: its own (wrong) draft is verified, 1 token;
    # pending "2": the context proposes 3 4 5 and the exit drafts 3: the lookup is verified, 3 accepted + bonus
    costs = {**COSTS, "exit_1": 1.3}
    a = sp.Answer(prompt=[9, 1, 2, 3, 4, 5], answer=[1, 2, 3, 4, 5, 6], exit_right=[False, True, False, False, False],
                  exit_top=[0.9] * 5, exit_choice=[7, 3, 0, 0, 0])
    out = sp.simulate(sp.Policy("confirm", ((1, 4),), k=1, confirm=True), [a], costs)
    assert (out["cycles"], out["exit_cycles"], out["lookup_cycles"], out["tokens_per_cycle"]) == (2, 1, 1, 2.5)
    assert abs(out["speedup"] - 5 / (1.3 + (1.3 - 1.0) + 1.0)) < 1e-12


def test_replay_of_a_draft_kind_exit_predicts_the_engines_k1_cycles():
    """A draft-kind exit is replayed as each cycle's first draft: with k = 1 and no lookup, the replay's cycles
    and accepted drafts are those of a real speculative run on the tiny random model."""
    from tests.test_draft_exits import make_bm

    bm = make_bm()
    prompt = bm.encode("the quick brown fox", chat=False)
    for exit_layer in (1, 3):
        out = bm.generate(prompt, mode="full", max_new_tokens=40, chat=False, eos=False).token_ids
        spec = bm.generate(prompt, mode="speculative", exit=exit_layer, draft_len=1, lookup_len=0,
                           max_new_tokens=40, chat=False, eos=False)
        assert spec.token_ids == out
        answers = sp.replay(bm, [(prompt, out)], exit_layer)
        assert len(answers[0].exit_right) == len(out) - 1
        sim = sp.simulate(sp.Policy("exit", (), k=1), answers, COSTS)
        # the run's first cycle drafts after the prefill's token; the replay starts there too
        assert sim["cycles"] == spec.stats.cycles and sim["cycles"] * sim["tokens_per_cycle"] == len(out) - 1
        assert round(sim["tokens_per_cycle"] * sim["cycles"]) - sim["cycles"] == spec.stats.accepted


def test_the_datastore_proposes_the_most_frequent_follower_chained_and_within_its_thresholds():
    docs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [9, 2, 3, 4, 5, 6], [1, 2, 3, 4, 8]]
    store = sp.Datastore(docs, sizes=(4, 3), min_count=2, min_share=0.5)
    # "1 2 3 4" -> 5 (2 of 3), then "2 3 4 5" -> 6 (2 of 3); "3 4 5 6" was never followed
    assert store.propose([0, 1, 2, 3, 4], 3) == [5, 6]
    assert store.propose([2, 3, 4], 1) == [5]  # the 3-gram "2 3 4": 5 three times of four
    assert store.propose([7, 7], 3) == [] and store.propose([1, 2, 3, 4], 0) == []
    assert sp.Datastore(docs, sizes=(4,), min_count=2, min_share=0.7).propose([1, 2, 3, 4], 2) == []  # 2/3 < 0.7
    assert sp.Datastore(docs, sizes=(4,), min_count=3, min_share=0.5).propose([1, 2, 3, 4], 2) == []  # 2 < 3
    big = [49151, 49000, 48000, 47000, 46000]  # real vocabulary ids: the 5-gram keys wrap past 2**64 in numpy
    wide = sp.Datastore([big + [7], big + [7]], sizes=(5,), min_count=2, min_share=0.5)
    assert wide.propose([1] + big, 1) == [7] and next(iter(wide.tables[5])) == sp.ngram_key(big)


def test_a_datastore_draft_is_read_only_where_the_context_has_none_and_priced_as_a_lookup():
    # the context "9 1 2 3 4 5" has no match for the pending "7"; the store continues "7" with 8 9
    a = sp.Answer(prompt=[9, 1, 2, 3, 4, 5], answer=[7, 8, 9, 6], exit_right=[False] * 3, exit_top=[0.9] * 3,
                  exit_choice=[0] * 3)
    stores = {"s": sp.Datastore([[7, 8, 9, 0]] * 2, sizes=(1,), min_count=1, min_share=0.5)}
    costs = {**COSTS, "lookup_3": 1.5}
    out = sp.simulate(sp.Policy("store", ((4, 3),), k=1, store="s", store_len=2), [a], costs, stores)
    assert (out["store_cycles"], out["store_tokens_per_cycle"], out["cycles"]) == (1, 2.0, 1)
    assert out["speedup"] == 3 / 1.5  # 8, 9 accepted and the bonus 6, for one 3-row verify
    # where the context has a match ("1 2 3" after the pending 1 of a prompt holding 1 2 3 4), it proposes, not the store
    ctx = sp.Answer(prompt=[9, 1, 2, 3, 4], answer=[1, 2, 3, 4, 6], exit_right=[False] * 4, exit_top=[0.9] * 4,
                    exit_choice=[0] * 4)
    both = {"s": sp.Datastore([[1, 5, 5, 5]] * 2, sizes=(1,), min_count=1, min_share=0.5)}
    first = sp.simulate(sp.Policy("store", ((1, 3),), k=1, store="s", store_len=3), [ctx], costs, both)
    assert (first["lookup_cycles"], first["store_cycles"]) == (1, 0)
    confirm = sp.simulate(sp.Policy("store", ((4, 3),), k=1, store="s", store_len=2, store_confirm=True), [a],
                          costs, stores)
    # the exit's d_1 (always 0) disagrees with the store's 8, then 9: two exit cycles, then a last bonus-only step
    assert (confirm["store_cycles"], confirm["exit_cycles"], confirm["cycles"]) == (0, 2, 3)
