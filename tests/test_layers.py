"""balspec's decoder-layer forward equals transformers' own, for the layer variants the engine runs."""

import pytest
import torch

from balspec.generate import BalconyModel
from balspec.tiny import tiny_tokenizer


def tiny(kind: str):
    import transformers

    common = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    if kind == "llama":
        config = transformers.LlamaConfig(**common, attention_bias=True)  # biases on q, k, v, o
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:  # per-head q/k norms
        config, cls = transformers.Qwen3Config(**common, head_dim=16), transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # biases and norms away from their zero/one init
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_engine_logits_equal_transformers_forward(kind):
    model = tiny(kind)
    engine = BalconyModel(model, tiny_tokenizer()).engine
    ids = torch.randint(3, 259, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(ids).logits[0]  # [14, vocab]
        engine.reset(32)
        prefill = engine.prefill(ids[:, :9], "full", None)  # 9 rows with a causal mask
        steps = [engine.step(ids[:, i:i + 1], i, "full", None) for i in range(9, 11)]  # one row each
        batch = engine.full_logits(engine.run_layers(engine.embed(ids[:, 11:]), 0, 4, 11))[0]  # 3 rows after 11
    torch.testing.assert_close(prefill[0], reference[8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps), reference[9:11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch, reference[11:], atol=1e-4, rtol=1e-4)
