"""Sub-model export: the sub-model of one exit as a standard Hugging Face checkpoint.

The sub-model of exit e is `embed -> trunk layers 1..e -> balcony_e -> norm_e -> lm_head`. In the base
architecture that is simply a model with e + b layers (b balcony layers, usually 1) whose final norm is
the balcony's norm, so it is written as one: plain transformers loads it, and serving engines run it as
a draft model or a fixed-budget model with no balspec code.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from balspec.checkpoint import base_model_info
from balspec.errors import BalspecError
from balspec.exits import Exits, model_parts
from balspec.files import apply_umask, check_output_dir, partial_path, remove_stale_partials, writing

EXPORT_FILE = "balspec_export.json"  # provenance; also marks a directory --force may replace
_PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


def submodel_config(config, exit_layer: int, balcony_layers: int):
    """The base config cut to e + b layers. A balcony layer is a copy of the base's last layer, so in
    per-layer fields (sliding/full attention, RoPE or not) it takes the last layer's entry."""
    sub = copy.deepcopy(config)
    sub.num_hidden_layers = exit_layer + balcony_layers
    for field in _PER_LAYER_FIELDS:
        values = getattr(config, field, None)
        if values:
            setattr(sub, field, list(values[:exit_layer]) + [values[-1]] * balcony_layers)
    return sub


def build_submodel(model: nn.Module, exits: Exits, exit_layer: int) -> nn.Module:
    """The sub-model of `exit_layer` as a causal LM of the base's class. It shares the trunk, embedding,
    head and norm with `model` and `exits` (no copy); only the balcony layers are copied, to renumber them."""
    parts = model_parts(model)
    exits.check_sub_model(exit_layer, "export")
    if exits.module in ("mlp", "attention"):
        raise BalspecError(f"export: an {exits.module}-only balcony is not a decoder layer of the base architecture, "
                           "so its sub-model is no standard checkpoint; use it with balspec generate")
    balcony = exits[exit_layer]
    config = submodel_config(model.config, exit_layer, exits.balcony_layers)
    with torch.device("meta"):  # every module is replaced by a real one below: allocate nothing
        sub = type(model)(config)
    top = [copy.deepcopy(layer) for layer in balcony.layers]
    for idx, layer in enumerate(top, start=exit_layer):
        layer.self_attn.layer_idx = idx  # in `exits` its cache slot lies past the trunk's; here it is layer e + j
    sub.model.embed_tokens = parts.embed
    sub.model.layers = nn.ModuleList([*parts.layers[:exit_layer], *top])
    sub.model.norm = balcony.norm
    sub.model.rotary_emb = parts.rotary
    sub.lm_head = parts.head  # the base's own head: tied to the embedding exactly when the base's is
    left = [n for n, t in itertools.chain(sub.named_parameters(), sub.named_buffers()) if t.is_meta]
    if left:
        raise BalspecError(f"cannot export {type(model).__name__}: it has modules balspec does not map "
                           f"onto the sub-model ({', '.join(left[:3])})")
    sub.generation_config = copy.deepcopy(model.generation_config)
    return sub.eval()


def check_output(output: str | Path, force: bool) -> None:
    """Refuse a non-empty --output without --force and, even with it, anything but an earlier export: a
    directory holding exactly the files its `balspec_export.json` lists (a user's own file among them, or a
    checkpoint, is never deleted)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BalspecError(f"--output: {output} exists and is not a directory")
    check_output_dir(output, "--output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not force:
        raise BalspecError(f"--output: {output} is not empty; pass --force to replace it")
    if output.is_symlink():
        raise BalspecError(f"--output: {output} is a symbolic link; give the directory it points to")
    foreign = _not_exported(output)
    if foreign:
        raise BalspecError(f"--output: {output} holds files balspec did not export ({', '.join(foreign[:3])}); "
                           "refusing to replace it even with --force")


def _not_exported(directory: Path) -> list[str]:
    """The entries of `directory` that no earlier export recorded writing: all of them without a readable
    provenance file."""
    names = sorted(p.name for p in directory.iterdir())
    try:
        written = json.loads((directory / EXPORT_FILE).read_text())["files"]
        assert isinstance(written, list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return names
    return [n for n in names if n not in written or (directory / n).is_symlink() or not (directory / n).is_file()]


def export_submodel(model: nn.Module, tokenizer, exits: Exits, exit_layer: int, output: str | Path,
                    force: bool = False) -> Path:
    """Write the sub-model of `exit_layer` to `output` as a standard HF model directory: config with
    e + b layers, safetensors weights in the model's dtype, tokenizer, chat template, generation config.
    Written in a temporary sibling directory and renamed into place, so `output` is never half-written."""
    output = Path(output)
    check_output(output, force)
    sub = build_submodel(model, exits, exit_layer)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output, hidden=True, marker=EXPORT_FILE)
    partial = partial_path(output, hidden=True)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with writing(f"--output: cannot write {output}"):
            partial.mkdir()
            (partial / EXPORT_FILE).write_text("{}\n")  # marks the partial as balspec's until provenance replaces it
            sub.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            _make_portable(partial)
            _write_provenance(partial / EXPORT_FILE, model, exits, exit_layer)
            apply_umask(partial)
            _move_into_place(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output


def _make_portable(directory: Path) -> None:
    """Let transformers 4.x, which serving engines may pin, read what transformers 5 wrote. Without this
    4.x crashes on a null quantization_config, cannot resolve the tokenizer class `TokenizersBackend`
    and, finding no `rope_theta`, silently runs RoPE with its default base: a different model."""
    config_file, tokenizer_file = directory / "config.json", directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if "quantization_config" in config and config["quantization_config"] is None:
        del config["quantization_config"]
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_file.exists():
        tokenizer_config = json.loads(tokenizer_file.read_text())
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the same class in 4.x and 5
            tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write_provenance(target: Path, model: nn.Module, exits: Exits, exit_layer: int) -> None:
    from balspec import __version__

    info = {"balspec_version": __version__, "exit": exit_layer, "balcony_layers": exits.balcony_layers,
            "num_hidden_layers": exit_layer + exits.balcony_layers, "norm_init": exits.norm_init,
            "layer_init": exits.layer_init, "base_model": base_model_info(model),
            "files": sorted(p.name for p in target.parent.iterdir())}  # what --force may replace later
    target.write_text(json.dumps(info, indent=2) + "\n")


def _move_into_place(partial: Path, output: Path) -> None:
    """Rename `partial` to `output`; an existing `output` (empty, or replaced with --force) is moved aside
    first, because a directory cannot be renamed over a non-empty one."""
    if not output.exists():
        os.replace(partial, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(partial, output)
    shutil.rmtree(old)
