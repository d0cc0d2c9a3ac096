"""Teacher cache: training on cached teacher states computes the very loss and gradients the live teacher gives,
the trunk-only forward equals the model's own, building resumes, and a cache for other data or another model is
refused with one line. CPU, fp32, the tiny random Llama; no downloads."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from balspec import cli
from balspec.errors import BalspecError
from balspec.exits import model_parts
from balspec.tiny import tiny_model
from balspec.training import teacher_cache as tc
from balspec.training import train as train_module
from balspec.training.data import Batch
from balspec.training.loss import teacher_forward, trunk_forward
from balspec.training.train import train
from tests.test_train import tiny_config

DRAFT = ["exits.layers=[2,4]", "exits.draft=[2]"]


def test_trunk_forward_equals_the_teacher_forward_trunk_and_stops_early():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    _, trunk = teacher_forward(model, ids, [1, 3, 4])
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model_parts(model).layers)]
    got = trunk_forward(model, ids, [1, 3, 4])
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(trunk, got))
    assert ran == [0, 1, 2, 3]  # layers 5 and 6 of 6 never ran
    _, trunk = teacher_forward(model, ids, [0, 2])
    ran.clear()
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model_parts(model).layers)]
    got = trunk_forward(model, ids, [0, 2])  # exit 0: the embeddings, the first layer's input
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(trunk, got)) and ran == [0, 1]
    ran.clear()
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model_parts(model).layers)]
    got = trunk_forward(model, ids, [0])
    for h in hooks:
        h.remove()
    assert torch.equal(got[0], trunk[0]) and ran == []  # no trunk layer runs


@pytest.mark.parametrize("first", [2, 0])  # exit 0: the balcony reads the embeddings (a forward pre-hook)
def test_cached_blocks_hold_the_teacher_states_and_give_the_same_loss_and_gradients(tmp_path, first):
    config = tiny_config(tmp_path / "run", f"exits.layers=[{first},4]", f"exits.draft=[{first}]")
    cache_dir = tc.build_cache(config, tmp_path / "cache", 12)
    model = tiny_model()
    cache = tc.TeacherCache(cache_dir, model, config)
    batch = cache.rows([3, 0, 7])
    teacher, _ = teacher_forward(model, batch.input_ids, [])
    assert torch.equal(batch.teacher_hidden, teacher)
    order = np.load(cache_dir / "block_index.npy")
    assert len(set(order.tolist())) == 12  # drawn without repetition

    from accelerate import Accelerator

    from balspec.exits import attach_exits
    from balspec.training.loss import Distiller

    grads = []
    for rows in (batch, Batch(batch.input_ids)):  # cached, then the live teacher
        torch.manual_seed(0)
        exits = attach_exits(model, [first, 4], draft_exits=[first], seed=0).float()
        distiller = Distiller(exits, draft_chain=3)
        losses = train_module.distill_batch(model, model_parts(model), distiller, rows, Accelerator(cpu=True),
                                            config, draws=torch.Generator().manual_seed(5))
        losses.loss.sum().backward()
        grads.append((losses.loss.detach(), [p.grad.clone() for p in exits.parameters()]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grad_a, grad_b))


def test_a_draft_vocabulary_loss_from_cached_lse_and_argmax_equals_the_live_teachers(tmp_path):
    """With loss.draft_vocab the cached teacher's lse and argmax replace its full-vocabulary head: the KL,
    agreement and gradients are the live teacher's up to rounding."""
    from accelerate import Accelerator

    from balspec.exits import attach_exits
    from balspec.training.loss import Distiller, teacher_stats

    config = tiny_config(tmp_path / "run", "exits.layers=[2]", "exits.draft=[2]")
    model = tiny_model()
    cache = tc.TeacherCache(tc.build_cache(config, tmp_path / "cache", 8), model, config)
    batch = cache.rows([5, 1, 2, 6])
    lse, top = teacher_stats(batch.teacher_hidden.flatten(0, 1), model_parts(model).head)
    assert torch.equal(batch.teacher_top.flatten(), top) and torch.equal(batch.teacher_lse.flatten(), lse)
    logits = model_parts(model).head(batch.teacher_hidden)
    assert torch.allclose(batch.teacher_lse, logits.logsumexp(-1), atol=1e-5)
    assert torch.equal(batch.teacher_top, logits.argmax(-1))

    vocab = torch.arange(0, model.config.vocab_size, 3)
    results = []
    for rows in (batch, Batch(batch.input_ids)):  # cached with its lse and argmax, then the live teacher
        exits = attach_exits(model, [2], draft_exits=[2], seed=0).float()
        with torch.no_grad():
            for p in exits.parameters():  # away from the last-layer copy, so that the KL is not near 0
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        distiller = Distiller(exits, draft_chain=3, draft_vocab=vocab)
        losses = train_module.distill_batch(model, model_parts(model), distiller, rows, Accelerator(cpu=True),
                                            config, draws=torch.Generator().manual_seed(5))
        losses.loss.sum().backward()
        results.append((losses, [p.grad.clone() for p in exits.parameters()]))
    (a, grad_a), (b, grad_b) = results
    assert a.kl.item() > 1e-3
    assert torch.allclose(a.kl, b.kl, rtol=1e-5) and torch.equal(a.agree, b.agree)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(grad_a, grad_b))


def test_training_on_a_cache_runs_records_it_and_resumes_exactly(tmp_path, monkeypatch):
    cache_dir = tc.build_cache(tiny_config(tmp_path / "x", *DRAFT), tmp_path / "cache", 16)
    sets = [*DRAFT, f"data.teacher_cache={cache_dir}", "train.max_steps=8", "train.save_every=4"]
    straight = train(tiny_config(tmp_path / "straight", *sets))
    record = json.loads((straight / "balspec.json").read_text())["training"]
    assert record["data"]["teacher_cache"] == str(cache_dir) and record["data"]["cached_blocks"] == 16
    assert record["steps"] == 8

    real_step = train_module.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *sets))
    monkeypatch.setattr(train_module, "train_step", real_step)
    from balspec.training.run import configure

    config, checkpoint = configure(None, [], {"train.output": str(tmp_path / "resumed")}, resume=True)
    other = tc.build_cache(tiny_config(tmp_path / "x", *DRAFT), tmp_path / "other", 12)
    moved = tmp_path / "moved"
    cache_dir.rename(moved)
    other.rename(cache_dir)  # another cache at the run's path: its position would mean other blocks
    with pytest.raises(BalspecError, match="is not the cache this run was trained on"):
        train(config, checkpoint)
    cache_dir.rename(other)
    moved.rename(cache_dir)
    resumed = train(config, checkpoint)
    a, b = load_file(straight / "exits.safetensors"), load_file(resumed / "exits.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_building_resumes_after_an_interruption_to_the_same_files(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run")
    straight = tc.build_cache(config, tmp_path / "straight", 10)
    from balspec.training import loss  # build_cache imports teacher_forward when called: patch it there

    calls = {"n": 0}
    forward = loss.teacher_forward

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (1, 3):  # in the first batch, then in the second batch of the continued build
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(loss, "teacher_forward", dying)
    for recorded in (0, config.optim.batch_size):
        with pytest.raises(KeyboardInterrupt):
            tc.build_cache(config, tmp_path / "resumed", 10)
        meta = json.loads((tmp_path / "resumed" / tc.CACHE_FILE).read_text())
        assert meta["written"] == recorded
        with pytest.raises(BalspecError, match="unfinished"):
            tc.TeacherCache(tmp_path / "resumed", tiny_model(), config)
    monkeypatch.setattr(loss, "teacher_forward", forward)
    tc.build_cache(config, tmp_path / "resumed", 10)
    for name in ("block_index", "input_ids", "teacher_hidden", "teacher_lse", "teacher_top"):
        assert np.array_equal(np.load(straight / f"{name}.npy"), np.load(tmp_path / "resumed" / f"{name}.npy"))


def test_a_cache_for_other_data_or_another_model_is_refused(tmp_path):
    config = tiny_config(tmp_path / "run")
    cache_dir = tc.build_cache(config, tmp_path / "cache", 4)
    with pytest.raises(BalspecError, match="data.block_size 64, this run has 32"):
        tc.TeacherCache(cache_dir, tiny_model(), tiny_config(tmp_path / "run", "data.block_size=32"))
    other = tiny_model()
    with torch.no_grad():
        model_parts(other).layers[0].mlp.up_proj.weight.mul_(2)
    with pytest.raises(BalspecError, match="another base model"):
        tc.TeacherCache(cache_dir, other, config)
    with pytest.raises(BalspecError, match="holds no teacher cache"):
        tc.TeacherCache(tmp_path, tiny_model(), config)
    with pytest.raises(BalspecError, match="another data.block_size"):  # continuing it with other settings
        tc.build_cache(tiny_config(tmp_path / "run", "data.block_size=32"), cache_dir, 4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BalspecError, match="other files"):
        tc.build_cache(config, tmp_path / "busy", 4)
    with pytest.raises(BalspecError, match="fewer than the 100000 asked"):
        tc.build_cache(config, tmp_path / "big", 100000)
    # the held-out blocks are split off data.train by train.seed (data.heldout null): another seed, other blocks
    with pytest.raises(BalspecError, match="data.split_seed 0, this run has 1"):
        tc.TeacherCache(cache_dir, tiny_model(), tiny_config(tmp_path / "run", "train.seed=1"))
    np.save(cache_dir / "teacher_lse.npy", np.zeros((4, 7), np.float32))
    with pytest.raises(BalspecError, match="corrupt"):
        tc.TeacherCache(cache_dir, tiny_model(), config)
    (cache_dir / "teacher_top.npy").write_bytes(b"garbage")
    with pytest.raises(BalspecError, match="teacher_top.npy cannot be read"):
        tc.TeacherCache(cache_dir, tiny_model(), config)
    (cache_dir / tc.CACHE_FILE).write_text("{not json")
    with pytest.raises(BalspecError, match="cannot be read"):
        tc.TeacherCache(cache_dir, tiny_model(), config)


def test_the_config_refuses_a_cache_with_streaming_or_a_training_base(tmp_path):
    with pytest.raises(BalspecError, match="data.teacher_cache: must be null when data.streaming"):
        tiny_config(tmp_path, "data.teacher_cache=x", "data.streaming=true")
    with pytest.raises(BalspecError, match="data.teacher_cache: must be null when the base trains"):
        tiny_config(tmp_path, "data.teacher_cache=x", "method=sorted")


def test_cli_builds_a_cache_and_a_bad_one_is_one_line(tmp_path, capsys, monkeypatch):
    from tests.test_train import TINY_RECIPE, TINY_TEXT

    monkeypatch.setattr("sys.argv", ["balspec", "cache-teacher", "--recipe", TINY_RECIPE, "--data", TINY_TEXT,
                                     "--blocks", "4", "--output", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache")
    monkeypatch.setattr("sys.argv", ["balspec", "train", "--recipe", TINY_RECIPE, "--data", TINY_TEXT,
                                     "--output", str(tmp_path / "run"), "--set", f"data.teacher_cache={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.teacher_cache:") and "holds no teacher cache" in err[0]


def test_several_caches_train_as_their_union_made_from_exactly_the_files_named(tmp_path):
    from tests.test_train import TINY_TEXT

    lines = open(TINY_TEXT, encoding="utf-8").read().splitlines(keepends=True)
    for name, part in (("part1.txt", lines[:30]), ("part2.txt", lines[30:60]), ("held.txt", lines[60:])):
        (tmp_path / name).write_text("".join(part), encoding="utf-8")
    held = [f"data.heldout={tmp_path / 'held.txt'}", "data.heldout_blocks=1", "data.block_size=32"]
    caches = [tc.build_cache(tiny_config(tmp_path / "x", *held, f"data.train={tmp_path / name}"),
                             tmp_path / f"cache-{name}", 6) for name in ("part1.txt", "part2.txt")]
    union_sets = [*DRAFT, *held, f"data.train={tmp_path / 'part*.txt'}",
                  f"data.teacher_cache={caches[0]},{caches[1]}"]
    config = tiny_config(tmp_path / "run", *union_sets, "train.max_steps=3")
    assert config.data.teacher_cache == [str(caches[0]), str(caches[1])]
    model = tiny_model()
    union = tc.open_cache(config.data.teacher_cache, model, config)
    assert len(union) == 12
    one = [tc.TeacherCache(d, model, tiny_config(tmp_path / "x", *held, f"data.train={tmp_path / n}"))
           for d, n in zip(caches, ("part1.txt", "part2.txt"))]
    batch = union.rows([7, 0, 11])
    expected = [one[1].rows([1]), one[0].rows([0]), one[1].rows([5])]
    for field in ("input_ids", "teacher_hidden", "teacher_lse", "teacher_top"):
        assert torch.equal(getattr(batch, field), torch.cat([getattr(e, field) for e in expected]))

    run = train(config)
    record = json.loads((run / "balspec.json").read_text())["training"]
    assert record["data"]["teacher_cache"] == [str(c) for c in caches] and record["data"]["cached_blocks"] == 12

    with pytest.raises(BalspecError, match="no cache holds .*part3.txt"):  # data.train names a file no cache has
        (tmp_path / "part3.txt").write_text("".join(lines[:20]), encoding="utf-8")
        tc.open_cache(config.data.teacher_cache, model, config)
    (tmp_path / "part3.txt").unlink()
    with pytest.raises(BalspecError, match="does not name .*part2.txt"):
        tc.open_cache(config.data.teacher_cache, model, tiny_config(tmp_path / "run", *union_sets,
                                                                    f"data.train={tmp_path / 'part1.txt'}"))
    with pytest.raises(BalspecError, match="were both made from"):
        copy = tmp_path / "copy"
        copy.mkdir()
        for f in caches[0].iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        tc.open_cache([str(caches[0]), str(copy)], model, config)
    with pytest.raises(BalspecError, match="data.heldout: several teacher caches need a held-out file"):
        tc.open_cache(config.data.teacher_cache, model, tiny_config(tmp_path / "run", *union_sets, "data.heldout=null"))
    with pytest.raises(BalspecError, match="data.teacher_cache: must be directories listed once each"):
        tiny_config(tmp_path / "run", *union_sets[:-1], f"data.teacher_cache={caches[0]},{caches[0]}")
