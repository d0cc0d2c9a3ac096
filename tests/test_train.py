"""Training: the loss is the paper's KL, only balconies move, checkpoints load and resume exactly, bad input
stops with one line before anything is written. CPU, fp32, the tiny random Llama; no downloads."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from balspec import cli
from balspec.checkpoint import load_exits, save_exits
from balspec.errors import BalspecError
from balspec.exits import attach_exits, model_parts
from balspec.tiny import tiny_model, tiny_tokenizer
from balspec.training import train as train_module
from balspec.training.config import resolve_config
from balspec.training.data import PackedBlocks, StreamedBlocks, load_blocks, pack, read_records
from balspec.training.loss import Distiller, distill_losses, next_token_labels, teacher_forward
from balspec.training.run import configure
from balspec.training.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(ROOT / "recipes" / "tiny.yaml")
TINY_TEXT = str(ROOT / "tests" / "data" / "tiny.txt")


def tiny_config(output, *sets):
    return resolve_config(TINY_RECIPE, [f"data.train={TINY_TEXT}", f"train.output={output}", *sets])


def causal_mask(seq):
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]  # [1, 1, seq, seq]


def manual_exit_logits(model, exits, exit_layer, ids):
    """embed -> trunk 1..e -> balcony -> norm -> head, layer by layer with an explicit causal mask."""
    parts = model_parts(model)
    positions = torch.arange(ids.shape[1])[None]
    h = parts.embed(ids)
    rope = parts.rotary(h, positions)
    for layer in [*parts.layers[:exit_layer], *exits[exit_layer].layers]:
        h = layer(h, attention_mask=causal_mask(ids.shape[1]), position_embeddings=rope)
    return parts.head(exits[exit_layer].norm(h))


def perturbed_exits(model, layers, seed=1):
    exits = attach_exits(model, layers).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in exits.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return exits


def test_one_forward_gives_teacher_and_trunk_layer_outputs():
    model = tiny_model()
    parts = model_parts(model)
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final, trunk = teacher_forward(model, ids, [1, 3, 5])
        torch.testing.assert_close(parts.head(final), model(ids).logits, atol=1e-6, rtol=0)  # the teacher
        h = parts.embed(ids)
        rope = parts.rotary(h, torch.arange(12)[None])
        manual = []
        for layer in parts.layers[:5]:
            h = layer(h, attention_mask=causal_mask(12), position_embeddings=rope)
            manual.append(h)
    for got, e in zip(trunk, [1, 3, 5]):
        torch.testing.assert_close(got, manual[e - 1], atol=1e-6, rtol=0)


def test_exit_submodel_equals_manual_composition():
    model = tiny_model()
    parts = model_parts(model)
    exits = perturbed_exits(model, [2, 4])
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, trunk = teacher_forward(model, ids, exits.exits)
        rope = parts.rotary(trunk[0], torch.arange(12)[None].expand(2, -1))
        for e, h in zip(exits.exits, trunk):
            logits = parts.head(exits[e](h, position_embeddings=rope))  # [2, 12, vocab]
            torch.testing.assert_close(logits, manual_exit_logits(model, exits, e, ids), atol=1e-5, rtol=0)


def hand_written_kl(teacher, hidden, head, labels=None, ce_weight=0.0):
    """Sum over exits of the mean over positions of KL(p || q) (+ ce_weight * CE), one position at a time."""
    total = 0.0
    for h in hidden:
        kl, ce, count = 0.0, 0.0, 0
        for i in range(teacher.shape[0]):
            p = torch.softmax(teacher[i].double(), -1)
            log_q = torch.log_softmax(head(h[i]).double(), -1)
            kl = kl + (p * (torch.log(p) - log_q)).sum()
            if labels is not None and labels[i] >= 0:
                ce, count = ce - log_q[labels[i]], count + 1
        total = total + kl / teacher.shape[0] + (ce_weight * ce / count if labels is not None else 0.0)
    return total


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_fused_kl_matches_hand_written_loop(ce_weight):
    generator = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 23, 16, 50
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    teacher_hidden = torch.randn(n, hidden_size, generator=generator) * 3  # [positions, hidden]
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[[4, 22]] = -100
    hidden = [torch.randn(n, hidden_size, generator=generator, requires_grad=True) for _ in range(3)]

    losses = distill_losses(hidden, teacher_hidden, head, labels, ce_weight, chunk=7)  # chunks split positions
    losses.loss.sum().backward()
    fused_grads = [h.grad.clone() for h in hidden]
    for h in hidden:
        h.grad = None
    teacher = head(teacher_hidden)  # [positions, vocab]
    expected = hand_written_kl(teacher, hidden, head, labels, ce_weight)
    expected.backward()

    torch.testing.assert_close(losses.loss.sum().double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, h in zip(fused_grads, hidden):
        torch.testing.assert_close(got, h.grad, atol=1e-6, rtol=1e-4)
    top1 = [(head(h).argmax(-1) == teacher.argmax(-1)).float().mean() for h in hidden]
    torch.testing.assert_close(losses.agree, torch.stack(top1))
    if ce_weight:
        ce = [F.cross_entropy(head(h)[labels >= 0], labels[labels >= 0]) for h in hidden]
        torch.testing.assert_close(losses.ce, torch.stack(ce).detach())


def test_draft_vocabulary_kl_is_the_renormalised_kl_over_the_vocabulary_weighted_by_its_teacher_mass():
    generator = torch.Generator().manual_seed(1)
    n, hidden_size, vocab_size = 19, 16, 50
    head = torch.nn.Linear(hidden_size, vocab_size, bias=False).requires_grad_(False)
    teacher_hidden = torch.randn(n, hidden_size, generator=generator) * 3  # [positions, hidden]
    vocab = torch.randperm(vocab_size, generator=generator)[:12].sort().values  # [12] token ids
    hidden = [torch.randn(n, hidden_size, generator=generator, requires_grad=True) for _ in range(2)]

    losses = distill_losses(hidden, teacher_hidden, head, chunk=6, vocab=vocab)
    losses.loss.sum().backward()
    fused_grads = [h.grad.clone() for h in hidden]
    for h in hidden:
        h.grad = None
    p = torch.softmax(head(teacher_hidden).double(), -1)[:, vocab]  # [positions, 12]: the teacher's mass in V
    mass = p.sum(-1, keepdim=True)  # [positions, 1]
    expected = 0.0
    for h in hidden:
        log_q = torch.log_softmax(head(h)[:, vocab].double(), -1)  # the reduced draft head's distribution
        renormalised_kl = (p / mass * ((p / mass).log() - log_q)).sum(-1)  # KL(p restricted to V || q)
        expected = expected + (mass.squeeze(-1) * renormalised_kl).mean()
    expected.backward()

    torch.testing.assert_close(losses.loss.sum().double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, h in zip(fused_grads, hidden):
        torch.testing.assert_close(got, h.grad, atol=1e-6, rtol=1e-4)
    teacher_top = head(teacher_hidden).argmax(-1)  # over the whole vocabulary
    top1 = [(vocab[head(h)[:, vocab].argmax(-1)] == teacher_top).float().mean() for h in hidden]
    torch.testing.assert_close(losses.agree, torch.stack(top1))
    assert float(losses.agree.min()) < 1 and not (teacher_top[:, None] == vocab).any(-1).all()  # some out of V


@pytest.mark.parametrize("reduced", [False, True], ids=["whole-vocabulary", "draft-vocabulary"])
def test_top1_cross_entropy_adds_the_ce_to_the_teachers_top1_token(reduced):
    """loss.top1_weight: KL (over V with a draft vocabulary) + w x CE to the teacher's top-1 token, averaged over
    every position, a position whose top-1 lies outside V adding none: loss and gradients as written by hand."""
    generator = torch.Generator().manual_seed(3)
    n, hidden_size, vocab_size, w = 21, 16, 50, 0.7
    head = torch.nn.Linear(hidden_size, vocab_size, bias=False).requires_grad_(False)
    teacher_hidden = torch.randn(n, hidden_size, generator=generator) * 3  # [positions, hidden]
    vocab = torch.randperm(vocab_size, generator=generator)[:15].sort().values if reduced else None
    hidden = [torch.randn(n, hidden_size, generator=generator, requires_grad=True) for _ in range(2)]

    losses = distill_losses(hidden, teacher_hidden, head, chunk=8, vocab=vocab, top1_weight=w)
    losses.loss.sum().backward()
    fused_grads = [h.grad.clone() for h in hidden]
    for h in hidden:
        h.grad = None
    teacher = head(teacher_hidden).double()
    top = teacher.argmax(-1)  # [positions], over the whole vocabulary
    columns = torch.arange(vocab_size) if vocab is None else vocab
    p = torch.softmax(teacher, -1)[:, columns]
    mass = p.sum(-1, keepdim=True)
    inside = (top[:, None] == columns).any(-1)  # [positions]
    target = (top[:, None] == columns).double().argmax(-1)  # the top-1's column (any where outside)
    expected, ces = 0.0, []
    for h in hidden:
        log_q = torch.log_softmax(head(h)[:, columns].double(), -1)
        kl = (mass.squeeze(-1) * (p / mass * ((p / mass).log() - log_q)).sum(-1)).mean()
        ce = (-log_q.gather(1, target[:, None]).squeeze(1) * inside).sum() / n
        expected = expected + kl + w * ce
        ces.append(ce)
    expected.backward()

    torch.testing.assert_close(losses.loss.sum().double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, h in zip(fused_grads, hidden):
        torch.testing.assert_close(got, h.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(losses.ce.double(), torch.stack(ces).detach(), atol=1e-5, rtol=1e-5)
    assert inside.all() != reduced  # the reduced case has positions outside V


def test_distiller_equals_reference_kl_and_gradients():
    model = tiny_model()
    parts = model_parts(model)
    exits = perturbed_exits(model, [2, 4])
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(2))
    teacher_hidden, trunk = teacher_forward(model, ids, exits.exits)
    rope = parts.rotary(trunk[0], torch.arange(12)[None].expand(2, -1))
    fused = []
    for checkpointing in (False, True):
        distiller = Distiller(exits, chunk=10, checkpointing=checkpointing)
        for _ in range(2):  # the second call reuses the workspace buffers
            exits.zero_grad()
            distiller(trunk, rope, teacher_hidden, parts.head).loss.sum().backward()
        fused.append({k: p.grad.clone() for k, p in exits.named_parameters()})
    exits.zero_grad()

    with torch.no_grad():
        teacher = model(ids).logits  # [2, 12, vocab]: the plain forward of the full model
    reference = 0.0
    for e, h in zip(exits.exits, trunk):  # the plain path: head(balcony(h_e)), F.kl_div, mean over positions
        log_q = torch.log_softmax(parts.head(exits[e](h, position_embeddings=rope)), -1).flatten(0, 1)
        log_p = torch.log_softmax(teacher, -1).flatten(0, 1)
        reference = reference + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    reference.backward()
    for k, p in exits.named_parameters():
        for grads in fused:
            torch.testing.assert_close(grads[k], p.grad, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short tiny run, with the model as loaded and the exits as saved captured along the way."""
    output = tmp_path_factory.mktemp("run") / "tiny"
    seen = {}
    load_model, save_exits = train_module.load_model, train_module.save_exits

    def spy_load(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        seen["model"], seen["base_before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, tokenizer

    def spy_save(exits, model, path, **kwargs):
        seen["exits"] = exits
        return save_exits(exits, model, path, **kwargs)

    config = tiny_config(output, "train.max_steps=24", "optim.lr=3e-3", "train.log_every=4",
                         "train.eval_every=0", "train.save_every=12")
    threads = torch.get_num_threads()  # module scope: set up before conftest's one-thread fixture applies
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "load_model", spy_load)
        mp.setattr(train_module, "save_exits", spy_save)
        train(config)
    torch.set_num_threads(threads)
    return output, seen


def test_training_leaves_base_bit_identical(trained):
    _, seen = trained
    after = seen["model"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["base_before"].items())
    assert all(not p.requires_grad for p in seen["model"].parameters())


def test_loss_falls(trained):
    output, _ = trained
    lines = [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert losses[-1] < 0.6 * losses[0]
    evals = [ln for ln in lines if "eval/kl/2" in ln]
    assert evals and 0 <= evals[-1]["eval/top1/4"] <= 1


def test_run_directory_and_record(trained):
    output, _ = trained
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-0000012", "step-0000024"]
    record = json.loads((output / "balspec.json").read_text())["training"]
    assert record["steps"] == 24 and record["tokens_seen"] == 24 * 4 * 64
    meta = json.loads((output / "balspec.json").read_text())
    assert meta["train_base"] is False and meta["module"] == "layer" and not (output / "config.json").exists()
    assert record["config"]["optim"]["lr"] == 3e-3 and record["device"].startswith("cpu")
    assert record["tokens_per_s"] > 0 and record["data"]["train"] == TINY_TEXT
    assert set(record["eval"]) == {"eval/kl/2", "eval/kl/4", "eval/top1/2", "eval/top1/4"}


def test_save_then_load_gives_identical_exit_logits(trained):
    output, seen = trained
    model, trained_exits = seen["model"], seen["exits"]
    loaded, meta = load_exits(model, output)
    assert meta["exits"] == [2, 4]
    ids = torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for e in (2, 4):
            expected = manual_exit_logits(model, trained_exits, e, ids)
            assert torch.equal(manual_exit_logits(model, loaded, e, ids), expected)
        initial = attach_exits(model, [2])[2].parameters()
        moved = any(not torch.equal(a, b) for a, b in zip(loaded[2].parameters(), initial))
    assert moved  # the checkpoint holds trained weights, not the initial copy


def test_init_from_continues_from_a_checkpoint(trained, tmp_path):
    output, seen = trained
    model = seen["model"]
    train(tiny_config(tmp_path / "next", f"exits.init_from={output}", "exits.layers=[4]", "train.max_steps=1",
                      "optim.lr=1e-12", "train.eval_every=0"))
    continued, _ = load_exits(model, tmp_path / "next")
    source, _ = load_exits(model, output)
    for a, b in zip(continued[4].parameters(), source[4].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(BalspecError, match="has no exit 3"):
        train(tiny_config(tmp_path / "bad", f"exits.init_from={output}", "exits.layers=[3]", "train.max_steps=1"))



def with_draft_vocab(run: Path, model, to: Path) -> torch.Tensor:
    """A copy of the exits of `run` at `to` that also holds a draft vocabulary; returns the vocabulary."""
    exits, _ = load_exits(model, run)
    exits.draft_vocab = torch.arange(3, 131)
    save_exits(exits, model, to)
    return exits.draft_vocab


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if "loss" in ln]


def test_continued_exits_keep_the_draft_vocabulary_they_had(trained, tmp_path):
    """Exits continued from a checkpoint with a draft vocabulary (the shipped exits have one) keep it in every
    checkpoint and the final exits, recorded as such, so they draft through the same reduced head; their loss is
    still the KL over every token: the same as from a checkpoint without one."""
    output, seen = trained
    model = seen["model"]
    vocab = with_draft_vocab(output, model, tmp_path / "with-vocab")
    sets = ["exits.layers=[4]", "train.max_steps=2", "train.save_every=1", "train.log_every=1", "train.eval_every=0"]
    train(tiny_config(tmp_path / "kept", f"exits.init_from={tmp_path / 'with-vocab'}", *sets))
    train(tiny_config(tmp_path / "plain", f"exits.init_from={output}", *sets))
    kept = tmp_path / "kept"
    for path in (kept, *sorted((kept / "checkpoints").iterdir())):
        assert torch.equal(load_exits(model, path)[0].draft_vocab, vocab), path
    meta = json.loads((kept / "balspec.json").read_text())
    assert meta["draft_vocab"] == {"size": 128, "source": f"exits.init_from: {tmp_path / 'with-vocab'}"}
    assert load_exits(model, tmp_path / "plain")[0].draft_vocab is None
    assert "draft_vocab" not in json.loads((tmp_path / "plain" / "balspec.json").read_text())
    assert len(losses(kept)) == 2 and losses(kept) == losses(tmp_path / "plain")


def test_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    sets = ["train.max_steps=6", "train.save_every=3", "train.log_every=1", "train.eval_every=0",
            "optim.grad_accum=2", "optim.batch_size=2"]
    train(tiny_config(tmp_path / "straight", *sets))

    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # after the step-3 checkpoint, in the middle of the run
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    assert not (tmp_path / "resumed" / "exits.safetensors").exists()
    monkeypatch.setattr(train_module, "train_step", real_step)
    resumed = {"train.output": str(tmp_path / "resumed")}
    with pytest.raises(BalspecError, match="--resume: optim.lr differs from the run being resumed"):
        configure(TINY_RECIPE, [f"data.train={TINY_TEXT}", *sets, "optim.lr=0.1"], resumed, resume=True)
    config, checkpoint = configure(None, ["train.log_every=2"], resumed, resume=True)  # saved config is the base
    assert checkpoint.name == "step-0000003" and config.optim.grad_accum == 2 and config.train.log_every == 2
    train(config, checkpoint)

    a, b = load_file(tmp_path / "straight" / "exits.safetensors"), load_file(tmp_path / "resumed" / "exits.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train(*configure(None, [], {"train.output": str(tmp_path / "straight")}, resume=True))  # finished: no step
    again = load_file(tmp_path / "straight" / "exits.safetensors")
    assert all(torch.equal(a[k], again[k]) for k in a)

    def losses(run):
        lines = map(json.loads, (tmp_path / run / "metrics.jsonl").open())
        return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}
    straight, resumed = losses("straight"), losses("resumed")
    assert list(resumed) == [1, 2, 3, 4, 6]  # 1..3 before the interruption, then every 2nd step and the last
    assert all(resumed[step] == straight[step] for step in resumed)


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["balspec", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_with_recipe(tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli(["train", "--recipe", TINY_RECIPE, "--data", TINY_TEXT, "--max-steps", "2",
                            "--output", str(tmp_path / "run")], capsys, monkeypatch)
    assert code == 0 and out.strip() == str(tmp_path / "run")
    assert (tmp_path / "run" / "exits.safetensors").exists()


# case: (flags added to a good tiny command, part of the one error line); {tmp} is the test's directory
BAD_INPUTS = {
    "exit out of range": (["--exits", "2,9"], "--exits: [9] out of range"),
    "exit duplicated": (["--exits", "2,2"], "--exits: duplicated"),
    "exit is the last layer": (["--exits", "6"], "out of range"),
    "unknown model": (["--model", "{tmp}/no-such-model"], "--model:"),
    "unknown recipe key": (["--recipe", "{tmp}/bad.yaml"], "unknown key 'optim.lrr'"),
    "wrong type in recipe": (["--recipe", "{tmp}/typo.yaml"], "optim.batch_size: expected int"),
    "wrong type in --set": (["--set", "optim.lr=fast"], "optim.lr: expected float"),
    "empty dataset": (["--data", "{tmp}/empty.txt"], "is empty"),
    "dataset under one block": (["--data", "{tmp}/short.txt"], "gives 0 blocks"),
    "unknown train_on": (["--set", "data.train_on=answers"], "data.train_on: must be one of all, assistant"),
    "output holds something else": (["--output", "{tmp}/other"], "not a balspec run"),
    "nothing to resume": (["--resume"], "holds no balspec run; nothing to resume"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short for a block")
    (tmp_path / "bad.yaml").write_text("model:\n  name: tiny-random\noptim:\n  lrr: 0.1\n")
    (tmp_path / "typo.yaml").write_text("model:\n  name: tiny-random\noptim:\n  batch_size: two\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a balspec run")
    flags, message = BAD_INPUTS[case]
    output = tmp_path / "run"
    args = ["train", "--recipe", TINY_RECIPE, "--data", TINY_TEXT, "--output", str(output),
            *[f.format(tmp=tmp_path) for f in flags]]  # a later --recipe/--data/--output wins
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 1
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not output.exists()
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_chat_records_use_the_chat_template(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]},
            {"text": "plain text record"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) * 8)
    config = resolve_config(None, [f"data.train={tmp_path / 'chat.jsonl'}", "data.block_size=32"]).data
    tokenizer = tiny_tokenizer()
    blocks = pack(*read_records(config.train, config, "data.train"), tokenizer, config)
    text = tokenizer.decode(sum((b["input_ids"] for b in blocks), []))
    assert "<|im_start|>user\nHow are you?<|im_end|>" in text and "plain text record<|im_end|>" in text


CHATS = [{"messages": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."},
                        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then more."}]},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello there"}]},
         {"text": "plain text record"}]


def counted_text(tokenizer, blocks) -> str:
    """The text of the tokens the loss predicts: token t + 1 for every counted position t."""
    ids = sum((b["input_ids"] for b in blocks), [])
    mask = sum((b["loss_mask"] for b in blocks), [])
    return tokenizer.decode([ids[t + 1] for t in range(len(ids) - 1) if mask[t]])


def test_assistant_positions_are_the_assistant_turns(tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS) * 6)
    config = resolve_config(None, [f"data.train={tmp_path / 'chat.jsonl'}", "data.block_size=40",
                                   "data.train_on=assistant"]).data
    tokenizer = tiny_tokenizer()
    blocks = pack(*read_records(config.train, config, "data.train"), tokenizer, config)
    one = "Fine.<|im_end|>\nThen more.<|im_end|>\nHello there<|im_end|>\nplain text record"
    text = counted_text(tokenizer, blocks)
    assert one in text  # assistant turns with their end markers, plain text whole
    assert "How are you" not in text and "Hi" not in text and "Be brief" not in text and "user" not in text
    whole = tokenizer.decode(sum((b["input_ids"] for b in blocks), []))
    assert "<|im_start|>user\nHow are you?<|im_end|>" in whole  # prompts stay in the context


@pytest.mark.integration
def test_assistant_positions_in_the_default_template(tmp_path):
    """SmolLM2's template inserts a default system prompt; the counted tokens are still the answers only."""
    from transformers import AutoTokenizer

    from balspec.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS[:2]) * 20)
    config = resolve_config(None, [f"data.train={tmp_path / 'chat.jsonl'}", "data.block_size=64",
                                   "data.train_on=assistant"]).data
    blocks = pack(*read_records(config.train, config, "data.train"), tokenizer, config)
    text = counted_text(tokenizer, blocks)
    assert "Fine.<|im_end|>" in text and "Hello there<|im_end|>" in text
    assert "How are you" not in text and "SmolLM" not in text and "Be brief" not in text


def test_masked_loss_counts_only_the_masked_positions():
    model = tiny_model()
    parts = model_parts(model)
    exits = perturbed_exits(model, [2, 4])
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(3))
    teacher_hidden, trunk = teacher_forward(model, ids, exits.exits)
    rope = parts.rotary(trunk[0], torch.arange(12)[None].expand(2, -1))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3:7], mask[1, 9:] = True, True
    distiller = Distiller(exits, chunk=5)
    masked = distiller(trunk, rope, teacher_hidden, parts.head, loss_mask=mask)
    masked.loss.sum().backward()
    grads = {k: p.grad.clone() for k, p in exits.named_parameters()}
    exits.zero_grad()
    assert masked.positions == 7
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits, -1)[mask]  # [7, vocab]
    reference = 0.0
    for e, h in zip(exits.exits, trunk):  # balconies see the whole block; the KL is over the masked rows
        log_q = torch.log_softmax(parts.head(exits[e](h, position_embeddings=rope)), -1)[mask]
        reference = reference + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    reference.backward()
    for k, p in exits.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-6, rtol=1e-4)
    none = distiller(trunk, rope, teacher_hidden, parts.head, loss_mask=torch.zeros_like(mask))
    none.loss.sum().backward()  # nothing counted: zero loss, and backward still works
    assert none.positions == 0 and float(none.loss.detach().abs().sum()) == 0.0


def test_training_on_assistant_positions(tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS) * 30)
    output = tmp_path / "run"
    config = tiny_config(output, f"data.train={tmp_path / 'chat.jsonl'}", "data.train_on=assistant",
                         "data.block_size=48", "data.heldout_blocks=2", "train.max_steps=3", "train.eval_every=3")
    train(config)
    record = json.loads((output / "balspec.json").read_text())["training"]
    assert record["config"]["data"]["train_on"] == "assistant" and record["data"]["train_on"] == "assistant"
    assert all(0.0 <= record["eval"][f"eval/top1/{e}"] <= 1.0 for e in config.exits.layers)


def test_packed_blocks_resume_and_shard(tmp_path):
    config = resolve_config(None, [f"data.train={TINY_TEXT}", "data.heldout=null", "data.block_size=32",
                                   "data.heldout_blocks=4"]).data
    tokenizer = tiny_tokenizer()
    blocks, heldout = load_blocks(config, tokenizer, seed=1)
    assert heldout.input_ids.shape == (4, 32) and heldout.loss_mask is None
    for _ in range(40):  # past one epoch
        blocks.next_batch(3)
    state = blocks.state_dict()
    expected = blocks.next_batch(3).input_ids
    again, _ = load_blocks(config, tokenizer, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(3).input_ids, expected)
    shards = [load_blocks(config, tokenizer, seed=1, rank=r, world=2)[0].next_batch(3).input_ids for r in (0, 1)]
    whole, _ = load_blocks(config, tokenizer, seed=1)
    assert torch.equal(torch.cat(shards), whole.next_batch(6).input_ids)
    assert isinstance(blocks, PackedBlocks)


def test_streamed_blocks_resume(tmp_path):
    config = resolve_config(None, [f"data.train={TINY_TEXT}", "data.heldout=null", "data.block_size=32",
                                   "data.heldout_blocks=2", "data.streaming=true", "data.shuffle_buffer=0"]).data
    tokenizer = tiny_tokenizer()
    blocks, heldout = load_blocks(config, tokenizer)
    assert isinstance(blocks, StreamedBlocks) and heldout.input_ids.shape == (2, 32)
    first = blocks.next_batch(2).input_ids
    assert not any(torch.equal(first[0], h) for h in heldout.input_ids)  # held-out blocks never reach training
    state = blocks.state_dict()
    expected = blocks.next_batch(2).input_ids
    again, _ = load_blocks(config, tokenizer)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(2).input_ids, expected)


def test_next_token_labels():
    ids = torch.tensor([[5, 6, 7]])
    assert next_token_labels(ids).tolist() == [[6, 7, -100]]


@pytest.fixture
def one_thread():
    """64-token batches: on a shared CPU a second thread mostly spins (7 s against 0.3 s a forward here)."""
    torch.set_num_threads(1)  # conftest's fixture sets the count again for the next test


@pytest.mark.integration
def test_default_model_fused_loss_equals_reference(one_thread):
    from balspec.models import load_model

    model, tokenizer = load_model()
    parts = model_parts(model)
    ids = tokenizer(Path(TINY_TEXT).read_text()[:400], return_tensors="pt").input_ids[:, :64]  # [1, 64]
    exits = attach_exits(model, [8, 12, 16]).float()
    with torch.no_grad():
        teacher_hidden, trunk = teacher_forward(model, ids, exits.exits)
        rope = parts.rotary(trunk[0], torch.arange(ids.shape[1])[None])
        losses = Distiller(exits, chunk=24)(trunk, rope, teacher_hidden, parts.head)
        log_p = torch.log_softmax(model(ids).logits, -1)[0]
        for i, (e, h) in enumerate(zip(exits.exits, trunk)):
            log_q = torch.log_softmax(parts.head(exits[e](h, position_embeddings=rope)), -1)[0]
            reference = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            torch.testing.assert_close(losses.kl[i], reference, atol=1e-3, rtol=1e-4)


@pytest.mark.integration
def test_default_model_trains_and_loads(tmp_path, one_thread):
    output = tmp_path / "run"
    config = resolve_config(None, ["model.name=default", "exits.layers=8,12,16", f"data.train={TINY_TEXT}",
                                   "data.heldout=null", "data.heldout_blocks=2", "data.block_size=64",
                                   "optim.batch_size=2", "optim.warmup_steps=0", "train.max_steps=2",
                                   "train.log_every=1", f"train.output={output}"])
    train(config)
    lines = [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert losses[1] < losses[0]
    from balspec.models import load_model

    exits, meta = load_exits(load_model()[0], output)
    assert exits.exits == [8, 12, 16] and meta["training"]["steps"] == 2
