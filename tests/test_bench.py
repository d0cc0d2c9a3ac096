"""The benchmark on tiny random models: its bookkeeping, its JSON document and its CLI errors."""

import copy
import json
import math
import sys

import pytest
import torch

from balspec.checkpoint import save_exits
from balspec.errors import BalspecError
from balspec.exits import attach_exits
from balspec.generate import BalconyModel
from balspec.measure.bench import (BenchOptions, Run, acceptance_needed, parse_draft_lens, parse_peers, run_bench,
                                   summarize)
from balspec.measure.prompts import Prompt, PromptSet
from balspec.measure.report import _lookup, plot, report_dict, require_matplotlib, to_json
from balspec.models import load_model
from balspec.tiny import tiny_model, tiny_tokenizer

PROMPTS = PromptSet("test", [Prompt("1", "math", "What is 2 + 2?"), Prompt("2", "writing", "Write a haiku."),
                             Prompt("3", "math", "Solve x + 1 = 3.")])
RESULT_KEYS = {"mode", "name", "exit", "draft_len", "acceptance_rate", "mean_accepted_length", "accepted_hist",
               "tokens_per_second", "speedup", "ttft_s", "decode_tokens_per_second", "decode_speedup",
               "greedy_mismatches", "cost_model", "per_category"}


@pytest.fixture(scope="module")
def bm():
    """Tiny Llama with an untied random head, so greedy text varies and untrained drafts are partly wrong.

    Exit 5 of 6 drafts with a copy of layer 6 and the final norm: that sub-model IS the full model, so
    its acceptance must be exactly 1. Exit 3 accepts little: rejections and rollbacks get exercised.
    """
    torch.manual_seed(0)
    model = tiny_model()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape) * 0.1, requires_grad=False)
    exits = attach_exits(model, [3, 5]).requires_grad_(False).eval()
    return BalconyModel(model, tiny_tokenizer(), exits)


@pytest.fixture(scope="module")
def report(bm):
    opts = BenchOptions(exits=[3, 5], draft_lens=[2, "auto"], max_new_tokens=10, warmup=1, peers=["hf"],
                        cost_repeats=2)
    steps = []
    out = run_bench(bm, PROMPTS, opts, command="test", on_step=lambda done, total, label: steps.append((done, total)))
    assert steps[-1][0] == steps[-1][1]  # progress reaches its total
    return out


def test_speculative_is_exact_and_counts_add_up(report):
    spec = [r for r in report.results if r.setting.mode == "speculative"]
    assert {(r.setting.exit, r.setting.draft_len) for r in spec} == {(3, 2), (3, "auto"), (5, 2), (5, "auto")}
    for r in spec:
        s = r.summary
        assert s.greedy_mismatches == 0
        # adaptive drafting may verify no draft at all on a tiny random model (every draft unsure): then None
        assert (0 <= s.acceptance_rate <= 1) if s.acceptance_rate is not None else r.setting.draft_len == "auto"
        assert s.new_tokens == report.baseline.summary.new_tokens
        cycles = sum(s.accepted_hist)
        # tau counts the bonus token: emitted tokens = accepted drafts + one per cycle (+ the prefill token)
        accepted = sum(n * c for n, c in enumerate(s.accepted_hist))
        assert s.mean_accepted_length == pytest.approx((accepted + cycles) / cycles)
        assert s.speedup > 0 and r.cost_model.bound > 0 and r.cost_model.full_step_s > 0
        assert set(r.per_category) == {"math", "writing"}
        assert r.per_category["math"].prompts == 2
    by_key = {(r.setting.exit, r.setting.draft_len): r.summary for r in spec}
    assert by_key[5, 2].acceptance_rate == 1.0
    assert by_key[3, 2].acceptance_rate < 1.0


def test_lookup_share_and_acceptance_pool_over_prompts():
    """Two prompts: 3 of 4 and 1 of 6 cycles verified looked-up drafts (2 of 5 and 1 of 2 accepted): the share is
    4 of 10 cycles and the acceptance 3 of 7 drafts, totals over prompts, not a mean of per-prompt ratios."""
    p = PROMPTS.prompts[0]
    runs = [Run(p, [1] * 8, 1.0, 6, 3, [1, 0, 1, 1], 8, lookup_cycles=3, lookup_drafted=5, lookup_accepted=2),
            Run(p, [1] * 9, 1.0, 7, 3, [0, 1, 0, 1, 1, 0], 9, lookup_cycles=1, lookup_drafted=2, lookup_accepted=1)]
    s = summarize(runs)
    assert s.lookup_share == 4 / 10 and s.lookup_acceptance_rate == 3 / 7
    assert _lookup(s) == "40%, 0.43"
    plain = summarize([Run(p, [1] * 8, 1.0, 4, 3, [1, 0, 1, 1], 8)])
    assert plain.lookup_share is None and plain.lookup_acceptance_rate is None and _lookup(plain) == ""


def test_decode_speedup_counts_the_tokens_and_seconds_after_the_first():
    """Prefill time is the same work in every mode; the decode rate leaves it out: (tokens - 1) / (seconds after the
    first token), totals over prompts. Here speculation halves the decode time and not the prefill."""
    p = PROMPTS.prompts[0]
    base = [Run(p, [1] * 9, 5.0, prefill_seconds=1.0, decode_seconds=4.0),
            Run(p, [1] * 5, 3.0, prefill_seconds=1.0, decode_seconds=2.0)]
    spec = [Run(p, [1] * 9, 3.5, prefill_seconds=1.5, decode_seconds=2.0),
            Run(p, [1] * 5, 1.5, prefill_seconds=0.5, decode_seconds=1.0)]
    s = summarize(spec, base)
    assert s.ttft_s == 1.0 and s.decode_tokens_per_second == 12 / 3.0  # the mean of 1.5 and 0.5
    assert s.decode_speedup == pytest.approx(2.0) and s.speedup == pytest.approx(14 / 5 / (14 / 8))
    peer = summarize([Run(p, [1] * 9, 2.0)], base)  # transformers' generate(): its first token is not timed
    assert peer.ttft_s is None and peer.decode_speedup is None and peer.speedup == pytest.approx(9 / 2 / (14 / 8))


def test_bench_reports_time_to_first_token_within_each_runs_seconds(report):
    base = report.baseline.summary
    assert 0 < base.ttft_s < base.seconds / base.prompts and base.decode_tokens_per_second > 0
    want = base.new_tokens - base.prompts  # tokens after each prompt's first
    assert base.decode_tokens_per_second > want / base.seconds  # the time to first token is left out
    for r in report.results:
        if r.setting.mode == "peer":
            assert r.summary.decode_speedup is None
        else:
            assert r.summary.ttft_s > 0 and r.summary.decode_speedup > 0


def test_generation_stats_split_prefill_from_decoding(bm):
    out = bm.generate([5, 6, 7, 8], mode="speculative", exit=3, draft_len=2, max_new_tokens=12, eos=False)
    s = out.stats
    assert 0 < s.prefill_seconds < s.seconds
    assert s.decode_tokens_per_second == pytest.approx(11 / (s.seconds - s.prefill_seconds))
    assert out.to_dict()["stats"]["decode_tokens_per_second"] == s.decode_tokens_per_second
    one = bm.generate([5, 6, 7, 8], mode="full", max_new_tokens=1, eos=False).stats
    assert one.decode_tokens_per_second is None  # no token after the first


def test_early_exit_and_peers(report):
    early = [r for r in report.results if r.setting.mode == "early-exit"]
    assert [r.setting.exit for r in early] == [3, 5]
    assert all(r.summary.greedy_mismatches is None and r.summary.acceptance_rate is None for r in early)
    (hf,) = [r for r in report.results if r.setting.mode == "peer"]
    assert hf.setting.name == "hf" and hf.summary.greedy_mismatches == 0 and hf.summary.tokens_per_second > 0


def test_json_document_has_the_schema(report):
    doc = json.loads(to_json(report))
    assert {"device", "dtype", "model", "exits_checkpoint", "versions", "prompts", "max_new_tokens", "temperature",
            "seed", "command"} <= set(doc["meta"])
    assert set(doc["meta"]["versions"]) == {"balspec", "torch", "transformers"}
    assert doc["meta"]["prompts"]["count"] == 3
    assert doc["baseline"]["mode"] == "full" and doc["baseline"]["tokens_per_second"] > 0
    assert len(doc["results"]) == 4 + 2 + 1
    for r in doc["results"]:
        assert RESULT_KEYS <= set(r)
    spec = [r for r in doc["results"] if r["mode"] == "speculative"]
    assert {"full_step_s", "draft_step_s", "verify_s", "bound", "efficiency", "acceptance_for_parity",
            "acceptance_for_1_5x"} <= set(spec[0]["cost_model"])


def test_json_turns_nan_into_null(report):
    report = copy.deepcopy(report)
    report.results[0].summary.speedup = math.nan
    assert json.loads(to_json(report))["results"][0]["speedup"] is None
    assert report_dict(report)["results"][0]["speedup"] != report_dict(report)["results"][0]["speedup"]


def test_sampling_runs_report_no_greedy_comparison(bm):
    opts = BenchOptions(exits=[5], draft_lens=[2], max_new_tokens=6, temperature=0.8, warmup=0, peers=["hf"],
                        cost_repeats=1)
    out = run_bench(bm, PromptSet("test", PROMPTS.prompts[:2]), opts)
    assert all(r.summary.greedy_mismatches is None for r in out.results)
    (spec,) = [r for r in out.results if r.setting.mode == "speculative"]
    assert 0 <= spec.summary.acceptance_rate <= 1 and out.meta["temperature"] == 0.8


def test_the_largest_seed_wraps_around_for_later_prompts(bm):
    """Prompt i samples with seed + i: from --seed 2**64 - 1 the second prompt's seed wraps to 0 (it was refused
    after the first prompt had been measured)."""
    opts = BenchOptions(exits=[5], draft_lens=[2], max_new_tokens=3, temperature=0.8, warmup=0, peers=["hf"],
                        seed=2 ** 64 - 1, cost_repeats=1, early_exit=False)
    out = run_bench(bm, PromptSet("test", PROMPTS.prompts[:2]), opts)
    assert all(r.summary.prompts == 2 for r in [out.baseline, *out.results])


def test_option_parsing():
    assert parse_draft_lens("2,4, auto") == [2, 4, "auto"]
    for bad in ("0", "x", "4,4", ""):
        with pytest.raises(BalspecError, match="--draft-len"):
            parse_draft_lens(bad)
    assert parse_peers("hf, prompt-lookup") == ["hf", "prompt-lookup"]
    with pytest.raises(BalspecError, match="--peers: unknown peer 'vllm'"):
        parse_peers("hf,vllm")


def test_missing_exit_fails_before_timing(bm):
    with pytest.raises(BalspecError, match=r"--exits: 4 not in the exits checkpoint \(it has 3,5\)"):
        run_bench(bm, PROMPTS, BenchOptions(exits=[4], draft_lens=[2]))


def test_plot_writes_a_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    plot(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BalspecError, match=r"--plot needs matplotlib"):
        require_matplotlib()


# -- the command line, on tiny-random loaded from disk -------------------------------------------------------

@pytest.fixture(scope="module")
def exits_dir(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALSPEC_HOME", str(home))
        model, _ = load_model("tiny-random")
    return home, save_exits(attach_exits(model, [2, 4]), model, home / "exits")


def run_cli(args, monkeypatch, exits_dir):
    from balspec.cli import main

    home, path = exits_dir
    monkeypatch.setenv("BALSPEC_HOME", str(home))
    monkeypatch.setattr(sys, "argv", ["balspec", "bench", "--model", "tiny-random", "--exits-path", str(path),
                                      "--num-prompts", "2", "--max-new-tokens", "4", "--warmup", "0", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0


def test_cli_json_is_one_document(monkeypatch, capsys, exits_dir, tmp_path):
    output = tmp_path / "bench.json"
    assert run_cli(["--exits", "2", "--json", "--output", str(output)], monkeypatch, exits_dir) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)  # the whole of stdout is the document
    assert json.loads(output.read_text()) == doc
    assert doc["meta"]["model"] == "tiny-random"
    assert doc["meta"]["exits_checkpoint"] == str(exits_dir[1])
    assert doc["meta"]["command"].startswith("balspec bench --model tiny-random")
    (spec,) = [r for r in doc["results"] if r["mode"] == "speculative"]
    assert spec["exit"] == 2 and spec["draft_len"] == 4 and spec["greedy_mismatches"] == 0
    assert doc["meta"]["layer_path"] == "lean"  # auto: the lean forward passes its check on a Llama model


def test_cli_layer_path_generic_runs_the_models_own_layers(monkeypatch, capsys, exits_dir):
    assert run_cli(["--exits", "2", "--layer-path", "generic", "--json", "--no-early-exit"], monkeypatch,
                   exits_dir) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["layer_path"] == "generic"
    (spec,) = [r for r in doc["results"] if r["mode"] == "speculative"]
    assert spec["greedy_mismatches"] == 0


def test_cli_static_cache_benches_the_sub_model_exits_unless_told(monkeypatch, capsys, exits_dir):
    """Without --exits, --static-cache benches every exit that static shapes can run (the shipped default exit is
    draft-kind); a draft-kind exit asked for by name is refused in one line."""
    home, _ = exits_dir
    monkeypatch.setenv("BALSPEC_HOME", str(home))
    model, _ = load_model("tiny-random")
    mixed = save_exits(attach_exits(model, [2, 4], draft_exits=[2]), model, home / "mixed-exits")
    assert run_cli(["--static-cache", "--no-early-exit", "--draft-len", "1", "--json"], monkeypatch,
                   (home, mixed)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["exits"] == [4] and doc["meta"]["static_cache"] is True
    assert run_cli(["--static-cache", "--exits", "2"], monkeypatch, (home, mixed)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: exit(s) 2: draft-kind exits run only with the dynamic cache") and "\n" not in err


def test_cli_benches_a_draft_exit_0_exactly(monkeypatch, capsys, exits_dir):
    """A draft-kind exit 0 (on the embeddings) passes bench's exit check and decodes with 0 mismatches."""
    home, _ = exits_dir
    monkeypatch.setenv("BALSPEC_HOME", str(home))
    model, _ = load_model("tiny-random")
    path = save_exits(attach_exits(model, [0, 4], draft_exits=[0]), model, home / "exit0")
    assert run_cli(["--exits", "0", "--no-early-exit", "--draft-len", "1", "--json"], monkeypatch, (home, path)) == 0
    (spec,) = [r for r in json.loads(capsys.readouterr().out)["results"] if r["mode"] == "speculative"]
    assert spec["exit"] == 0 and spec["greedy_mismatches"] == 0


@pytest.mark.parametrize("args, message", [
    (["--exits", "3"], "error: --exits: 3 not in the exits checkpoint (it has 2,4)"),
    (["--exits", "2", "--draft-len", "0"], "error: --draft-len: draft lengths must lie in 1..64, got 0"),
    (["--exits", "a,b"], "error: --exits: expected comma-separated layer numbers"),
    (["--prompts", "/nonexistent/p.jsonl"], "error: --prompts: /nonexistent/p.jsonl is not a file"),
    (["--layer-path", "fast"], "error: --layer-path: choose one of auto, lean, generic; got 'fast'"),
])
def test_cli_bad_input_is_one_clear_line(monkeypatch, capsys, exits_dir, args, message):
    assert run_cli(args, monkeypatch, exits_dir) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message)
    assert "Traceback" not in captured.err


# -- evals/exit_quality.py ------------------------------------------------------------------------------------

def load_exit_quality(monkeypatch):
    """evals/exit_quality.py as a module (evals/ is no package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("exit_quality", Path(__file__).parents[1] / "evals/exit_quality.py")
    exit_quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "exit_quality", exit_quality)  # dataclasses look their module up
    spec.loader.exec_module(exit_quality)
    return exit_quality


def heldout_file(tmp_path):
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p.text},
                                                       {"role": "assistant", "content": p.text[::-1]}]})
                              for p in PROMPTS.prompts) + "\n" + json.dumps({"text": "plain text record"}) + "\n")
    return data


def test_exit_quality_is_exact_for_a_copy_of_the_last_layer(monkeypatch, exits_dir, tmp_path):
    """On a 6-layer model an untrained balcony at exit 5 (copy of layer 6 + final norm) IS the full model:
    KL 0 and full agreement check the hidden-state, rotary and causal-mask plumbing of the eval."""
    exit_quality = load_exit_quality(monkeypatch)
    monkeypatch.setenv("BALSPEC_HOME", str(exits_dir[0]))
    data = heldout_file(tmp_path)
    output = tmp_path / "quality.json"
    exit_quality.main(["--model", "tiny-random", "--exits", "2,5", "--data", str(data), "--seq-len", "32",
                       "--output", str(output)])
    doc = json.loads(output.read_text())
    rows = {(r["name"], r["exit"]): r for r in doc["rows"]}
    assert set(rows) == {("full", None), ("balcony (untrained)", 2), ("shared head", 2),
                         ("balcony (untrained)", 5), ("shared head", 5)}
    assert rows["balcony (untrained)", 5]["kl"] == pytest.approx(0, abs=1e-5)
    assert rows["balcony (untrained)", 5]["top1_agreement"] == 1.0
    assert rows["balcony (untrained)", 5]["perplexity"] == pytest.approx(rows["full", None]["perplexity"], rel=1e-4)
    assert rows["shared head", 2]["kl"] > 0
    assert doc["meta"]["tokens"] > 0 and doc["meta"]["device"]
    assert all(r["top1_draft_vocab"] is None for r in doc["rows"])

    # --draft-vocab: each exit's choice within the vocabulary against the full model's over all tokens
    from balspec.checkpoint import save_exits
    from balspec.exits import attach_exits
    from balspec.models import load_model

    model, _ = load_model("tiny-random")
    for name, vocab in (("all", torch.arange(model.config.vocab_size)), ("few", torch.arange(3, 13))):
        holder = attach_exits(model, [2])
        holder.draft_vocab = vocab
        save_exits(holder, model, tmp_path / name)
        exit_quality.main(["--model", "tiny-random", "--exits", "2,5", "--data", str(data), "--seq-len", "32",
                           "--draft-vocab", str(tmp_path / name), "--output", str(output)])
        rows = {(r["name"], r["exit"]): r for r in json.loads(output.read_text())["rows"]}
        if name == "all":  # nothing left out: the same choices
            assert all(r["top1_draft_vocab"] == r["top1_agreement"] for k, r in rows.items() if k[1] is not None)
        else:  # the full model itself, restricted to ten tokens, seldom picks its own choice
            assert rows["balcony (untrained)", 5]["top1_draft_vocab"] < 0.5


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "granite"])
def test_exit_quality_is_exact_for_a_copy_of_the_last_layer_beyond_llama(kind, monkeypatch, tmp_path):
    """The same on 4-layer models whose forward does more than Llama's: exit 3's untrained balcony (a copy of
    the sliding-window layer 4 on Gemma) must rotate with that layer's base (Gemma 3: local and global bases
    differ), mask its window (blocks longer than the window) and get the model's final soft-cap (Gemma) or
    logit divisor (Granite), else KL > 0."""
    from tests.test_architectures import WINDOW
    from tests.test_architectures_train import saved

    exit_quality = load_exit_quality(monkeypatch)
    output = tmp_path / "quality.json"
    exit_quality.main(["--model", str(saved(kind, tmp_path)), "--exits", "1,3", "--data", str(heldout_file(tmp_path)),
                       "--seq-len", str(4 * WINDOW), "--output", str(output)])
    rows = {(r["name"], r["exit"]): r for r in json.loads(output.read_text())["rows"]}
    assert rows["balcony (untrained)", 3]["kl"] == pytest.approx(0, abs=1e-5)
    assert rows["balcony (untrained)", 3]["top1_agreement"] == 1.0
    assert rows["balcony (untrained)", 3]["perplexity"] == pytest.approx(rows["full", None]["perplexity"], rel=1e-4)
    assert rows["shared head", 1]["kl"] > 1e-3


def test_draft_rank_on_gemma3_rotates_a_draft_kind_balcony_with_its_kind(monkeypatch, tmp_path, capsys):
    """evals/draft_rank.py on a model whose layer kinds have their own rotary bases: the draft-kind exit 1 is
    scored through the rotary embedding of the balcony's kind (no kind: a TypeError from Gemma 3's rotary), and
    the sub-model exit 3 (a copy of the last layer) ranks the full model's token first everywhere."""
    import importlib.util
    from pathlib import Path

    from tests.test_architectures_train import saved

    path = saved("gemma3", tmp_path)
    model, _ = load_model(str(path))
    exits = save_exits(attach_exits(model, [1, 3], draft_exits=[1]), model, tmp_path / "exits")
    spec = importlib.util.spec_from_file_location("draft_rank", Path(__file__).parents[1] / "evals/draft_rank.py")
    draft_rank = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts evals/ on it
    spec.loader.exec_module(draft_rank)
    output = tmp_path / "rank.json"
    draft_rank.main(["--model", str(path), "--exits-path", str(exits), "--num-prompts", "2", "--max-new-tokens", "8",
                     "--output", str(output)])
    doc = json.loads(output.read_text())
    assert doc["positions"] == 16 and doc["model"] == str(path)
    assert doc["agreement"]["3"] == {"top1": 1.0, "top2": 1.0, "top3": 1.0, "top4": 1.0}
    assert set(doc["agreement"]) == {"1", "3"}


def test_draft_widths_parse_and_refuse_sampling():
    from balspec.measure.bench import parse_draft_widths

    assert parse_draft_widths("1,3") == [1, 3]
    for bad in ("0", "1,1", "two", ""):
        with pytest.raises(BalspecError, match="--draft-width"):
            parse_draft_widths(bad)
    with pytest.raises(BalspecError, match="needs greedy decoding"):
        parse_draft_widths("1,3", temperature=0.7)


def test_acceptance_needed_inverts_the_cost_model():
    # full step 30 ms; a cycle of k = 2 drafts costs 2 * 8 + 32 = 48 ms: tau must reach 48 / 30 * speedup
    alpha = acceptance_needed(1.0, 2, 0.030, 0.048)
    assert abs((1 + alpha + alpha ** 2) - 1.6) < 1e-6
    alpha = acceptance_needed(1.5, 2, 0.030, 0.048)
    assert abs((1 + alpha + alpha ** 2) - 2.4) < 1e-6
    assert acceptance_needed(1.0, 1, 0.030, 0.020) < 1e-6  # a cycle cheaper than a step pays at any acceptance
    assert acceptance_needed(1.5, 1, 0.030, 0.048) is None  # 2 tokens per 48 ms: at most 1.25x


def test_mismatch_rate_counts_first_differences_per_1000_agreeing_tokens():
    from balspec.measure.bench import Run, summarize
    prompt = Prompt("p", "c", "x")
    base = [Run(prompt, [1, 2, 3, 4], 1.0), Run(prompt, [5, 6, 7, 8], 1.0)]
    runs = [Run(prompt, [1, 2, 9, 9], 1.0), Run(prompt, [5, 6, 7, 8], 1.0)]
    s = summarize(runs, base, compare=True)
    assert s.greedy_mismatches == 1 and s.mismatches_per_1000_tokens == 1000 * 1 / (3 + 4)
    assert summarize(base, base, compare=True).mismatches_per_1000_tokens == 0
