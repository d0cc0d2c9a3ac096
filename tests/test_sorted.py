"""Sorted fine-tuning (method sorted), balconies of half a layer (exits.module) and an unfrozen base
(exits.train_base): what trains, the loss, checkpoints that load and resume, exact decoding. CPU, fp32, the
tiny random Llama; no downloads."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from balspec.checkpoint import load_exits, read_meta, save_exits
from balspec.errors import BalspecError
from balspec.exits import attach_exits, model_parts
from balspec.generate import BalconyModel
from balspec.models import load_model
from balspec.tiny import tiny_model, tiny_tokenizer
from balspec.training import train as train_module
from balspec.training.run import configure
from balspec.training.sorted import BaseDistiller, frozen_copy
from balspec.training.train import train
import balspec
from tests.test_engine import sharp_model
from tests.test_train import TINY_RECIPE, TINY_TEXT, causal_mask, tiny_config

QUICK = ["train.eval_every=0", "train.log_every=1", "optim.lr=3e-3", "optim.warmup_steps=0"]


def layer_outputs(model, ids):
    """Hidden states after trunk layers 0..N (0: embeddings), layer by layer with an explicit causal mask."""
    parts = model_parts(model)
    h = parts.embed(ids)
    rope = parts.rotary(h, torch.arange(ids.shape[1])[None])
    out = [h]
    for layer in parts.layers:
        h = layer(h, attention_mask=causal_mask(ids.shape[1]), position_embeddings=rope)
        out.append(h)
    return out


def parameters(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    """A short SoFT run on the tiny model, checkpointed halfway."""
    output = tmp_path_factory.mktemp("soft") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_config(output, "method=sorted", "train.max_steps=4", "train.save_every=2", *QUICK))
    torch.set_num_threads(threads)
    return output


def test_sorted_trains_every_base_parameter_and_no_balcony(soft):
    original, trained = load_model("tiny-random")[0], load_model(str(soft))[0]
    before, after = parameters(original), parameters(trained)
    assert before.keys() == after.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []  # every parameter moved
    meta = read_meta(soft)
    assert meta["module"] == "shared-head" and meta["balcony_layers"] == 0 and meta["train_base"] is True
    assert meta["exits"] == [2, 4] and load_file(soft / "exits.safetensors") == {}  # the balcony set is empty
    assert meta["training"]["config"]["method"] == "sorted"
    lines = [ln for ln in map(json.loads, (soft / "metrics.jsonl").read_text().splitlines()) if "loss" in ln]
    assert lines[-1]["loss"] == pytest.approx(lines[-1]["ce/2"] + lines[-1]["ce/4"] + lines[-1]["loss/full"])


@pytest.mark.parametrize("target", ["ce", "kl"])
def test_sorted_loss_is_the_sum_over_exits_and_the_last_layer(target):
    model = tiny_model().float()
    original = frozen_copy(model)
    with torch.no_grad():  # the model being trained has moved away from the original
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    model.requires_grad_(True)
    exits = attach_exits(model, [2, 4], module="shared-head")
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    ce_weight = 0.5 if target == "kl" else 0.0
    distiller = BaseDistiller(model, exits, target == "ce", ce_weight, chunk=5,
                              original=original if target == "kl" else None)
    losses = distiller(ids)
    total = losses.loss.sum() + losses.full_loss

    parts = model_parts(model)
    hidden = layer_outputs(model, ids)
    teacher = model_parts(original)  # the original full model, before training moved it
    log_p = F.log_softmax(teacher.head(teacher.norm(layer_outputs(original, ids)[-1])), -1).detach()
    expected = 0.0
    for e in (2, 4, 6):  # the exits and the last layer, each through the final norm and the shared head
        log_q = F.log_softmax(parts.head(parts.norm(hidden[e])), -1)  # [2, 12, vocab]
        ce = F.cross_entropy(log_q[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        expected = expected + (ce if target == "ce" else kl + ce_weight * ce)
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-6)
    total.backward()
    assert parts.head.weight.grad.abs().sum() > 0 and parts.norm.weight.grad.abs().sum() > 0


def test_sorted_checkpoint_loads_and_speculative_equals_its_full_output(soft):
    bm = balspec.load(model=str(soft))  # the exits are found beside the model
    assert bm.exits == [2, 4] and bm.exit_modules.module == "shared-head"
    ids = [(7 * i + 11) % 250 + 3 for i in range(9)]
    full = bm.generate(ids, mode="full", max_new_tokens=24, eos=False)
    for e in bm.exits:
        for k in (1, 3, "auto"):
            out = bm.generate(ids, mode="speculative", exit=e, draft_len=k, max_new_tokens=24, eos=False)
            assert out.token_ids == full.token_ids, (e, k)
        first = bm.generate(ids, mode="early-exit", exit=e, max_new_tokens=1, eos=False).token_ids[0]
        parts = model_parts(bm.model)
        with torch.no_grad():  # the exit is the model's own final norm and head on h_e: no balcony
            shared = parts.head(parts.norm(layer_outputs(bm.model, torch.tensor([ids]))[e]))[0, -1]
        assert first == shared.argmax().item()


def test_sorted_run_resumes_exactly(soft, tmp_path, monkeypatch):
    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    config = tiny_config(tmp_path / "resumed", "method=sorted", "train.max_steps=4", "train.save_every=2", *QUICK)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(train_module, "train_step", real_step)
    train(*configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True))
    a, b = load_file(soft / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("module", ["mlp", "attention"])
def test_half_layer_balconies_train_load_and_decode_exactly(module, tmp_path):
    output = tmp_path / module
    train(tiny_config(output, f"exits.module={module}", "train.max_steps=2", *QUICK))
    model = load_model("tiny-random")[0]
    exits, meta = load_exits(model, output)
    assert meta["module"] == module and meta["train_base"] is False
    keys = load_file(output / "exits.safetensors")  # "balconies.<exit>.layers.0.mlp.up_proj.weight", ...
    names = {k.split(".")[4] for k in keys if ".layers." in k}
    assert names == ({"post_attention_layernorm", "mlp"} if module == "mlp" else {"input_layernorm", "self_attn"})

    model = sharp_model()  # decoding: drafts that often miss
    exits = attach_exits(model, [1, 3, 4], module=module).requires_grad_(False).eval()
    ids = [(5 * i + 3) % 250 + 3 for i in range(7)]
    for path in ("lean", "generic"):
        bm = BalconyModel(model, tiny_tokenizer(), exits, layer_path=path)
        full = bm.generate(ids, mode="full", max_new_tokens=20, eos=False)
        for e in (1, 3, 4):
            for k in (1, 4, "auto"):
                out = bm.generate(ids, mode="speculative", exit=e, draft_len=k, max_new_tokens=20, eos=False)
                assert out.token_ids == full.token_ids, (path, e, k)
            sampled = [bm.generate(ids, mode=m, exit=e, temperature=0.8, seed=s, max_new_tokens=6, eos=False)
                       for m in ("speculative", "early-exit") for s in (0, 1)]
            assert all(len(o.token_ids) == 6 for o in sampled)
            early = bm.generate(ids, mode="early-exit", exit=e, max_new_tokens=8, eos=False).token_ids
            assert early == sub_model_greedy(model, exits, e, ids, 8), (path, e)


def sub_model_greedy(model, exits, exit_layer, ids, n):
    """Greedy decoding of embed -> trunk 1..e -> balcony -> norm -> head, recomputed from scratch per token."""
    parts, ids = model_parts(model), list(ids)
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            h = layer_outputs(model, x)[exit_layer]
            rope = parts.rotary(h, torch.arange(len(ids))[None])
            ids.append(parts.head(exits[exit_layer](h, rope))[0, -1].argmax().item())
    return ids[-n:]


def test_train_base_changes_the_base_and_is_recorded(tmp_path):
    output = tmp_path / "unfrozen"
    train(tiny_config(output, "exits.train_base=true", "train.max_steps=2", *QUICK))
    meta = read_meta(output)
    assert meta["train_base"] is True and meta["module"] == "layer"
    assert meta["training"]["config"]["exits"]["train_base"] is True
    before, after = parameters(load_model("tiny-random")[0]), parameters(load_model(str(output))[0])
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    bm = balspec.load(model=str(output))
    assert bm.exits == [2, 4] and bm.exit_modules.module == "layer"
    ids = [(3 * i + 7) % 250 + 3 for i in range(6)]
    full = bm.generate(ids, mode="full", max_new_tokens=16, eos=False)
    assert bm.generate(ids, mode="speculative", exit=2, draft_len=3, max_new_tokens=16, eos=False).token_ids \
        == full.token_ids
    with pytest.raises(BalspecError, match="different weights"):  # its exits fit the trained base only
        load_exits(load_model("tiny-random")[0], output)


def test_module_is_checked_by_the_schema(tmp_path):
    model = tiny_model()
    save_exits(attach_exits(model, [2], module="mlp"), model, tmp_path)
    meta = json.loads((tmp_path / "balspec.json").read_text())
    for field, value, message in [("module", "half", "module must be one of layer, mlp"),
                                  ("balcony_layers", 0, "balcony_layers must be a whole number >= 1"),
                                  ("train_base", "yes", "train_base must be true or false")]:
        (tmp_path / "balspec.json").write_text(json.dumps({**meta, field: value}))
        with pytest.raises(BalspecError, match=message):
            read_meta(tmp_path)


@pytest.mark.parametrize("sets, message", [
    (["method=soft"], "method: must be one of balcony, sorted"),
    (["exits.module=ffn"], "exits.module: must be one of layer, mlp, attention"),
    (["method=sorted", "exits.module=mlp"], "exits.module: must be layer with method sorted"),
    (["loss.sorted_target=mse"], "loss.sorted_target: must be one of ce, kl"),
    (["exits.module=mlp", "exits.draft=[2]"], "exits.draft: must be empty unless exits.module is layer"),
    (["exits.train_base=true", "exits.draft=[2]"], "exits.draft: must be empty with exits.train_base"),
])
def test_bad_settings_are_one_line(sets, message, tmp_path):
    with pytest.raises(BalspecError, match=message):
        configure(TINY_RECIPE, [f"data.train={TINY_TEXT}", *sets], {"train.output": str(tmp_path / "x")}, False)


def test_shared_head_exit_exports_as_the_first_layers_and_half_layers_are_refused(soft, tmp_path):
    from balspec.export import build_submodel
    from balspec.info import describe_checkpoint

    model = load_model(str(soft))[0]
    exits, _ = load_exits(model, soft)
    ids = torch.randint(3, 259, (1, 10), generator=torch.Generator().manual_seed(2))
    parts = model_parts(model)
    with torch.no_grad():
        sub = build_submodel(model, exits, 2)
        assert sub.config.num_hidden_layers == 2  # trunk layers 1..2, the final norm, the shared head
        expected = parts.head(parts.norm(layer_outputs(model, ids)[2]))
        assert torch.allclose(sub(ids).logits, expected, atol=1e-5)
    info = describe_checkpoint(soft)
    assert info["module"] == "shared-head" and info["train_base"] is True and info["parameters_total"] == 0
    with pytest.raises(BalspecError, match="an mlp-only balcony is not a decoder layer"):
        build_submodel(model, attach_exits(model, [2], module="mlp"), 2)


def test_half_layer_balconies_need_a_pre_norm_layer():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(BalspecError, match="Gemma2DecoderLayer has another form; use layer"):
        attach_exits(model, [2], module="mlp")  # its norms sit around the MLP, not only before it
