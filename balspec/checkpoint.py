"""The exits checkpoint: exits.safetensors + balspec.json, the base model's fingerprints, save, load and checks.

A checkpoint directory holds the balconies' weights (and a draft vocabulary, if any) in exits.safetensors and
their record in balspec.json: format version, base model fingerprints, exit layers and kinds, how they were
trained. Loading checks all of it against the base model and refuses, in one line, anything that does not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from balspec.errors import BalspecError
from balspec.exits import KINDS, LAYER_INITS, MODULES, NORM_INITS, Exits, attach_exits, identity_layer, model_parts
from balspec.files import apply_umask, partial_path, remove_stale_partials

FORMAT_VERSION = 1
WEIGHTS_FILE = "exits.safetensors"
META_FILE = "balspec.json"
DRAFT_VOCAB_KEY = "draft_vocab"  # int64 token ids in exits.safetensors: the reduced draft head's rows
_FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "rope_theta",
                       "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "hidden_act")
# Fields that change the arithmetic of some architectures and are not seen in the weights. Hashed only where
# set (not None), so a config without them (Llama) keeps the fingerprint it had before they were added.
_ARITHMETIC_FIELDS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                      "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                      "rope_local_base_freq", "partial_rotary_factor", "hidden_activation", "embedding_multiplier",
                      "residual_multiplier", "attention_multiplier", "logits_scaling", "logit_scale",
                      "use_bidirectional_attention")


def config_fingerprint(config) -> str:
    """A hash of the config fields that decide a balcony's arithmetic: shapes, norms, rotary, windows, caps."""
    fields = {k: getattr(config, k, None) for k in _FINGERPRINT_FIELDS}
    fields.update({k: getattr(config, k) for k in _ARITHMETIC_FIELDS if getattr(config, k, None) is not None})
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of a fixed sample of every base weight, rounded to bf16 so fp32 and bf16 loads agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().flatten()
        stride = max(1, flat.numel() // 2048)
        sample = flat[::stride][:2048].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def base_model_info(model: nn.Module) -> dict:
    return {"name": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "revision": getattr(model.config, "_commit_hash", None),
            "num_layers": model_parts(model).num_layers,
            "config_fingerprint": config_fingerprint(model.config),
            "weights_fingerprint": weights_fingerprint(model)}


def save_exits(exits: Exits, model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
               training: dict | None = None, defaults: dict | None = None,
               draft_vocab_info: dict | None = None, train_base: bool = False) -> Path:
    """Write `exits.safetensors` and `balspec.json` atomically (temp file + rename, JSON last).

    `defaults` records the generation settings chosen by measurement (mode, exit, draft_len);
    `draft_vocab_info` describes `exits.draft_vocab` (how it was counted, its coverage); train_base: the base
    was trained with the exits (its weights lie beside them, in the same directory: sorted.py).
    """
    from safetensors.torch import save_file

    from balspec import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in exits.state_dict().items()}
    weights_dtype = next(iter(tensors.values())).dtype if tensors else dtype or model_parts(model).head.weight.dtype
    if exits.draft_vocab is not None:
        tensors[DRAFT_VOCAB_KEY] = exits.draft_vocab.detach().to("cpu", torch.int64).contiguous()
    weights_tmp = _temp_in(path, WEIGHTS_FILE)
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        apply_umask(weights_tmp)  # safetensors writes 0600
        meta = {"format_version": FORMAT_VERSION, "balspec_version": __version__,
                "base_model": base_model_info(model), "exits": exits.exits, "norm_init": exits.norm_init,
                "layer_init": exits.layer_init, "balcony_layers": exits.balcony_layers,
                "module": exits.module, "train_base": train_base,
                "kinds": {str(e): kind for e, kind in exits.kinds.items()},
                "dtype": str(weights_dtype).replace("torch.", ""),
                "weights_sha256": sha256_file(weights_tmp), "training": training or {}}
        if defaults:
            meta["defaults"] = defaults
        if exits.draft_vocab is not None:
            meta["draft_vocab"] = {"size": int(exits.draft_vocab.numel()), **(draft_vocab_info or {})}
        os.replace(weights_tmp, path / WEIGHTS_FILE)
    finally:
        weights_tmp.unlink(missing_ok=True)
    _write_json_atomic(path / META_FILE, meta)
    return path


def exit_kinds(meta: dict) -> dict[int, str]:
    """Each exit of a checkpoint's balspec.json and its kind, "sub-model" or "draft" (older files: sub-model)."""
    return {e: meta.get("kinds", {}).get(str(e), "sub-model") for e in meta["exits"]}


def read_meta(path: str | Path) -> dict:
    """The checkpoint's `balspec.json`, checked against its schema; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise BalspecError(f"--exits-path: {path} is not a directory")
    meta_file = path / META_FILE
    if not meta_file.exists() or not (path / WEIGHTS_FILE).exists():
        raise BalspecError(f"--exits-path: {path} is not an exits checkpoint (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BalspecError(f"{meta_file} is corrupt: not valid JSON ({e})") from None
    _check_field(meta, {"format_version": (_WHOLE, True)}, "", meta_file)
    if meta["format_version"] != FORMAT_VERSION:
        raise BalspecError(f"{meta_file}: format version {meta['format_version']} is not supported "
                           f"(this balspec reads version {FORMAT_VERSION})")
    _check_meta(meta, meta_file)
    return meta


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A field's type: (test, what it must be). An object: {key: (type, required)}, "*" for every key. A list: [type].
_WHOLE = (_is_whole, "a whole number")
_COUNT = (lambda v: _is_whole(v) and v >= 1, "a whole number >= 1")
_BALCONY_LAYERS = (lambda v: _is_whole(v) and v >= 0, "a whole number >= 1 (0 with module shared-head)")
_TEXT = (lambda v: isinstance(v, str), "a string")
_TEXT_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
_NUMBER_OR_NULL = (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool), "a number or null")
_OBJECT = (lambda v: isinstance(v, dict), "an object")


def _one_of(choices) -> tuple:
    return (lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(choices))


def _meta_schema() -> dict:
    """What `save_exits` writes in `balspec.json`. Optional fields came later, or are written when known."""
    from balspec.generate import MODES

    draft_len = (lambda v: v == "auto" or _is_whole(v) and v >= 1, 'a whole number >= 1 or "auto"')
    return {"format_version": (_WHOLE, True),
            "balspec_version": (_TEXT, False),
            "base_model": ({"name": (_TEXT, True), "revision": (_TEXT_OR_NULL, False), "num_layers": (_COUNT, True),
                            "config_fingerprint": (_TEXT, True), "weights_fingerprint": (_TEXT, True)}, True),
            "exits": ([_WHOLE], True),
            "norm_init": (_one_of(NORM_INITS), False),
            "layer_init": (_one_of(LAYER_INITS), False),
            "balcony_layers": (_BALCONY_LAYERS, False),
            "module": (_one_of(MODULES), False),
            "train_base": ((lambda v: isinstance(v, bool), "true or false"), False),
            "kinds": ({"*": (_one_of(KINDS), False)}, False),
            "dtype": (_TEXT, False),
            "weights_sha256": (_TEXT, True),
            "training": ({"config": (_OBJECT, False)}, False),
            "defaults": ({"mode": (_one_of(MODES), False), "exit": (_WHOLE, False), "draft_len": (draft_len, False),
                          "draft_width": (_COUNT, False), "measured": (_OBJECT, False),
                          "lookup_len": ((lambda v: _is_whole(v) and 0 <= v <= 64, "a whole number in 0..64"), False)},
                         False),
            "draft_vocab": ({"size": (_COUNT, True), "train_coverage": (_NUMBER_OR_NULL, False),
                             "heldout_coverage": (_NUMBER_OR_NULL, False), "source": (_TEXT, False)}, False)}


def _check_meta(meta, meta_file: Path) -> None:
    """The whole of `balspec.json` against `_meta_schema()` and its fields against each other, so that no reader
    meets a wrong type later. Names the first field that does not fit: the checkpoint is at fault, not a flag."""
    _check_field(meta, _meta_schema(), "", meta_file)
    exits, layers = meta["exits"], meta["base_model"]["num_layers"]
    kinds = meta.get("kinds", {})
    if not exits or len(set(exits)) != len(exits) \
            or not all(1 <= e < layers or (e == 0 and kinds.get("0") == "draft") for e in exits):
        _corrupt(meta_file, "exits", f"distinct layers in 1..{layers - 1}, or 0 for a draft-kind exit "
                 f"(base_model.num_layers is {layers})", exits)
    for key in kinds:
        if key not in map(str, exits):
            _corrupt(meta_file, f"kinds.{key}", f"an exit of the checkpoint ({','.join(map(str, exits))})", key)
    shared = meta.get("module", "layer") == "shared-head"  # no balcony: zero balcony layers, and only then
    if (meta.get("balcony_layers", 1) == 0) != shared:
        _corrupt(meta_file, "balcony_layers", "0 with module shared-head" if shared else "a whole number >= 1",
                 meta["balcony_layers"])
    defaults = meta.get("defaults", {})
    if "exit" in defaults and defaults["exit"] not in exits:
        _corrupt(meta_file, "defaults.exit", f"one of the exits ({','.join(map(str, exits))})", defaults["exit"])
    if defaults.get("mode") == "early-exit" and kinds.get(str(defaults.get("exit"))) == "draft":
        _corrupt(meta_file, "defaults.exit", "a sub-model exit with mode early-exit", defaults["exit"])


def _check_field(value, kind, field: str, meta_file: Path) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            _corrupt(meta_file, field or "the document", "an object", value)
        for key, (sub, required) in kind.items():
            for name in (value if key == "*" else [key]):
                where = f"{field}.{name}" if field else name
                if name in value:
                    _check_field(value[name], sub, where, meta_file)
                elif required:
                    raise BalspecError(f"{meta_file} is corrupt: {where} is missing")
    elif isinstance(kind, list):
        if not isinstance(value, list):
            _corrupt(meta_file, field, "a list", value)
        for i, item in enumerate(value):
            _check_field(item, kind[0], f"{field}[{i}]", meta_file)
    elif not kind[0](value):
        _corrupt(meta_file, field, kind[1], value)


def _corrupt(meta_file: Path, field: str, expected: str, value) -> None:
    shown = json.dumps(value)
    raise BalspecError(f"{meta_file} is corrupt: {field} must be {expected}, not "
                       f"{shown if len(shown) <= 40 else shown[:37] + '...'}")


def check_base(meta: dict, model: nn.Module, where: str) -> None:
    base = meta["base_model"]
    if base.get("config_fingerprint") != config_fingerprint(model.config):
        raise BalspecError(f"{where} was trained for another base model ({base.get('name')}, "
                           f"{base.get('num_layers')} layers), not the loaded one "
                           f"({model.config._name_or_path}, {model_parts(model).num_layers} layers)")
    if base.get("weights_fingerprint") != weights_fingerprint(model):
        raise BalspecError(f"{where} was trained for base model {base.get('name')} with different weights "
                           "(weight fingerprint mismatch): load the exact base model it was trained on")


def load_exits(model: nn.Module, path: str | Path) -> tuple[Exits, dict]:
    """Load an exits checkpoint onto `model`, refusing another base model or a damaged file."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    check_base(meta, model, str(path))
    if sha256_file(path / WEIGHTS_FILE) != meta.get("weights_sha256"):
        raise BalspecError(f"{path / WEIGHTS_FILE} is corrupt or truncated (checksum does not match {META_FILE})")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise BalspecError(f"{path / WEIGHTS_FILE} is corrupt: {e}") from None
    exits = attach_exits(model, meta["exits"], meta.get("norm_init", "final"), "last",
                         meta.get("balcony_layers", 1),
                         draft_exits=[e for e, kind in exit_kinds(meta).items() if kind == "draft"],
                         module=meta.get("module", "layer"))
    exits.layer_init = meta.get("layer_init", "last")
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    if draft_vocab is not None:
        exits.draft_vocab = checked_vocab(draft_vocab, model, f"{path / WEIGHTS_FILE}: its draft vocabulary")
    missing, unexpected = exits.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise BalspecError(f"{path / WEIGHTS_FILE} does not match {META_FILE} "
                           f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    exits.to(dtype=model_parts(model).head.weight.dtype).requires_grad_(False).eval()
    return exits, meta


def read_draft_vocab(model: nn.Module, path: str | Path, where: str) -> torch.Tensor:
    """The draft vocabulary [V] (int64 token ids) stored with the exits checkpoint at `path`, which must be for
    `model`'s base. Raises BalspecError naming `where` if the checkpoint has none or is not for this model."""
    from safetensors import safe_open

    meta = read_meta(path)
    check_base(meta, model, where)
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        if DRAFT_VOCAB_KEY not in f.keys():
            raise BalspecError(f"{where}: {path} holds no draft vocabulary")
        vocab = f.get_tensor(DRAFT_VOCAB_KEY)
    return checked_vocab(vocab, model, f"{where}: the draft vocabulary in {path}")


def checked_vocab(vocab: torch.Tensor, model: nn.Module, what: str) -> torch.Tensor:
    size = model_parts(model).head.weight.shape[0]
    if vocab.dim() != 1 or vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= size \
            or vocab.unique().numel() != vocab.numel():
        raise BalspecError(f"{what} is not a list of distinct token ids below {size}")
    return vocab.long()


def init_exits_from(exits: Exits, model: nn.Module, path: str | Path, source_exit: int | None = None) -> None:
    """Copy the balconies of `exits` from the checkpoint at `path` (exits.init_from), keeping their dtype. A
    draft exit may start from a sub-model balcony (its layer and norm; `fuse` stays zero). source_exit
    (exits.init_exit): every exit starts from that exit of the checkpoint instead of its own. Draft exits with
    more balcony layers than the checkpoint's take its layers first; the others start as the identity
    (`identity_layer`), so training starts from the checkpoint's draft exactly."""
    source, meta = load_exits(model, path)
    where = f"exits.init_from: {path}"
    origin = {e: e if source_exit is None else source_exit for e in exits.exits}
    missing = sorted({origin[e] for e in exits.exits} - set(source.exits))
    if missing:
        raise BalspecError(f"{where} has no exit {','.join(map(str, missing))} (it has "
                           f"{','.join(map(str, source.exits))})")
    kinds = [e for e in exits.exits if source.kinds[origin[e]] == "draft" and exits.kinds[e] == "sub-model"]
    if kinds:
        e = kinds[0]
        source_is = f"exit {e} is" if origin[e] == e else f"exit {origin[e]} (exits.init_exit) is"
        raise BalspecError(f"{where}: {source_is} a draft exit there, exit {e} a sub-model exit in this run")
    if source.module != exits.module:
        raise BalspecError(f"{where} has {source.module} balconies, this run {exits.module} ones")
    deeper = source.balcony_layers < exits.balcony_layers and set(exits.kinds.values()) == {"draft"}
    if source.balcony_layers != exits.balcony_layers and not deeper:
        hint = " (only draft exits may start from fewer layers)" if source.balcony_layers < exits.balcony_layers else ""
        raise BalspecError(f"{where} has {source.balcony_layers}-layer balconies, this run "
                           f"{exits.balcony_layers}-layer ones{hint}")
    with torch.no_grad():
        for e in exits.exits:
            target = exits[e].state_dict()
            for name, value in source[origin[e]].state_dict().items():
                target[name].copy_(value)
            for layer in exits[e].layers[source.balcony_layers:]:
                identity_layer(layer)


def _temp_in(directory: Path, name: str) -> Path:
    """A hidden partial file for `directory / name`, after removing those of killed earlier writers."""
    remove_stale_partials(directory / name, hidden=True)
    return partial_path(directory / name, hidden=True)


def _write_json_atomic(target: Path, obj: dict) -> None:
    tmp = _temp_in(target.parent, target.name)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(file: str | Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
