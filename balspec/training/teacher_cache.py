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
Train on it with `--set data.teacher_cache=DIR` (the recipe's data and base model must be the cache's). Several
caches, each made from one file, train as their union: `--set data.teacher_cache=A,B,C` with data.train naming
exactly their files (`open_cache`), so that data gathered in rounds is never sent through the teacher twice.
"""

from __future__ import annotations

import hashlib
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


def data_identity(config: TrainingConfig) -> dict:
    """The data settings that decide the training blocks: the text, its packing, and where the held-out blocks
    come from (split off data.train by train.seed when data.heldout is null: then those decide it too)."""
    identity = {key: getattr(config.data, key) for key in DATA_KEYS}
    identity["heldout"] = config.data.heldout
    if config.data.heldout is None:
        identity.update(heldout_blocks=config.data.heldout_blocks, split_seed=config.train.seed)
    return identity


def build_cache(config: TrainingConfig, output: str | Path, blocks: int) -> Path:
    """Write (or continue) the teacher cache of `blocks` blocks of config.data.train into `output`, with
    config.model and config.train.mixed_precision as training runs the teacher. Returns `output`.

    Raises BalspecError: fewer training blocks than asked, streamed data, several processes, `output` holding
    another cache or other files, a damaged cache, or a failed write (a full disk: the files are allocated
    whole when created)."""
    from accelerate import Accelerator

    from balspec.checkpoint import base_model_info
    from balspec.engine.architecture import architecture
    from balspec.exits import model_parts
    from balspec.files import check_output_dir, writing
    from balspec.models import load_model
    from balspec.training.data import load_blocks
    from balspec.training.loss import teacher_forward, teacher_stats
    from balspec.training.train import progress_bar

    output = Path(output)
    check_output_dir(output, "--output")
    if blocks < 1:
        raise BalspecError(f"--blocks: must be at least 1, got {blocks}")
    if config.data.streaming:
        raise BalspecError("data.streaming: a teacher cache holds packed blocks; cache local data (streaming false)")
    meta = {"format": FORMAT, "data": data_identity(config), "model_dtype": config.model.dtype,
            "mixed_precision": config.train.mixed_precision, "seed": config.train.seed, "blocks": blocks,
            "block_size": config.data.block_size, "dtype": "float32", "written": 0, "seconds": 0.0}
    old = None
    if (output / CACHE_FILE).exists():  # continue it: the same settings only (checked before the slow loads)
        old = _read_meta(output, "--output")
        _same(output, _identity(old), _identity(meta))
    elif output.exists() and any(output.iterdir()):
        raise BalspecError(f"--output: {output} holds other files (not a teacher cache); choose a new or empty one")
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=config.train.cpu)
    if accelerator.num_processes > 1:
        raise BalspecError("cache-teacher runs in one process (each would write the same files); "
                           "run it without accelerate launch")
    model, tokenizer = load_model(config.model.name, config.model.dtype, device=accelerator.device)
    dataset = load_blocks(config.data, tokenizer, seed=config.train.seed)[0].dataset
    if blocks > len(dataset):
        raise BalspecError(f"--blocks: data.train {config.data.train} gives {len(dataset)} blocks of "
                           f"{config.data.block_size} tokens, fewer than the {blocks} asked")
    meta.update(base_model=base_model_info(model), dataset_blocks=len(dataset), hidden_size=model.config.hidden_size)
    if old is not None:
        _same(output, _identity(old), _identity(meta))
        meta = old
    masked = config.data.train_on == "assistant"
    shape = (blocks, config.data.block_size)
    files = {"block_index": (np.int64, (blocks,)), "input_ids": (np.int32, shape),
             "teacher_hidden": (np.float32, (*shape, meta["hidden_size"])), "teacher_lse": (np.float32, shape),
             "teacher_top": (np.int32, shape), **({"loss_mask": (np.bool_, shape)} if masked else {})}
    parts = model_parts(model)
    arch = architecture(model, parts.rotary, parts.num_layers)
    with writing(f"--output: cannot write the teacher cache into {output}"):
        output.mkdir(parents=True, exist_ok=True)
        if old is None:
            _write_meta(output, meta)  # first: an interrupted first batch leaves a cache to continue
        arrays = {name: _array(output, name, dtype, size, meta["written"]) for name, (dtype, size) in files.items()}
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(meta["seed"]))[:blocks].numpy()
        arrays["block_index"][:] = order
        rows = dataset.with_format("numpy")
        done, spent = meta["written"], meta["seconds"]
        with progress_bar(True) as bar:
            task = bar.add_task("cache", total=blocks, completed=done, info="")
            while done < blocks:
                t0 = time.perf_counter()
                take = order[done:done + config.optim.batch_size]
                ascending = np.sort(take)
                chosen = rows[ascending.tolist()]
                pick = np.searchsorted(ascending, take)  # back to the drawn order
                ids = torch.as_tensor(np.asarray(chosen["input_ids"], dtype=np.int64)[pick])  # [batch, block]
                with accelerator.autocast():  # as training runs the teacher and its loss
                    hidden, _ = teacher_forward(model, ids.to(accelerator.device), [])
                    lse, top = teacher_stats(hidden.flatten(0, 1), parts.head, arch, config.loss.chunk_size)
                end = done + len(take)
                arrays["input_ids"][done:end] = ids.numpy()
                arrays["teacher_hidden"][done:end] = hidden.float().cpu().numpy()
                arrays["teacher_lse"][done:end] = lse.view(ids.shape).numpy()
                arrays["teacher_top"][done:end] = top.view(ids.shape).numpy()
                if masked:
                    arrays["loss_mask"][done:end] = np.asarray(chosen["loss_mask"], dtype=np.bool_)[pick]
                for array in arrays.values():
                    array.flush()
                spent += time.perf_counter() - t0
                done = end
                meta.update(written=done, seconds=round(spent, 2), teacher_dtype=str(hidden.dtype)[len("torch."):],
                            tokens_per_s=round(done * config.data.block_size / max(spent, 1e-9), 1))
                _write_meta(output, meta)  # after the arrays' flush: what it counts is on disk
                bar.update(task, completed=done, info=f"{meta['tokens_per_s']:,.0f} tok/s")
    return output


def _identity(meta: dict) -> dict:
    """What a cache was made from, flat: data settings, dtypes, seed, sizes and (once loaded) base model."""
    flat = {f"data.{k}": v for k, v in meta["data"].items()}
    flat.update({k: meta.get(k) for k in ("model_dtype", "mixed_precision", "seed", "blocks")})
    if "base_model" in meta:
        flat.update({"base model": meta["base_model"].get("weights_fingerprint"),
                     "number of training blocks": meta.get("dataset_blocks"), "hidden size": meta.get("hidden_size")})
    return flat


def _same(output: Path, theirs: dict, mine: dict) -> None:
    differs = [k for k in mine if theirs.get(k) != mine[k]]
    if differs:
        key = differs[0]
        raise BalspecError(f"--output: {output} holds a teacher cache made with another {key} "
                           f"({theirs.get(key)!r}, here {mine[key]!r}); choose another directory")


def _array(output: Path, name: str, dtype, shape: tuple, written: int) -> np.memmap:
    """The cache's .npy file `name`: created at its full shape with its disk space allocated (a full disk
    fails here, not later in a write through the mapping), or reopened to continue after `written` blocks."""
    file = output / f"{name}.npy"
    if written == 0:
        array = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
        with open(file, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(file))
        return array
    try:
        array = np.load(file, mmap_mode="r+")
    except (OSError, ValueError) as e:
        raise BalspecError(f"--output: {file} cannot be read ({e}); delete {output} and build it again") from None
    if array.shape != shape or array.dtype != dtype:
        raise BalspecError(f"--output: {file} is corrupt (shape {array.shape}, {array.dtype}); delete {output} "
                           "and build it again")
    return array


def _write_meta(output: Path, meta: dict) -> None:
    from balspec.files import partial_path

    target = output / CACHE_FILE
    partial = partial_path(target)
    partial.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, target)


def _read_meta(directory: Path, flag: str) -> dict:
    try:
        meta = json.loads((directory / CACHE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise BalspecError(f"{flag}: {directory / CACHE_FILE} cannot be read ({e})") from None
    keys = ("format", "data", "model_dtype", "mixed_precision", "seed", "blocks", "block_size", "written", "seconds")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in keys) \
            or not isinstance(meta["data"], dict):
        raise BalspecError(f"{flag}: {directory / CACHE_FILE} is not a balspec teacher cache of format {FORMAT}")
    return meta


class TeacherCache:
    """A complete cache, opened read-only (memory-mapped) for training: `rows(indices)` gives the blocks."""

    def __init__(self, directory: str | Path, model: torch.nn.Module, config: TrainingConfig,
                 part_of_union: bool = False):
        """Raises BalspecError: no cache there, an unfinished or damaged one, or one made for another base
        model, data settings, model dtype or mixed precision than `config`'s. `part_of_union`: one of several
        caches (open_cache), whose data.train is one of the files the run's data.train names, checked there."""
        from balspec.checkpoint import weights_fingerprint

        directory = Path(directory)
        flag = "data.teacher_cache"
        if not (directory / CACHE_FILE).is_file():
            raise BalspecError(f"{flag}: {directory} holds no teacher cache (make one with "
                               f"`balspec cache-teacher --recipe RECIPE --blocks N --output {directory}`)")
        meta = _read_meta(directory, flag)
        if meta["written"] < meta["blocks"]:
            raise BalspecError(f"{flag}: {directory} is unfinished ({meta['written']} of {meta['blocks']} "
                               "blocks); run the same `balspec cache-teacher` again to finish it")
        if meta.get("base_model", {}).get("weights_fingerprint") != weights_fingerprint(model):
            raise BalspecError(f"{flag}: {directory} was made with another base model "
                               f"({meta.get('base_model', {}).get('name')}) than model.name {config.model.name}")
        wanted = {**{f"data.{k}": v for k, v in data_identity(config).items()}, "model.dtype": config.model.dtype,
                  "train.mixed_precision": config.train.mixed_precision}
        have = {**{f"data.{k}": v for k, v in meta["data"].items()}, "model.dtype": meta["model_dtype"],
                "train.mixed_precision": meta["mixed_precision"]}
        if part_of_union:
            del wanted["data.train"]
        for key, value in wanted.items():
            if have.get(key) != value:
                raise BalspecError(f"{flag}: {directory} was made with {key} {have.get(key)!r}, this run has "
                                   f"{value!r}")
        names = ["input_ids", "teacher_hidden", "teacher_lse", "teacher_top"]
        names += ["loss_mask"] if config.data.train_on == "assistant" else []
        arrays = {}
        for name in names:
            try:
                arrays[name] = np.load(directory / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise BalspecError(f"{flag}: {directory / (name + '.npy')} cannot be read ({e})") from None
        shape = (meta["blocks"], meta["block_size"])
        if any(a.shape[:2] != shape for a in arrays.values()) or arrays["teacher_hidden"].ndim != 3:
            raise BalspecError(f"{flag}: {directory} is corrupt (its arrays' shapes disagree with "
                               f"{CACHE_FILE})")
        self.directory, self.meta = directory, meta
        self.input_ids, self.teacher_hidden = arrays["input_ids"], arrays["teacher_hidden"]  # [blocks, block(, h)]
        self.teacher_lse, self.teacher_top = arrays["teacher_lse"], arrays["teacher_top"]  # [blocks, block]
        self.loss_mask = arrays.get("loss_mask")  # [blocks, block] or None
        self.dtype = getattr(torch, meta.get("teacher_dtype", "float32"))  # the live teacher's: stored as float32
        digest = hashlib.sha256(np.ascontiguousarray(self.input_ids[:, :8]).tobytes()).hexdigest()[:16]
        self.identity = {"blocks": meta["blocks"], "seed": meta["seed"], "ids": digest}  # checked on resume

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, indices: list[int]):
        """A Batch of the cached blocks `indices`: ids [rows, block], teacher_hidden [rows, block, hidden],
        teacher_lse and teacher_top [rows, block], loss_mask where the run counts some positions only."""
        from balspec.training.data import Batch

        ids = torch.as_tensor(np.asarray(self.input_ids[indices], dtype=np.int64))
        hidden = torch.from_numpy(np.ascontiguousarray(self.teacher_hidden[indices])).to(self.dtype)
        lse = torch.from_numpy(np.ascontiguousarray(self.teacher_lse[indices]))
        top = torch.as_tensor(np.asarray(self.teacher_top[indices], dtype=np.int64))
        mask = None if self.loss_mask is None else torch.as_tensor(np.asarray(self.loss_mask[indices]))
        return Batch(ids, mask, hidden, lse, top)

    def info(self) -> dict:
        return {"teacher_cache": str(self.directory), "cached_blocks": len(self),
                "cache_tokens_per_s": self.meta.get("tokens_per_s")}


class CacheUnion:
    """Several complete caches trained on as one: block i of the union is block i - offset of the cache it falls
    in (in the order given). The same interface as TeacherCache: len, rows, identity, info."""

    def __init__(self, caches: list[TeacherCache]):
        self.caches = caches
        self.offsets = np.cumsum([0] + [len(c) for c in caches])  # [caches + 1]
        self.directory = ",".join(str(c.directory) for c in caches)
        self.identity = {"caches": [c.identity for c in caches]}  # checked on resume

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: list[int]):
        """A Batch of the union's blocks `indices`, in that order (see TeacherCache.rows for the shapes)."""
        from balspec.training.data import Batch

        parts = []
        for i in indices:
            which = int(np.searchsorted(self.offsets, i, side="right")) - 1
            parts.append(self.caches[which].rows([int(i - self.offsets[which])]))
        fields = ["input_ids", "loss_mask", "teacher_hidden", "teacher_lse", "teacher_top"]
        return Batch(*[None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                       for f in fields])

    def info(self) -> dict:
        rates = [c.meta.get("tokens_per_s") for c in self.caches]
        return {"teacher_cache": [str(c.directory) for c in self.caches], "cached_blocks": len(self),
                "cache_tokens_per_s": rates}


def open_cache(directories: list[str], model: torch.nn.Module, config: TrainingConfig):
    """The teacher cache data.teacher_cache names: one TeacherCache, or a CacheUnion of several, each made from
    one of the files data.train names, together exactly those files (in any order).

    Raises BalspecError: as TeacherCache does for any of them, when data.train names files no cache was made
    from or a cache was made from a file data.train does not name, or when several have no data.heldout."""
    from balspec.training.data import local_files

    if len(directories) == 1:
        return TeacherCache(directories[0], model, config)
    if config.data.heldout is None:  # split off the union, its held-out blocks could be blocks a cache trains on
        raise BalspecError("data.heldout: several teacher caches need a held-out file; the blocks split off "
                           "data.train would not be the ones each cache left out")
    caches = [TeacherCache(d, model, config, part_of_union=True) for d in directories]

    def files(source: str, key: str) -> set[str]:
        found = local_files(source, key)
        return {str(Path(f).resolve()) for f in (found or [source])}

    run = files(config.data.train, "data.train")
    made = {}
    for cache in caches:
        for f in files(cache.meta["data"]["train"], f"data.teacher_cache: {cache.directory}'s data.train"):
            if f in made:
                raise BalspecError(f"data.teacher_cache: {made[f]} and {cache.directory} were both made from {f}")
            made[f] = cache.directory
    if set(made) != run:
        missing, extra = sorted(run - set(made)), sorted(set(made) - run)
        said = [f"no cache holds {', '.join(missing)}"] * bool(missing) \
            + [f"data.train does not name {', '.join(extra)}"] * bool(extra)
        raise BalspecError(f"data.teacher_cache: the caches must be made from exactly the files data.train "
                           f"({config.data.train}) names: {'; '.join(said)}")
    return CacheUnion(caches)
