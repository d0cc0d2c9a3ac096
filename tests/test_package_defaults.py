"""recipes/package_default_exits.py's choice of generation defaults from `balspec bench --json` outputs."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def choose_defaults():
    spec = importlib.util.spec_from_file_location("package_default_exits", ROOT / "recipes" / "package_default_exits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.choose_defaults


def bench(*rows):
    return {"meta": {"command": "balspec bench ...", "device": "cpu"},
            "results": [{"mode": "speculative", "exit": 8, "draft_len": k, "draft_width": 1, "lookup_len": n,
                         "speedup": speedup, "greedy_mismatches": 0} for k, n, speedup in rows]}


def test_lookup_settings_are_chosen_by_their_worst_speedup_and_speculative_needs_1_2x():
    choose = choose_defaults()
    chosen = choose([bench((1, 0, 1.10), (1, 4, 1.44)), bench((1, 0, 0.93), (1, 4, 1.23))])
    assert (chosen["mode"], chosen["draft_len"], chosen["lookup_len"]) == ("speculative", 1, 4)
    assert chosen["measured"]["worst_speedup_of_best"] == 1.23
    chosen = choose([bench((1, 0, 1.10), (1, 4, 1.44)), bench((1, 0, 0.93), (1, 4, 1.19))])
    assert (chosen["mode"], chosen["lookup_len"]) == ("full", 4)  # the best setting is kept for --mode speculative
