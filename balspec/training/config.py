"""Training configuration: typed dataclasses, YAML recipes that mirror them, `--set` overrides.

One source of truth: every setting is a dataclass field documented where it is declared. A recipe is a
YAML file with the same nested sections (model / exits / data / optim / loss / train); `--set key=value`
and the CLI flags override it, in that order. Everything a user can get wrong is checked in `validate`
or while merging, and the error names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balspec.errors import BalspecError

MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
TRAIN_ON = ("all", "assistant")


@dataclass
class ModelConfig:
    name: str = "default"
    """Base model: a local HF directory, a hub id, "default" (embedded SmolLM2-135M-Instruct) or "tiny-random"."""
    dtype: str = "float32"
    """Dtype of the frozen base weights: float32, bfloat16 or float16. Balconies always train in float32."""


@dataclass
class ExitsConfig:
    layers: list[int] = field(default_factory=lambda: [8, 12, 16])
    """Exit layers e (1 <= e < N): balcony e reads the output of trunk layer e. A draft-kind exit may be 0: its
    balcony reads the token embeddings, as EAGLE's draft head does (no trunk layer runs twice per cycle)."""
    norm_init: str = "final"
    """Norm of each balcony starts as a copy of: "final" (the final norm) or "next-input" (trunk layer e+1's)."""
    layer_init: str = "last"
    """Balcony layers start as a copy of the base's "last" decoder layer (paper) or "random"."""
    balcony_layers: int = 1
    """Decoder layers per balcony (the paper uses one)."""
    draft: list[int] = field(default_factory=list)
    """Exits among `layers` that are of the draft kind (DESIGN.md 3b): a balcony whose every layer also reads the
    full model's final states of verified positions. Faster to draft with, but no standalone sub-model."""
    draft_chain: int = 3
    """Draft-kind exits: training simulates chains of up to this many drafts (each position is trained as if
    0..draft_chain-1 drafted positions before it were not yet verified, uniformly)."""
    module: str = "layer"
    """What a balcony layer is (paper appendix B): a copy of the last decoder "layer", of its "mlp" half only (post-
    attention norm + MLP, with the residual) or of its "attention" half only (input norm + attention)."""
    train_base: bool = False
    """Train the base model with the balconies (the paper's unfrozen ablation). The loss adds the full model's own
    KL to the original (a frozen copy), and every exit's KL is to that original; the run directory then also
    holds the trained model (a Hugging Face directory: --model OUTPUT finds the exits beside it)."""
    init_from: str | None = None
    """An exits checkpoint whose balconies start this run instead of the init above (continue training on new
    data); it must hold every exit of `layers` (or exits.init_exit), with the same balcony_layers (draft exits: as
    many or fewer; the added layers start as the identity), for the same base model."""
    init_exit: int | None = None
    """With init_from: start every exit of `layers` from this one exit of init_from instead of the same exit
    (e.g. a draft exit 0 from a trained draft exit 2; the balconies have the same shapes at every exit)."""


@dataclass
class DataConfig:
    train: str = "data/corpus/train.jsonl"
    """Training text: a file, directory or glob (.txt, .jsonl/.json, .parquet) or a hub dataset name."""
    heldout: str | None = None
    """Held-out text, same kinds as `train`; null holds out `heldout_blocks` random blocks of `train`."""
    hub_config: str | None = None
    """Configuration of a hub dataset, e.g. cosmopedia-v2 for HuggingFaceTB/smollm-corpus."""
    split: str = "train"
    """Split to read from a hub dataset (local files always give one split, "train")."""
    streaming: bool = False
    """Read and pack on the fly instead of tokenising everything first: for corpora too big for the disk."""
    shuffle_buffer: int = 1000
    """Streaming only: blocks shuffled within a buffer of this many blocks (0: keep stream order)."""
    text_field: str = "text"
    """Field of a record that holds plain text."""
    messages_field: str = "messages"
    """Field of a record that holds a conversation [{"role", "content"}...], rendered with the chat template."""
    train_on: str = "all"
    """Positions the loss counts: "all", or "assistant": only those whose next token belongs to an assistant
    turn of a conversation (its content and end-of-turn marker), the text an exit drafts at generation time.
    The other tokens stay in the context. Plain-text records count whole either way."""
    block_size: int = 512
    """Tokens per training sequence: documents are concatenated (EOS between them) and cut into blocks."""
    heldout_blocks: int = 16
    """Blocks used for the per-exit evaluation (0: no evaluation)."""
    teacher_cache: list[str] | None = None
    """Directories `balspec cache-teacher` wrote for this data and base model: train on their blocks, reading the
    full model's hidden states there instead of running the teacher (only trunk layers 1..max(exits) run). One
    cache is one made from data.train; several (`a,b,c`) are the union of caches made from one file each, and
    data.train must name exactly those files (e.g. a glob `data/self[6-9]/train.jsonl`)."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate (paper: 5e-4), reached after warmup, then cosine decay."""
    min_lr_ratio: float = 0.0
    """Learning rate at the last step, as a fraction of `lr`."""
    warmup_steps: int = 100
    """Linear warmup from 0, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on norms)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    batch_size: int = 4
    """Sequences per process per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step: sequences per step = batch_size x grad_accum x processes."""


@dataclass
class LossConfig:
    ce_weight: float = 0.0
    """Weight of next-token cross-entropy added to each exit's KL (paper: 0, it does not help)."""
    top1_weight: float = 0.0
    """Weight of a cross-entropy to the teacher's top-1 token (the one greedy verification accepts) added to each
    exit's KL; over the draft vocabulary with loss.draft_vocab (positions whose top-1 lies outside it add none).
    Exclusive with ce_weight; balconies on a frozen base only."""
    sorted_target: str = "ce"
    """Method sorted: each sub-model's loss is next-token cross-entropy on the data ("ce", SoFT) or KL to the
    original full model, a frozen copy ("kl", plus ce_weight x CE)."""
    chunk_size: int = 1024
    """Positions per chunk of the fused LM-head + KL: bounds memory at chunk x vocab floats per exit."""
    draft_vocab: str | None = None
    """Draft-kind exits only: train on the KL over a reduced draft vocabulary, the only tokens a reduced draft
    head proposes (the teacher's mass outside it is dropped), which shrinks each exit's head products to its
    size. "default" takes the shipped exits' vocabulary, or give an exits directory that holds one; the
    trained exits keep it. null: the KL over the whole vocabulary."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps; also the length of the cosine schedule."""
    output: str = "runs/balspec"
    """Run directory: final exits, checkpoints/, metrics.jsonl, run.json."""
    seed: int = 0
    mixed_precision: str = "no"
    """accelerate mixed precision: no, bf16 or fp16 (on a CPU without bf16 units "no" is faster)."""
    gradient_checkpointing: bool = False
    """Recompute balcony activations in the backward pass instead of storing them."""
    log_every: int = 10
    """Steps between progress/metrics lines."""
    eval_every: int = 200
    """Steps between held-out evaluations (0: only at the end)."""
    save_every: int = 500
    """Steps between resumable checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept under checkpoints/."""
    cpu: bool = False
    """Train on the CPU even when an accelerator is present."""


@dataclass
class TrainingConfig:
    method: str = "balcony"
    """"balcony": train balconies on the frozen base (the paper). "sorted": Sorted Fine-Tuning (SoFT, Kavehzadeh
    et al. 2024): no balconies, the whole base trains so that trunk layers 1..e + the final norm + the shared head
    is a sub-model for each exit e; the loss sums the exits' and the full model's (loss.sorted_target)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainingConfig) if f.name != "method")
METHODS = ("balcony", "sorted")
SORTED_TARGETS = ("ce", "kl")
# Settings that may differ between a run and its --resume: they change no computed number.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
                     "train.output"}  # a run directory may be moved or copied


def resolve_config(recipe: str | Path | None = None, sets: list[str] = (), flags: dict | None = None,
                   base: TrainingConfig | None = None) -> TrainingConfig:
    """base (defaults) <- recipe YAML <- `--set key=value` <- flags (dotted keys, None = not given)."""
    config = copy.deepcopy(base) if base is not None else TrainingConfig()
    if recipe is not None:
        merge_dict(config, read_recipe(recipe), source=str(recipe))
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise BalspecError(f"--set: expected key=value, got {item!r}")
        set_value(config, key.strip(), text.strip(), "--set", from_text=True)
    for key, value in (flags or {}).items():
        if value is not None:
            set_value(config, key, value, "--" + key.split(".")[-1].replace("_", "-"))
    validate(config)
    return config


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BalspecError(f"--recipe: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise BalspecError(f"--recipe: {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise BalspecError(f"--recipe: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BalspecError(f"--recipe: {path} must hold a mapping of sections (model, exits, data, ...)")
    return data


def merge_dict(config, data: dict, source: str, prefix: str = "") -> None:
    """Set every leaf of nested `data` on `config`; unknown keys and wrong types name the key."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(config, dotted):
            merge_dict(config, value, source, prefix=dotted + ".")
        else:
            set_value(config, dotted, value, source)


def set_value(config, key: str, value: Any, source: str, from_text: bool = False) -> None:
    *path, name = key.split(".")
    target = config
    for part in path:
        target = getattr(target, part, None)
    fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
    if name not in fields:
        close = difflib.get_close_matches(key, [*known_keys(), *SECTIONS], n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; sections are {', '.join(SECTIONS)}"
        raise BalspecError(f"{source}: unknown key {key!r}{hint}")
    if dataclasses.is_dataclass(getattr(target, name)):
        raise BalspecError(f"{source}: {key!r} is a section; give its keys, e.g. {key}.{_first_field(target, name)}")
    kind = typing.get_type_hints(type(target))[name]
    if from_text and isinstance(value, str):
        value = parse_text(value, kind, key)
    setattr(target, name, check_type(value, kind, key))


def parse_text(text: str, kind, key: str):
    """A `--set` value, read as the field's type: `8,12,16` for a list, `null` for an optional."""
    if _optional_of(kind) is not None and text.lower() in ("null", "none", "~"):
        return None
    kind = _optional_of(kind) or kind
    if typing.get_origin(kind) is list:
        items = [x for x in text.strip("[]").split(",") if x.strip()]
        return [parse_text(x.strip(), typing.get_args(kind)[0], key) for x in items]
    if kind is bool:
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
        raise BalspecError(f"{key}: expected true or false, got {text!r}")
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise BalspecError(f"{key}: expected {kind.__name__}, got {text!r}") from None


def check_type(value, kind, key: str):
    """`value` (from YAML or a flag) if it fits the field's type; YAML's `5e-4` string counts as a float."""
    inner = _optional_of(kind)
    if inner is not None:
        return None if value is None else check_type(value, inner, key)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            return parse_text(value, kind, key)
        if not isinstance(value, (list, tuple)):
            raise BalspecError(f"{key}: expected a list, got {value!r}")
        return [check_type(v, typing.get_args(kind)[0], key) for v in value]
    if kind is float and isinstance(value, str):
        return parse_text(value, float, key)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        hint = " (quote it: YAML reads yes/no/on/off as booleans)" if kind is str and isinstance(value, bool) else ""
        raise BalspecError(f"{key}: expected {kind.__name__}, got {value!r}{hint}")
    return value


def validate(config: TrainingConfig) -> None:
    """Range checks a type cannot express. Exit layers are checked against the model once it is loaded."""
    from balspec.exits import LAYER_INITS, MODULES, NORM_INITS

    c = config
    checks = [
        ("method", c.method in METHODS, f"one of {', '.join(METHODS)}"),
        ("exits.module", c.exits.module in MODULES[:3], f"one of {', '.join(MODULES[:3])}"),
        ("exits.module", c.method == "balcony" or c.exits.module == "layer", "layer with method sorted (no balconies)"),
        ("exits.draft", not c.exits.draft or c.exits.module == "layer", "empty unless exits.module is layer"),
        ("exits.draft", not c.exits.draft or c.method == "balcony", "empty with method sorted (no balconies)"),
        ("exits.draft", not c.exits.draft or not c.exits.train_base, "empty with exits.train_base"),
        ("exits.init_from", not c.exits.init_from or c.method == "balcony", "null with method sorted (no balconies)"),
        ("exits.init_exit", c.exits.init_exit is None or c.exits.init_from, "null unless exits.init_from is set"),
        ("loss.sorted_target", c.loss.sorted_target in SORTED_TARGETS, f"one of {', '.join(SORTED_TARGETS)}"),
        ("model.dtype", c.model.dtype in DTYPE_NAMES, f"one of {', '.join(DTYPE_NAMES)}"),
        ("exits.layers", len(c.exits.layers) > 0, "at least one exit layer"),
        ("exits.norm_init", c.exits.norm_init in NORM_INITS, f"one of {', '.join(NORM_INITS)}"),
        ("exits.layer_init", c.exits.layer_init in LAYER_INITS, f"one of {', '.join(LAYER_INITS)}"),
        ("exits.balcony_layers", c.exits.balcony_layers >= 1, "at least 1"),
        ("exits.draft", set(c.exits.draft) <= set(c.exits.layers), "a subset of exits.layers"),
        ("exits.draft_chain", not c.exits.draft or c.exits.balcony_layers == 1 or c.exits.draft_chain == 1,
         "1 when draft exits have exits.balcony_layers > 1 (only a cycle's first draft is simulated then)"),
        ("exits.draft_chain", c.exits.draft_chain >= 1, "at least 1"),
        ("data.block_size", c.data.block_size >= 2, "at least 2"),
        ("data.heldout_blocks", c.data.heldout_blocks >= 0, "0 or more"),
        ("data.shuffle_buffer", c.data.shuffle_buffer >= 0, "0 or more"),
        ("data.train_on", c.data.train_on in TRAIN_ON, f"one of {', '.join(TRAIN_ON)}"),
        ("data.teacher_cache", c.data.teacher_cache is None or len(c.data.teacher_cache) > 0,
         "null or at least one directory"),
        ("data.teacher_cache", c.data.teacher_cache is None or len(set(c.data.teacher_cache)) == len(c.data.teacher_cache),
         "directories listed once each"),
        ("data.teacher_cache", c.data.teacher_cache is None or not c.data.streaming,
         "null when data.streaming is true (a cache holds packed blocks)"),
        ("data.teacher_cache", c.data.teacher_cache is None or (c.method == "balcony" and not c.exits.train_base),
         "null when the base trains (method sorted or exits.train_base): its teacher is not frozen"),
        ("optim.lr", 0 < c.optim.lr < math.inf, "a finite number > 0"),
        ("optim.min_lr_ratio", 0 <= c.optim.min_lr_ratio <= 1, "between 0 and 1"),
        ("optim.warmup_steps", c.optim.warmup_steps >= 0, "0 or more"),
        ("optim.weight_decay", 0 <= c.optim.weight_decay < math.inf, "a finite number >= 0"),
        ("optim.beta1", 0 <= c.optim.beta1 < 1, "in [0, 1)"),
        ("optim.beta2", 0 <= c.optim.beta2 < 1, "in [0, 1)"),
        ("optim.eps", 0 < c.optim.eps < math.inf, "a finite number > 0"),
        ("optim.grad_clip", 0 <= c.optim.grad_clip < math.inf, "a finite number >= 0"),
        ("optim.batch_size", c.optim.batch_size >= 1, "at least 1"),
        ("optim.grad_accum", c.optim.grad_accum >= 1, "at least 1"),
        ("loss.ce_weight", 0 <= c.loss.ce_weight < math.inf, "a finite number >= 0"),
        ("loss.top1_weight", 0 <= c.loss.top1_weight < math.inf, "a finite number >= 0"),
        ("loss.top1_weight", c.loss.top1_weight == 0 or c.loss.ce_weight == 0, "0 when loss.ce_weight > 0"),
        ("loss.top1_weight", c.loss.top1_weight == 0 or (c.method == "balcony" and not c.exits.train_base),
         "0 with method sorted or exits.train_base"),
        ("loss.chunk_size", c.loss.chunk_size >= 1, "at least 1"),
        ("loss.draft_vocab", c.loss.draft_vocab is None or set(c.exits.draft) == set(c.exits.layers),
         "null unless every exit is of the draft kind (a sub-model exit's early-exit mode needs every token)"),
        ("loss.draft_vocab", c.loss.draft_vocab is None or c.loss.ce_weight == 0,
         "null when loss.ce_weight > 0 (no cross-entropy over a reduced vocabulary)"),
        ("train.max_steps", c.train.max_steps >= 1, "at least 1"),
        ("train.seed", 0 <= c.train.seed < 2 ** 32, "in [0, 2**32) (numpy's seeds)"),
        ("train.mixed_precision", c.train.mixed_precision in MIXED_PRECISION, f"one of {', '.join(MIXED_PRECISION)}"),
        ("train.log_every", c.train.log_every >= 1, "at least 1"),
        ("train.eval_every", c.train.eval_every >= 0, "0 or more"),
        ("train.save_every", c.train.save_every >= 0, "0 or more"),
        ("train.keep_checkpoints", c.train.keep_checkpoints >= 1, "at least 1"),
    ]
    for key, ok, wanted in checks:
        if not ok:
            raise BalspecError(f"{key}: must be {wanted}, got {get_value(config, key)!r}")


def config_to_dict(config: TrainingConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict, source: str) -> TrainingConfig:
    config = TrainingConfig()
    merge_dict(config, data, source)
    validate(config)
    return config


def changed_keys(old: TrainingConfig, new: TrainingConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    return [k for k in a if a[k] != b[k]]


def known_keys() -> list[str]:
    return list(_flatten(config_to_dict(TrainingConfig())))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_section(config, dotted: str) -> bool:
    target = config
    for part in dotted.split("."):
        target = getattr(target, part, None)
    return dataclasses.is_dataclass(target)


def _first_field(target, name: str) -> str:
    return dataclasses.fields(getattr(target, name))[0].name


def get_value(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _optional_of(kind):
    """X for `X | None`, else None."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0]
    return None
