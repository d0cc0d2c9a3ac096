"""`tiny-random`: a tiny random Llama with a byte-level tokenizer, built locally for tests and smoke runs.

It has the real architecture (LlamaForCausalLM, GQA, RoPE, tied head) at a size that trains for a few
steps on a CPU in seconds, and needs no download: `--model tiny-random` builds it in the balspec cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_NAME = "tiny-random"
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_config(num_layers: int = 6, vocab_size: int = 259, hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5, attn_implementation="sdpa")


def tiny_tokenizer():
    """Byte-level tokenizer: the 256 byte symbols plus ChatML specials (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({ch: len(_SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_model(num_layers: int = 6, seed: int = 0, vocab_size: int = 259, hidden: int = 64):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_layers, vocab_size, hidden)).eval()
    model.generation_config.eos_token_id = 2
    return model


def tiny_model_dir(root: Path) -> Path:
    """Write (once) the tiny model and tokenizer as an ordinary HF directory under `root`."""
    target = root / "models" / TINY_NAME
    if (target / "config.json").exists():
        return target
    from balspec.models import write_model_dir

    model = tiny_model()
    model.config._name_or_path = TINY_NAME
    return write_model_dir(target, model, tiny_tokenizer())
