"""The engine on the real default model (SmolLM2-135M-Instruct, 30 layers, fp32, CPU)."""

import pytest

from balspec.exits import attach_exits
from balspec.generate import BalconyModel, default_exits_path, load
from balspec.models import DEFAULT_MODEL, load_model

pytestmark = pytest.mark.integration

PROMPTS = ["What is the capital of France?", "Write a limerick about a cat who learns to code."]


@pytest.fixture(scope="module")
def untrained():
    model, tokenizer = load_model()
    exits = attach_exits(model, [8, 24]).requires_grad_(False).eval()
    return BalconyModel(model, tokenizer, exits)


def test_default_model_answers_sanely(untrained):
    out = untrained.generate(PROMPTS[0], mode="full", max_new_tokens=12)
    assert "Paris" in out.text


def test_engine_logits_equal_transformers_on_default_model(untrained):
    """balspec's layer forward computes what transformers' decoder layers compute on the real weights."""
    import torch

    engine = untrained.engine
    ids = torch.tensor([untrained.encode(PROMPTS[1])])
    with torch.inference_mode():
        reference = untrained.model(ids).logits[0]
        engine.reset(ids.shape[1] + 4)
        prefill = engine.prefill(ids[:, :-1], "full", None)[0]
        step = engine.step(ids[:, -1:], ids.shape[1] - 1, "full", None)[0]
    torch.testing.assert_close(prefill, reference[-2], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(step, reference[-1], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("exit_layer, draft_len", [(8, 3), (24, "auto")])
def test_speculative_equals_full_on_default_model(untrained, exit_layer, draft_len):
    for prompt in PROMPTS:
        full = untrained.generate(prompt, mode="full", max_new_tokens=24, eos=False)
        spec = untrained.generate(prompt, mode="speculative", exit=exit_layer, draft_len=draft_len,
                                  max_new_tokens=24, eos=False)
        assert spec.token_ids == full.token_ids


@pytest.mark.skipif(default_exits_path(DEFAULT_MODEL) is None, reason="no exits shipped yet")
def test_shipped_exits_load_and_are_exact():
    bm = load()
    assert bm.meta["base_model"]["name"] == DEFAULT_MODEL  # load() checked both fingerprints
    assert set(bm.exits) >= {8, 12, 16}
    assert bm.engine.draft_vocab is not None and bm.meta["draft_vocab"]["size"] == len(bm.engine.draft_vocab)
    for prompt in PROMPTS:
        full = bm.generate(prompt, mode="full", max_new_tokens=32)
        shipped = bm.generate(prompt, max_new_tokens=32)  # the shipped defaults: speculative, prompt lookup
        assert shipped.token_ids == full.token_ids and shipped.stats.mode == "speculative"
        for exit_layer, draft_len, width in ((2, 1, 1), (2, 3, 1), (8, 1, 1), (8, "auto", 3), (16, "auto", 1),
                                             (24, 3, 2)):  # 2: the shipped draft-kind exit
            spec = bm.generate(prompt, mode="speculative", exit=exit_layer, draft_len=draft_len, draft_width=width,
                               max_new_tokens=32)
            assert spec.token_ids == full.token_ids, (exit_layer, draft_len, width)
        assert spec.stats.acceptance_rate > 0
        for exit_layer, lookup_len, draft_len in ((2, 3, 1), (8, 3, 1), (8, 6, "auto")):  # the shipped default, more
            spec = bm.generate(prompt, mode="speculative", exit=exit_layer, draft_len=draft_len, lookup_len=lookup_len,
                               max_new_tokens=64, eos=False)
            assert spec.token_ids == bm.generate(prompt, mode="full", max_new_tokens=64, eos=False).token_ids
    assert (bm.defaults["mode"], bm.defaults["exit"], bm.defaults["lookup_len"]) == ("speculative", 2, 3)
    assert bm.exit_modules.kinds[2] == "draft" and bm.exit_modules.sub_model_exits == [8, 12, 16, 20, 24]
    assert 2 in bm.exit_modules.draft_vocab.tolist()  # <|im_end|>, the EOS: stored in the shipped file


@pytest.mark.skipif(default_exits_path(DEFAULT_MODEL) is None, reason="no exits shipped yet")
@pytest.mark.parametrize("prompt, args", [
    ("Write one short sentence about cats.", ["--mode", "speculative", "--exit", "24", "--draft-len", "8",
                                              "--full-draft-head"]),
    ("Reply with five emoji about the sea 🌊.", ["--max-new-tokens", "16"]),
    ("Reply with five emoji about the sea 🌊.", ["--max-new-tokens", "16", "--mode", "speculative", "--exit", "8"]),
])
def test_cli_streams_exactly_the_returned_text(capsys, monkeypatch, prompt, args):
    """The EOS accepted inside a cycle ends the stream (issue: '...a loyal companion.\\nsystem\\n'), and a
    character split over tokens is printed whole (no U+FFFD)."""
    import json
    import sys

    from balspec import cli

    def run(extra):
        monkeypatch.setattr(sys, "argv", ["balspec", "generate", prompt, *args, *extra])
        with pytest.raises(SystemExit) as code:
            cli.main()
        assert code.value.code in (0, None)
        return capsys.readouterr().out

    doc = json.loads(run(["--json"]))
    # (the budget may end inside a character: the returned text, like decode(), then ends in U+FFFD)
    assert run([]) == doc["text"] + "\n" and "\ufffd" not in doc["text"].rstrip("\ufffd")
    stats = doc["stats"]
    if stats["mode"] == "speculative":
        assert stats["mean_accepted_length"] == pytest.approx(stats["cycle_tokens"] / stats["cycles"])
        assert stats["cycle_tokens"] == len(doc["token_ids"]) - 1
