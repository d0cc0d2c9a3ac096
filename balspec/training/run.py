"""A training run's directory: its config, lock, metrics, checkpoints and record (train.py's layout).

Run directory (`train.output`):
    run.json                 marks a balspec run; the resolved config it started with
    metrics.jsonl            one JSON line per log step and per evaluation
    checkpoints/step-NNNNNNN a loadable exits checkpoint (exits.safetensors + balspec.json) and the state
                             that resumes it exactly, in safetensors + JSON (see trainstate.py; no pickle)
    exits.safetensors, balspec.json   the final exits: `load_exits(model, output)`
    .lock                    held by the process writing the run: a second one is refused
Everything a user can get wrong about the directory is checked (`configure`) before the first file is written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import resource
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from balspec import __version__
from balspec.checkpoint import read_meta
from balspec.errors import BalspecError
from balspec.files import check_output_dir, writing
from balspec.models import device_name
from balspec.training.config import (
    RESUMABLE_CHANGES,
    TrainingConfig,
    changed_keys,
    config_from_dict,
    config_to_dict,
    get_value,
    resolve_config,
)
from balspec.training.sorted import MODEL_PARTIAL

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


@dataclass
class RunProgress:
    """How far a run has got; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # time inside training steps: the denominator of tokens/s
    wall_seconds: float = 0.0  # all of it, evaluations and checkpoints included, summed over resumes

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__init__(**state)


def configure(recipe: str | None, sets: list[str], flags: dict, resume: bool) -> tuple[TrainingConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None: start at step 0, for --resume too when the run
    was stopped before its first checkpoint, with the config it recorded); refuses an output directory it must
    not touch."""
    config = resolve_config(recipe, sets, flags)
    output = Path(config.train.output)
    if output.exists() and not output.is_dir():
        raise BalspecError(f"--output: {output} is a file, not a directory")
    check_output_dir(output, "--output")
    if _main_process():
        check_not_busy(output)
    is_run = (output / RUN_FILE).exists()
    if output.exists() and not is_run and set(output.iterdir()) - set(stale_files(output)) - {output / LOCK_FILE}:
        raise BalspecError(f"--output: {output} holds other files (not a balspec run); choose a new or empty directory")
    if not resume:
        if is_run:
            raise BalspecError(f"--output: {output} already holds a balspec run; add --resume to continue it "
                               "or choose another directory")
        return config, None
    if not is_run:
        raise BalspecError(f"--resume: {output} holds no balspec run; nothing to resume")
    checkpoint = latest_checkpoint(output)
    saved = recorded_config(output, checkpoint)
    config = resolve_config(recipe, sets, flags, base=saved)
    changed = [k for k in changed_keys(saved, config) if k not in RESUMABLE_CHANGES]
    if changed:
        raise BalspecError(f"--resume: {changed[0]} differs from the run being resumed "
                           f"({get_value(saved, changed[0])!r} there); start a new run to change it")
    # a step directory past the latest checkpoint is not balspec's (it renames each checkpoint into place whole),
    # and saving that step would replace it
    start = int(checkpoint.name.split("-")[1]) if checkpoint is not None else 0
    ahead = [p for p in (output / CHECKPOINTS).glob("step-*")
             if re.fullmatch(r"step-\d+", p.name) and start < int(p.name.split("-")[1]) <= config.train.max_steps]
    if ahead:
        raise BalspecError(f"--resume: {ahead[0]} is not a checkpoint balspec wrote (no balspec.json) and lies "
                           "among the steps this run will save; move it away")
    return config, checkpoint


def recorded_config(output: Path, checkpoint: Path | None) -> TrainingConfig:
    """The config a run recorded: in its latest checkpoint, or in run.json when it has none yet."""
    source = checkpoint / "balspec.json" if checkpoint is not None else output / RUN_FILE
    try:
        if checkpoint is not None:
            recorded = read_meta(checkpoint)["training"]["config"]
        else:
            recorded = json.loads(source.read_text())["config"]
    except (ValueError, KeyError, TypeError):
        raise BalspecError(f"--resume: {source} is damaged (no recorded config)") from None
    return config_from_dict(recorded, str(source))


def checkpoints(output: Path) -> list[Path]:
    """The completed checkpoints balspec wrote in a run directory (`step-NNNNNNN` holding balspec.json), oldest
    first; anything else a user put in `checkpoints/` is neither read nor pruned."""
    done = [p for p in (output / CHECKPOINTS).glob("step-*")
            if re.fullmatch(r"step-\d+", p.name) and p.is_dir() and (p / "balspec.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output: Path) -> Path | None:
    done = checkpoints(output)
    return done[-1] if done else None


def stale_files(output: Path) -> list[Path]:
    """Temp files and partial checkpoints a killed run left: balspec writes each under a hidden name and renames
    it into place, so these are never part of the run."""
    names = [f".{name}.*" for name in (RUN_FILE, METRICS_FILE, "exits.safetensors", "balspec.json")]
    return [p for pattern in [*names, MODEL_PARTIAL] for p in output.glob(pattern)] + \
        list((output / CHECKPOINTS).glob(".step-*"))


def check_not_busy(output: Path) -> None:
    """Refuse a run directory another process is training into (it holds the lock)."""
    if (output / LOCK_FILE).exists():
        with open(output / LOCK_FILE) as f:
            _lock(f, output, fcntl.LOCK_SH)  # shared: two processes checking at once do not see each other
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_run(output: Path):
    """Take the run's lock (held until the returned file is closed or the process ends)."""
    f = open(output / LOCK_FILE, "a")
    try:
        _lock(f, output, fcntl.LOCK_EX)
    except BalspecError:
        f.close()
        raise
    return f


def _lock(f, output: Path, mode: int) -> None:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BalspecError(f"--output: another balspec train is writing to {output}; wait for it to end "
                           "or choose another directory") from None


def _main_process() -> bool:
    """Before accelerate is set up: torchrun and `accelerate launch` give each process its RANK."""
    return os.environ.get("RANK", "0") == "0"


def launched_processes() -> int:
    """How many processes the launcher started: torchrun and `accelerate launch` say so in WORLD_SIZE, mpirun
    in its own variables (the ones accelerate reads)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


@contextmanager
def run_directory(output: Path, accelerator, config: TrainingConfig, resume_from: Path | None):
    """The main process holds the run's lock while the body trains into `output`; first it removes what a killed
    run left and, unless resuming from a checkpoint, writes run.json."""
    lock = None
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        lock = lock_run(output)
    try:
        if accelerator.is_main_process:
            if resume_from is None and latest_checkpoint(output) is not None:  # a run started there meanwhile
                raise BalspecError(f"--output: {output} already holds a balspec run; add --resume to continue it "
                                   "or choose another directory")
            for path in stale_files(output):
                log.warning("removing %s, left by an interrupted run", path)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if resume_from is None:
                _write_json(output / RUN_FILE, {"balspec_version": __version__, "config": config_to_dict(config)})
        yield
    finally:
        if lock is not None:
            lock.close()


def training_record(config: TrainingConfig, progress: RunProgress, accelerator, data: dict, eval_metrics: dict,
                    resumed_at: int | None) -> dict:
    """The `training` field of balspec.json: what was trained, on what, how long and how fast."""
    device = device_name(accelerator.device)
    if accelerator.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"config": config_to_dict(config), "data": data, "steps": progress.step, "tokens_seen": progress.tokens,
            "wall_time_s": round(progress.wall_seconds, 2), "train_time_s": round(progress.train_seconds, 2),
            "tokens_per_s": round(progress.tokens / max(progress.train_seconds, 1e-9), 1), "device": device,
            "num_processes": accelerator.num_processes, "mixed_precision": config.train.mixed_precision,
            "peak_memory_mb": round(peak_mb, 1), "resumed_at_step": resumed_at, "eval": eval_metrics}


def append_metrics(accelerator, output: Path, line: dict) -> None:
    if accelerator.is_main_process:
        with writing(f"--output: cannot write {output / METRICS_FILE}"), open(output / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (the resumed run logs those steps again) and lines
    torn by a crash, with a warning."""
    if not path.exists():
        return
    keep = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            if line.strip():
                log.warning("%s: line %d is not a metrics line (torn by a crash?); dropped", path, number)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(f"--output: cannot write {path}"):
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(f"--output: cannot write {path}"):
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
