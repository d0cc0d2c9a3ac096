"""Teacher cache: the frozen full model's final normed hidden states over training blocks, computed once and
stored, so that training exits on those blocks (for several epochs, or in several runs) skips the teacher's
forward pass. EAGLE (Li et al. 2024, arXiv 2401.15077) precomputes its target model's hidden states the same way.

The teacher of a balcony run is the frozen model itself: its final normed hidden states give the KL's target
distribution (through the shared head) and, for draft-kind exits, the verified context. Those are fixed for a
block, whatever the exits. A training step on a cached block runs only trunk layers 1..max(exits) (to get the
exits' inputs; `trunk_forward`) and reads the rest from the cache: the same loss and gradients to the last bit
in fp32. With a reduced draft vocabulary (loss.draft_vocab) the cache's per-position logsumexp and argmax of the
teacher's logits also spare the teacher's head over the whole vocabulary (49,152 rows for SmolLM2, against 8,192
drafted): the same loss up to rounding. tests/test_teacher_cache.py checks both. On the default model (30
layers) a draft exit at layer 2 then runs 2 of 30 layers; measured tokens/s are in the README.

A cache directory holds, for `blocks` blocks of `data.block_size` tokens drawn (seeded, without repetition)
from the recipe's data.train:
    teacher_cache.json   what it was made from and how far it got (written last, after every batch)
    block_index.npy      int64 [blocks]: each block's index among the packed training blocks
    input_ids.npy        int32 [blocks, block_size]
    loss_mask.npy        bool [blocks, block_size] (data.train_on "assistant" only)
    teacher_hidden.npy   float32 [blocks, block_size, hidden]: 4 x hidden bytes per token (2,304 for SmolLM2-135M)
    teacher_lse.npy      float32 [blocks, block_size]: logsumexp of the teacher's logits (loss.teacher_stats)
    teacher_top.npy      int32 [blocks, block_size]: the teacher's argmax token
Building it is resumable: run the same command again and it continues after the last batch it recorded.
Train on it with `--set data.teacher_cache=DIR` (the recipe's data and base model must be the cache's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from balspec.errors import BalspecError
from balspec.training.config import TrainingConfig

CACHE_FILE = "teacher_cache.json"
FORMAT = 1
DATA_KEYS = ("train", "hub_config", "split", "text_field", "messages_field", "train_on", "block_size")


class _Stop(Exception):
    """Raised by a forward hook once the last trunk layer needed has run: the rest of the model is skipped."""


def trunk_forward(model: torch.nn.Module, input_ids: torch.Tensor, exits: list[int]) -> list[torch.Tensor]:
    """The trunk hidden states [batch, seq, hidden] after layer e for each e in `exits`, equal to those
    `loss.teacher_forward` returns (the model's own forward, the same kernels), but running layers 1..max(exits)
    only: forward hooks record the layers' outputs and stop the forward after the last one needed."""
    from balspec.exits import model_parts

    layers = model_parts(model).layers
    states: dict[int, torch.Tensor] = {}
    last = max(exits)

    def recorder(e: int):
        def hook(module, args, output):
            states[e] = output[0] if isinstance(output, tuple) else output
            if e == last:
                raise _Stop
        return hook

    handles = [layers[e - 1].register_forward_hook(recorder(e)) for e in set(exits)]
    try:
        with torch.no_grad():
            model(input_ids, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [states[e] for e in exits]


def data_identity(config: TrainingConfig) -> dict:
    """The data settings that decide the training blocks' tokens."""
    return {key: getattr(config.data, key) for key in DATA_KEYS}


def build_cache(config: TrainingConfig, output: str | Path, blocks: int) -> Path:
    """Write (or continue) the teacher cache of `blocks` blocks of config.data.train into `output`, with
    config.model and config.train.mixed_precision as training runs the teacher. Returns `output`.

    Raises BalspecError: fewer training blocks than asked, or `output` holding another cache or other files."""
    from accelerate import Accelerator

    from balspec.checkpoint import base_model_info
    from balspec.files import check_output_dir, writing
    from balspec.models import load_model
    from balspec.training.data import load_blocks
    from balspec.engine.architecture import architecture
    from balspec.exits import model_parts
    from balspec.training.loss import teacher_forward, teacher_stats
    from balspec.training.train import progress_bar

    output = Path(output)
    check_output_dir(output, "--output")
    if blocks < 1:
        raise BalspecError(f"--blocks: must be at least 1, got {blocks}")
    started = time.perf_counter()
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=config.train.cpu)
    model, tokenizer = load_model(config.model.name, config.model.dtype, device=accelerator.device)
    train_blocks, _ = load_blocks(config.data, tokenizer, seed=config.train.seed)
    dataset = train_blocks.dataset
    if blocks > len(dataset):
        raise BalspecError(f"--blocks: data.train {config.data.train} gives {len(dataset)} blocks of "
                           f"{config.data.block_size} tokens, fewer than the {blocks} asked")
    meta = {"format": FORMAT, "base_model": base_model_info(model), "data": data_identity(config),
            "model_dtype": config.model.dtype, "mixed_precision": config.train.mixed_precision,
            "seed": config.train.seed,
            "blocks": blocks, "dataset_blocks": len(dataset), "block_size": config.data.block_size,
            "hidden_size": model.config.hidden_size, "dtype": "float32", "written": 0, "seconds": 0.0}
    path = output / CACHE_FILE
    if path.exists():
        old = _read_meta(output)
        mine, theirs = _identity(meta), _identity(old)
        differs = [k for k in mine if theirs.get(k) != mine[k]]
        if differs:
            raise BalspecError(f"--output: {output} holds a teacher cache made with another {differs[0]} "
                               f"({theirs.get(differs[0])!r}, here {mine[differs[0]]!r}); choose another directory")
        meta = old
    elif output.exists() and any(output.iterdir()):
        raise BalspecError(f"--output: {output} holds other files (not a teacher cache); choose a new or empty one")
    output.mkdir(parents=True, exist_ok=True)
    masked = config.data.train_on == "assistant"
    shape = (blocks, config.data.block_size)
    with writing(f"--output: cannot write the teacher cache into {output}"):
        arrays = {"block_index": _array(output, "block_index", np.int64, (blocks,), meta["written"]),
                  "input_ids": _array(output, "input_ids", np.int32, shape, meta["written"]),
                  "teacher_hidden": _array(output, "teacher_hidden", np.float32,
                                           (*shape, meta["hidden_size"]), meta["written"])}
        if masked:
            arrays["loss_mask"] = _array(output, "loss_mask", np.bool_, shape, meta["written"])
        stats_written = meta.get("stats_written", 0)  # a cache of an earlier format has none yet
        arrays["teacher_lse"] = _array(output, "teacher_lse", np.float32, shape, stats_written)
        arrays["teacher_top"] = _array(output, "teacher_top", np.int32, shape, stats_written)
        parts = model_parts(model)
        arch = architecture(model, parts.rotary, parts.num_layers)

        def stats_of(hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # [rows, block, hidden]
            lse, top = teacher_stats(hidden.flatten(0, 1), parts.head, arch, config.loss.chunk_size)
            return lse.view(hidden.shape[:2]).numpy(), top.view(hidden.shape[:2]).numpy()

        for start in range(stats_written, meta["written"], config.optim.batch_size):  # blocks cached before
            end = min(start + config.optim.batch_size, meta["written"])
            hidden = torch.from_numpy(np.ascontiguousarray(arrays["teacher_hidden"][start:end]))
            hidden = hidden.to(accelerator.device, getattr(torch, meta.get("teacher_dtype", "float32")))
            arrays["teacher_lse"][start:end], arrays["teacher_top"][start:end] = stats_of(hidden)
            meta["stats_written"] = end
        if stats_written < meta["written"]:
            arrays["teacher_lse"].flush()
            arrays["teacher_top"].flush()
            _write_meta(output, meta)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(meta["seed"]))[:blocks].numpy()
        arrays["block_index"][:] = order
        rows = dataset.with_format("numpy")
        batch = config.optim.batch_size
        done, spent = meta["written"], meta["seconds"]
        with progress_bar(True) as bar:
            task = bar.add_task("cache", total=blocks, completed=done, info="")
            while done < blocks:
                t0 = time.perf_counter()
                take = order[done:done + batch]
                chosen = rows[np.sort(take).tolist()]
                position = {int(b): i for i, b in enumerate(np.sort(take))}
                pick = [position[int(b)] for b in take]  # back to the drawn order
                ids = torch.as_tensor(np.asarray(chosen["input_ids"], dtype=np.int64)[pick])  # [batch, block]
                with accelerator.autocast():
                    hidden, _ = teacher_forward(model, ids.to(accelerator.device), [])
                meta["teacher_dtype"] = str(hidden.dtype).removeprefix("torch.")  # float32 on disk; cast back
                end = done + len(take)
                arrays["input_ids"][done:end] = ids.numpy()
                arrays["teacher_hidden"][done:end] = hidden.float().cpu().numpy()
                if masked:
                    arrays["loss_mask"][done:end] = np.asarray(chosen["loss_mask"], dtype=np.bool_)[pick]
                arrays["teacher_lse"][done:end], arrays["teacher_top"][done:end] = stats_of(hidden)
                for array in arrays.values():
                    array.flush()
                spent += time.perf_counter() - t0
                done = end
                meta.update(written=done, stats_written=done, seconds=round(spent, 2),
                            tokens_per_s=round(done * config.data.block_size / max(spent, 1e-9), 1))
                _write_meta(output, meta)
                bar.update(task, completed=done, info=f"{meta['tokens_per_s']:,.0f} tok/s")
    meta["wall_seconds"] = round(time.perf_counter() - started, 2)
    return output


def _identity(meta: dict) -> dict:
    """What a cache was made from, flat: base model, data settings, dtypes, seed, sizes."""
    flat = {f"data.{k}" if k not in ("block_size",) else k: v for k, v in meta["data"].items()}
    flat["base model"] = meta["base_model"].get("weights_fingerprint")
    flat.update({k: meta.get(k) for k in ("model_dtype", "mixed_precision", "seed", "blocks", "hidden_size")})
    return flat


def _array(output: Path, name: str, dtype, shape: tuple, written: int) -> np.memmap:
    """The cache's .npy file `name`, created at its full shape, or opened to continue after `written` blocks."""
    file = output / f"{name}.npy"
    if written > 0 and file.exists():
        array = np.load(file, mmap_mode="r+")
        if array.shape == shape and array.dtype == dtype:
            return array
    return np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)


def _write_meta(output: Path, meta: dict) -> None:
    from balspec.files import partial_path

    target = output / CACHE_FILE
    partial = partial_path(target)
    partial.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, target)


def _read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / CACHE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise BalspecError(f"data.teacher_cache: {directory / CACHE_FILE} cannot be read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BalspecError(f"data.teacher_cache: {directory / CACHE_FILE} is not a balspec teacher cache "
                           f"of format {FORMAT}")
    return meta


class TeacherCache:
    """A complete cache, opened read-only (memory-mapped) for training: `rows(indices)` gives the blocks."""

    def __init__(self, directory: str | Path, model: torch.nn.Module, config: TrainingConfig):
        """Raises BalspecError: no cache there, an unfinished one, or one made for another base model, data
        settings or model dtype than `config`'s."""
        from balspec.checkpoint import weights_fingerprint

        directory = Path(directory)
        if not (directory / CACHE_FILE).is_file():
            raise BalspecError(f"data.teacher_cache: {directory} holds no teacher cache (make one with "
                               f"`balspec cache-teacher --recipe RECIPE --blocks N --output {directory}`)")
        meta = _read_meta(directory)
        if meta["written"] < meta["blocks"]:
            raise BalspecError(f"data.teacher_cache: {directory} is unfinished ({meta['written']} of "
                               f"{meta['blocks']} blocks); run the same `balspec cache-teacher` again to finish it")
        if meta["base_model"].get("weights_fingerprint") != weights_fingerprint(model):
            raise BalspecError(f"data.teacher_cache: {directory} was made with another base model "
                               f"({meta['base_model'].get('name')}) than model.name {config.model.name}")
        wanted = {**data_identity(config), "model_dtype": config.model.dtype,
                  "mixed_precision": config.train.mixed_precision}
        have = {**meta["data"], "model_dtype": meta["model_dtype"], "mixed_precision": meta["mixed_precision"]}
        for key, value in wanted.items():
            if have.get(key) != value:
                raise BalspecError(f"data.teacher_cache: {directory} was made with {key} {have.get(key)!r}, "
                                   f"this run has {value!r}")
        self.directory, self.meta = directory, meta
        self.input_ids = np.load(directory / "input_ids.npy", mmap_mode="r")  # [blocks, block]
        self.teacher_hidden = np.load(directory / "teacher_hidden.npy", mmap_mode="r")  # [blocks, block, hidden]
        self.teacher_lse = self.teacher_top = None  # a cache of an earlier format: the teacher's head runs
        if meta.get("stats_written", 0) == meta["written"]:
            self.teacher_lse = np.load(directory / "teacher_lse.npy", mmap_mode="r")  # [blocks, block]
            self.teacher_top = np.load(directory / "teacher_top.npy", mmap_mode="r")  # [blocks, block]
        mask = directory / "loss_mask.npy"
        self.loss_mask = np.load(mask, mmap_mode="r") if config.data.train_on == "assistant" else None
        if self.loss_mask is None and mask.exists() or self.loss_mask is not None and not mask.exists():
            raise BalspecError(f"data.teacher_cache: {directory} is incomplete (loss_mask.npy)")
        if self.teacher_hidden.shape[:2] != self.input_ids.shape or len(self.input_ids) != meta["blocks"]:
            raise BalspecError(f"data.teacher_cache: {directory} is corrupt (its arrays' shapes disagree)")

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, indices: list[int]):
        """A Batch of the cached blocks `indices` with their teacher_hidden."""
        from balspec.training.data import Batch

        ids = torch.as_tensor(np.asarray(self.input_ids[indices], dtype=np.int64))  # [rows, block]
        hidden = torch.from_numpy(np.ascontiguousarray(self.teacher_hidden[indices]))  # [rows, block, hidden]
        hidden = hidden.to(getattr(torch, self.meta.get("teacher_dtype", "float32")))  # the live teacher's dtype
        mask = None if self.loss_mask is None else torch.as_tensor(np.asarray(self.loss_mask[indices]))
        if self.teacher_lse is None:
            return Batch(ids, mask, hidden)
        lse = torch.from_numpy(np.ascontiguousarray(self.teacher_lse[indices]))  # [rows, block]
        top = torch.as_tensor(np.asarray(self.teacher_top[indices], dtype=np.int64))  # [rows, block]
        return Batch(ids, mask, hidden, lse, top)

    def info(self) -> dict:
        return {"teacher_cache": str(self.directory), "cached_blocks": len(self),
                "cache_tokens_per_s": self.meta.get("tokens_per_s")}
