"""What an exits checkpoint holds: base model, fingerprints, exits, parameters, training summary (and, given
the base model, which layer path the engine runs it with).

Read from `balspec.json` and the safetensors header only, so describing a checkpoint loads no weights;
checking it against a base model (optional) loads that model.
"""

from __future__ import annotations

import math
from pathlib import Path

from balspec.checkpoint import DRAFT_VOCAB_KEY, WEIGHTS_FILE, check_base, exit_kinds, read_meta, sha256_file
from balspec.errors import BalspecError
from balspec.measure.report import json_safe


def resolve_exits_path(exits_path: str | Path | None, model_name: str | None) -> Path:
    """--exits-path, or the exits shipped for --model when it is omitted."""
    if exits_path is not None:
        return Path(exits_path)
    from balspec.generate import default_exits_path

    path = default_exits_path(model_name)
    if path is None:
        raise BalspecError(f"--exits-path: balspec ships no exits for {model_name or 'the default model'}; "
                           "pass the directory `balspec train` wrote")
    return path


def describe_checkpoint(path: str | Path, model=None) -> dict:
    """A JSON-ready description of the exits checkpoint at `path`. With `model`, also check that the
    checkpoint was trained on it (a BalspecError if not)."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_meta(path)
    if model is not None:
        check_base(meta, model, str(path))
    weights = path / WEIGHTS_FILE
    per_exit: dict[str, int] = {}
    try:
        with safe_open(weights, "pt") as f:  # the header only: shapes, no tensor data
            for key in f.keys():  # "balconies.<exit>.layers.0.mlp.up_proj.weight"
                if key == DRAFT_VOCAB_KEY:  # token ids of the reduced draft head, not an exit's weights
                    continue
                exit_layer = key.split(".")[1]
                per_exit[exit_layer] = per_exit.get(exit_layer, 0) + math.prod(f.get_slice(key).get_shape())
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise BalspecError(f"{weights} is corrupt: {e}") from None
    return {"path": str(path),
            "format_version": meta["format_version"],
            "balspec_version": meta.get("balspec_version"),
            "base_model": meta["base_model"],
            "base_model_check": None if model is None else "matches",
            "layer_path": None if model is None else _layer_path(model),
            "exits": meta["exits"],
            "kinds": {str(e): kind for e, kind in exit_kinds(meta).items()},
            "balcony_layers": meta.get("balcony_layers", 1),
            "module": meta.get("module", "layer"),
            "train_base": meta.get("train_base", False),
            "norm_init": meta.get("norm_init"),
            "layer_init": meta.get("layer_init"),
            "dtype": meta.get("dtype"),
            "parameters_per_exit": {str(e): per_exit.get(str(e), 0) for e in meta["exits"]},
            "parameters_total": sum(per_exit.values()),
            "size_bytes": weights.stat().st_size,
            "checksum_ok": sha256_file(weights) == meta.get("weights_sha256"),
            "draft_vocab": meta.get("draft_vocab"),
            "defaults": json_safe(meta.get("defaults") or {}),
            "training": json_safe(meta.get("training") or {})}


def _layer_path(model) -> str:
    """How the engine runs this model's decoder layers: "lean" (balspec's own forward) or "generic" (the
    model's modules), as decided by its check at start."""
    from balspec.engine.speculative import Engine

    return Engine(model).layer_path


def render_table(info: dict):
    """The description as a two-column rich table; nested training fields flattened as a.b.c."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    base = info["base_model"]
    table = Table(title=f"exits checkpoint {escape(info['path'])}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [("base model", f"{base.get('name')} ({base.get('num_layers')} layers"
                           + (f", revision {base['revision']})" if base.get("revision") else ")")),
            ("config fingerprint", base.get("config_fingerprint")),
            ("weights fingerprint", base.get("weights_fingerprint")),
            ("base check", info["base_model_check"] or "not checked (pass --model to check)"),
            ("layer path", info["layer_path"] or "not checked (pass --model to check)"),
            ("exits", ", ".join(f"{e} ({info['kinds'][str(e)]})" for e in info["exits"])),
            ("balcony layers", info["balcony_layers"]),
            ("balcony module", info["module"] + (" (no balcony: the model's own final norm and head)"
                                                 if info["module"] == "shared-head" else "")),
            ("base", "trained with the exits (its weights lie beside them)" if info["train_base"] else "frozen"),
            ("norm init", info["norm_init"]),
            ("layer init", info["layer_init"]),
            ("dtype", info["dtype"]),
            *[(f"parameters, exit {e}", f"{n:,}") for e, n in info["parameters_per_exit"].items()],
            ("parameters, total", f"{info['parameters_total']:,}"),
            ("size", f"{info['size_bytes'] / 2**20:.1f} MiB"),
            ("checksum", "ok" if info["checksum_ok"] else "MISMATCH: the weights file is damaged"),
            ("draft vocabulary", _draft_vocab(info["draft_vocab"])),
            ("balspec version", info["balspec_version"])]
    rows += [(f"defaults.{k}", v) for k, v in _flatten(info["defaults"])]
    rows += [(f"training.{k}", v) for k, v in _flatten(info["training"])] or [("training", "no summary recorded")]
    for name, value in rows:
        text = str(value)
        # Text, not markup: a value such as "[cosine]" must print as it is
        table.add_row(name, Text(text if len(text) <= 100 else text[:97] + "..."))  # a loss curve, say
    return table


def _draft_vocab(meta: dict | None) -> str:
    if not meta:
        return "none (drafts score the whole vocabulary)"
    text = f"{meta['size']:,} tokens"
    if meta.get("heldout_coverage") is not None:
        text += f", {100 * meta['heldout_coverage']:.1f}% of held-out answer tokens"
    return text


def _flatten(tree: dict, prefix: str = "", in_list: bool = False) -> list[tuple[str, object]]:
    """Rows "a.b.c" for nested dicts and "a[i].b" for lists of dicts (earlier training stages, added exits),
    so no stage record is cut to "...". Inside such list entries a stage's whole recipe ("config") is one
    row pointing to --json: the table stays readable and the JSON keeps everything."""
    out = []
    for key, value in tree.items():
        if in_list and key == "config" and isinstance(value, dict):
            out.append((f"{prefix}{key}", "the stage's recipe (balspec info --json)"))
        elif isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.", in_list)
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):
                out += _flatten(item, f"{prefix}{key}[{i}].", True)
        else:
            out.append((f"{prefix}{key}", value))
    return out
