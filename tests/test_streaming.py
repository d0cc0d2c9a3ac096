"""What is streamed equals what is returned: endings inside a cycle, statistics, UTF-8, stop strings."""

import json

import pytest

from balspec.generate import _Stopper
from balspec.stream import TextStream, TokenStreamer
from balspec.tiny import tiny_tokenizer
from tests.test_cli_generate import base_args, exits_dir, run_cli  # noqa: F401 (fixture)
from tests.test_engine import identity_tail, make_bm, sharp_model


def perfect_drafter():
    """Exit 3 drafts exactly the full model's greedy tokens: layers 4..N and the balcony are the identity."""
    model = sharp_model()
    identity_tail(model, 3)
    bm = make_bm(model, exits=[3])
    with_balcony = bm.exit_modules[3].layers[0]
    with_balcony.self_attn.o_proj.weight.data.zero_()
    with_balcony.mlp.down_proj.weight.data.zero_()
    return bm


def test_an_eos_inside_a_cycle_ends_the_stream_and_the_statistics_there():
    bm = perfect_drafter()
    ids = [5, 9, 14, 30, 31]
    full = bm.generate(ids, mode="full", max_new_tokens=12, eos=False).token_ids
    eos_at = next(i for i in range(2, 5) if full[i] not in full[:i])  # a draft position of the first cycle
    bm.eos_ids = {full[eos_at]}
    streamed, rejected = [], []
    out = bm.generate(ids, mode="speculative", exit=3, draft_len=4, max_new_tokens=12,
                      on_cycle=lambda tokens, missed: (streamed.extend(tokens), rejected.extend(missed)))
    assert out.token_ids == full[:eos_at + 1] and out.stop_reason == "eos"
    assert streamed == out.token_ids and rejected == []
    s = out.stats
    # one cycle, cut at the EOS: the drafts up to it count, the one after it and the bonus token do not
    assert (s.cycles, s.drafted, s.accepted, s.cycle_tokens) == (1, eos_at, eos_at, eos_at)
    assert s.acceptance_rate == 1.0 and s.mean_accepted_length == eos_at and s.accepted_lengths == [eos_at]


def test_a_stop_string_inside_a_cycle_ends_the_stream_where_the_text_ends(capsys):
    bm = perfect_drafter()
    ids = [5, 9, 14, 30, 31]
    full = bm.generate(ids, mode="full", max_new_tokens=12, eos=False)
    # a one-byte character that a draft of the first cycle writes (tiny-random writes random bytes)
    stop = next(c for c in (bm.tokenizer.decode([t]) for t in full.token_ids[2:5])
                if len(c) == 1 and c != "\ufffd" and c not in bm.tokenizer.decode(full.token_ids[:2]))
    streamer = TokenStreamer(bm.tokenizer, stop=[stop])
    out = bm.generate(ids, mode="speculative", exit=3, draft_len=4, max_new_tokens=12, stop=[stop],
                      eos=False, on_cycle=streamer)
    streamer.finish(out.text)
    assert out.stop_reason == "stop" and out.stats.drafted == out.stats.accepted == len(out.token_ids) - 1
    assert capsys.readouterr().out == out.text + "\n"


def test_a_character_split_over_tokens_is_held_back_until_complete():
    tokenizer = tiny_tokenizer()  # byte level: each emoji is four tokens
    text = "Waves 🌊🌊, sea 海 and café."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    stream = TextStream(tokenizer)
    pieces = [stream.push([token]) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.rest(text) == text and stream.rest(text) == ""


def test_a_stop_string_of_multi_byte_characters_ends_the_output():
    """Three emoji are twelve tokens here: the stop string is searched over as many tokens as it has bytes."""
    tokenizer = tiny_tokenizer()
    stop = "🌊🌊🌊"
    ids = tokenizer("ab " + stop + " cd", add_special_tokens=False)["input_ids"]
    stopper = _Stopper(tokenizer, set(), [stop], budget=100)
    kept = stopper.add(ids)
    assert stopper.reason == "stop" and stopper.text() == "ab " and kept == len(("ab " + stop).encode())


def test_text_that_may_begin_a_stop_string_is_held_back():
    tokenizer = tiny_tokenizer()
    stream = TextStream(tokenizer, stop=["STOP", "\n\n"])
    released = ""
    for token in tokenizer("one ST two S\nthree STOP four", add_special_tokens=False)["input_ids"]:
        released += stream.push([token])
        assert "one ST two S\nthree ".startswith(released)
    assert released == "one ST two S\nthree " and stream.rest("one ST two S\nthree ") == ""


@pytest.mark.parametrize("mode, extra", [("full", []), ("speculative", []), ("full", ["--stop", "a"]),
                                         ("speculative", ["--stop", "a"]), ("full", ["--show-drafts"])])
def test_cli_stdout_equals_the_returned_text(exits_dir, capsys, monkeypatch, mode, extra):  # noqa: F811
    """tiny-random writes random bytes: invalid and split UTF-8 everywhere."""
    args = ["generate", "hello", "--mode", mode, "--exit", "4", *base_args(exits_dir), *extra]
    code, out, _ = run_cli([*args, "--json"], capsys, monkeypatch)
    text = json.loads(out)["text"]
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code in (0, None) and out == text + "\n"
