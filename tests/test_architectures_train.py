"""Training balconies on architectures beyond Llama (tiny random models from tests/test_architectures.py, CPU,
fp32): one `balspec train` step moves the balconies and leaves the base bit-identical, the trained exits decode
exactly; training's forward is the engine's (windows, per-kind rotary bases, eager masks) and its loss is on the
model's own logits (soft-caps, divisors); checkpoints are tied to the config fields that change the arithmetic."""

import pytest
import torch

from balspec.checkpoint import config_fingerprint, load_exits, save_exits
from balspec.errors import BalspecError
from balspec.exits import attach_exits, model_parts
from balspec.generate import BalconyModel
from balspec.tiny import tiny_tokenizer
from balspec.training import train as train_module
from balspec.training.loss import Distiller, teacher_forward
from balspec.training.train import train
from tests.test_architectures import assert_sub_model_matches_early_exit, build, configs, make_bm, prompt
from tests.test_draft_exits import assert_engine_drafts_as_trained
from tests.test_train import tiny_config

TRAINED = ["gemma2", "gemma3", "phi3", "olmo2", "granite", "qwen2"]


def saved(kind, root):
    """The tiny random model of `kind` as a model directory `balspec train --model` loads."""
    path = root / kind
    if not (path / "config.json").exists():
        build(kind).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def train_one_step(kind, tmp_path, *sets):
    """One step of `balspec train` on the saved model into tmp_path / "run"; returns what it saw: the model as
    loaded ("model"), its state before ("before"), exits as initialised ("initial") and as saved ("exits")."""
    seen = {}
    load_model, save = train_module.load_model, train_module.save_exits

    def spy_load(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        seen["model"], seen["before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        seen["initial"] = attach_exits(model, [1, 2], draft_exits=[1] if "exits.draft=[1]" in sets else [])
        return model, tokenizer

    def spy_save(exits, model, path, **kwargs):
        seen["exits"] = exits
        return save(exits, model, path, **kwargs)

    # exits 1 and 2: exit 3's balcony, a copy of layer 4 on layer 3's states, is the full model (nothing to learn)
    config = tiny_config(tmp_path / "run", f"model.name={saved(kind, tmp_path)}", "exits.layers=[1,2]",
                         "train.max_steps=1", "train.eval_every=0", "optim.lr=3e-3", "optim.warmup_steps=0", *sets)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "load_model", spy_load)
        mp.setattr(train_module, "save_exits", spy_save)
        train(config)
    return seen


def assert_trained_and_exact(seen, kind, output):
    model = seen["model"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())  # the base: bit-identical
    for e in (1, 2):
        moved = [not torch.equal(a, b) for a, b in zip(seen["exits"][e].parameters(), seen["initial"][e].parameters())]
        assert any(moved), (kind, e)
    exits, _ = load_exits(model, output)  # the checkpoint loads onto the model it was trained for
    bm = BalconyModel(model, tiny_tokenizer(), exits)
    assert bm.engine.layer_path == configs()[kind][2]
    ids = prompt(9)  # longer than the sliding window
    full = bm.generate(ids, mode="full", max_new_tokens=12, eos=False)
    for exit_layer in (1, 2):
        for k, width in ((1, 1), (4, 1), ("auto", 3)):
            out = bm.generate(ids, mode="speculative", exit=exit_layer, draft_len=k, draft_width=width,
                              max_new_tokens=12, eos=False)
            assert out.token_ids == full.token_ids, (kind, exit_layer, k, width)


@pytest.mark.parametrize("kind", TRAINED)
def test_one_train_step_moves_the_balconies_and_decodes_exactly(kind, tmp_path):
    assert_trained_and_exact(train_one_step(kind, tmp_path), kind, tmp_path / "run")


def test_draft_kind_exits_train_on_the_generic_path(tmp_path):
    seen = train_one_step("gemma2", tmp_path, "exits.draft=[1]", "exits.draft_chain=3")
    assert seen["exits"].kinds == {1: "draft", 2: "sub-model"}
    assert seen["exits"][1].fuse.weight.abs().sum() > 0  # fuse left zero: it was trained
    assert_trained_and_exact(seen, "gemma2", tmp_path / "run")


def balcony_inputs(model, exits, ids):
    """(trunk states per exit, final normed states, the balconies' rotary embeddings), as training makes them."""
    final, trunk = teacher_forward(model, ids, exits.exits)
    arch = exits.arch
    positions = torch.arange(ids.shape[1])[None]
    return trunk, final, arch.rotary(model_parts(model).rotary, trunk[0], positions, arch.balcony_kind)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "qwen2", "granite"])
def test_training_forward_equals_the_exported_sub_model(kind):
    """head(balcony(trunk state)) as training computes it, soft-capped or divided as the model does, over a block
    longer than the window, equals the logits of the sub-model transformers runs (export): masks, windows, the
    last layer's rotary base and the logit formula are the model's."""
    from balspec.export import build_submodel

    model = build(kind)
    exits = make_bm(kind, exits=(2,)).exit_modules
    ids = torch.tensor([prompt(16)])
    trunk, _, rope = balcony_inputs(model, exits, ids)
    with torch.no_grad():
        ours = exits.arch.finish_logits(model_parts(model).head(exits[2](trunk[0], rope)))
        theirs = build_submodel(model, exits, 2)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_loss_is_on_the_models_own_logits():
    """The fused KL with Gemma's soft-cap (and Granite's divisor) equals KL(p || q) of the soft-capped logits
    written out with autograd, gradients included."""
    import torch.nn.functional as F

    for kind in ("gemma2", "granite"):
        model = build(kind)
        exits = make_bm(kind, exits=(1, 3)).exit_modules.requires_grad_(True)
        ids = torch.tensor([prompt(12), prompt(12, salt=5)])
        trunk, final, rope = balcony_inputs(model, exits, ids)
        head, arch = model_parts(model).head, exits.arch
        exits.zero_grad()
        fused = Distiller(exits, chunk=7)(trunk, rope, final, head).loss.sum()
        fused.backward()
        grads = {k: p.grad.clone() for k, p in exits.named_parameters()}
        exits.zero_grad()
        with torch.no_grad():
            log_p = torch.log_softmax(model(ids).logits, -1).flatten(0, 1)  # the model's own logits
        reference = sum(F.kl_div(torch.log_softmax(arch.finish_logits(head(exits[e](h, rope))), -1).flatten(0, 1),
                                 log_p, log_target=True, reduction="batchmean") for e, h in zip(exits.exits, trunk))
        reference.backward()
        torch.testing.assert_close(fused, reference.detach(), atol=1e-5, rtol=1e-5)
        for k, p in exits.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gemma2", "qwen2"])
def test_draft_training_forward_matches_the_engine_draft(kind):
    """As tests/test_draft_exits.py on Llama, through the generic path, with the pending token beyond the
    window: Balcony.forward with r unverified rows is the engine's (r+1)-th draft of a cycle."""
    bm = make_bm(kind, exits=(1, 3), draft_exits=(3,))
    with torch.no_grad():
        bm.exit_modules[3].fuse.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    seq = prompt(14, salt=2)
    e, pending = 3, 9
    engine, balcony = bm.engine, bm.exit_modules[3]
    with torch.inference_mode():
        trunk, final, rope = balcony_inputs(bm.model, bm.exit_modules, torch.tensor([seq]))
        positions = torch.arange(len(seq))[None]
        unverified = (positions - pending).clamp(min=0)  # 0 up to the pending token, then 1, 2, ...
        trained = balcony(trunk[1], rope, final, unverified)  # [1, len(seq), hidden]
        assert_engine_drafts_as_trained(engine, e, seq, pending, trained)


def test_exits_are_checked_against_the_models_depth_at_train_start(tmp_path):
    for exits, bad, zero in (("[1,4]", "4", ""), ("[0,2]", "0", r" \(0 only for a draft-kind exit\)")):
        with pytest.raises(BalspecError, match=rf"^--exits: \[{bad}\] out of range; this model has 4 layers, so exits "
                                               rf"must lie in 1\.\.3{zero}$"):
            train(tiny_config(tmp_path / "run", f"model.name={saved('gemma2', tmp_path)}", f"exits.layers={exits}"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_checkpoint_for_another_window_is_refused(tmp_path):
    """Same weights, another sliding window (or soft-cap): other arithmetic, so another config fingerprint."""
    import transformers as t

    model = build("gemma2")
    save_exits(attach_exits(model, [2]), model, tmp_path / "exits")
    for change in ({"sliding_window": 7}, {"final_logit_softcapping": 3.0}, {"layer_types": ["full_attention"] * 4}):
        config = t.Gemma2Config(**{**model.config.to_dict(), **change})
        other = t.Gemma2ForCausalLM(config).eval()
        other.load_state_dict(model.state_dict())
        assert config_fingerprint(other.config) != config_fingerprint(model.config), change
        with pytest.raises(BalspecError, match="was trained for another base model"):
            load_exits(other, tmp_path / "exits")
    load_exits(model, tmp_path / "exits")  # the model it was trained for loads


def test_the_shipped_exits_keep_their_config_fingerprint():
    """The Llama config has none of the window / soft-cap fields: its fingerprint is what the shipped exits hold."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from balspec.models import default_model_dir

    meta = json.loads((Path(__file__).parents[1] / "balspec" / "default_exits" / "balspec.json").read_text())
    config = AutoConfig.from_pretrained(default_model_dir())
    assert config_fingerprint(config) == meta["base_model"]["config_fingerprint"]


def test_draft_kind_gradients_equal_with_and_without_checkpointing():
    """context_layer stops each K/V-making pass early; recomputed under gradient checkpointing, it gives the
    same gradients."""
    model = build("gemma2")
    exits = make_bm("gemma2", exits=(1, 2), draft_exits=(1,)).exit_modules.requires_grad_(True)
    ids = torch.tensor([prompt(12), prompt(12, salt=5)])
    trunk, final, rope = balcony_inputs(model, exits, ids)
    grads = []
    for checkpointing in (False, True):
        exits.zero_grad()
        distiller = Distiller(exits, chunk=7, checkpointing=checkpointing, draft_chain=3)
        draws = torch.Generator().manual_seed(0)
        distiller(trunk, rope, final, model_parts(model).head, draws=draws).loss.sum().backward()
        grads.append({k: p.grad.clone() for k, p in exits.named_parameters()})
    assert grads[0]["balconies.1.fuse.weight"].abs().sum() > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


def test_trained_gemma3_exit_exported_to_disk_gives_the_early_exit_logits(tmp_path):
    """Train, save, load, export exit 2 of Gemma 3 (local/global layers, soft-capped logits) as a standard
    checkpoint, load it with transformers alone: its logits are early-exit mode's."""
    from balspec.export import export_submodel
    from tests.test_export import load_plain

    seen = train_one_step("gemma3", tmp_path)
    model = seen["model"]
    exits, _ = load_exits(model, tmp_path / "run")
    sub = load_plain(export_submodel(model, tiny_tokenizer(), exits, 2, tmp_path / "exit2"))
    assert sub.config.model_type == "gemma3_text" and sub.config.num_hidden_layers == 3
    bm = BalconyModel(model, tiny_tokenizer(), exits)
    ids = prompt(12)
    out = bm.generate(ids, mode="early-exit", exit=2, max_new_tokens=6, eos=False)
    assert_sub_model_matches_early_exit(bm, sub, ids, out.token_ids, 2)
