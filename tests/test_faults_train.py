"""Faults of a training run directory: files planted or torn in it, a run killed at a bad moment, the directory
moved, two processes on it. Each ends in an exact resume or one clear line, and nothing in it is unpickled.
CPU, fp32, the tiny random Llama; no downloads."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from balspec.errors import BalspecError
from balspec.training import train as train_module
from balspec.training.run import check_not_busy, configure
from balspec.training.train import train
from tests.test_train import TINY_RECIPE, TINY_TEXT, run_cli, tiny_config

SETS = ["train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.eval_every=0"]


class Payload:
    """Unpickling it runs a shell command that leaves `marker` behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of 4 steps with checkpoints at steps 2 and 4; tests work on copies of it."""
    output = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(output, *SETS))
    return output


def copy_run(run: Path, to: Path, keep_step: int = 4) -> Path:
    """A copy of `run` as it was when its checkpoint of `keep_step` was the latest one."""
    shutil.copytree(run, to)
    for checkpoint in (to / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > keep_step:
            shutil.rmtree(checkpoint)
    return to


def final_weights(run: Path) -> dict:
    return load_file(run / "exits.safetensors")


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logged_steps(run: Path) -> list[int]:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [ln["step"] for ln in lines if "loss" in ln]


def one_error_line(code, err) -> str:
    assert code == 1 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_resume_never_unpickles_a_planted_file(finished_run, tmp_path, capsys, monkeypatch):
    """A pickle planted in any file of the run or its latest checkpoint (each of whose files --resume reads) is
    never executed: resume stops with one line naming the file, or, for a file it only rewrites, goes on."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    run = copy_run(finished_run, tmp_path / "pristine")
    checkpoint = run / "checkpoints" / "step-0000004"
    targets = [p.relative_to(run) for folder in (run, checkpoint) for p in sorted(folder.iterdir())
               if p.is_file() and p.name != ".lock"]
    assert {p.name for p in checkpoint.iterdir()} >= {"trainer.json", "optimizer.safetensors", "rank-0.json",
                                                       "rank-0.safetensors", "exits.safetensors", "balspec.json"}
    for target in targets:
        attempt = tmp_path / "attempt"
        shutil.rmtree(attempt, ignore_errors=True)
        shutil.copytree(run, attempt)
        (attempt / target).write_bytes(payload)
        code, _, err = run_cli(["train", "--output", str(attempt), "--resume"], capsys, monkeypatch)
        assert not marker.exists(), f"unpickled {target}"
        if target.parent == checkpoint.relative_to(run):
            assert str(attempt / target) in one_error_line(code, err), (target, err)
        else:  # run.json and the final exits are not read; metrics.jsonl's torn lines are dropped
            assert code == 0 or one_error_line(code, err), (target, err)


def test_an_old_pickled_checkpoint_is_refused_unread(finished_run, tmp_path, capsys, monkeypatch):
    """A checkpoint in accelerate's layout (pickles) is refused in one line; none of its pickles is opened."""
    marker = tmp_path / "pwned"
    run = copy_run(finished_run, tmp_path / "old", keep_step=2)
    checkpoint = run / "checkpoints" / "step-0000002"
    for name in ("trainer.json", "optimizer.safetensors", "rank-0.json", "rank-0.safetensors"):
        (checkpoint / name).unlink()
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "custom_checkpoint_2.pkl",
                 "random_states_0.pkl", "optimizer.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
    code, _, err = run_cli(["train", "--output", str(run), "--resume"], capsys, monkeypatch)
    assert "written by an older balspec" in one_error_line(code, err)
    assert not marker.exists()


def test_a_block_longer_than_the_models_context_is_refused_before_the_run_starts(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(BalspecError, match="data.block_size: must be at most the model's context of 1024 tokens"):
        train(tiny_config(output, "data.block_size=4096"))
    assert not output.exists()


def interrupt_at(monkeypatch, call: int):
    """Make train_step raise KeyboardInterrupt on its `call`-th call (1-based)."""
    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    return real_step


def test_resume_before_the_first_checkpoint_starts_from_step_zero(finished_run, tmp_path, capsys, monkeypatch):
    """Killed before its first checkpoint: --resume trains from step 0 with the recorded config (not the
    recipe's defaults) and ends where an uninterrupted run does; a fresh start is pointed to --resume."""
    run = tmp_path / "run"
    real_step = interrupt_at(monkeypatch, 2)  # step 1 is logged, no checkpoint yet (save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, *SETS))
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert (run / "run.json").exists() and not list((run / "checkpoints").glob("step-*"))
    code, _, err = run_cli(["train", "--recipe", TINY_RECIPE, "--data", TINY_TEXT, "--output", str(run)],
                           capsys, monkeypatch)
    assert "add --resume" in one_error_line(code, err)

    config, checkpoint = configure(None, [], {"train.output": str(run)}, resume=True)
    assert checkpoint is None and config.train.max_steps == 4 and config.train.log_every == 1  # recorded ones
    train(config, checkpoint)
    assert_same_weights(final_weights(run), final_weights(finished_run))
    assert logged_steps(run) == [1, 2, 3, 4]  # the killed attempt's line for step 1 is not kept twice


def test_resume_skips_a_torn_metrics_line(finished_run, tmp_path, capsys, monkeypatch, caplog):
    """Power lost while a metrics line was written: --resume drops the torn line with a warning."""
    run = copy_run(finished_run, tmp_path / "run", keep_step=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')
    code, out, err = run_cli(["train", "--output", str(run), "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if "is not a metrics line" in r.getMessage()]
    assert logged_steps(run) == [1, 2, 3, 4]
    assert_same_weights(final_weights(run), final_weights(finished_run))


def test_a_moved_run_resumes_exactly(finished_run, tmp_path, capsys, monkeypatch):
    """The run directory's location is not part of the computation: a copy elsewhere resumes bitwise."""
    moved = copy_run(finished_run, tmp_path / "elsewhere" / "moved", keep_step=2)
    cwd = tmp_path / "elsewhere"
    monkeypatch.chdir(cwd)
    code, out, err = run_cli(["train", "--output", "moved", "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert_same_weights(final_weights(moved), final_weights(finished_run))
    assert json.loads((moved / "balspec.json").read_text())["training"]["config"]["train"]["output"] == "moved"


def test_a_run_whose_init_checkpoint_is_gone_resumes(finished_run, tmp_path, monkeypatch):
    """Nor is the location of exits.init_from, once a checkpoint holds the weights: it is not read on resume."""
    source = copy_run(finished_run, tmp_path / "source")
    sets = ["train.max_steps=2", "train.save_every=1", "train.log_every=1", "train.eval_every=0",
            f"exits.init_from={source}"]
    train(tiny_config(tmp_path / "straight", *sets))
    real_step = interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    monkeypatch.setattr(train_module, "train_step", real_step)
    shutil.rmtree(source)
    train(*configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True))
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))



@pytest.mark.parametrize("train_base", [False, True])
def test_a_resumed_run_keeps_the_draft_vocabulary_of_a_checkpoint_now_gone(finished_run, tmp_path, monkeypatch,
                                                                          train_base):
    """The inherited draft vocabulary is read from the run's own checkpoint on resume, not from exits.init_from;
    also where the base trains (the checkpoint is then for the trained base, not the one loaded at start). A
    damaged checkpoint is refused in one line before anything else reads it."""
    from balspec.models import load_model
    from tests.test_train import with_draft_vocab

    model, _ = load_model("tiny-random")
    vocab = with_draft_vocab(finished_run, model, tmp_path / "source")
    sets = ["train.max_steps=2", "train.save_every=1", "train.log_every=1", "train.eval_every=0",
            f"exits.init_from={tmp_path / 'source'}", f"exits.train_base={str(train_base).lower()}"]
    real_step = interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    monkeypatch.setattr(train_module, "train_step", real_step)
    shutil.rmtree(tmp_path / "source")
    damaged = shutil.copytree(tmp_path / "resumed", tmp_path / "damaged")
    weights = damaged / "checkpoints" / "step-0000001" / "exits.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BalspecError, match="is damaged or does not fit this run"):
        train(*configure(None, [], {"train.output": str(damaged)}, resume=True))
    train(*configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True))
    assert torch.equal(load_file(tmp_path / "resumed" / "exits.safetensors")["draft_vocab"], vocab)

HOLD_LOCK = """
import sys
from pathlib import Path
from balspec.training.run import lock_run
lock = lock_run(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_process_on_the_same_output_is_refused_in_one_line(finished_run, tmp_path, capsys, monkeypatch):
    run = copy_run(finished_run, tmp_path / "run", keep_step=2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["--resume"], ["--recipe", TINY_RECIPE, "--data", TINY_TEXT]):
            code, _, err = run_cli(["train", "--output", str(run), *args], capsys, monkeypatch)
            assert f"another balspec train is writing to {run}" in one_error_line(code, err)
    finally:
        holder.communicate("")
    code, _, err = run_cli(["train", "--output", str(run), "--resume"], capsys, monkeypatch)  # released: it runs
    assert code == 0, err


def test_training_holds_the_lock_and_releases_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_step, seen = train_module.train_step, []

    def probing_step(*args, **kwargs):
        with pytest.raises(BalspecError, match="another balspec train is writing to"):
            check_not_busy(run)
        seen.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", probing_step)
    train(tiny_config(run, "train.max_steps=1", "train.eval_every=0"))
    assert seen
    check_not_busy(run)  # released at the end


def test_a_run_started_meanwhile_in_the_same_output_is_not_overwritten(finished_run, tmp_path):
    """Two fresh starts both pass the checks on an empty directory; the second to take the lock refuses."""
    output = tmp_path / "run"
    config, checkpoint = configure(TINY_RECIPE, [f"data.train={TINY_TEXT}"], {"train.output": str(output)},
                                   resume=False)
    shutil.copytree(finished_run, output)  # the other start got there first and finished
    before = final_weights(output)
    with pytest.raises(BalspecError, match="already holds a balspec run"):
        train(config, checkpoint)
    assert_same_weights(final_weights(output), before)


def test_temp_files_of_a_killed_save_are_removed_on_the_next_start(finished_run, tmp_path, capsys, monkeypatch):
    """A kill while a file or checkpoint was being written leaves hidden temp files: the next start removes
    them, and a directory holding nothing but them is not taken for someone else's."""
    run = copy_run(finished_run, tmp_path / "run")
    stale = [run / ".exits.safetensors.k2j4h1", run / ".balspec.json.x8d0q", run / ".metrics.jsonl.tmp",
             run / ".run.json.tmp", run / "checkpoints" / ".step-0000004.partial" / ".exits.safetensors.a1"]
    stale[-1].parent.mkdir()
    for path in stale:
        path.write_bytes(b"")
    code, _, err = run_cli(["train", "--output", str(run), "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert not any(p.exists() for p in stale) and not stale[-1].parent.exists()
    assert_same_weights(final_weights(run), final_weights(finished_run))

    fresh = tmp_path / "fresh"  # killed while run.json itself was written
    fresh.mkdir()
    (fresh / ".run.json.tmp").write_bytes(b"")
    code, _, err = run_cli(["train", "--recipe", TINY_RECIPE, "--data", TINY_TEXT, "--output", str(fresh),
                            "--max-steps", "1"], capsys, monkeypatch)
    assert code == 0, err
    assert not (fresh / ".run.json.tmp").exists() and (fresh / "run.json").exists()


def test_draft_exit_draws_do_not_depend_on_torch_global_generator(tmp_path, monkeypatch):
    """Draft-kind exits draw their unverified rows per step from a generator seeded by (seed, step, process):
    whatever else draws from torch's global generator (another library, a test before this one), a resumed run
    trains to the uninterrupted run's weights bit for bit."""
    sets = ["exits.draft=[2]", "train.max_steps=4", "train.save_every=2", "train.eval_every=0"]
    train(tiny_config(tmp_path / "straight", *sets))
    real_step, calls = train_module.train_step, []

    def noisy_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        torch.rand(len(calls))  # someone else's draw from the global generator
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", noisy_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    train(*configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True))  # still noisy
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))


def test_resume_refuses_a_users_directory_named_as_a_later_checkpoint(tmp_path, finished_run):
    """Saving step 4 would replace `checkpoints/step-0000004`; one balspec did not write is refused up front."""
    run = copy_run(finished_run, tmp_path / "run", keep_step=2)
    (run / "checkpoints" / "step-0000004").mkdir()
    (run / "checkpoints" / "step-0000004" / "mine.txt").write_text("keep me")
    with pytest.raises(BalspecError, match="step-0000004 is not a checkpoint balspec wrote"):
        configure(None, [], {"train.output": str(run)}, resume=True)
    assert (run / "checkpoints" / "step-0000004" / "mine.txt").read_text() == "keep me"


def test_a_full_disk_stops_training_in_one_line(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--recipe", TINY_RECIPE, "--data", TINY_TEXT, "--output", str(run),
                            "--max-steps", "1", "--set", "train.eval_every=0"], capsys, monkeypatch)
    line = one_error_line(code, err)
    assert "cannot write the checkpoint" in line and line.endswith("(No space left on device)")


@pytest.mark.parametrize("method", ["balcony", "sorted"])
def test_a_run_directory_follows_the_umask(tmp_path, method):
    """safetensors creates its files 0600: the optimizer and RNG state, and the trained model (method sorted)."""
    old = os.umask(0o002)
    try:
        run = train(tiny_config(tmp_path / "run", f"method={method}", "train.max_steps=1", "train.eval_every=0"))
    finally:
        os.umask(old)
    modes = {p.relative_to(run): p.stat().st_mode & 0o777 for p in [run, *run.rglob("*")]}
    assert "checkpoints/step-0000001/optimizer.safetensors" in map(str, modes)
    assert {str(p): oct(m) for p, m in modes.items() if m != (0o775 if (run / p).is_dir() else 0o664)} == {}


def test_pruning_and_resume_ignore_what_a_user_put_in_checkpoints(tmp_path, finished_run):
    """Only `step-NNNNNNN` directories balspec wrote are read or pruned; a user's `step-best` survives."""
    run = copy_run(finished_run, tmp_path / "run", keep_step=2)
    for name in ("step-best", "step-0000003-notes"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "mine.txt").write_text("keep me")
    config, checkpoint = configure(None, [], {"train.output": str(run)}, resume=True)
    assert checkpoint.name == "step-0000002"
    train(config, checkpoint)
    assert_same_weights(final_weights(run), final_weights(finished_run))
    for name in ("step-best", "step-0000003-notes"):
        assert (run / "checkpoints" / name / "mine.txt").read_text() == "keep me"
