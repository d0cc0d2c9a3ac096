"""The GPU plan: three parts, each time-boxed, each writing its JSON as soon as it ends.

  c. throughput  `balspec train` (bf16) at a few batch sizes: tokens/s and peak memory. Runs first: it is short,
                 and part b sizes its training steps from it.
  a. bench       `balspec bench` (the library call the CLI makes, one model load per dtype) in chunks of
                 priority: bf16 then fp32, built-in prompts then Spec-Bench, the core grid (every exit, k in
                 1,2,4,auto, peers, early exit) before the rest (k 3,5,6; width 3). A chunk starts only if its
                 estimated time (from the decode rate measured so far) fits; it shrinks its prompt count to fit.
  b. train       the full model answers the carried instructions in large batches (self-distillation data)
                 until its share of the time is spent; `balspec train` continues the shipped exits on those
                 answers for the number of steps the measured throughput allows in its share; then exit
                 quality (evals/exit_quality.py) of trained and shipped exits on the held-out answers and a
                 bench of both. The trained exits come back in pieces under 16 MiB.

Each part is a child process killed at its deadline (the whole plan's deadline caps every part), so a kill
loses only the chunk in flight. Everything small lands in WORK/results and is re-bundled into
OUT/results.tar.gz after every chunk and part; a kill of the whole call leaves the last bundle.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = Path(__file__).resolve().with_name("kit.py")
RETURN_LIMIT = 15 * 2**20  # under the device tool's 16 MiB per file brought back


@dataclass
class PlanConfig:
    """Every setting of the plan; `kit.py device-run` flags set the budgets, `--dry-run` the small sizes."""

    out: str  # $OUT: what comes back (at most 8 files, each under 16 MiB)
    work: str  # scratch on the machine: runs, data, results/ (bundled into OUT/results.tar.gz)
    data: str  # the payload's data/: instructions.jsonl.gz, spec_bench_questions.jsonl (if carried)
    deadline: float  # time.time() by which everything must have ended
    model: str = "default"
    device: str = "cuda"
    shipped_exits: str | None = None  # None: the exits shipped with balspec
    exits: list[int] = field(default_factory=lambda: [8, 12, 16, 20, 24])
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "float32"])
    # c. throughput
    throughput_s: float = 40
    throughput_batches: list[int] = field(default_factory=lambda: [64, 256])
    throughput_steps: int = 20
    # a. bench
    bench_s: float = 230
    bench_prompts: int = 4
    bench_tokens: int = 128
    # b. train
    train_s: float = 220
    gen_share: float = 0.25  # of train_s: writing answers
    train_share: float = 0.35  # of train_s: training; the rest is start-up, quality and the bench
    gen_batch: int = 384
    gen_tokens: int = 160
    gen_dtype: str = "bfloat16"
    recipe: str = "recipes/smollm2-135m-answers.yaml"  # or recipes/smollm2-135m-draft.yaml (with init_from none)
    init_from: str = "shipped"  # the exits training continues: shipped, none, or an exits checkpoint
    train_sets: list[str] = field(default_factory=list)  # extra --set overrides (the dry run's tiny sizes)
    block_size: int = 256
    heldout_every: int = 25
    quality_tokens: int = 65536
    dry_run: bool = False

    @staticmethod
    def load(path: Path) -> "PlanConfig":
        return PlanConfig(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @property
    def results(self) -> Path:
        return Path(self.work) / "results"


def dry_run_config(out: Path, work: Path, data: Path, deadline: float, shipped_exits: str) -> PlanConfig:
    """The whole plan at the tiny random model's scale, on the CPU: a couple of minutes on two cores."""
    return PlanConfig(out=str(out), work=str(work), data=str(data), deadline=deadline, model="tiny-random",
                      device="cpu", shipped_exits=shipped_exits, exits=[2, 4], throughput_s=30,
                      throughput_batches=[4], throughput_steps=4, bench_s=45, bench_prompts=2, bench_tokens=8,
                      train_s=90, gen_batch=16, gen_tokens=16, gen_dtype="float32", block_size=64, heldout_every=4,
                      quality_tokens=1024, train_sets=["exits.layers=[2,4]", "data.heldout_blocks=2"],
                      dry_run=True)


# ---- the parent: run the parts, bundle the results ----

def run_plan(cfg: PlanConfig) -> dict:
    """Run parts c, a, b as child processes with deadlines; returns {part: status}."""
    cfg.results.mkdir(parents=True, exist_ok=True)
    config_path = Path(cfg.work) / "plan.json"
    cfg.save(config_path)
    status = {}
    for part, budget in (("throughput", cfg.throughput_s), ("bench", cfg.bench_s), ("train", cfg.train_s)):
        status[part] = run_part(part, config_path, budget, cfg.deadline)
        write_json(cfg.results / "parts.json", status)
        bundle(cfg)
        log(f"part {part}: {status[part]['status']} after {status[part]['seconds']:.0f} s")
    return status


def run_part(part: str, config_path: Path, budget: float, deadline: float) -> dict:
    started = time.time()
    limit = min(budget, deadline - started)
    if limit < 5:
        return {"status": "skipped (no time left)", "seconds": 0.0, "budget_s": budget}
    # a session of its own, so the whole group (data loader workers too) can be killed at the deadline
    child = subprocess.Popen([sys.executable, str(KIT), "part", part, "--config", str(config_path),
                              "--deadline", str(started + limit)], start_new_session=True)
    try:
        rc = child.wait(timeout=limit + 5)  # the part stops itself at its deadline; this is the backstop
        state = "ok" if rc == 0 else f"failed (exit status {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        state = "killed at its deadline"
    return {"status": state, "seconds": round(time.time() - started, 1), "budget_s": budget}


def bundle(cfg: PlanConfig) -> Path:
    """WORK/results -> OUT/results.tar.gz (written aside, then renamed: a kill never leaves half a bundle)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tmp = out / "results.tar.gz", out / ".results.tar.gz.tmp"
    files = sorted(p for p in cfg.results.rglob("*") if p.is_file())
    total = 0
    with tarfile.open(tmp, "w:gz") as tar:
        for path in files:  # JSON and metrics lines: far under the limit unless something went very wrong
            total += path.stat().st_size
            if total > 4 * RETURN_LIMIT:  # compressed JSON shrinks about 5x: stay under the limit
                log(f"bundle: left out {path.relative_to(cfg.results)} and later files (bundle full)")
                break
            tar.add(path, f"results/{path.relative_to(cfg.results)}")
    os.replace(tmp, target)
    return target


# ---- the parts (each runs in its own child process) ----

def part_throughput(cfg: PlanConfig, deadline: float) -> None:
    """`balspec train` for a few steps per batch size, bf16: tokens/s (median over log windows after the first,
    so CUDA start-up is left out) and peak memory."""
    from balspec.training.run import configure
    from balspec.training.train import train

    data = Path(cfg.work) / "data" / "throughput.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "w", encoding="utf-8") as f:  # instructions as plain text: the content does not matter here
        for text in read_instructions(cfg):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    runs = []
    for batch in cfg.throughput_batches:
        if time.time() > deadline - 10:
            runs.append({"batch_size": batch, "status": "skipped (no time left)"})
            continue
        output = Path(cfg.work) / "runs" / f"throughput-b{batch}"
        sets = train_sets(cfg, output, data, batch, cfg.throughput_steps) + [
            "data.heldout=null", "data.heldout_blocks=0", "data.train_on=all", "exits.init_from=null",
            "train.log_every=5", "train.save_every=0"]
        try:
            config, _ = configure(str(ROOT / cfg.recipe), sets, {}, False)
            train(config)
        except Exception as e:  # out of memory at a large batch, say: the other sizes still count
            runs.append({"batch_size": batch, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            continue
        record = json.loads((output / "balspec.json").read_text())["training"]
        windows = [m["tokens_per_s"] for m in read_metrics(output) if "tokens_per_s" in m][1:]
        runs.append({"batch_size": batch, "status": "ok", "block_size": cfg.block_size,
                     "tokens_per_s_median": median(windows) or record["tokens_per_s"],
                     "tokens_per_s_overall": record["tokens_per_s"], "peak_memory_mb": record["peak_memory_mb"],
                     "steps": record["steps"], "tokens_seen": record["tokens_seen"], "device": record["device"],
                     "mixed_precision": record["mixed_precision"], "exits": config.exits.layers,
                     "command": "balspec train " + shlex.join(["--recipe", cfg.recipe, *[a for s in sets
                                                                                         for a in ("--set", s)]])})
        write_json(cfg.results / "c_throughput.json", {"runs": runs})
    write_json(cfg.results / "c_throughput.json", {"runs": runs})


def part_bench(cfg: PlanConfig, deadline: float) -> None:
    """The bench grid in chunks of priority; each chunk's JSON is written and bundled as soon as it ends."""
    from balspec.generate import load
    from balspec.measure import bench as bench_lib
    from balspec.measure import report
    from balspec.measure.prompts import load_prompts

    models, rate, done = {}, None, []  # rate: tokens decoded per second, measured, then over the chunks so far
    for chunk in bench_chunks(cfg):
        key = chunk["dtype"], chunk.get("compile")
        if chunk.get("compile") == "cuda-graphs" and cfg.device != "cuda":
            done.append({"chunk": chunk["name"], "status": "skipped (cuda-graphs needs CUDA)"})
            write_json(cfg.results / "a_bench.json", {"chunks": done})
            continue
        if key not in models:
            models[key] = load(model=cfg.model, exits=cfg.shipped_exits, dtype=chunk["dtype"], device=cfg.device,
                               compile=chunk.get("compile"))
        bm = models[key]
        if rate is None:  # one full-mode decode (after a warm-up) sizes the first chunk
            bm.generate("Write a short story about a lighthouse.", mode="full", max_new_tokens=8)
            t0 = time.time()
            out = bm.generate("Write a short story about a lighthouse.", mode="full", max_new_tokens=cfg.bench_tokens,
                              eos=False)
            rate = len(out.token_ids) / (time.time() - t0)
            log(f"bench: full mode decodes {rate:.0f} tokens/s")
            write_json(cfg.results / "a_syncs.json", count_syncs(bm, cfg))
        remaining = deadline - time.time()
        opts = bench_lib.BenchOptions(exits=chunk.get("exits", cfg.exits), draft_lens=chunk["draft_lens"],
                                      lookup_lens=chunk.get("lookup_lens", [0]),
                                      draft_widths=chunk["widths"], max_new_tokens=cfg.bench_tokens,
                                      peers=chunk["peers"], early_exit=chunk["early_exit"])
        n_settings = len(bench_lib.settings(opts, bm.exit_modules.sub_model_exits))
        prompts = cfg.bench_prompts
        def estimate(n):  # decodes at the rate so far, with room for the pass-cost timing and slower peers
            return n_settings * (opts.warmup + n) * cfg.bench_tokens / rate * 1.25

        while prompts > 2 and estimate(prompts) > remaining:  # shrink the chunk to what fits, else skip it
            prompts -= 1
        if estimate(prompts) > remaining:
            done.append({"chunk": chunk["name"], "status": "skipped (would not fit)",
                         "estimate_s": round(estimate(prompts), 1)})
            write_json(cfg.results / "a_bench.json", {"chunks": done, "calibration_tokens_per_s": rate})
            continue
        source = chunk["prompts"]
        prompt_set = load_prompts(source, prompts)
        command = bench_command(cfg, chunk, source, prompts)
        log(f"bench chunk {chunk['name']}: {n_settings} settings x {prompts} prompts")
        t0 = time.time()
        try:
            result = bench_lib.run_bench(bm, prompt_set, opts, command=command,
                                         exits_checkpoint=cfg.shipped_exits or shipped_path())
        except Exception as error:  # a chunk that fails (a capture CUDA refuses) must not cost the ones after it
            done.append({"chunk": chunk["name"], "status": f"failed: {type(error).__name__}: {error}"[:500],
                         "command": command})
            write_json(cfg.results / "a_bench.json", {"chunks": done})
            continue
        seconds = time.time() - t0
        (cfg.results / "a").mkdir(parents=True, exist_ok=True)
        report.write_json(result, cfg.results / "a" / f"{chunk['name']}.json")
        decoded = sum(r.summary.new_tokens for r in [result.baseline, *result.results]) * (1 + 1 / prompts)
        rate = (rate + decoded / seconds) / 2
        done.append({"chunk": chunk["name"], "status": "ok", "seconds": round(seconds, 1), "prompts": prompts,
                     "settings": n_settings, "estimate_s": round(estimate(prompts), 1), "command": command})
        write_json(cfg.results / "a_bench.json", {"chunks": done})
        bundle(cfg)


def count_syncs(bm, cfg: PlanConfig) -> dict:
    """Host syncs CUDA reports (torch.cuda.set_sync_debug_mode) in greedy speculative and full decoding: the
    engine means to wait for the device once per verify cycle (the accept step) and once per full-mode token."""
    import warnings

    import torch

    if torch.device(bm.device).type != "cuda":
        return {"status": "skipped (not on CUDA)"}
    prompt, counts = "Write a short story about a lighthouse.", {}
    for name, kwargs in (("full", dict(mode="full")),
                         ("speculative k=1", dict(mode="speculative", exit=cfg.exits[0], draft_len=1)),
                         ("speculative k=4", dict(mode="speculative", exit=cfg.exits[0], draft_len=4))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = bm.generate(prompt, max_new_tokens=32, eos=False, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        steps = out.stats.cycles if kwargs["mode"] == "speculative" else len(out.token_ids)
        counts[name] = {"syncs": len(syncs), "steps": steps, "syncs_per_step": round(len(syncs) / max(steps, 1), 2),
                        "kinds": sorted(set(syncs))[:5]}
    return {"status": "ok", "dtype": str(bm.dtype).removeprefix("torch."), "counts": counts}


def bench_chunks(cfg: PlanConfig) -> list[dict]:
    """Highest priority first: the core grid in bf16 then fp32 on both prompt sets, then prompt lookup (bf16, the
    shipped default exit (draft-kind exit 2 since stop 27) and the first exit, k 1 and auto, lookup 0, 3 (the
    shipped default) and 4, both prompt sets), then CUDA graphs against
    those eager numbers (bf16, built-in prompts, the first exit, k 1, 2, 4: `--compile cuda-graphs`, which
    captures in milliseconds; torch.compile's "reduce-overhead" would spend minutes compiling), then the rest
    of the grid (k 3,5,6 and width 3: draft lengths 1..6 and auto x widths 1,3 in all)."""
    sets = [("builtin", None)]
    spec = Path(cfg.data) / "spec_bench_questions.jsonl"
    if spec.is_file():
        sets.append(("specbench", str(spec)))
    core = dict(draft_lens=[1, 2, 4, "auto"], widths=[1], peers=["hf", "hf-early-exit", "prompt-lookup"],
                early_exit=True)
    rest = [("k356", dict(draft_lens=[3, 5, 6], widths=[1], peers=[], early_exit=False)),
            ("w3", dict(draft_lens=[1, 2, 3, 4, 5, 6, "auto"], widths=[3], peers=[], early_exit=False))]
    short = {"bfloat16": "bf16", "float32": "fp32"}
    chunks = [dict(name=f"{short[d]}_{s}_core", dtype=d, prompts=p, **core) for d in cfg.dtypes for s, p in sets]
    lookup_exits = list(dict.fromkeys([shipped_default_exit(cfg), *cfg.exits[:1]]))  # the shipped default first
    chunks += [dict(name=f"{short[cfg.dtypes[0]]}_{s}_lookup", dtype=cfg.dtypes[0], prompts=p, exits=lookup_exits,
                    draft_lens=[1, "auto"], widths=[1], lookup_lens=[0, 3, 4], peers=[], early_exit=False)
               for s, p in sets]
    chunks.append(dict(name=f"{short[cfg.dtypes[0]]}_builtin_cuda_graphs", dtype=cfg.dtypes[0], prompts=None,
                       compile="cuda-graphs", exits=cfg.exits[:1], draft_lens=[1, 2, 4], widths=[1], peers=[],
                       early_exit=False))
    chunks += [dict(name=f"{short[d]}_{s}_{r}", dtype=d, prompts=p, **grid)
               for d in cfg.dtypes for s, p in sets for r, grid in rest]
    return chunks


def bench_command(cfg: PlanConfig, chunk: dict, source: str | None, prompts: int) -> str:
    """The `balspec bench` command line that measures what this chunk measured."""
    args = ["balspec", "bench", "--exits", ",".join(map(str, chunk.get("exits", cfg.exits))),
            "--draft-len", ",".join(map(str, chunk["draft_lens"])),
            "--draft-width", ",".join(map(str, chunk["widths"])), "--num-prompts", str(prompts),
            "--lookup-len", ",".join(map(str, chunk.get("lookup_lens", [0]))),
            "--max-new-tokens", str(cfg.bench_tokens), "--dtype", chunk["dtype"], "--device", cfg.device]
    if source:
        args += ["--prompts", source]
    if chunk["peers"]:
        args += ["--peers", ",".join(chunk["peers"])]
    if not chunk["early_exit"]:
        args.append("--no-early-exit")
    if chunk.get("compile"):
        args += ["--compile", chunk["compile"]]
    if cfg.model != "default":
        args += ["--model", cfg.model]
    if cfg.shipped_exits:
        args += ["--exits-path", cfg.shipped_exits]
    return shlex.join(args)


def part_train(cfg: PlanConfig, deadline: float) -> None:
    """Self-distillation data at GPU scale, training for a fixed time, quality and a bench of the result."""
    start = time.time()
    budget = deadline - start
    work = Path(cfg.work)
    data = work / "data" / "self"
    data.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "recipes"))
    from build_self_distill import generate

    # 1. answers, batched, until the generation share is spent
    prompts = read_instructions(cfg)
    answers = data / "answers.jsonl.partial"
    t0 = time.time()
    tokens = generate(prompts, answers, cfg.gen_tokens, cfg.gen_batch, None if cfg.model == "default" else cfg.model,
                      dtype=cfg.gen_dtype, device=cfg.device, deadline=t0 + cfg.gen_share * budget)
    seconds = time.time() - t0
    records = answers.read_text(encoding="utf-8").splitlines(keepends=True)
    filler = 0
    if cfg.dry_run:  # the tiny random model answers only whitespace (dropped): echo instructions instead
        filler = max(0, 16 - len(records))
        records += [json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": p}]})
                    + "\n" for p in prompts[:filler]]
    random.Random(0).shuffle(records)
    heldout = records[::cfg.heldout_every]
    train = [r for i, r in enumerate(records) if i % cfg.heldout_every]
    (data / "train.jsonl").write_text("".join(train), encoding="utf-8")
    (data / "heldout.jsonl").write_text("".join(heldout), encoding="utf-8")
    write_json(cfg.results / "b_generate.json", {
        "instructions": len(prompts), "answers": len(records), "train": len(train), "heldout": len(heldout),
        "answer_tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "batch_size": cfg.gen_batch, "max_new_tokens": cfg.gen_tokens, "dtype": cfg.gen_dtype,
        "dry_run_filler": filler})
    save_answers(cfg, data)
    bundle(cfg)

    # 2. train for the training share, steps sized by part c's measured throughput
    batch, tokens_per_s = best_throughput(cfg)
    train_seconds = min(cfg.train_share * budget, deadline - time.time() - 0.25 * budget)
    steps = max(4, int(train_seconds * tokens_per_s / (batch * cfg.block_size)))
    output = work / "runs" / "trained-exits"
    sets = train_sets(cfg, output, data / "train.jsonl", batch, steps) + [
        f"data.heldout={data / 'heldout.jsonl'}", f"exits.init_from={init_from(cfg)}",
        f"optim.warmup_steps={max(2, steps // 20)}", f"train.save_every={max(1, steps // 4)}",
        "train.eval_every=0", f"train.log_every={max(1, steps // 20)}"]
    command = [sys.executable, "-m", "balspec.cli", "train", "--recipe", str(ROOT / cfg.recipe),
               *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    state = run_child(command, timeout=max(30.0, min(2 * train_seconds + 30, deadline - time.time() - 20)))
    exits_dir = output if (output / "balspec.json").exists() else latest_checkpoint(output)
    summary = {"status": state, "planned_steps": steps, "batch_size": batch,
               "planned_seconds": round(train_seconds, 1), "throughput_used_tokens_per_s": tokens_per_s,
               "seconds": round(time.time() - t0, 1), "exits_dir": str(exits_dir) if exits_dir else None,
               "command": "balspec train " + shlex.join(command[4:])}
    if exits_dir is not None:
        meta = json.loads((exits_dir / "balspec.json").read_text())
        summary["training"] = {k: meta["training"].get(k) for k in (
            "steps", "tokens_seen", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb", "device",
            "mixed_precision", "eval")}
        (cfg.results / "b_exits").mkdir(parents=True, exist_ok=True)
        (cfg.results / "b_exits" / "balspec.json").write_text((exits_dir / "balspec.json").read_text())
        summary["exits_pieces"] = split_for_return(exits_dir / "exits.safetensors", Path(cfg.out))
    if (output / "metrics.jsonl").exists():
        (cfg.results / "b_metrics.jsonl").write_text((output / "metrics.jsonl").read_text())
    write_json(cfg.results / "b_train.json", summary)
    bundle(cfg)
    if exits_dir is None:
        return

    # 3. exit quality of the trained and the shipped exits on the held-out answers
    sys.path.insert(0, str(ROOT / "evals"))
    import exit_quality

    for name, path in (("trained", exits_dir), ("shipped", cfg.shipped_exits or shipped_path())):
        if time.time() > deadline - 20:
            break
        exit_quality.run(exit_quality.parse_args([
            "--exits-path", str(path), "--data", str(data / "heldout.jsonl"), "--positions", "assistant",
            "--seq-len", str(cfg.block_size), "--max-tokens", str(cfg.quality_tokens), "--device", cfg.device,
            "--output", str(cfg.results / f"b_quality_{name}.json"),
            *(["--model", cfg.model] if cfg.model != "default" else [])]))
        bundle(cfg)

    # 4. the trained exits against the shipped ones: bf16 (the first dtype), built-in prompts, k 1 and auto
    from balspec.checkpoint import read_meta
    from balspec.generate import load
    from balspec.measure import bench as bench_lib
    from balspec.measure import report
    from balspec.measure.prompts import load_prompts

    for name, path in (("trained", exits_dir), ("shipped", cfg.shipped_exits or shipped_path())):
        if time.time() > deadline - 30:
            break
        bm = load(model=cfg.model, exits=path, dtype=cfg.dtypes[0], device=cfg.device)
        exits = read_meta(path)["exits"] if name == "trained" else cfg.exits  # a draft recipe trains others
        opts = bench_lib.BenchOptions(exits=exits, draft_lens=[1, "auto"], max_new_tokens=cfg.bench_tokens,
                                      early_exit=False)
        result = bench_lib.run_bench(bm, load_prompts(None, max(2, cfg.bench_prompts // 2)), opts,
                                     command=f"(kit) bench of the {name} exits", exits_checkpoint=str(path))
        report.write_json(result, cfg.results / f"b_bench_{name}.json")
        bundle(cfg)


def train_sets(cfg: PlanConfig, output: Path, data: Path, batch: int, steps: int) -> list[str]:
    """The --set overrides every training run of the plan shares: bf16 on the accelerator."""
    return [f"model.name={cfg.model}", f"train.output={output}", f"data.train={data}", f"optim.batch_size={batch}",
            f"train.max_steps={steps}", f"data.block_size={cfg.block_size}",
            f"model.dtype={'bfloat16' if not cfg.dry_run else 'float32'}",
            f"train.mixed_precision={'bf16' if not cfg.dry_run else 'no'}", *cfg.train_sets]


def init_from(cfg: PlanConfig) -> str:
    if cfg.init_from == "shipped":
        return cfg.shipped_exits or shipped_path()
    return "null" if cfg.init_from == "none" else cfg.init_from


def best_throughput(cfg: PlanConfig) -> tuple[int, float]:
    """(batch size, tokens/s) of part c's fastest run; a cautious guess when part c measured nothing."""
    path = cfg.results / "c_throughput.json"
    runs = [r for r in json.loads(path.read_text())["runs"] if r["status"] == "ok"] if path.exists() else []
    if not runs:
        return cfg.throughput_batches[0], 20_000.0 if not cfg.dry_run else 200.0
    best = max(runs, key=lambda r: r["tokens_per_s_median"])
    return best["batch_size"], best["tokens_per_s_median"]


def split_for_return(path: Path, out: Path) -> list[dict]:
    """OUT/<name>.part-NN pieces under 15 MiB, with their sha256 (kit.py collect joins them)."""
    import hashlib

    pieces = []
    with open(path, "rb") as f:
        for k, data in enumerate(iter(lambda: f.read(RETURN_LIMIT), b"")):
            name = f"{path.name}.part-{k:02d}"
            (out / name).write_bytes(data)
            pieces.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return pieces


def save_answers(cfg: PlanConfig, data: Path) -> None:
    """The generated answers come back too (OUT/selfdistill.tar.gz), when they fit: CPU runs can train on them."""
    target = Path(cfg.out) / "selfdistill.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for name in ("train.jsonl", "heldout.jsonl"):
            tar.add(data / name, f"selfdistill/{name}")
    if target.stat().st_size > RETURN_LIMIT:
        target.unlink()
        log("selfdistill.tar.gz is over 15 MiB: left on the machine")


def read_instructions(cfg: PlanConfig) -> list[str]:
    with gzip.open(Path(cfg.data) / "instructions.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def latest_checkpoint(output: Path) -> Path | None:
    from balspec.training.run import latest_checkpoint as latest

    return latest(output) if output.exists() else None


def shipped_default_exit(cfg: PlanConfig) -> int:
    """The default exit recorded in the shipped exits' balspec.json (defaults.exit; the first exit without one)."""
    from balspec.checkpoint import read_meta

    return int((read_meta(cfg.shipped_exits or shipped_path()).get("defaults") or {}).get("exit", cfg.exits[0]))


def shipped_path() -> str:
    from balspec.generate import default_exits_path

    return str(default_exits_path(None))


def run_child(command: list[str], timeout: float) -> str:
    child = subprocess.Popen(command, start_new_session=True)
    try:
        rc = child.wait(timeout=timeout)
        return "ok" if rc == 0 else f"failed (exit status {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return f"killed after {timeout:.0f} s"


def median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def log(message: str) -> None:
    print(f"[kit {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


PARTS = {"throughput": part_throughput, "bench": part_bench, "train": part_train}
