"""Prompt sets: the built-in set, each accepted file format, and one clear error per malformed file."""

import json

import pytest

from balspec.errors import BalspecError
from balspec.measure.prompts import Prompt, after_first, load_prompts, spread


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_set_is_varied_and_well_formed():
    prompts = load_prompts()
    assert prompts.source == "builtin"
    assert 48 <= len(prompts.prompts) <= 64
    assert len(prompts.categories) >= 6
    assert len({p.id for p in prompts.prompts}) == len(prompts.prompts)
    assert len({p.text for p in prompts.prompts}) == len(prompts.prompts)
    assert all(p.text.strip() for p in prompts.prompts)


def test_spec_bench_format_uses_the_first_turn(tmp_path):
    records = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
               {"question_id": 201, "category": "translation", "turns": ["Translate: hola"]}]
    path = write(tmp_path, "q.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    prompts = load_prompts(path)
    assert prompts.prompts == [Prompt("81", "writing", "Write a poem."),
                               Prompt("201", "translation", "Translate: hola")]
    assert prompts.categories == ["writing", "translation"]


def test_prompt_jsonl_with_optional_category(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "Hi there"}\n{"prompt": "Sum 2+2", "category": "math", "id": "m1"}\n')
    prompts = load_prompts(path).prompts
    assert prompts == [Prompt("1", "all", "Hi there"), Prompt("m1", "math", "Sum 2+2")]


def test_text_file_one_prompt_per_line(tmp_path):
    path = write(tmp_path, "p.txt", "First prompt\n\n  Second prompt  \n")
    assert [p.text for p in load_prompts(path).prompts] == ["First prompt", "Second prompt"]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"p\.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n\n{"question": "no prompt"}\n', r"p\.jsonl:3: a record needs \"prompt\""),
    ('{"question_id": 1, "turns": []}\n', r"p\.jsonl:1: \"turns\" must be a non-empty list"),
    ('["a list"]\n', r"p\.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": ""}\n', r"p\.jsonl:1: \"prompt\" must be a non-empty string"),
    ('{"prompt": "x", "category": 3}\n', r"p\.jsonl:1: \"category\" must be a non-empty string"),
    ("\n\n", r"holds no prompts"),
])
def test_malformed_jsonl_names_the_line(tmp_path, text, message):
    path = write(tmp_path, "p.jsonl", text)
    with pytest.raises(BalspecError, match=message):
        load_prompts(path)


def test_missing_and_binary_files_fail_clearly(tmp_path):
    with pytest.raises(BalspecError, match="is not a file"):
        load_prompts(tmp_path / "nope.jsonl")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BalspecError, match="not UTF-8"):
        load_prompts(binary)
    with pytest.raises(BalspecError, match="--num-prompts"):
        load_prompts(None, limit=0)


def test_limit_spreads_over_categories():
    prompts = [Prompt(str(i), c, f"{c} {i}") for i, c in enumerate("aaaabbbcc")]
    assert [p.category for p in spread(prompts, 5)] == ["a", "b", "c", "a", "b"]
    assert len(spread(prompts, 100)) == len(prompts)
    sample = load_prompts(None, limit=7)
    assert len(sample.prompts) == 7 and len(sample.categories) == 7


def test_build_self_distill_answers_your_own_prompts_without_each_categorys_first(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    sys.path.insert(0, str(recipes))
    try:
        spec = importlib.util.spec_from_file_location("build_self_distill", recipes / "build_self_distill.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(recipes))
    rows = [("a", "A1"), ("a", "A2"), ("b", "B1"), ("a", "A3"), ("b", "B2"), ("b", "B2")]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
                            for i, (c, t) in enumerate(rows)))
    assert module.own_instructions(path, 0) == ["A1", "A2", "B1", "A3", "B2"]  # a repeated prompt once
    assert module.own_instructions(path, 1) == ["A2", "A3", "B2"]  # the bench's first of each category left out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match="--instructions"):
        module.own_instructions(bad, 0)


def test_after_first_leaves_out_what_spread_takes_first():
    prompts = [Prompt(str(i), c, f"{c}{i}") for i, c in enumerate("aabab")]
    assert [p.text for p in after_first(prompts, 1)] == ["a1", "a3", "b4"]
    assert not {p.text for p in spread(prompts, 2)} & {p.text for p in after_first(prompts, 1)}
    assert after_first(prompts, 0) == prompts
