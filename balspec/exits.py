"""Balcony exits: model surgery, initialisation, fingerprints, save and load.

A balcony for exit e is one (or a few) extra decoder layer(s) of the base architecture plus a norm. The
sub-model of exit e is `embed -> trunk layers 1..e -> balcony_e -> norm_e -> lm_head` with the base's
own head, shared and frozen. The base model is never modified: balconies live in their own module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from balspec.architecture import Architecture, architecture, causal_mask
from balspec.errors import BalspecError
from balspec.files import apply_umask, partial_path, remove_stale_partials
from balspec.layers import has_lean_form

FORMAT_VERSION = 1
NORM_INITS = ("final", "next-input")  # copy of the final norm, or of the input norm of trunk layer e + 1
LAYER_INITS = ("last", "random")  # copy of the base's last decoder layer (paper), or re-initialised
KINDS = ("sub-model", "draft")  # a standalone sub-model (paper), or a verified-context draft (DESIGN.md 3b)
# What a balcony layer is (paper appendix B): a whole decoder layer, its MLP half or its attention half. Or no
# balcony at all, "shared-head": the model's own final norm and head on h_e (LayerSkip-style; method sorted).
MODULES = ("layer", "mlp", "attention", "shared-head")
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


@dataclass(frozen=True)
class Parts:
    """The pieces of a decoder-only causal LM that balspec runs one by one (architecture.py: what else it needs)."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def model_parts(model: nn.Module) -> Parts:
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise BalspecError(f"model type {model_type} ({type(model).__name__}) is not supported: balspec runs "
                           "decoder-only causal LMs with rotary attention layers (embed_tokens, layers, norm, "
                           "rotary_emb, lm_head)")
    return Parts(inner.embed_tokens, inner.layers, inner.norm, model.lm_head, inner.rotary_emb)


def validate_exits(exits: list[int], num_layers: int) -> list[int]:
    """Exit layers must be distinct integers in 1..N-1 (exit N is the full model itself)."""
    if not exits:
        raise BalspecError("--exits: give at least one exit layer, e.g. --exits 8,12,16")
    if len(set(exits)) != len(exits):
        raise BalspecError(f"--exits: duplicated exit layer in {exits}")
    bad = [e for e in exits if not 1 <= e < num_layers]
    if bad:
        raise BalspecError(f"--exits: {bad} out of range; this model has {num_layers} layers, "
                           f"so exits must lie in 1..{num_layers - 1}")
    return sorted(exits)


class HalfLayer(nn.Module):
    """Half of a decoder layer (its own modules, not copies), with the residual: the balcony of exits.module mlp
    or attention. Called like a transformers decoder layer, so the engine's generic path runs it as one."""

    def __init__(self, layer: nn.Module, half: str):
        super().__init__()
        needed = ("input_layernorm", "self_attn") if half == "attention" else ("post_attention_layernorm", "mlp")
        if not has_lean_form(layer):  # a pre-norm Llama-family layer: x + attn(norm(x)), then x + mlp(norm(x))
            raise BalspecError(f"exits.module: an {half}-only balcony takes the {' and '.join(needed)} of a "
                               f"pre-norm decoder layer, and {type(layer).__name__} has another form; use layer")
        self.half = half
        for name in needed:
            setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        """[b, q, hidden] -> [b, q, hidden]; the attention half appends its K/V to `past_key_values`."""
        if self.half == "mlp":
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                position_embeddings=position_embeddings, past_key_values=past_key_values, **kwargs)
        return hidden_states + out


def parse_exits(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BalspecError(f"--exits: expected comma-separated layer numbers like 8,12,16, got {text!r}") from None


class Balcony(nn.Module):
    """Decoder layer(s) of the base architecture, then a norm; the LM head is the base's.

    kind "draft" (DESIGN.md 3b): a verified-context balcony. Its attention over verified positions reads
    K/V made of the full model's final normed hidden states there (`deep`), and its input at the first
    drafted position also gets `fuse(deep of the previous position)` (zero-initialised, so training starts
    from the plain balcony). It has no standalone sub-model: early-exit and export refuse it.
    """

    def __init__(self, layers: list[nn.Module], norm: nn.Module, arch: Architecture, kind: str = "sub-model",
                 shared_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if shared_norm:  # a shared-head exit: the model's own final norm, not a balcony weight (no state dict entry)
            object.__setattr__(self, "norm", norm)
        else:
            self.norm = norm
        self.kind = kind
        self.arch = arch  # the base's: a balcony attends as its last layer (window, mask format)
        self.window = arch.windows[arch.balcony_kind]
        if kind == "draft":
            hidden = norm.weight.shape[0]
            self.fuse = nn.Linear(hidden, hidden, bias=False)
            nn.init.zeros_(self.fuse.weight)

    def forward(self, hidden: torch.Tensor, position_embeddings, deep: torch.Tensor | None = None,
                unverified: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of trunk layer e over a whole block [b, L, hidden] -> normed balcony output [b, L,
        hidden], ready for the LM head. Training's path (no cache, the layers' own modules); the engine runs the
        layers itself. position_embeddings: cos, sin [b, L, rotary dim] of the base's last layer's kind of
        attention (Architecture.rotary with Architecture.balcony_kind).

        A sub-model balcony attends causally over its own states, within the last layer's sliding window if it
        has one, as in the engine. A draft balcony needs `deep` (the full model's final normed states [b, L,
        hidden]) and `unverified` [b, L] (long): r, how many positions before each one are drafted but not yet
        verified when it is drafted (0 for the first draft of a cycle, i for the (i+1)-th). Position i then
        sees deep K/V at positions <= i - r - 1, and its own inputs at i - r .. i: the one at i - r (the cycle's
        pending token) carries fuse(deep[i - r - 1]), the later ones (drafts) carry nothing, exactly as the
        engine drafts a chain; under a window, only keys less than the window behind i.
        """
        from balspec.layers import context_layer, module_layer

        length = hidden.shape[1]
        if self.kind == "sub-model":
            mask = None  # sdpa without a window: its own causal kernel
            if self.window is not None or self.arch.additive_masks:
                mask = self.arch.mask(causal_mask(length, self.window, hidden.device)[None, None], hidden.dtype)
            for layer in self.layers:
                hidden = module_layer(layer, hidden, position_embeddings, mask, None)
            return self.norm(hidden)
        previous = F.pad(deep[:, :-1], (0, 0, 1, 0))  # deep state of position i - 1, zero at i = 0
        pending = hidden + self.fuse(previous)  # a cycle's first drafted row: [b, L, hidden]
        position = torch.arange(length, device=hidden.device)
        r = torch.minimum(unverified, position)  # position 0 is always a prompt token
        first_own = (position - r)[..., None]  # [b, L, 1]: the cycle's pending token
        key = position.view(1, 1, -1)
        mask = torch.cat([key < first_own, key == first_own, (key > first_own) & (key <= position[:, None])], -1)
        if self.window is not None:  # keys at the same positions in each of the three blocks
            mask &= (key > position[:, None] - self.window).repeat(1, 1, 3)
        query = torch.where((r == 0)[..., None], pending, hidden)
        out = context_layer(self.layers[0], query, [deep, pending, hidden], position_embeddings,
                            self.arch.mask(mask[:, None], hidden.dtype))
        return self.norm(out)


class Exits(nn.Module):
    """All balconies of one base model. Holds no base weights: its state dict is the checkpoint."""

    def __init__(self, balconies: dict[int, Balcony], num_base_layers: int, norm_init: str, layer_init: str,
                 arch: Architecture, module: str = "layer"):
        super().__init__()
        self.arch = arch  # the base model's formulas around its layers: the loss's logits are the model's
        self.module = module
        self.exits = sorted(balconies)
        self.balconies = nn.ModuleDict({str(e): balconies[e] for e in self.exits})
        self.num_base_layers = num_base_layers
        self.norm_init = norm_init
        self.layer_init = layer_init
        self.balcony_layers = len(next(iter(balconies.values())).layers)
        self.kinds = {e: balconies[e].kind for e in self.exits}
        self.draft_vocab: torch.Tensor | None = None  # token ids of a reduced draft head, stored with the exits

    def __getitem__(self, exit_layer: int) -> Balcony:
        if exit_layer not in self.exits:
            raise BalspecError(f"--exit: exit {exit_layer} is not in the loaded checkpoint "
                               f"(it has {','.join(map(str, self.exits))})")
        return self.balconies[str(exit_layer)]

    def check_sub_model(self, exit_layer: int, what: str) -> None:
        """Refuse `what` (early-exit, export) for a draft-kind exit: it has no standalone sub-model."""
        if self[exit_layer].kind == "draft":
            raise BalspecError(f"--exit: exit {exit_layer} is a draft-kind exit (it reads the full model's verified "
                               f"states), so it has no standalone sub-model for {what}; use it with --mode "
                               f"speculative, or pick a sub-model exit ({','.join(map(str, self.sub_model_exits))})")

    @property
    def sub_model_exits(self) -> list[int]:
        return [e for e in self.exits if self.kinds[e] == "sub-model"]

    def cache_slots(self, exit_layer: int) -> list[int]:
        """KV-cache slots of this exit's balcony layers; slots 0..N-1 belong to the trunk."""
        first = self.num_base_layers + self.exits.index(exit_layer) * self.balcony_layers
        return list(range(first, first + self.balcony_layers))

    @property
    def num_cache_slots(self) -> int:
        return self.num_base_layers + len(self.exits) * self.balcony_layers

    def num_parameters(self, exit_layer: int) -> int:
        return sum(p.numel() for p in self[exit_layer].parameters())


def attach_exits(model: nn.Module, exits: list[int], norm_init: str = "final", layer_init: str = "last",
                 balcony_layers: int = 1, seed: int = 0, draft_exits: list[int] = (), module: str = "layer") -> Exits:
    """Build balconies for `exits` on a frozen `model`, initialised from its own weights; those in
    `draft_exits` are of the draft kind (verified-context, one layer). module (MODULES): each balcony layer is a
    copy of the last decoder layer, of its MLP half or of its attention half; "shared-head": no balcony, the
    exit is the model's own final norm and head (zero balcony layers, no weights)."""
    parts = model_parts(model)
    arch = architecture(model, parts.rotary, parts.num_layers)  # refuses what balspec cannot run, in one line
    exits = validate_exits(list(exits), parts.num_layers)
    if norm_init not in NORM_INITS:
        raise BalspecError(f"exits.norm_init: {norm_init!r} is not one of {', '.join(NORM_INITS)}")
    if layer_init not in LAYER_INITS:
        raise BalspecError(f"exits.layer_init: {layer_init!r} is not one of {', '.join(LAYER_INITS)}")
    if balcony_layers < 1 and module != "shared-head":
        raise BalspecError("exits.balcony_layers: must be at least 1")
    if draft_exits and balcony_layers != 1:
        raise BalspecError("exits.balcony_layers: a draft-kind exit has exactly one balcony layer")
    if module not in MODULES:
        raise BalspecError(f"exits.module: {module!r} is not one of {', '.join(MODULES)}")
    if draft_exits and module != "layer":
        raise BalspecError("exits.draft: a draft-kind exit is a whole decoder layer; use exits.module=layer")
    if set(draft_exits) - set(exits):
        raise BalspecError(f"draft exits {sorted(set(draft_exits) - set(exits))} are not among the exits {exits}")
    if norm_init == "next-input" and not hasattr(parts.layers[0], "input_layernorm"):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise BalspecError(f"exits.norm_init: next-input copies a layer's input norm, and model type {model_type} "
                           "has none (its norms follow attention and MLP); use final")
    if module == "shared-head":
        balconies = {e: Balcony([], parts.norm, arch, shared_norm=True) for e in exits}
        return Exits(balconies, parts.num_layers, "final", layer_init, arch, module)
    generator = torch.Generator().manual_seed(seed)
    balconies = {}
    for e in exits:
        layers = [copy.deepcopy(parts.layers[-1]) for _ in range(balcony_layers)]
        if layer_init == "random":
            for layer in layers:
                _reinit(layer, model.config, generator)
        if module != "layer":
            layers = [HalfLayer(layer, module) for layer in layers]
        source_norm = parts.norm if norm_init == "final" else parts.layers[e].input_layernorm
        balconies[e] = Balcony(layers, copy.deepcopy(source_norm), arch, "draft" if e in draft_exits else "sub-model")
    out = Exits(balconies, parts.num_layers, norm_init, layer_init, arch, module)
    for e in exits:  # a deep copy keeps the last trunk layer's cache slot: give each balcony its own
        for layer, slot in zip(out[e].layers, out.cache_slots(e)):
            if hasattr(layer, "self_attn"):  # an MLP-only balcony has no attention and writes no K/V
                layer.self_attn.layer_idx = slot
    out.requires_grad_(True)
    return out.to(parts.head.weight.device)


def _reinit(layer: nn.Module, config, generator: torch.Generator) -> None:
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight") or "norm" in name:
                p.fill_(1.0)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.zero_()


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
                          "draft_width": (_COUNT, False), "measured": (_OBJECT, False)}, False),
            "draft_vocab": ({"size": (_COUNT, True), "train_coverage": (_NUMBER_OR_NULL, False),
                             "heldout_coverage": (_NUMBER_OR_NULL, False), "source": (_TEXT, False)}, False)}


def _check_meta(meta, meta_file: Path) -> None:
    """The whole of `balspec.json` against `_meta_schema()` and its fields against each other, so that no reader
    meets a wrong type later. Names the first field that does not fit: the checkpoint is at fault, not a flag."""
    _check_field(meta, _meta_schema(), "", meta_file)
    exits, layers = meta["exits"], meta["base_model"]["num_layers"]
    if not exits or len(set(exits)) != len(exits) or not all(1 <= e < layers for e in exits):
        _corrupt(meta_file, "exits", f"distinct layers in 1..{layers - 1} (base_model.num_layers is {layers})", exits)
    kinds = meta.get("kinds", {})
    for key in kinds:
        if key not in map(str, exits):
            _corrupt(meta_file, f"kinds.{key}", f"an exit of the checkpoint ({','.join(map(str, exits))})", key)
    shared = meta.get("module", "layer") == "shared-head"  # no balcony: zero balcony layers, and only then
    if (meta.get("balcony_layers", 1) == 0) != shared:
        _corrupt(meta_file, "balcony_layers", "0 with module shared-head" if shared else "a whole number >= 1",
                 meta["balcony_layers"])
    if "draft" in kinds.values() and meta.get("balcony_layers", 1) != 1:
        _corrupt(meta_file, "balcony_layers", "1 with a draft-kind exit", meta["balcony_layers"])
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
    kinds = meta.get("kinds", {})
    exits = attach_exits(model, meta["exits"], meta.get("norm_init", "final"), "last",
                         meta.get("balcony_layers", 1), draft_exits=[int(e) for e, v in kinds.items() if v == "draft"],
                         module=meta.get("module", "layer"))
    exits.layer_init = meta.get("layer_init", "last")
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    if draft_vocab is not None:
        exits.draft_vocab = _checked_vocab(draft_vocab, model, f"{path / WEIGHTS_FILE}: its draft vocabulary")
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
    return _checked_vocab(vocab, model, f"{where}: the draft vocabulary in {path}")


def _checked_vocab(vocab: torch.Tensor, model: nn.Module, what: str) -> torch.Tensor:
    size = model_parts(model).head.weight.shape[0]
    if vocab.dim() != 1 or vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= size \
            or vocab.unique().numel() != vocab.numel():
        raise BalspecError(f"{what} is not a list of distinct token ids below {size}")
    return vocab.long()


def frequent_tokens(sequences, vocab_size: int, size: int, always=()) -> tuple[torch.Tensor, float]:
    """A reduced draft vocabulary (`exits.draft_vocab`): the token ids in `always` (EOS and chat-control
    tokens, which answers end with but texts rarely hold), then the most frequent ids in `sequences` (lists
    of ids) up to `size` ids in all, sorted; and the share of all tokens in `sequences` they cover."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(torch.as_tensor(seq, dtype=torch.long), minlength=vocab_size)
    if size >= vocab_size or counts.sum() == 0:
        raise BalspecError(f"a draft vocabulary of {size} tokens needs a vocabulary larger than that "
                           f"({vocab_size}) and some text to count")
    forced = sorted(set(always))
    ranked = counts.clone()
    ranked[forced] = counts.max() + 1  # first, in their own order (a stable sort keeps it)
    top = ranked.argsort(descending=True, stable=True)[:max(size, len(forced))]
    return top.sort().values, counts[top].sum().item() / counts.sum().item()


def with_control_tokens(draft_vocab: torch.Tensor, control: list[int] | set[int]) -> torch.Tensor:
    """draft_vocab [n] token ids -> the sorted union with `control` (EOS and chat-control ids): a draft
    vocabulary that lacks the EOS can never draft the end of a reply, so every reply's last cycle is lost."""
    missing = sorted(set(control) - set(draft_vocab.tolist()))
    if not missing:
        return draft_vocab
    return torch.cat([draft_vocab, torch.tensor(missing, dtype=draft_vocab.dtype)]).sort().values


def init_exits_from(exits: Exits, model: nn.Module, path: str | Path) -> None:
    """Copy the balconies of `exits` from the checkpoint at `path` (exits.init_from), keeping their dtype. A
    draft exit may start from a sub-model balcony (its layer and norm; `fuse` stays zero)."""
    source, meta = load_exits(model, path)
    where = f"exits.init_from: {path}"
    missing = [e for e in exits.exits if e not in source.exits]
    if missing:
        raise BalspecError(f"{where} has no exit {','.join(map(str, missing))} (it has "
                           f"{','.join(map(str, source.exits))})")
    kinds = [e for e in exits.exits if source.kinds[e] == "draft" and exits.kinds[e] == "sub-model"]
    if kinds:
        raise BalspecError(f"{where}: exit {kinds[0]} is a draft exit there, a sub-model exit in this run")
    if source.module != exits.module:
        raise BalspecError(f"{where} has {source.module} balconies, this run {exits.module} ones")
    if source.balcony_layers != exits.balcony_layers:
        raise BalspecError(f"{where} has {source.balcony_layers}-layer balconies, this run "
                           f"{exits.balcony_layers}-layer ones")
    with torch.no_grad():
        for e in exits.exits:
            target = exits[e].state_dict()
            for name, value in source[e].state_dict().items():
                target[name].copy_(value)


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
