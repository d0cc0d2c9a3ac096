"""Architectures beyond Llama on tiny random models (CPU, fp32), each built from its transformers config: the
engine's `full` logits equal the model's own forward, greedy speculative decoding equals `full` with prompts
longer than the sliding window, the lean forward runs only where it is exact, and what balspec cannot run is
refused in one line naming the model type."""

import pytest
import torch

from balspec.errors import BalspecError
from balspec.exits import attach_exits
from balspec.generate import BalconyModel
from balspec.tiny import tiny_tokenizer

WINDOW = 5  # sliding window, shorter than every prompt below
COMMON = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def configs():
    """kind -> (config, model class, the layer path the engine must choose)."""
    import transformers as t

    return {
        "llama": (t.LlamaConfig(**COMMON, attention_bias=True), t.LlamaForCausalLM, "lean"),
        "qwen2": (t.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                  t.Qwen2ForCausalLM, "lean"),  # biases on q/k/v; layers 2..4 slide
        "qwen3": (t.Qwen3Config(**COMMON, head_dim=16), t.Qwen3ForCausalLM, "lean"),
        "mistral": (t.MistralConfig(**COMMON, sliding_window=WINDOW), t.MistralForCausalLM, "lean"),
        "gemma2": (t.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                  attn_logit_softcapping=2.0, final_logit_softcapping=1.5, layer_types=LAYER_TYPES),
                   t.Gemma2ForCausalLM, "generic"),
        "gemma3": (t.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                      final_logit_softcapping=1.5, layer_types=LAYER_TYPES, rope_theta=100.0),
                   t.Gemma3ForCausalLM, "generic"),
        "phi3": (t.Phi3Config(**COMMON, sliding_window=WINDOW), t.Phi3ForCausalLM, "generic"),
        "olmo2": (t.Olmo2Config(**COMMON), t.Olmo2ForCausalLM, "generic"),
        "granite": (t.GraniteConfig(**COMMON, embedding_multiplier=3.0, residual_multiplier=0.5,
                                    attention_multiplier=0.2, logits_scaling=2.0), t.GraniteForCausalLM, "generic"),
    }


KINDS = list(configs())


def build(kind, seed=0):
    config, cls, _ = configs()[kind]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # weights large enough that greedy outputs vary and drafts miss
            p.add_(torch.randn_like(p) * (0.15 if p.dim() > 1 else 0.2))
    return model


def make_bm(kind, exits=(1, 3), draft_exits=(), layer_path=None, static_cache=False):
    model = build(kind)
    modules = attach_exits(model, list(exits), draft_exits=list(draft_exits)).requires_grad_(False).eval()
    with torch.no_grad():  # balconies that differ from the last layer, so drafts are sometimes wrong
        for p in modules.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return BalconyModel(model, tiny_tokenizer(), modules, layer_path=layer_path, static_cache=static_cache)


def prompt(length, salt=0):
    return [(7 * i + 11 + salt) % 250 + 3 for i in range(length)]


def engine_logits(bm, ids):
    """Full-mode logits [len(ids) - 8, vocab] of positions 8.. from a prefill of 9 tokens, single-token steps and
    a pass over the last 3 rows at once (a verify's causal mask with an offset)."""
    engine, n = bm.engine, len(ids)
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        engine.reset(n + 4)
        rows = [engine.prefill(tokens[:, :9], "full", None)]
        rows += [engine.step(tokens[:, i:i + 1], i, "full", None) for i in range(9, n - 3)]
        hidden = engine.run_layers(engine.embed(tokens[:, n - 3:]), 0, engine.num_layers, n - 3)
        rows.append(engine.full_logits(hidden)[0])
    return torch.cat(rows)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_logits_equal_the_models_own_forward(kind, static_cache):
    bm = make_bm(kind, static_cache=static_cache)
    ids = prompt(16)  # beyond the window: its sliding layers attend over the last WINDOW positions only
    with torch.inference_mode():
        reference = bm.model(torch.tensor([ids])).logits[0, 8:]
    torch.testing.assert_close(engine_logits(bm, ids), reference, atol=1e-5, rtol=1e-5)
    assert bm.engine.layer_path == configs()[kind][2]


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculative_equals_full(kind, static_cache):
    """Also with static shapes (--static-cache): masks over the whole cache, sliding windows included."""
    bm = make_bm(kind, static_cache=static_cache)
    ids = prompt(9)
    full = bm.generate(ids, mode="full", max_new_tokens=16, eos=False)
    accepted = drafted = 0
    for exit_layer in (1, 3):
        for k, width in ((1, 1), (4, 1), ("auto", 1), (1, 3), (4, 3), ("auto", 3)):
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=k, draft_width=width,
                              max_new_tokens=16, eos=False)
            assert out.token_ids == full.token_ids, (exit_layer, k, width)
            accepted, drafted = accepted + out.stats.accepted, drafted + out.stats.drafted
    assert 0 < accepted < drafted  # drafts were both kept and thrown away


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "granite"])
def test_early_exit_equals_the_exported_sub_model(kind):
    """The sub-model as transformers runs it (export: e + 1 layers, `layer_types` cut, the balcony keeping the
    last layer's kind of attention) gives the logits of early-exit mode, soft-capping or logit scaling included."""
    from balspec.export import build_submodel

    bm = make_bm(kind, exits=(2,))
    ids = prompt(12)
    out = bm.generate(ids, mode="early-exit", exit=2, max_new_tokens=6, eos=False)
    sub = build_submodel(bm.model, bm.exit_modules, 2)
    if kind != "granite":
        assert sub.config.layer_types == LAYER_TYPES[:2] + LAYER_TYPES[-1:]
    assert_sub_model_matches_early_exit(bm, sub, ids, out.token_ids, 2)


def test_draft_kind_exit_through_the_generic_path_is_exact():
    """A verified-context balcony's K/V of verified rows are written by a pass of its module (write_deep)."""
    bm = make_bm("gemma2", exits=(1, 2), draft_exits=(1,))
    with torch.no_grad():
        bm.exit_modules[1].fuse.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ids = prompt(8)
    full = bm.generate(ids, mode="full", max_new_tokens=16, eos=False)
    for k, width in ((1, 1), (3, 1), ("auto", 3)):
        out = bm.generate(ids, mode="speculative", exit=1, draft_len=k, draft_width=width, max_new_tokens=16,
                          eos=False)
        assert out.token_ids == full.token_ids, (k, width)


def test_generic_and_lean_paths_give_equal_logits_on_llama():
    lean, generic = make_bm("llama", layer_path="lean"), make_bm("llama", layer_path="generic")
    assert (lean.engine.layer_path, generic.engine.layer_path) == ("lean", "generic")
    ids = prompt(14)
    torch.testing.assert_close(engine_logits(generic, ids), engine_logits(lean, ids), atol=1e-5, rtol=1e-5)
    a = lean.generate(ids, mode="speculative", exit=3, draft_len=3, draft_width=2, max_new_tokens=12, eos=False)
    b = generic.generate(ids, mode="speculative", exit=3, draft_len=3, draft_width=2, max_new_tokens=12, eos=False)
    assert a.token_ids == b.token_ids and a.stats.accepted_lengths == b.stats.accepted_lengths


def test_lean_forward_is_refused_where_it_is_not_exact():
    with pytest.raises(BalspecError, match="model type granite: balspec's lean layer forward"):
        make_bm("granite", layer_path="lean")  # a Llama-shaped layer, but with a residual multiplier


def test_sliding_window_changes_the_output():
    """The window is applied, not ignored: the same weights with a window longer than the context decode
    differently (so the equality with transformers above is not trivial)."""
    import transformers as t

    windowed = make_bm("mistral")
    config = t.MistralConfig(**{**COMMON, "sliding_window": 4096})
    wide = t.MistralForCausalLM(config).eval()
    wide.load_state_dict(windowed.model.state_dict())
    ids = prompt(16)
    assert not torch.allclose(engine_logits(windowed, ids), engine_logits(BalconyModel(wide, tiny_tokenizer()), ids),
                              atol=1e-3)


def test_unsupported_models_are_refused_in_one_line():
    import transformers as t

    t5 = t.T5ForConditionalGeneration(t.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                 num_heads=2))
    with pytest.raises(BalspecError, match="model type t5 .*not supported"):
        BalconyModel(t5, tiny_tokenizer())
    # Cohere's layers run through the generic path, but its forward scales the logits (logit_scale), which
    # balspec does not know of: the check at start refuses it rather than decode with other logits
    cohere = t.CohereForCausalLM(t.CohereConfig(**COMMON)).eval()
    with pytest.raises(BalspecError, match="model type cohere is not supported: balspec's engine does not"):
        BalconyModel(cohere, tiny_tokenizer())


def test_speculative_sampling_matches_the_full_distribution_on_gemma2():
    """As tests/test_sampling.py on Llama: the first two tokens that draft-verify cycles emit after the pending
    token follow the full model's joint distribution (computed exactly by transformers, soft-capped logits
    included), under temperature and top-k, through the generic path."""
    from balspec.engine.sampling import Sampling
    from tests.test_sampling import chi2, chi2_critical, two_token_joint

    model = build("gemma2")
    modules = attach_exits(model, [3]).requires_grad_(False).eval()
    with torch.no_grad():  # the sub-model of exit 3 is the full model, but for a little noise: drafts mostly land
        for p in modules.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    engine = BalconyModel(model, tiny_tokenizer(), modules).engine
    ids, pending, sampling, k = prompt(7), 44, Sampling(temperature=1.3, top_k=3), 3
    exact = two_token_joint(model, ids + [pending], sampling)
    gen, counts, accepted, start = torch.Generator().manual_seed(0), torch.zeros_like(exact), 0, len(ids)
    with torch.inference_mode():
        engine.reset(32)
        engine.prefill(torch.tensor([ids]), "speculative", 3)
        for _ in range(600):
            engine.cache.rollback(range(len(engine.cache.lengths)), start)  # back to just after the prefill
            cycle = engine.cycle(torch.tensor([[pending]]), start, 3, k, sampling, gen)
            emitted, accepted = cycle.tokens, accepted + cycle.accepted
            if len(emitted) == 1:  # rejected at once: one more cycle from the emitted token
                emitted += engine.cycle(torch.tensor([emitted]), start + 1, 3, k, sampling, gen).tokens
            counts[emitted[0], emitted[1]] += 1
    stat, df = chi2(counts.flatten(), exact.flatten())
    assert stat < chi2_critical(df), (stat, df)
    assert 200 < accepted < 600 * k  # drafts were accepted often, not always


def test_a_saved_gemma2_loads_with_eager_attention_and_runs(tmp_path):
    """Gemma 2 cannot run sdpa attention (its scores are soft-capped): the loader takes eager, whose additive
    masks the engine then builds."""
    from balspec.generate import load

    build("gemma2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    bm = load(str(tmp_path), device="cpu")
    assert bm.model.config._attn_implementation == "eager" and bm.engine.arch.additive_masks
    out = bm.generate(prompt(9), mode="full", max_new_tokens=8, eos=False)
    seq = prompt(9)
    with torch.inference_mode():
        for _ in range(8):
            seq.append(int(bm.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.token_ids == seq[9:]


def test_next_input_norm_init_is_refused_without_input_norms():
    with pytest.raises(BalspecError, match="model type olmo2 has none"):
        attach_exits(build("olmo2"), [2], norm_init="next-input")


def assert_sub_model_matches_early_exit(bm, sub, ids: list[int], generated: list[int], exit_layer: int) -> None:
    """The standalone sub-model `sub` gives early-exit mode's first logits and its greedy tokens `generated`."""
    seq = ids + generated
    with torch.inference_mode():
        reference = sub(torch.tensor([seq])).logits[0, len(ids) - 1:-1]  # [len(generated), vocab]
        bm.engine.reset(len(seq))
        prefill = bm.engine.prefill(torch.tensor([ids]), "early-exit", exit_layer)
    torch.testing.assert_close(prefill[0], reference[0], atol=1e-5, rtol=1e-5)
    assert generated == reference.argmax(-1).tolist()
