"""Corpus -> fixed-length token blocks for distillation.

Records are plain text or conversations; conversations are rendered with the tokenizer's chat template
(an instruct model's exits must predict what it sees at generation time). Documents are concatenated with
EOS between them and cut into blocks of `block_size` tokens. Local files are tokenised once (datasets
caches the result); streamed sources (hub corpora too big for the disk) are packed on the fly.
Both kinds of block source resume exactly from their `state_dict`. With data.train_on "assistant" each
block also carries a loss mask: the positions whose next token is in an assistant turn.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from balspec.errors import BalspecError
from balspec.training.config import DataConfig

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}
_PACK_BATCH = 1000  # records per packing batch; at most block_size - 1 tokens are dropped per batch


@dataclass
class Batch:
    """Token blocks and, when the loss counts only some positions, which ones; from a teacher cache, also the
    full model's final normed hidden states there (teacher_cache.py)."""

    input_ids: torch.Tensor  # [rows, block]
    loss_mask: torch.Tensor | None = None  # [rows, block] bool: positions the loss counts; None: all of them
    teacher_hidden: torch.Tensor | None = None  # [rows, block, hidden], or None: run the teacher
    teacher_lse: torch.Tensor | None = None  # [rows, block] float32: logsumexp of the teacher's logits
    teacher_top: torch.Tensor | None = None  # [rows, block] long: the teacher's argmax token

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, rows) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self._tensors()))

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple:
        return self.input_ids, self.loss_mask, self.teacher_hidden, self.teacher_lse, self.teacher_top


def _batch(rows: dict) -> Batch:
    """A Batch of rows {"input_ids": [...], "loss_mask"?: [...]} given column-wise."""
    ids = torch.as_tensor(np.asarray(rows["input_ids"], dtype=np.int64))
    mask = rows.get("loss_mask")
    return Batch(ids, None if mask is None else torch.as_tensor(np.asarray(mask, dtype=np.bool_)))


class PackedBlocks:
    """Blocks of a tokenised map-style dataset, in a new seeded order each epoch.

    Every process walks the same global order; of each global batch (batch x processes rows) process r
    takes rows r*batch .. (r+1)*batch - 1. The position is (epoch, index), so resuming is exact.
    """

    def __init__(self, dataset, seed: int, rank: int = 0, world: int = 1):
        self.dataset = dataset.with_format("numpy") if dataset is not None else None
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.index = 0, 0
        self._order = (-1, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        while len(rows) < batch_size * self.world:
            order = self._epoch_order()
            take = order[self.index:self.index + batch_size * self.world - len(rows)]
            rows.extend(take.tolist())
            self.index += len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        mine = rows[self.rank * batch_size:(self.rank + 1) * batch_size]
        return self._fetch(mine)  # [batch, block]

    def _fetch(self, rows: list[int]) -> Batch:
        return _batch(self.dataset[rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _epoch_order(self) -> torch.Tensor:
        if self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self), generator=generator))
        return self._order[1]


class CachedBlocks(PackedBlocks):
    """The blocks of a teacher cache (teacher_cache.py), each with the teacher's hidden states, walked as
    PackedBlocks walks a dataset: a new seeded order each epoch, resumable at (epoch, index)."""

    def __init__(self, cache, seed: int, rank: int = 0, world: int = 1):
        super().__init__(None, seed, rank, world)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def _fetch(self, rows: list[int]) -> Batch:
        return self.cache.rows(rows)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cache": self.cache.identity}

    def load_state_dict(self, state: dict) -> None:
        """Raises BalspecError: the checkpoint's position is in another cache than the one now at that path."""
        if state.get("cache") != self.cache.identity:
            raise BalspecError(f"data.teacher_cache: {self.cache.directory} is not the cache this run was trained "
                               f"on ({state.get('cache')} then, {self.cache.identity} now); resume with that one")
        super().load_state_dict(state)


class StreamedBlocks:
    """Blocks of a streamed (iterable) dataset: this process's shard, restarted with a new epoch at its end."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = 0
        self._rows = iter(dataset)

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        while len(rows) < batch_size:
            try:
                rows.append(next(self._rows))
            except StopIteration:
                self.epoch += 1
                self.dataset.set_epoch(self.epoch)
                self._rows = iter(self.dataset)
        return _batch({key: [r[key] for r in rows] for key in rows[0]})  # [batch, block]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.dataset.set_epoch(self.epoch)
        self.dataset.load_state_dict(state["dataset"])
        self._rows = iter(self.dataset)


def load_blocks(config: DataConfig, tokenizer, seed: int = 0, rank: int = 0, world: int = 1):
    """(training blocks, this process's share; all held-out blocks, a Batch [heldout_blocks, block_size])."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    train = pack(*read_records(config.train, config, "data.train"), tokenizer, config)
    heldout = None
    if config.heldout is not None and config.heldout_blocks > 0:
        heldout = pack(*read_records(config.heldout, config, "data.heldout"), tokenizer, config)
    if config.streaming:
        return _streamed_blocks(train, heldout, config, seed, rank, world)
    return _packed_blocks(train, heldout, config, seed, rank, world)


def read_records(source: str, config: DataConfig, key: str):
    """(records, plain_text): a datasets Dataset (IterableDataset when streaming) of the raw records of
    `source`, and whether they are the lines of text files (which join back without EOS between them)."""
    import datasets

    files = local_files(source, key)
    builder = _builder(files, key) if files is not None else None
    try:
        if files is None:
            records = datasets.load_dataset(source, config.hub_config, split=config.split,
                                            streaming=config.streaming)
        else:
            options = {"keep_linebreaks": True} if builder == "text" else {}
            records = datasets.load_dataset(builder, data_files=files, split="train", streaming=config.streaming,
                                            **options)
    except Exception as e:  # datasets raises many types for unreadable files and unreachable hubs
        while e.__cause__ is not None:  # the root cause says what is wrong, e.g. records' fields differ
            e = e.__cause__
        last = (str(e).strip().splitlines() or [""])[-1]
        hint = ("; records with different fields must be interleaved: the reader takes the fields from the "
                "first records") if "column names don't match" in last else ""
        raise BalspecError(f"{key}: cannot read {source} ({type(e).__name__}: {last}){hint}") from None
    return records, builder == "text"


def local_files(source: str, key: str) -> list[str] | None:
    """The files `source` names (a file, a directory, a glob), or None when it names a hub dataset."""
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
    elif path.is_file():
        files = [str(path)]
    elif path.suffix in _BUILDERS or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise BalspecError(f"{key}: {source} does not exist")
    else:
        return None
    if not files:
        raise BalspecError(f"{key}: {source} holds no .txt, .jsonl, .json or .parquet files")
    if all(Path(f).stat().st_size == 0 for f in files):
        raise BalspecError(f"{key}: {source} is empty")
    return files


def pack(records, plain_text: bool, tokenizer, config: DataConfig):
    """Records -> rows {"input_ids": [block_size]} (and "loss_mask" when data.train_on is "assistant"):
    rendered, tokenised, concatenated, cut into blocks."""
    eos = tokenizer.eos_token_id
    columns = records.column_names
    if columns is None:  # a stream that does not declare its fields: read them off the first record
        columns = list(next(iter(records.take(1)), {}))
    if config.messages_field in columns and tokenizer.chat_template is None:
        raise BalspecError(f"data: records hold conversations ({config.messages_field!r}) but the model's "
                           "tokenizer has no chat template")
    masked = config.train_on == "assistant"
    if masked and not tokenizer.is_fast:
        raise BalspecError("data.train_on: 'assistant' needs a fast tokenizer (token offsets); use 'all'")

    def pack_batch(batch: dict) -> dict:
        texts, spans = render(batch, tokenizer, config, with_spans=True) if masked else \
            (render(batch, tokenizer, config), None)
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=masked)
        stream, counted = [], []  # counted[i]: token i is one the loss trains on
        for r, ids in enumerate(encoded["input_ids"]):
            stream.extend(ids)
            if masked:
                counted.extend(_in_spans(encoded["offset_mapping"][r], spans[r]))
            if not plain_text and eos is not None:
                stream.append(eos)
                counted.append(False)
        n = len(stream) // config.block_size
        rows = {"input_ids": [stream[i * config.block_size:(i + 1) * config.block_size] for i in range(n)]}
        if masked:  # position t predicts token t + 1: its loss counts when that token does
            counted = counted[1:] + [False]
            rows["loss_mask"] = [counted[i * config.block_size:(i + 1) * config.block_size] for i in range(n)]
        return rows

    return records.map(pack_batch, batched=True, batch_size=_PACK_BATCH, remove_columns=columns or None)


def _in_spans(offsets: list, spans: list[tuple[int, int]] | None) -> list[bool]:
    """Per token, whether its first character lies in one of `spans` (None: the whole text counts)."""
    if spans is None:
        return [True] * len(offsets)
    return [any(a <= start < b for a, b in spans) for start, _ in offsets]


def render(batch: dict, tokenizer, config: DataConfig, with_spans: bool = False):
    """The text of each record: its conversation through the chat template, else its text field. With
    with_spans, (texts, spans): per record the character spans of its assistant turns, None for plain text."""
    conversations = batch.get(config.messages_field)
    texts = batch.get(config.text_field)
    count = len(next(iter(batch.values())))
    out, spans = [], []
    for i in range(count):
        if conversations is not None and conversations[i]:
            out.append(tokenizer.apply_chat_template(conversations[i], tokenize=False))
            spans.append(assistant_spans(conversations[i], out[-1], tokenizer) if with_spans else None)
        elif texts is not None and texts[i] is not None:
            out.append(texts[i])
            spans.append(None)
        else:
            raise BalspecError(f"data: a record has neither a {config.text_field!r} nor a "
                               f"{config.messages_field!r} field (it has {', '.join(batch)}); "
                               "set data.text_field or data.messages_field")
    return (out, spans) if with_spans else out


def assistant_spans(messages: list[dict], text: str, tokenizer) -> list[tuple[int, int]]:
    """Character spans of `text` (the rendered conversation) that hold its assistant turns: from the end of
    the generation prompt before each turn to the end of the turn as rendered (content and end marker)."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i == 0:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise BalspecError("data.train_on: the chat template does not render a conversation as the "
                               "rendering of its earlier turns plus the new one, so assistant turns cannot be "
                               "located; use data.train_on=all")
        spans.append((len(before), len(through)))
    return spans


def _builder(files: list[str], key: str) -> str:
    kinds = {_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        suffixes = ", ".join(sorted({Path(f).suffix or "(none)" for f in files}))
        raise BalspecError(f"{key}: mixes or holds unsupported file kinds ({suffixes}); "
                           "use one of .txt, .jsonl/.json, .parquet")
    return kinds.pop()


def _packed_blocks(train, heldout, config: DataConfig, seed: int, rank: int, world: int):
    if len(train) == 0:
        raise BalspecError(_too_small("data.train", config.train, 0, config))
    if heldout is None and config.heldout_blocks > 0:
        if len(train) <= config.heldout_blocks:
            raise BalspecError(_too_small("data.train", config.train, len(train), config,
                                          f" (more than data.heldout_blocks={config.heldout_blocks} are needed)"))
        split = train.train_test_split(test_size=config.heldout_blocks, seed=seed)
        train, heldout = split["train"], split["test"]
    if heldout is not None and len(heldout) == 0:
        raise BalspecError(_too_small("data.heldout", config.heldout, 0, config))
    if heldout is not None:
        eval_blocks = _batch(heldout.with_format("numpy")[:config.heldout_blocks])  # [heldout, block]
    else:
        eval_blocks = Batch(torch.zeros((0, config.block_size), dtype=torch.long))
    return PackedBlocks(train, seed, rank, world), eval_blocks


def _streamed_blocks(train, heldout, config: DataConfig, seed: int, rank: int, world: int):
    from datasets.distributed import split_dataset_by_node

    if heldout is None and config.heldout_blocks > 0:
        heldout, train = train.take(config.heldout_blocks), train.skip(config.heldout_blocks)
    if next(iter(train.take(1)), None) is None:
        raise BalspecError(_too_small("data.train", config.train, 0, config))
    rows = list(heldout.take(config.heldout_blocks)) if heldout is not None else []
    if rows:
        eval_blocks = _batch({key: [r[key] for r in rows] for key in rows[0]})  # [heldout, block]
    else:
        eval_blocks = Batch(torch.zeros((0, config.block_size), dtype=torch.long))
    if config.shuffle_buffer > 0:  # after the held-out blocks are split off, so they never reach training
        train = train.shuffle(buffer_size=config.shuffle_buffer, seed=seed)
    if world > 1:
        train = split_dataset_by_node(train, rank=rank, world_size=world)
    return StreamedBlocks(train), eval_blocks


def _too_small(key: str, source: str, blocks: int, config: DataConfig, extra: str = "") -> str:
    return (f"{key}: {source} gives {blocks} blocks of data.block_size={config.block_size} tokens{extra}; "
            "give more text or a smaller data.block_size")
