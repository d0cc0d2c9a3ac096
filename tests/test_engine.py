"""Exactness of the engine on tiny random models (fp32, CPU): greedy speculative == full greedy."""

import pytest
import torch

from balspec.engine.sampling import Sampling
from balspec.errors import BalspecError
from balspec.exits import attach_exits
from balspec.generate import BalconyModel
from balspec.tiny import tiny_model, tiny_tokenizer

EXITS = [1, 3, 4]


def sharp_model(num_layers=6, seed=0):
    """A tiny random model with large weights, so that greedy outputs vary and drafts often miss."""
    model = tiny_model(num_layers=num_layers, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def make_bm(model=None, exits=EXITS, draft_vocab=None, logits_dtype="model"):
    model = model or sharp_model()
    modules = attach_exits(model, exits).requires_grad_(False).eval()
    return BalconyModel(model, tiny_tokenizer(), modules, draft_vocab=draft_vocab, logits_dtype=logits_dtype)


def identity_tail(model, first):
    """Make trunk layers first+1..N the identity: zero the projections that write into the residual."""
    with torch.no_grad():
        for layer in model.model.layers[first:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def bm():
    return make_bm()


@pytest.mark.parametrize("prompt_len, draft_lens", [(1, [1, 4, "auto"]), (6, [2, 5]), (23, [3, 6])])
def test_speculative_greedy_equals_full(bm, prompt_len, draft_lens):
    ids = [(7 * i + 11) % 250 + 3 for i in range(prompt_len)]
    full = bm.generate(ids, mode="full", max_new_tokens=30, eos=False)
    assert len(full.token_ids) == 30
    for exit_layer in EXITS:
        for k in draft_lens:
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=k, max_new_tokens=30, eos=False)
            assert out.token_ids == full.token_ids, (exit_layer, k)
            assert out.stats.cycles >= 4  # several verify rounds happened
            assert sum(out.stats.accepted_lengths) == out.stats.accepted


@pytest.mark.parametrize("draft_len, width", [(1, 2), (1, 4), (3, 3), ("auto", 2), ("auto", 5)])
def test_speculative_greedy_with_siblings_equals_full(bm, draft_len, width):
    for prompt_len in (1, 9):
        ids = [(5 * i + 17) % 250 + 3 for i in range(prompt_len)]
        full = bm.generate(ids, mode="full", max_new_tokens=30, eos=False)
        for exit_layer in EXITS:
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=draft_len, draft_width=width,
                              max_new_tokens=30, eos=False)
            assert out.token_ids == full.token_ids, (exit_layer, draft_len, width, prompt_len)
            assert out.stats.draft_width == width


def test_two_layer_balconies_are_exact():
    model = sharp_model()
    modules = attach_exits(model, [2, 4], balcony_layers=2).requires_grad_(False).eval()
    with torch.no_grad():  # the two layers of a balcony differ, so their order and caches matter
        for p in modules.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    bm = BalconyModel(model, tiny_tokenizer(), modules)
    ids = [(3 * i + 5) % 250 + 3 for i in range(7)]
    full = bm.generate(ids, mode="full", max_new_tokens=30, eos=False)
    for exit_layer in (2, 4):
        for k, width in ((1, 1), (3, 1), ("auto", 3)):
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=k, draft_width=width,
                              max_new_tokens=30, eos=False)
            assert out.token_ids == full.token_ids, (exit_layer, k, width)
            assert 0 < out.stats.accepted < 30  # some drafts land, some miss


@pytest.mark.parametrize("draft_len", [1, 3])
def test_a_sibling_the_full_model_chose_is_accepted(draft_len, monkeypatch):
    """The first draft is always wrong and the right token is always among the siblings: every cycle must
    accept that sibling (its K/V moved into place, the balcony run on it), and the output stays exact."""
    bm = make_bm()
    ids = list(range(40, 47))
    seq = ids + bm.generate(ids, mode="full", max_new_tokens=25, eos=False).token_ids
    engine, vocab = bm.engine, bm.engine.vocab_size
    real_cycle, at = engine.cycle, {}

    def cycle(token, start, *args, **kwargs):
        at["start"] = start
        return real_cycle(token, start, *args, **kwargs)

    def pick_draft(logits, sampling, generator=None):
        return torch.tensor([(seq[at["start"] + 1] + 1) % vocab]), None  # never the full model's token

    def alternatives(logits, width):
        right = seq[at["start"] + 1]
        return torch.tensor([(right + 2) % vocab, right])[-(width - 1):]

    monkeypatch.setattr(engine, "cycle", cycle)
    monkeypatch.setattr(engine, "pick_draft", pick_draft)
    monkeypatch.setattr(engine, "alternatives", alternatives)
    for width in (2, 3):
        out = bm.generate(ids, mode="speculative", exit=3, draft_len=draft_len, draft_width=width,
                          max_new_tokens=25, eos=False)
        assert out.token_ids == seq[len(ids):]
        assert out.stats.accepted_lengths == [1] * out.stats.cycles  # the sibling, every cycle
    # every store holds exactly what one pass over the emitted tokens writes (the last one is pending)
    cached, slots = engine.cache.lengths[0], [*range(6), *bm.exit_modules.cache_slots(3)]
    assert cached == len(ids) + 24 and all(engine.cache.lengths[s] == cached for s in slots)
    keys = engine.cache.keys[slots, :, :, :cached].clone()
    engine.reset(64)
    with torch.inference_mode():
        engine.prefill(torch.tensor([seq[:cached]]), "speculative", 3)
    torch.testing.assert_close(keys, engine.cache.keys[slots, :, :, :cached], atol=1e-4, rtol=1e-4)


def test_tree_rows_see_only_their_ancestors():
    from balspec.engine.tree import DraftTree

    tree = DraftTree.build(k=2, width=3, device="cpu")  # rows: t, d_1, d_2, s_1, s_2
    assert tree.size == 5 and tree.depth.tolist() == [0, 1, 2, 1, 1]
    assert tree.allowed.int().tolist() == [[1, 0, 0, 0, 0],
                                           [1, 1, 0, 0, 0],
                                           [1, 1, 1, 0, 0],
                                           [1, 0, 0, 1, 0],
                                           [1, 0, 0, 0, 1]]


def test_some_drafts_accepted_and_some_rejected(bm):
    out = bm.generate(list(range(10, 20)), mode="speculative", exit=4, draft_len=3, max_new_tokens=40, eos=False)
    assert 0 < out.stats.accepted < out.stats.drafted


def test_full_mode_equals_plain_forward_greedy():
    bm = make_bm()
    ids = list(range(20, 32))
    out = bm.generate(ids, mode="full", max_new_tokens=12, eos=False)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(bm.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_every_draft_accepted_when_balcony_reproduces_full_model():
    # layers 4..6 are identity and the balcony copies the (identity) last layer and the final norm:
    # the sub-model of exit 3 computes exactly the full model
    model = identity_tail(sharp_model(), 3)
    bm = make_bm(model, exits=[3])
    # 21 = the prefill's token + 4 cycles of 5, so no cycle is shortened by the budget
    full = bm.generate([5, 6, 7], mode="full", max_new_tokens=21, eos=False)
    out = bm.generate([5, 6, 7], mode="speculative", exit=3, draft_len=4, max_new_tokens=21, eos=False)
    assert out.token_ids == full.token_ids
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.mean_accepted_length == 5.0  # k accepted + the bonus, every full cycle


def test_no_draft_accepted_when_balcony_is_adversarial():
    model = identity_tail(sharp_model(), 3)
    bm = make_bm(model, exits=[3])
    with torch.no_grad():  # a negated norm negates the draft logits: the draft picks the full model's argmin
        bm.exit_modules[3].norm.weight.neg_()
    full = bm.generate([5, 6, 7], mode="full", max_new_tokens=20, eos=False)
    out = bm.generate([5, 6, 7], mode="speculative", exit=3, draft_len=3, max_new_tokens=20, eos=False)
    assert out.token_ids == full.token_ids
    assert out.stats.accepted == 0 and out.stats.drafted > 0
    assert out.stats.mean_accepted_length == 1.0


def test_early_exit_equals_sub_model_composed_by_hand(bm):
    ids = list(range(40, 49))
    out = bm.generate(ids, mode="early-exit", exit=3, max_new_tokens=15, eos=False)
    model, balcony = bm.model, bm.exit_modules[3]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(15):
            h = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[3]
            positions = torch.arange(len(seq))[None]
            normed = balcony(h, model.model.rotary_emb(h, positions))
            seq.append(int(model.lm_head(normed)[0, -1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_early_exit_never_runs_deeper_layers(bm, monkeypatch):
    calls = count_layer_calls(bm, monkeypatch)
    bm.generate(list(range(5, 12)), mode="early-exit", exit=3, max_new_tokens=8, eos=False)
    assert calls[:3] == [8, 8, 8] and calls[3:] == [0, 0, 0]


def count_layer_calls(bm, monkeypatch):
    """Passes through each trunk layer, counted where the engine runs a layer."""
    import balspec.engine.speculative

    index = {id(layer): i for i, layer in enumerate(bm.model.model.layers)}
    calls = [0] * len(index)
    run = balspec.engine.speculative.decoder_layer

    def counted(layer, *args):
        if id(layer) in index:
            calls[index[id(layer)]] += 1
        return run(layer, *args)

    monkeypatch.setattr(balspec.engine.speculative, "decoder_layer", counted)
    return calls


def test_verify_skips_trunk_layers_already_run(monkeypatch):
    bm = make_bm()
    calls = count_layer_calls(bm, monkeypatch)
    out = bm.generate(list(range(5, 12)), mode="speculative", exit=3, draft_len=4, max_new_tokens=30, eos=False)
    cycles, drafted = out.stats.cycles, out.stats.drafted
    # layers 1..e run once per drafted token plus once for d_k (or t) per cycle, plus the prefill
    assert calls[:3] == [1 + drafted + cycles] * 3
    # layers e+1..N run once per cycle (one batched verify pass), plus the prefill
    assert calls[3:] == [1 + cycles] * 3


def test_verify_logits_and_cache_lengths_after_rollback():
    bm = make_bm()
    engine, e, k = bm.engine, 3, 4
    ids = list(range(30, 41))
    prompt = torch.tensor([ids])
    engine.reset(64)
    with torch.inference_mode():
        first = int(engine.prefill(prompt, "speculative", e)[0].argmax())
        start = len(ids)
        cycle = engine.cycle(torch.tensor([[first]]), start, e, k, Sampling(), None)
        kept = start + cycle.accepted + 1
        assert engine.cache.lengths[:6] == [kept] * 6
        assert engine.cache.lengths[bm.exit_modules.cache_slots(e)[0]] == kept
        # verify logits over t, d_1..d_k equal a plain forward over the same tokens
        seq = torch.tensor([ids + [first] + cycle.drafts])
        engine.reset(64)
        engine.prefill(prompt, "speculative", e)
        hidden = engine.run_layers(engine.embed(seq[:, start:]), 0, e, start)
        p_logits = engine.full_logits(engine.run_layers(hidden, e, 6, start))[0]
        reference = bm.model(seq).logits[0, start:]
    torch.testing.assert_close(p_logits, reference, atol=1e-4, rtol=1e-4)
    assert cycle.tokens[:-1] == cycle.drafts[:cycle.accepted]
    assert cycle.tokens[-1] == int(reference[cycle.accepted].argmax())


def test_max_new_tokens_exact(bm):
    for n in [1, 2, 7, 13]:
        out = bm.generate(list(range(9, 19)), mode="speculative", exit=4, draft_len=5, max_new_tokens=n, eos=False)
        assert len(out.token_ids) == n and out.stop_reason == "length"


def test_eos_inside_accepted_drafts_cuts_there():
    model = identity_tail(sharp_model(), 3)
    bm = make_bm(model, exits=[3])
    full = bm.generate([5, 6, 7], mode="full", max_new_tokens=25, eos=False).token_ids
    eos = full[6]  # declare a token the model emits mid-cycle to be EOS
    bm.eos_ids = {eos}
    out = bm.generate([5, 6, 7], mode="speculative", exit=3, draft_len=4, max_new_tokens=25)
    cut = full.index(eos)
    assert out.token_ids == full[:cut + 1] and out.stop_reason == "eos"
    assert bm.generate([5, 6, 7], mode="full", max_new_tokens=25).token_ids == out.token_ids


def test_stop_string_inside_drafts(bm):
    full = bm.generate([50, 51, 52], mode="full", max_new_tokens=30, eos=False)
    stop = bm.tokenizer.decode(full.token_ids[8:10])
    out = bm.generate([50, 51, 52], mode="speculative", exit=4, draft_len=4, max_new_tokens=30, stop=[stop], eos=False)
    assert out.stop_reason == "stop"
    assert stop not in out.text and full.text.startswith(out.text)
    assert out.token_ids == full.token_ids[:len(out.token_ids)]


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "speculative", "exit": 2}, "exit 2 is not in the loaded checkpoint"),
    ({"mode": "speculative", "exit": 3, "draft_len": 0}, "--draft-len must lie in 1..64"),
    ({"mode": "speculative", "exit": 3, "draft_len": "many"}, "--draft-len"),
    ({"mode": "full", "temperature": -1.0}, "--temperature must be a finite number >= 0"),
    ({"mode": "full", "temperature": 1.0, "top_p": 0.0}, "--top-p must lie in (0, 1]"),
    ({"mode": "full", "temperature": 1.0, "top_p": 1.5}, "--top-p must lie in (0, 1]"),
    ({"mode": "fastest"}, "unknown mode"),
    ({"mode": "speculative", "exit": 3, "draft_width": 0}, "--draft-width must be a whole number in 1..64"),
    ({"mode": "speculative", "exit": 3, "draft_width": 3, "temperature": 0.7}, "needs greedy decoding"),
    ({"mode": "full", "max_new_tokens": 2000}, "exceeds the model's context"),
])
def test_bad_input_is_one_clear_error(bm, kwargs, message):
    with pytest.raises(BalspecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        bm.generate("hello", **kwargs)


def test_empty_prompt_is_an_error(bm):
    with pytest.raises(BalspecError, match="empty"):
        bm.generate("   ", mode="full")


def test_no_exits_loaded_means_full_only():
    bm = BalconyModel(sharp_model(), tiny_tokenizer(), None)
    assert bm.generate("hi", max_new_tokens=3, eos=False).stats.mode == "full"
    with pytest.raises(BalspecError, match="needs exits"):
        bm.generate("hi", mode="speculative")


def test_bf16_full_model_logits_can_be_computed_in_fp32():
    """--logits-dtype float32 for bf16/fp16 models: the LM head's product runs in fp32 on the final normed
    states (no ties from logits rounded to bf16), in full mode and in the verify pass alike."""
    model = sharp_model().to(torch.bfloat16)
    normed = torch.randn(1, 3, model.config.hidden_size).to(torch.bfloat16)
    weight = model.lm_head.weight.float()
    for policy, dtype in (("float32", torch.float32), ("model", torch.bfloat16)):
        bm = make_bm(model, logits_dtype=policy)
        with torch.no_grad():
            logits = bm.engine.head_logits(normed)
        assert logits.dtype == dtype and bm.engine.logits_dtype == policy
        expected = normed.float() @ weight.T if policy == "float32" else model.lm_head(normed)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            out = bm.generate([5, 9, 14], mode="full", max_new_tokens=6, eos=False)
        assert len(out.token_ids) == 6
    assert make_bm(sharp_model(), logits_dtype="float32").engine.logits_dtype == "model"  # fp32: nothing to do
    with pytest.raises(BalspecError, match="--logits-dtype must be one of"):
        make_bm(sharp_model(), logits_dtype="half")


def count_host_syncs(monkeypatch) -> list[str]:
    """Every read of a tensor's value into Python (item, tolist, bool, int, float): on a GPU each one waits for
    the device. Returns the list the calls are recorded in, by name."""
    seen = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name):
            seen.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


@pytest.mark.parametrize("accepting", [False, True])
@pytest.mark.parametrize("draft_len, width", [(1, 1), (4, 1), (1, 3), (3, 2)])
def test_a_greedy_cycle_reads_the_device_once(accepting, draft_len, width, monkeypatch):
    """Drafting and verifying stay on the device: a greedy cycle reads it once, for the accept step, whatever
    k and width, with drafts rejected (a random balcony) or all accepted (a sub-model that is the full model);
    a full-mode step never does."""
    bm = make_bm(identity_tail(sharp_model(), 3), exits=[3]) if accepting else make_bm(exits=[3])
    engine, ids = bm.engine, list(range(30, 41))
    engine.reset(128)
    with torch.inference_mode():
        token = torch.tensor([[int(engine.prefill(torch.tensor([ids]), "speculative", 3)[0].argmax())]])
        start, accepted = len(ids), []
        syncs = count_host_syncs(monkeypatch)
        for _ in range(6):
            before = len(syncs)
            cycle = engine.cycle(token, start, 3, draft_len, Sampling(), None, width=width)
            assert syncs[before:] == ["tolist"]
            accepted.append(cycle.accepted)
            start += len(cycle.tokens)
            token = torch.tensor([[cycle.tokens[-1]]])
        monkeypatch.undo()
        assert accepted == [draft_len] * 6 if accepting else sum(accepted) < 6 * draft_len
        engine.reset(128)
        logits = engine.prefill(torch.tensor([ids]), "full", None)
        syncs = count_host_syncs(monkeypatch)
        for i in range(4):
            logits = engine.step(logits.argmax(-1).view(1, 1), len(ids) + i, "full", None)
        assert syncs == []


def test_adaptive_drafting_reads_the_device_once_per_draft(monkeypatch):
    """--draft-len auto decides after each draft whether to go on: one read per drafted token, one to accept."""
    bm = make_bm()
    engine, ids = bm.engine, list(range(30, 41))
    engine.reset(128)
    with torch.inference_mode():
        token = torch.tensor([[int(engine.prefill(torch.tensor([ids]), "speculative", 3)[0].argmax())]])
        syncs = count_host_syncs(monkeypatch)
        cycle = engine.cycle(token, len(ids), 3, 8, Sampling(), None, adaptive=True)
    reads = len(syncs) - 1  # one per draft made: the kept ones and, where the chain ended unsure, a dropped one
    assert syncs == ["item"] * reads + ["tolist"] and len(cycle.drafts) <= reads <= len(cycle.drafts) + 1


def test_adaptive_drafting_near_temperature_0_drafts_as_greedy_does():
    """--draft-len auto judges a draft by the exit's own distribution, not the temperature-sharpened one: near
    temperature 0 that one is one-hot, so every draft looked sure and each cycle drafted the longest chain."""
    bm = make_bm()
    engine, ids = bm.engine, list(range(30, 41))
    drafted = {}
    for sampling in (Sampling(), Sampling(temperature=1e-4)):
        engine.reset(128)
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            token = torch.tensor([[int(engine.prefill(torch.tensor([ids]), "speculative", 3)[0].argmax())]])
            start, counts = len(ids), []
            for _ in range(5):
                cycle = engine.cycle(token, start, 3, 8, sampling, generator, adaptive=True)
                counts.append(len(cycle.drafts))
                start += len(cycle.tokens)
                token = torch.tensor([[cycle.tokens[-1]]])
        drafted[sampling.greedy] = counts
    assert max(drafted[True]) < 8  # a random balcony is unsure: greedy auto stops early
    assert drafted[False] == drafted[True]


def test_compiled_passes_equal_eager_and_compile_once_per_shape():
    """--compile: each pass shape (full step, draft step, balcony, verify per k) is compiled once, whatever the
    position it runs at (the position is a device tensor, not a constant the graph is specialised on), and the
    output equals the eager engine's. On CUDA these are the graphs that replay; on a CPU, inductor's code."""
    from torch._dynamo.utils import counters

    model = sharp_model()
    modules = attach_exits(model, EXITS).requires_grad_(False).eval()
    compiled = BalconyModel(model, tiny_tokenizer(), modules, compile="reduce-overhead")
    eager = make_bm()
    before = counters["stats"]["unique_graphs"]
    for prompt in ([5, 6, 7], list(range(40, 57))):  # a second prompt: other positions, the same shapes
        for kwargs in (dict(mode="full"), dict(mode="speculative", exit=3, draft_len=2)):
            want = eager.generate(prompt, max_new_tokens=20, eos=False, **kwargs).token_ids
            assert compiled.generate(prompt, max_new_tokens=20, eos=False, **kwargs).token_ids == want
    assert compiled.engine.compiled_passes >= 4  # full step, draft step, balcony, verify
    assert counters["stats"]["unique_graphs"] - before == compiled.engine.compiled_passes


def test_cuda_graphs_and_bad_compile_modes_are_refused_in_one_line():
    model = sharp_model()
    modules = attach_exits(model, EXITS).requires_grad_(False).eval()
    with pytest.raises(BalspecError, match="cuda-graphs needs a CUDA device"):
        BalconyModel(model, tiny_tokenizer(), modules, compile="cuda-graphs")
    with pytest.raises(BalspecError, match="--compile: choose one of reduce-overhead, cuda-graphs"):
        BalconyModel(model, tiny_tokenizer(), modules, compile="max-autotune")
