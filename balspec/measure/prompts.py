"""Benchmark prompt sets: the built-in set, Spec-Bench question files, prompt jsonl and plain text.

Formats accepted by `load_prompts(path)`:
- `.jsonl` / `.json` lines, one JSON object per line, either Spec-Bench style
  `{"question_id", "category", "turns": [...]}` (the first turn is the prompt) or
  `{"prompt": ..., "category": ...}` (category optional);
- any other file: one prompt per non-blank line.
The built-in set (`balspec/measure/prompts/builtin.jsonl`) is written for this project: chat-style requests in
seven categories, eight prompts each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from balspec.errors import BalspecError

BUILTIN = "builtin"
_UNCATEGORISED = "all"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


@dataclass(frozen=True)
class PromptSet:
    source: str  # "builtin" or the file path
    prompts: list[Prompt]

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(p.category for p in self.prompts))


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> PromptSet:
    """The prompts of `path` (None: the built-in set), at most `limit` of them, spread over categories."""
    if path is None or str(path) == BUILTIN:
        text = resources.files("balspec.measure").joinpath("prompts/builtin.jsonl").read_text(encoding="utf-8")
        prompts = parse_jsonl(text, BUILTIN)
        source = BUILTIN
    else:
        path = Path(path)
        if not path.is_file():
            raise BalspecError(f"--prompts: {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BalspecError(f"--prompts: {path} is not UTF-8 text") from None
        is_json = path.suffix.lower() in (".jsonl", ".json")
        prompts = parse_jsonl(text, str(path)) if is_json else parse_lines(text, str(path))
        source = str(path)
    if not prompts:
        raise BalspecError(f"--prompts: {source} holds no prompts")
    if limit is not None:
        if limit < 1:
            raise BalspecError(f"--num-prompts: must be at least 1, got {limit}")
        prompts = spread(prompts, limit)
    return PromptSet(source, prompts)


def parse_jsonl(text: str, where: str) -> list[Prompt]:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BalspecError(f"--prompts: {where}:{lineno}: not valid JSON ({e.msg})") from None
        prompts.append(_prompt_from_record(record, f"{where}:{lineno}", default_id=str(len(prompts) + 1)))
    return prompts


def parse_lines(text: str, where: str) -> list[Prompt]:
    return [Prompt(str(i), _UNCATEGORISED, line.strip())
            for i, line in enumerate((ln for ln in text.splitlines() if ln.strip()), 1)]


def spread(prompts: list[Prompt], limit: int) -> list[Prompt]:
    """The first `limit` prompts taken round-robin over categories, so a small sample still covers each
    category (Spec-Bench files are sorted by category: a plain head would be all one category)."""
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    picked = []
    for rank in range(max(len(v) for v in by_category.values())):
        picked += [group[rank] for group in by_category.values() if rank < len(group)]
    return picked[:limit]


def after_first(prompts: list[Prompt], skip: int) -> list[Prompt]:
    """`prompts` in order without the first `skip` of each category: those `spread` (and so `balspec bench
    --num-prompts`) takes first, so the rest are prompts a bench run never used."""
    rank: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        rank[prompt.category] = rank.get(prompt.category, 0) + 1
        if rank[prompt.category] > skip:
            kept.append(prompt)
    return kept


def _prompt_from_record(record, where: str, default_id: str) -> Prompt:
    if not isinstance(record, dict):
        raise BalspecError(f"--prompts: {where}: expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise BalspecError(f"--prompts: {where}: \"turns\" must be a non-empty list of strings")
        text = turns[0]
    elif "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise BalspecError(f"--prompts: {where}: \"prompt\" must be a non-empty string")
    else:
        raise BalspecError(f"--prompts: {where}: a record needs \"prompt\" (or Spec-Bench \"turns\")")
    category = record.get("category", _UNCATEGORISED)
    if not isinstance(category, str) or not category:
        raise BalspecError(f"--prompts: {where}: \"category\" must be a non-empty string")
    pid = record.get("question_id", record.get("id", default_id))
    return Prompt(str(pid), category, text)
