"""recipes/package_default_exits.py's choice of generation defaults from `balspec bench --json` outputs."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def choose_defaults():
    spec = importlib.util.spec_from_file_location("package_default_exits", ROOT / "recipes" / "package_default_exits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.choose_defaults


def bench(source, *rows, base_seconds=10.0):
    """A bench run on `source`: the baseline decodes 100 tokens in base_seconds; each row (k, lookup, speedup)
    the same 100 tokens `speedup` times as fast."""
    return {"meta": {"command": "balspec bench ...", "device": "cpu", "prompts": {"source": source}},
            "baseline": {"new_tokens": 100, "seconds": base_seconds},
            "results": [{"mode": "speculative", "exit": 8, "draft_len": k, "draft_width": 1, "lookup_len": n,
                         "speedup": speedup, "new_tokens": 100, "seconds": base_seconds / speedup,
                         "greedy_mismatches": 0} for k, n, speedup in rows]}


def test_lookup_settings_are_chosen_by_their_worst_speedup_and_speculative_needs_1_2x():
    choose = choose_defaults()
    chosen = choose([bench("builtin", (1, 0, 1.10), (1, 4, 1.44)), bench("sb", (1, 0, 0.93), (1, 4, 1.23))])
    assert (chosen["mode"], chosen["draft_len"], chosen["lookup_len"]) == ("speculative", 1, 4)
    assert abs(chosen["measured"]["worst_speedup_of_best"] - 1.23) < 1e-9
    chosen = choose([bench("builtin", (1, 0, 1.10), (1, 4, 1.44)), bench("sb", (1, 0, 0.93), (1, 4, 1.19))])
    assert (chosen["mode"], chosen["lookup_len"]) == ("full", 4)  # the best setting is kept for --mode speculative


def test_repeated_runs_of_a_prompt_set_are_pooled_and_every_set_must_be_measured():
    choose = choose_defaults()
    # two runs of "sb": 100 tokens each way; lookup 4 took 10/1.1 + 10/1.4 s against 20 s, a pooled 1.232x
    runs = [bench("builtin", (1, 4, 1.44), (1, 3, 1.5)), bench("sb", (1, 4, 1.1)), bench("sb", (1, 4, 1.4))]
    chosen = choose(runs)
    assert chosen["lookup_len"] == 4 and chosen["mode"] == "speculative"  # lookup 3 never ran on "sb"
    pooled = 20 / (10 / 1.1 + 10 / 1.4)
    assert abs(chosen["measured"]["speedups_of_best"]["sb"] - pooled) < 1e-9
    assert abs(chosen["measured"]["worst_speedup_of_best"] - pooled) < 1e-9
    # a slow baseline run weighs by its seconds: pooling is over time, not a mean of ratios
    chosen = choose([bench("builtin", (1, 4, 1.3)), bench("sb", (1, 4, 1.1), base_seconds=30.0),
                     bench("sb", (1, 4, 1.4))])
    assert abs(chosen["measured"]["speedups_of_best"]["sb"] - 40 / (30 / 1.1 + 10 / 1.4)) < 1e-9


def test_a_setting_with_a_greedy_mismatch_is_never_chosen():
    choose = choose_defaults()
    bad = bench("sb", (1, 4, 2.0))
    bad["results"][0]["greedy_mismatches"] = 1
    chosen = choose([bench("builtin", (1, 4, 2.0), (1, 0, 1.05)), bad, bench("sb", (1, 0, 1.0))])
    assert (chosen["mode"], chosen["lookup_len"]) == ("full", 0)
