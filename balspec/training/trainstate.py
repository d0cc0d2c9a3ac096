"""A training checkpoint's resumable state, written and read by balspec itself: safetensors for tensors, JSON
for everything else, never pickle (a pickle planted in a run directory would run code on --resume).

Beside the checkpoint's exits (exits.safetensors: the fp32 balcony weights, checked against balspec.json):
    trainer.json            format, processes, progress, scheduler, optimizer param groups, grad scaler
    optimizer.safetensors   optimizer state tensors, "state.<param index>.<name>"
    rank-<r>.json           process r's data position
    rank-<r>.safetensors    process r's torch RNG states (CPU, and CUDA on a GPU)
The training's own random draws are seeded from (seed, step, process), so they need no saved state; the RNG
states are kept for anything else that draws from torch's global generator.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from balspec.errors import BalspecError
from balspec.files import apply_umask

STATE_FORMAT = 1
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def save_state(directory: Path, accelerator, optimizer, scheduler, blocks, progress) -> None:
    """Write this process's part of the state into `directory` (a checkpoint's temp directory); every process
    must call it."""
    from safetensors.torch import save_file

    rank = accelerator.process_index
    save_file(rng_state(accelerator.device), directory / f"rank-{rank}.safetensors")
    apply_umask(directory / f"rank-{rank}.safetensors")  # safetensors writes 0600
    _write_json(directory / f"rank-{rank}.json", {"data": blocks.state_dict()})
    if not accelerator.is_main_process:
        return
    trainer = {"format": STATE_FORMAT, "processes": accelerator.num_processes, "progress": progress.state_dict(),
               "scheduler": scheduler.state_dict(), "optimizer": None,
               "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
    if not _sharded(accelerator):
        tensors, trainer["optimizer"] = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, directory / OPTIMIZER_FILE)
        apply_umask(directory / OPTIMIZER_FILE)
    _write_json(directory / TRAINER_FILE, trainer)


def load_state(directory: Path, accelerator, exits, optimizer, scheduler, blocks, progress) -> None:
    """Restore the balcony weights, optimizer, scheduler, data position, progress and RNG saved in `directory`.
    Anything damaged, from another balspec or another setup stops with one line; nothing is unpickled."""
    from safetensors.torch import load_file

    from balspec.checkpoint import DRAFT_VOCAB_KEY, WEIGHTS_FILE

    trainer_file = directory / TRAINER_FILE
    if not trainer_file.exists():
        raise BalspecError(f"--resume: {directory} was written by an older balspec (accelerate's pickled state), "
                           "which is never loaded; start a new run, with --set exits.init_from=<it> to keep its weights")
    with _reading(trainer_file):
        trainer = json.loads(trainer_file.read_text())
    if not isinstance(trainer, dict) or trainer.get("format") != STATE_FORMAT:
        raise BalspecError(f"--resume: {trainer_file} is not a balspec training state of format {STATE_FORMAT}")
    if trainer.get("processes") != accelerator.num_processes:
        raise BalspecError(f"--resume: {directory} was written by {trainer.get('processes')} processes; "
                           f"resume it with as many (now {accelerator.num_processes})")
    if trainer.get("optimizer") is None:
        raise BalspecError(f"--resume: {directory} was written under FSDP or DeepSpeed, whose sharded optimizer "
                           "state balspec does not save; start a new run with --set exits.init_from=<it>")
    weights = _checked_weights(directory)
    weights.pop(DRAFT_VOCAB_KEY, None)  # not a weight: train() took it from this checkpoint (saved_draft_vocab)
    with _reading(directory / WEIGHTS_FILE):
        exits.load_state_dict(weights)
    with _reading(directory / OPTIMIZER_FILE):
        optimizer.load_state_dict(join_optimizer_state(load_file(directory / OPTIMIZER_FILE), trainer["optimizer"],
                                                       optimizer))
    with _reading(trainer_file):
        scheduler.load_state_dict(trainer["scheduler"])
        progress.load_state_dict(trainer["progress"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(trainer["scaler"])
    rank = accelerator.process_index
    with _reading(directory / f"rank-{rank}.json"):
        blocks.load_state_dict(json.loads((directory / f"rank-{rank}.json").read_text())["data"])
    with _reading(directory / f"rank-{rank}.safetensors"):
        set_rng_state(load_file(directory / f"rank-{rank}.safetensors"), accelerator.device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}  # uint8 [5056]
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (tensors for safetensors, the rest for JSON)."""
    tensors, other = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "other": other}


def join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict, optimizer) -> dict:
    """The inverse of `split_optimizer_state`, with JSON's lists turned back into the tuples (betas) the live
    optimizer holds."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in saved["other"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in group.items()}
              for group, live in zip(saved["param_groups"], optimizer.state_dict()["param_groups"])]
    return {"state": state, "param_groups": groups}


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def saved_draft_vocab(directory: Path, model) -> torch.Tensor | None:
    """The draft vocabulary [V] (int64 token ids) a checkpoint stored beside its weights, or None. Read before
    the run's loss is built (it may depend on it); the weights' base is checked by the resume, not here: a run
    that trains the base saved its checkpoint for the base as trained."""
    from balspec.checkpoint import DRAFT_VOCAB_KEY, WEIGHTS_FILE, checked_vocab

    vocab = _checked_weights(directory).get(DRAFT_VOCAB_KEY)
    return None if vocab is None else checked_vocab(vocab, model, f"--resume: the draft vocabulary in {directory / WEIGHTS_FILE}")


def _checked_weights(directory: Path) -> dict[str, torch.Tensor]:
    """exits.safetensors of a checkpoint, its checksum matched against balspec.json; any failure in one line."""
    from safetensors.torch import load_file

    from balspec.checkpoint import META_FILE, WEIGHTS_FILE, sha256_file

    weights_file = directory / WEIGHTS_FILE
    with _reading(directory / META_FILE):
        checksum = json.loads((directory / META_FILE).read_text())["weights_sha256"]
    with _reading(weights_file):
        if sha256_file(weights_file) != checksum:
            raise ValueError(f"its checksum does not match {META_FILE}")
        return load_file(weights_file)


@contextmanager
def _reading(path: Path):
    """Any failure inside (file missing, damaged, not fitting this run) as one line naming the file."""
    try:
        yield
    except BalspecError:
        raise
    except Exception as e:  # json, safetensors and load_state_dict each raise their own types
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BalspecError(f"--resume: {path} is damaged or does not fit this run ({reason})") from None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
