"""Draft-kind (verified-context) exits, DESIGN.md 3b, on tiny random models (fp32, CPU): exact output, the
balcony's cache holding the full model's K/V of verified rows, and training's simulation matching the engine."""

import copy

import pytest
import torch

from balspec.checkpoint import load_exits, save_exits
from balspec.engine.layers import key_value
from balspec.engine.sampling import Sampling
from balspec.errors import BalspecError
from balspec.exits import attach_exits, identity_layer
from balspec.generate import BalconyModel
from balspec.tiny import tiny_tokenizer
from tests.test_engine import identity_tail, sharp_model
from tests.test_sampling import chi2, chi2_critical, two_token_joint

DRAFT, SUB = [0, 1, 3], [4]  # exit 0: a balcony on the token embeddings


def make_bm(model=None, draft_vocab=None, balcony_layers=1):
    model = model or sharp_model()
    exits = DRAFT + SUB if balcony_layers == 1 else DRAFT  # one balcony depth per checkpoint
    modules = attach_exits(model, exits, draft_exits=DRAFT, balcony_layers=balcony_layers)
    modules = modules.requires_grad_(False).eval()
    with torch.no_grad():  # a trained fuse is not zero: exercise it
        for e in DRAFT:
            modules[e].fuse.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(e))
    return BalconyModel(model, tiny_tokenizer(), modules, draft_vocab=draft_vocab)


@pytest.fixture(scope="module")
def bm():
    return make_bm()


def final_states(bm, seq):
    """The full model's final normed hidden states [1, len(seq), hidden] over `seq`, from transformers."""
    with torch.no_grad():
        return bm.model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1]


def assert_deep_cache(bm, exit_layer, seq):
    """Each layer of the exit's balcony holds in its cache, at every cached position, K/V made of the full
    model's final state there, as a fresh pass over the decided tokens makes them."""
    engine = bm.engine
    layers = bm.exit_modules[exit_layer].layers
    for slot, layer in zip(bm.exit_modules.cache_slots(exit_layer), layers, strict=True):
        cached = engine.cache.lengths[slot]
        assert cached == engine.cache.lengths[0]  # as far as the trunk: every decided token but the pending one
        cos, sin = engine._rope["full_attention"]
        key, value = key_value(layer, final_states(bm, seq[:cached]), (cos[:, :cached], sin[:, :cached]))
        torch.testing.assert_close(engine.cache.keys[slot, :, :, :cached], key, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(engine.cache.values[slot, :, :, :cached], value, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [1, 6, 23])
def test_greedy_speculative_with_draft_exits_equals_full(bm, prompt_len):
    ids = [(7 * i + 11) % 250 + 3 for i in range(prompt_len)]
    full = bm.generate(ids, mode="full", max_new_tokens=30, eos=False)
    for exit_layer in DRAFT:
        for k, width in ((1, 1), (2, 1), (5, 1), ("auto", 1), (1, 3), (3, 2), ("auto", 4)):
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=k, draft_width=width,
                              max_new_tokens=30, eos=False)
            assert out.token_ids == full.token_ids, (exit_layer, k, width)
            assert_deep_cache(bm, exit_layer, ids + out.token_ids)


def test_deep_cache_after_rejections_all_accepted_and_siblings(monkeypatch):
    """Three regimes of one cycle: every draft rejected (rollback), every draft accepted (n == k: the last
    draft's K/V come from the verify), a sibling accepted in place of d_1; the cache holds deep K/V after each."""
    bm = make_bm()
    ids = list(range(40, 47))
    seq = ids + bm.generate(ids, mode="full", max_new_tokens=25, eos=False).token_ids
    engine, vocab, at = bm.engine, bm.engine.vocab_size, {}
    real_cycle = engine.cycle

    def cycle(token, start, *args, **kwargs):
        at["start"], at["i"] = start, 0
        return real_cycle(token, start, *args, **kwargs)

    def drafts_that(right: bool):
        def pick_draft(logits, sampling, generator=None):
            at["i"] += 1
            token = seq[at["start"] + at["i"]]
            return torch.tensor([token if right else (token + 1) % vocab]), None
        return pick_draft

    def alternatives(logits, width):
        right = seq[at["start"] + 1]
        return torch.tensor([(right + 2) % vocab, right])[-(width - 1):]

    monkeypatch.setattr(engine, "cycle", cycle)
    monkeypatch.setattr(engine, "alternatives", alternatives)
    for right, k, width, accepted in ((False, 3, 1, 0), (True, 3, 1, 3), (False, 2, 3, 1)):
        monkeypatch.setattr(engine, "pick_draft", drafts_that(right))
        out = bm.generate(ids, mode="speculative", exit=3, draft_len=k, draft_width=width, max_new_tokens=25,
                          eos=False)
        assert out.token_ids == seq[len(ids):]
        assert set(out.stats.accepted_lengths[:-1]) == {accepted}  # the last cycle may be cut by the budget
        assert_deep_cache(bm, 3, seq)


def assert_engine_drafts_as_trained(engine, e: int, seq: list[int], pending: int, trained: torch.Tensor) -> None:
    """The engine's balcony outputs for a chain of three drafts from `pending` equal training's forward `trained`
    [1, len(seq), hidden] at those positions (call under inference mode)."""
    engine.reset(32)
    engine.prefill(torch.tensor([seq[:pending]]), "speculative", e)
    for i, position in enumerate(range(pending, pending + 3)):
        h = engine.run_layers(engine.embed(torch.tensor([[seq[position]]])), 0, e, position)
        drafted = engine.run_balcony(e, h, position, pending=i == 0)
        torch.testing.assert_close(drafted[0, 0], trained[0, position], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("e", [3, 0])
def test_training_forward_matches_the_engine_draft(bm, e):
    """Balcony.forward with r unverified rows is what the engine computes for the (r+1)-th draft of a cycle:
    r = 0 for the pending token (input + fuse(previous deep state)), r = 1 and 2 for chain drafts. Exit 0 reads
    the token embeddings (hidden_states[0])."""
    seq = [(11 * i + 3) % 250 + 3 for i in range(14)]
    pending = 9  # the pending token's position; seq[10], seq[11] stand for d_1, d_2
    model, engine, balcony = bm.model, bm.engine, bm.exit_modules[e]
    with torch.inference_mode():
        hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        positions = torch.arange(len(seq))[None]
        rope = model.model.rotary_emb(hidden[e], positions)
        unverified = (positions - pending).clamp(min=0)  # 0 up to the pending token, then 1, 2, ...
        trained = balcony(hidden[e], rope, hidden[-1], unverified)  # [1, len(seq), hidden]
        assert_engine_drafts_as_trained(engine, e, seq, pending, trained)
        # and the context matters: with every position treated as verified the prediction differs
        verified = balcony(hidden[e], rope, hidden[-1], torch.zeros_like(unverified))
        assert not torch.allclose(verified[0, pending + 2], trained[0, pending + 2], atol=1e-3)


@pytest.mark.parametrize("adaptive", [False, True], ids=["chain", "adaptive"])
def test_speculative_sampling_with_a_draft_exit_matches_full_model_distribution(adaptive):
    """As tests/test_sampling.py for sub-model exits: the first two tokens that draft-verify cycles emit after
    the pending token follow the full model's joint distribution (computed exactly), under temperature and
    top-k, with the verified-context balcony drafting chains of 3. Layers 4..6 are the identity and the
    balcony nearly so, so that drafts are often but not always accepted."""
    bm = make_bm(identity_tail(sharp_model(), 3))
    with torch.no_grad():
        layer = bm.exit_modules[3].layers[0]
        layer.self_attn.o_proj.weight.mul_(0.05)
        layer.mlp.down_proj.weight.mul_(0.05)
        bm.exit_modules[3].fuse.weight.mul_(0.1)
    engine, e, k = bm.engine, 3, 3
    ids, pending, sampling = [40, 41, 42, 43], 44, Sampling(temperature=1.3, top_k=3)
    exact = two_token_joint(bm.model, ids + [pending], sampling)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(exact)
    start = len(ids)
    engine.reset(32)
    accepted = 0
    with torch.inference_mode():
        for _ in range(2000):
            engine.prefill(torch.tensor([ids]), "speculative", e)  # the deep state of the last prompt row
            cycle = engine.cycle(torch.tensor([[pending]]), start, e, k, sampling, gen, adaptive)
            emitted, accepted = cycle.tokens, accepted + cycle.accepted
            if len(emitted) == 1:  # rejected at once: one more cycle from the emitted token
                emitted += engine.cycle(torch.tensor([emitted]), start + 1, e, k, sampling, gen, adaptive).tokens
            counts[emitted[0], emitted[1]] += 1
            engine.reset(32)
    stat, df = chi2(counts.flatten(), exact.flatten())
    assert stat < chi2_critical(df), (stat, df)
    assert 1000 < accepted < 2000 * k  # drafts were accepted often enough for the test to mean something


def test_draft_exits_refuse_early_exit_and_export(bm, tmp_path):
    from balspec.export import build_submodel

    with pytest.raises(BalspecError, match="draft-kind exit .* no standalone sub-model"):
        bm.generate([5, 6, 7], mode="early-exit", exit=3, max_new_tokens=4)
    with pytest.raises(BalspecError, match="draft-kind exit"):
        build_submodel(bm.model, bm.exit_modules, 1)
    assert bm.generate([5, 6, 7], mode="early-exit", exit=4, max_new_tokens=4).token_ids  # sub-model exit: fine


def test_kinds_round_trip_through_a_checkpoint(bm, tmp_path):
    save_exits(bm.exit_modules, bm.model, tmp_path / "ck")
    loaded, meta = load_exits(bm.model, tmp_path / "ck")
    assert meta["kinds"] == {"0": "draft", "1": "draft", "3": "draft", "4": "sub-model"}
    assert loaded.kinds == {0: "draft", 1: "draft", 3: "draft", 4: "sub-model"}
    torch.testing.assert_close(loaded[0].fuse.weight, bm.exit_modules[0].fuse.weight)
    torch.testing.assert_close(loaded[3].fuse.weight, bm.exit_modules[3].fuse.weight)


def test_a_draft_exit_lies_among_the_exits():
    model = sharp_model()
    with pytest.raises(BalspecError, match="not among the exits"):
        attach_exits(model, [2, 4], draft_exits=[3])
    with pytest.raises(BalspecError, match=r"out of range.*0 only for a draft-kind exit"):
        attach_exits(model, [0, 2], draft_exits=[2])  # a sub-model needs at least one trunk layer


def test_draft_exits_train_record_their_kind_and_resume_exactly(tmp_path, monkeypatch):
    """`exits.draft` trains verified-context balconies beside sub-model ones: the loss falls, fuse leaves
    zero, balspec.json records the kinds, and a run interrupted after a checkpoint resumes to the same weights
    (its draws of unverified rows are seeded per step, not taken from torch's global generator)."""
    import json

    from safetensors.torch import load_file

    from balspec.training import train as train_module
    from balspec.training.run import configure
    from balspec.training.train import train
    from tests.test_train import tiny_config

    sets = ["exits.draft=[2]", "train.max_steps=12", "train.save_every=6", "train.log_every=1",
            "train.eval_every=12", "optim.lr=3e-3"]
    straight = train(tiny_config(tmp_path / "straight", *sets))
    meta = json.loads((straight / "balspec.json").read_text())
    assert meta["kinds"] == {"2": "draft", "4": "sub-model"}
    assert meta["training"]["config"]["exits"]["draft"] == [2]
    weights = load_file(straight / "exits.safetensors")
    assert weights["balconies.2.fuse.weight"].abs().sum() > 0 and "balconies.4.fuse.weight" not in weights
    lines = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    kl = [ln["kl/2"] for ln in lines if "kl/2" in ln]
    assert kl[-1] < 0.7 * kl[0]
    assert 0 <= lines[-1]["eval/top1/2"] <= 1

    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    monkeypatch.setattr(train_module, "train_step", real_step)
    train(*configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True))
    resumed = load_file(tmp_path / "resumed" / "exits.safetensors")
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert json.loads((tmp_path / "resumed" / "balspec.json").read_text())["training"]["steps"] == 12


def test_packaging_adds_draft_exits_beside_sub_model_exits(tmp_path):
    """recipes/package_default_exits.py --add: one checkpoint with both runs' exits, weights unchanged, the
    first one's draft vocabulary kept and the added run's training recorded."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from package_default_exits import add_exits

    model = sharp_model()
    shipped = attach_exits(model, [4, 5]).requires_grad_(False)
    shipped.draft_vocab = torch.arange(0, 259, 3)
    drafts = attach_exits(model, [1, 2], draft_exits=[1, 2]).requires_grad_(False)
    with torch.no_grad():
        drafts[2].fuse.weight.fill_(0.01)
    save_exits(drafts, model, tmp_path / "drafts", training={"steps": 7})
    merged, training = add_exits(model, shipped, {"training": {"steps": 3}}, str(tmp_path / "drafts"))
    assert merged.exits == [1, 2, 4, 5] and merged.kinds == {1: "draft", 2: "draft", 4: "sub-model", 5: "sub-model"}
    assert torch.equal(merged.draft_vocab, shipped.draft_vocab)
    assert torch.equal(merged[2].fuse.weight, drafts[2].fuse.weight)
    assert torch.equal(merged[5].layers[0].mlp.up_proj.weight, shipped[5].layers[0].mlp.up_proj.weight)
    assert training["steps"] == 3 and training["added_exits"][0]["training"] == {"steps": 7}
    with pytest.raises(BalspecError, match="other exits"):
        add_exits(model, drafts, {}, str(tmp_path / "drafts"))
    save_exits(attach_exits(model, [3], draft_exits=[3], balcony_layers=2), model, tmp_path / "deep")
    with pytest.raises(BalspecError, match="has 2-layer balconies, the exits it joins 1-layer ones"):
        add_exits(model, shipped, {}, str(tmp_path / "deep"))

    # --replace: a continued run of added exits 1,2 takes their place; their old record becomes its earlier stage
    with torch.no_grad():
        drafts[2].fuse.weight.fill_(0.02)
    save_exits(drafts, model, tmp_path / "continued", training={"steps": 9})
    again, record = add_exits(model, merged, {"training": training}, str(tmp_path / "continued"), replace=True)
    assert again.exits == [1, 2, 4, 5] and again.kinds == merged.kinds
    assert torch.equal(again[2].fuse.weight, drafts[2].fuse.weight) and not torch.equal(again[2].fuse.weight, merged[2].fuse.weight)
    assert torch.equal(again[5].layers[0].mlp.up_proj.weight, shipped[5].layers[0].mlp.up_proj.weight)
    assert record["steps"] == 3 and len(record["added_exits"]) == 1
    assert record["added_exits"][0]["training"] == {"steps": 9, "earlier_stages": [{"steps": 7}]}
    only_2 = attach_exits(model, [2], draft_exits=[2]).requires_grad_(False)
    save_exits(only_2, model, tmp_path / "only2", training={"steps": 1})
    with pytest.raises(BalspecError, match="whole earlier"):  # exit 1 would lose its record
        add_exits(model, merged, {"training": training}, str(tmp_path / "only2"), replace=True)
    two_and_3 = attach_exits(model, [1, 2, 3], draft_exits=[1, 2, 3]).requires_grad_(False)
    save_exits(two_and_3, model, tmp_path / "plus3", training={"steps": 1})
    with pytest.raises(BalspecError, match="replace nothing"):  # exit 3's record would inherit 1,2's stages
        add_exits(model, merged, {"training": training}, str(tmp_path / "plus3"), replace=True)
    shipped_5 = attach_exits(model, [5]).requires_grad_(False)
    save_exits(shipped_5, model, tmp_path / "five", training={"steps": 1})
    with pytest.raises(BalspecError, match="whole earlier"):  # exit 5 was trained in the shipped run itself
        add_exits(model, merged, {"training": training}, str(tmp_path / "five"), replace=True)


def test_draft_exits_train_over_a_reduced_draft_vocabulary_and_keep_it(tmp_path):
    """loss.draft_vocab: the KL over the vocabulary an exits checkpoint holds, with the EOS and chat-control
    tokens it may lack (the drafts must be able to end a reply); the trained exits store it and draft through it
    (greedy speculative output still equals full), and balspec.json says where it came from. Sub-model exits
    cannot take it (their early-exit mode needs every token)."""
    import json

    from safetensors.torch import load_file

    from balspec.models import load_model
    from balspec.training.train import train
    from tests.test_train import tiny_config

    model, tokenizer = load_model("tiny-random")
    source = attach_exits(model, [2], draft_exits=[2])
    source.draft_vocab = torch.arange(0, model.config.vocab_size, 2)  # every other token: not 1, <|im_start|>
    save_exits(source, model, tmp_path / "vocab")
    trained_vocab = torch.cat([source.draft_vocab, torch.tensor([1])]).sort().values
    sets = ["exits.layers=[2]", "exits.draft=[2]", f"loss.draft_vocab={tmp_path / 'vocab'}", "train.max_steps=12",
            "train.log_every=1", "train.eval_every=12", "optim.lr=3e-3"]
    run = train(tiny_config(tmp_path / "run", *sets))
    meta = json.loads((run / "balspec.json").read_text())
    assert meta["draft_vocab"] == {"size": len(trained_vocab), "source": f"loss.draft_vocab: {tmp_path / 'vocab'}"}
    assert torch.equal(load_file(run / "exits.safetensors")["draft_vocab"], trained_vocab)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    kl = [ln["kl/2"] for ln in lines if "kl/2" in ln]
    assert kl[-1] < 0.7 * kl[0] and min(kl) >= 0

    exits, _ = load_exits(model, run)
    bm = BalconyModel(model, tokenizer, exits.requires_grad_(False).eval(), draft_vocab=exits.draft_vocab)
    prompt = "the quick brown fox"
    full = bm.generate(prompt, mode="full", max_new_tokens=24, chat=False, eos=False).token_ids
    spec = bm.generate(prompt, mode="speculative", exit=2, draft_len=3, max_new_tokens=24, chat=False, eos=False)
    assert spec.token_ids == full and spec.stats.drafted > 0

    with pytest.raises(BalspecError, match="loss.draft_vocab: must be null unless every exit is of the draft kind"):
        train(tiny_config(tmp_path / "mixed", "exits.layers=[2,4]", "exits.draft=[2]",
                          f"loss.draft_vocab={tmp_path / 'vocab'}"))


def test_a_run_over_a_draft_vocabulary_resumes_exactly(tmp_path, monkeypatch):
    """A checkpoint stores the draft vocabulary beside the weights: resuming reads it back as the vocabulary
    (not as a weight), so the resumed run ends with the weights of the uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    from balspec.models import load_model
    from balspec.training.run import configure
    from balspec.training.train import train
    from tests.test_faults_train import interrupt_at
    from tests.test_train import tiny_config

    model, _ = load_model("tiny-random")
    source = attach_exits(model, [2], draft_exits=[2])
    source.draft_vocab = torch.arange(0, model.config.vocab_size, 2)
    save_exits(source, model, tmp_path / "vocab")
    sets = ["exits.layers=[2]", "exits.draft=[2]", f"loss.draft_vocab={tmp_path / 'vocab'}", "train.max_steps=4",
            "train.save_every=2", "train.log_every=1", "train.eval_every=0"]
    train(tiny_config(tmp_path / "straight", *sets))
    real_step = interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    monkeypatch.setattr("balspec.training.train.train_step", real_step)
    shutil.rmtree(tmp_path / "vocab")  # the run's own checkpoint holds the vocabulary
    train(*configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True))
    straight, resumed = load_file(tmp_path / "straight" / "exits.safetensors"), \
        load_file(tmp_path / "resumed" / "exits.safetensors")
    assert straight.keys() == resumed.keys() and "draft_vocab" in resumed
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_static_cache_refuses_draft_exits_and_runs_sub_model_exits():
    """Static shapes (--static-cache, --compile) do not write a draft-kind balcony's deep K/V: refused in one
    line, while a sub-model exit of the same checkpoint runs and equals full."""
    model = sharp_model()
    modules = attach_exits(model, DRAFT + SUB, draft_exits=DRAFT).requires_grad_(False).eval()
    static = BalconyModel(model, tiny_tokenizer(), modules, static_cache=True)
    with pytest.raises(BalspecError, match="draft-kind exit .* dynamic cache"):
        static.generate([5, 6, 7], mode="speculative", exit=3, max_new_tokens=4)
    full = static.generate([5, 6, 7], mode="full", max_new_tokens=12, eos=False).token_ids
    assert static.generate([5, 6, 7], mode="speculative", exit=4, draft_len=2, max_new_tokens=12,
                           eos=False).token_ids == full


def test_exit_0_starts_from_another_exit_trains_and_decodes_exactly(tmp_path):
    """exits.init_from with exits.init_exit: a draft exit 0 (a balcony on the token embeddings) starts as a copy
    of a saved exit 2, trains on the embeddings (its KL falls) and decodes exactly; init_exit needs init_from
    and an exit the checkpoint has."""
    import json

    from balspec.checkpoint import init_exits_from
    from balspec.models import load_model
    from balspec.training.train import train
    from tests.test_train import tiny_config

    model, tokenizer = load_model("tiny-random")
    source = attach_exits(model, [2], draft_exits=[2])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    save_exits(source, model, tmp_path / "e2")
    sets = ["exits.layers=[0]", "exits.draft=[0]", f"exits.init_from={tmp_path / 'e2'}", "exits.init_exit=2",
            "train.max_steps=12", "train.log_every=1", "train.eval_every=12", "optim.lr=3e-3"]
    first = attach_exits(model, [0], draft_exits=[0])
    init_exits_from(first, model, tmp_path / "e2", 2)
    assert all(torch.equal(a, b) for a, b in zip(first[0].state_dict().values(), source[2].state_dict().values()))
    run = train(tiny_config(tmp_path / "run", *sets))
    meta = json.loads((run / "balspec.json").read_text())
    assert meta["exits"] == [0] and meta["kinds"] == {"0": "draft"}
    kl = [ln["kl/0"] for ln in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "kl/0" in ln]
    assert kl[-1] < 0.8 * kl[0]

    exits, _ = load_exits(model, run)
    bm = BalconyModel(model, tokenizer, exits.requires_grad_(False).eval())
    full = bm.generate("the quick brown fox", mode="full", max_new_tokens=24, chat=False, eos=False).token_ids
    spec = bm.generate("the quick brown fox", mode="speculative", exit=0, draft_len=2, max_new_tokens=24,
                       chat=False, eos=False)
    assert spec.token_ids == full and spec.stats.drafted > 0
    with pytest.raises(BalspecError, match="has no exit 3"):
        train(tiny_config(tmp_path / "bad", *sets[:3], "exits.init_exit=3"))
    with pytest.raises(BalspecError, match="exits.init_exit"):
        train(tiny_config(tmp_path / "bad2", *sets[:2], "exits.init_exit=2"))
    with pytest.raises(BalspecError, match=r"exit 2 \(exits.init_exit\) is a draft exit there, exit 3 a sub-model "):
        train(tiny_config(tmp_path / "bad3", "exits.layers=[3]", *sets[2:4]))


def test_two_layer_draft_exits_decode_exactly_and_train_as_the_engine_drafts():
    """Draft exits with two balcony layers: greedy output equals full for every k and width, every balcony
    layer's cache holds deep K/V of the decided tokens, and training's forward (first drafts, r = 0: the only
    case trained with more than one layer) equals the engine's first draft of a cycle."""
    bm = make_bm(balcony_layers=2)
    ids = [(7 * i + 11) % 250 + 3 for i in range(9)]
    full = bm.generate(ids, mode="full", max_new_tokens=30, eos=False)
    seq = [(11 * i + 3) % 250 + 3 for i in range(14)]
    for e in DRAFT:
        for k, width in ((1, 1), (3, 1), ("auto", 1), (1, 3), (2, 2)):
            out = bm.generate(ids, mode="speculative", exit=e, draft_len=k, draft_width=width,
                              max_new_tokens=30, eos=False)
            assert out.token_ids == full.token_ids, (e, k, width)
            assert_deep_cache(bm, e, ids + out.token_ids)
        with torch.inference_mode():
            hidden = bm.model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            positions = torch.arange(len(seq))[None]
            rope = bm.model.model.rotary_emb(hidden[e], positions)
            trained = bm.exit_modules[e](hidden[e], rope, hidden[-1], torch.zeros_like(positions))
            without = copy.deepcopy(bm.exit_modules[e])  # the second layer made the identity: another draft
            identity_layer(without.layers[1])
            assert not torch.allclose(without(hidden[e], rope, hidden[-1], torch.zeros_like(positions)), trained,
                                      atol=1e-3)
            for pending in (1, 6, 12):
                bm.engine.reset(32)
                bm.engine.prefill(torch.tensor([seq[:pending]]), "speculative", e)
                h = bm.engine.run_layers(bm.engine.embed(torch.tensor([[seq[pending]]])), 0, e, pending)
                drafted = bm.engine.run_balcony(e, h, pending, pending=True)
                torch.testing.assert_close(drafted[0, 0], trained[0, pending], atol=1e-4, rtol=1e-4)


def test_a_deeper_draft_exit_starts_from_a_one_layer_checkpoint_exactly(tmp_path):
    """exits.init_from a one-layer draft exit into a two-layer one: the added layer starts as the identity, so the
    new exit drafts exactly as the saved one; training it needs exits.draft_chain 1 (first drafts only), and a
    sub-model exit still needs the checkpoint's depth."""
    from balspec.checkpoint import init_exits_from
    from balspec.training.loss import Distiller
    from tests.test_train import tiny_config

    model = sharp_model()
    source = attach_exits(model, [3], draft_exits=[3])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    save_exits(source, model, tmp_path / "one")
    deeper = attach_exits(model, [3], draft_exits=[3], balcony_layers=2)
    init_exits_from(deeper, model, tmp_path / "one")
    seq = [(5 * i + 2) % 250 + 3 for i in range(12)]
    with torch.inference_mode():
        hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        positions = torch.arange(len(seq))[None]
        rope = model.model.rotary_emb(hidden[3], positions)
        r = torch.zeros_like(positions)
        torch.testing.assert_close(deeper[3](hidden[3], rope, hidden[-1], r), source[3](hidden[3], rope, hidden[-1], r))
    save_exits(attach_exits(model, [3]), model, tmp_path / "sub")
    with pytest.raises(BalspecError, match="1-layer balconies, this run 2-layer ones"):
        init_exits_from(attach_exits(model, [3], balcony_layers=2), model, tmp_path / "sub")
    with pytest.raises(BalspecError, match="exits.draft_chain"):
        tiny_config(tmp_path / "bad", "exits.layers=[2]", "exits.draft=[2]", "exits.balcony_layers=2")
    tiny_config(tmp_path / "ok", "exits.layers=[2]", "exits.draft=[2]", "exits.balcony_layers=2", "exits.draft_chain=1")
    with pytest.raises(BalspecError, match="exits.draft_chain"):  # the library path too, not only the recipe
        Distiller(deeper, draft_chain=3)
    assert Distiller(deeper, draft_chain=1).draft_chain == 1
