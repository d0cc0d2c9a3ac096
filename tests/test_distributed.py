"""Distributed training, shown: `accelerate launch` with recipes/accelerate-cpu-2proc.yaml (two processes on the
CPU, gradients all-reduced over gloo) trains the tiny recipe to the exits that one process trains with the same
global batch, and a two-process run killed after a checkpoint resumes, with two processes, to the exits of the
uninterrupted one.

Why a tolerance (1e-5) against one process, and equality for the resume: at every micro-step both runs train on
the same rows (every process walks the same global block order and process r takes rows r*batch.. of it), from
the same weights, with the same schedule, the same clipped norm and grad_accum 2. Only the order of float32
additions differs: one process sums each exit's gradient over its 4 x 64 positions in one matmul, two processes
sum 2 x 64 each and gloo adds the two halves. That is rounding in the last bits of a gradient (about 1e-7
relative), which eight AdamW steps of lr 1e-3 keep orders of magnitude below 1e-5 (here the two have even
agreed bitwise, which nothing guarantees). A resumed two-process run repeats the same additions in the same
order as the uninterrupted one, so it must match it bit for bit (`torch.equal`).

CPU, fp32, the tiny random Llama, no downloads. Each launch starts three Python processes (the launcher and two
trainers), so this file takes a minute or two on two busy cores.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from balspec.checkpoint import read_meta
from tests.test_train import TINY_TEXT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "accelerate-cpu-2proc.yaml"
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
# global batch: optim.batch_size 4 on one process = 2 per process on two; x grad_accum 2 per step
SETS = ["train.max_steps=8", "train.save_every=2", "train.log_every=1", "train.eval_every=0",
        "optim.grad_accum=2", "train.cpu=true"]
TIMEOUT = 300


def launch(output: Path, *args: str, processes: int = 2) -> subprocess.Popen:
    """`balspec train --output OUTPUT ARGS` in the background, under `accelerate launch --config_file
    recipes/accelerate-cpu-2proc.yaml` for two processes; its output goes to OUTPUT.log beside it."""
    log = open(output.with_name(output.name + ".log"), "a")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one core per process
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(CONFIG)] if processes == 2 else []
    command = [sys.executable, *launcher, "-m", "balspec.cli", "train", "--output", str(output), *args]
    with log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, output: Path) -> str:
    """Wait for a launch; its output (for the assertion messages)."""
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        kill_tree(proc)
    return output.with_name(output.name + ".log").read_text()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch that is still running: its training processes, then the launcher. They run in sessions
    of their own (torchrun starts them so), which a kill of the launcher's process group would miss."""
    import psutil  # accelerate's dependency

    if proc.poll() is not None:
        return
    workers = psutil.Process(proc.pid).children(recursive=True)
    for worker in workers:
        worker.kill()
    psutil.wait_procs(workers, timeout=30)
    proc.kill()
    proc.wait()


def tiny_run(output: Path, processes: int = 2, batch_size: int = 2) -> subprocess.Popen:
    """The tiny recipe with SETS; optim.batch_size is per process."""
    sets = [arg for s in [*SETS, f"optim.batch_size={batch_size}"] for arg in ("--set", s)]
    return launch(output, "--recipe", str(TINY_RECIPE), "--data", TINY_TEXT, *sets, processes=processes)


def exits_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "exits.safetensors")


def losses(run: Path) -> dict[int, float]:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The tiny recipe trained by two processes, uninterrupted: 8 steps, a checkpoint every 2."""
    output = tmp_path_factory.mktemp("distributed") / "two"
    log = finish(tiny_run(output), output)
    assert (output / "exits.safetensors").exists(), log
    return output


def test_two_processes_train_the_exits_of_one_with_the_same_global_batch(two_processes, tmp_path):
    training = read_meta(two_processes)["training"]
    assert training["num_processes"] == 2 and training["tokens_seen"] == 8 * 2 * 2 * 2 * 64
    one = tmp_path / "one"
    log = finish(tiny_run(one, processes=1, batch_size=4), one)
    assert read_meta(one)["training"]["num_processes"] == 1, log
    a, b = exits_of(one), exits_of(two_processes)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    assert losses(one).keys() == losses(two_processes).keys() == set(range(1, 9))
    assert all(abs(losses(one)[s] - losses(two_processes)[s]) <= 1e-5 for s in losses(one))
    evals = read_meta(one)["training"]["eval"], training["eval"]  # the held-out blocks, shared between processes
    assert evals[0].keys() == evals[1].keys() and all(abs(evals[0][k] - evals[1][k]) <= 1e-5 for k in evals[0])


def test_two_process_run_killed_after_a_checkpoint_resumes_exactly(two_processes, tmp_path):
    output = tmp_path / "killed"
    proc = tiny_run(output)
    first = output / "checkpoints" / "step-0000002"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        kill_tree(proc)  # every training process at once, as a lost machine would
    log = output.with_name("killed.log").read_text()
    assert first.exists(), log
    assert not (output / "exits.safetensors").exists(), "the run finished before the kill: nothing was resumed"

    resumed = finish(launch(output, "--resume"), output)
    assert (output / "exits.safetensors").exists(), resumed
    training = read_meta(output)["training"]
    assert training["num_processes"] == 2 and training["resumed_at_step"] in (2, 4, 6)
    a, b = exits_of(two_processes), exits_of(output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(output) == losses(two_processes)  # steps after the checkpoint logged once, as before


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, accelerate joins the processes on it")
def test_processes_accelerate_leaves_unjoined_are_refused_in_one_line(tmp_path):
    """Without train.cpu, on a machine with no GPU, accelerate would run each launched process alone, each
    training on its own into the same directory."""
    output = tmp_path / "run"
    log = finish(launch(output, "--recipe", str(TINY_RECIPE), "--data", TINY_TEXT, "--max-steps", "1",
                        "--set", "optim.batch_size=2"), output)
    errors = {ln for ln in log.splitlines() if ln.startswith("error:")}  # one line, the same from both processes
    assert errors == {"error: train.cpu: 2 processes were launched but accelerate did not join them (no GPU?); "
                      "to train them together on the CPU add --set train.cpu=true"}, log
    assert not output.exists()
