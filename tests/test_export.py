"""Sub-model export and `balspec info`: the exported checkpoint IS the sub-model, and loads anywhere."""

import json
import sys

import pytest
import torch

from balspec.checkpoint import save_exits
from balspec.errors import BalspecError
from balspec.exits import attach_exits, model_parts
from balspec.export import build_submodel, export_submodel
from balspec.tiny import tiny_model, tiny_tokenizer


def composed_logits(model, exits, exit_layer, ids):
    """embed -> trunk 1..e -> balcony -> norm -> head, by hand from the base model and the exits."""
    parts = model_parts(model)
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[exit_layer]  # [1, seq, hidden]
        positions = torch.arange(ids.shape[1])[None]
        return parts.head(exits[exit_layer](h, position_embeddings=parts.rotary(h, positions)))


def perturb(module, seed):
    """Move every weight off its initial copy, so a balcony differs from the base's last layer and norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module


def lively_tiny_model():
    """tiny_model() with larger weights: its greedy output varies instead of repeating one token."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
    return model


def load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_exported_logits_equal_composed_submodel(tmp_path):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    exits = perturb(attach_exits(model, [2, 4], balcony_layers=2), seed=1).eval()
    out = export_submodel(model, tokenizer, exits, 2, tmp_path / "exit2")

    sub = load_plain(out)
    ids = torch.randint(3, 259, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = sub(ids).logits  # [1, 10, vocab]
    torch.testing.assert_close(logits, composed_logits(model, exits, 2, ids), atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config  # nothing but stock transformers code is needed to run it
    assert sub.lm_head.weight.data_ptr() == sub.model.embed_tokens.weight.data_ptr()  # still tied
    assert exits[2].layers[0].self_attn.layer_idx == exits.cache_slots(2)[0]  # the exits keep their slots


def test_in_memory_submodel_renumbers_balcony_cache_slots():
    """build_submodel shares weights with the base; its balcony layers must write KV slots e, e+1, not
    their slots in the exits (past the trunk's N), or cached decoding breaks."""
    model = lively_tiny_model()
    exits = perturb(attach_exits(model, [2], balcony_layers=2), seed=3).eval()
    sub = build_submodel(model, exits, 2)
    assert [layer.self_attn.layer_idx for layer in sub.model.layers] == [0, 1, 2, 3]
    ids = torch.randint(3, 259, (1, 8), generator=torch.Generator().manual_seed(2))
    cached = sub.generate(ids, do_sample=False, max_new_tokens=8)
    tokens = ids
    for _ in range(8):  # the same greedy decoding without any cache
        logits = composed_logits(model, exits, 2, tokens)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, tokens)


def test_export_ships_tokenizer_chat_template_and_generation_config(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    model, tokenizer = tiny_model(), tiny_tokenizer()
    out = export_submodel(model, tokenizer, attach_exits(model, [3]), 3, tmp_path / "exit3")
    loaded = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2


def test_export_config_reads_in_transformers_4(tmp_path):
    """What transformers 4.x needs (checked by hand with 4.57: without it, logits differed by 6): a RoPE
    base under the old key, no null quantization_config, a tokenizer class name it knows."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_theta": 100000.0}
    model.config.quantization_config = None  # as the converted default model carries it
    out = export_submodel(model, tokenizer, attach_exits(model, [3]), 3, tmp_path / "exit3")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and "quantization_config" not in config
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert load_plain(out).model.rotary_emb.inv_freq[1].item() == pytest.approx(100000.0 ** (-2 / 16))


def test_untied_head_and_per_layer_attention_types(tmp_path):
    """A Qwen2 with sliding and full layers and its own head: the trunk keeps its layer types, the
    balcony takes the last layer's, and the untied head is written."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"] * 3, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    exits = perturb(attach_exits(model, [3]), seed=2).eval()
    out = export_submodel(model, tiny_tokenizer(), exits, 3, tmp_path / "exit3")

    sub = load_plain(out)
    assert sub.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        logits = sub(ids).logits
    torch.testing.assert_close(logits, composed_logits(model, exits, 3, ids), atol=1e-5, rtol=0)
    assert sub.lm_head.weight.data_ptr() != sub.model.embed_tokens.weight.data_ptr()


def test_exported_submodel_drafts_for_assisted_generation(tmp_path):
    """transformers' own speculative loop with the export as assistant gives the full model's greedy output."""
    model = lively_tiny_model()
    exits = attach_exits(model, [3]).eval()
    sub = load_plain(export_submodel(model, tiny_tokenizer(), exits, 3, tmp_path / "exit3"))
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(1))

    full = model.generate(ids, do_sample=False, max_new_tokens=24)
    draft = sub.generate(ids, do_sample=False, max_new_tokens=24)
    assert not torch.equal(draft, full)  # the draft is wrong somewhere, so rejections are exercised
    assisted = model.generate(ids, assistant_model=sub, do_sample=False, max_new_tokens=24)
    assert torch.equal(assisted, full)


def test_output_directory_rules(tmp_path):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    exits = attach_exits(model, [2, 4]).eval()
    out = export_submodel(model, tokenizer, exits, 2, tmp_path / "draft")
    with pytest.raises(BalspecError, match="not empty; pass --force"):
        export_submodel(model, tokenizer, exits, 4, out)
    export_submodel(model, tokenizer, exits, 4, out, force=True)  # replaces the earlier export
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]  # no temporary directory left behind

    checkpoint = save_exits(exits, model, tmp_path / "exits")
    with pytest.raises(BalspecError, match="refusing to replace it even with --force"):
        export_submodel(model, tokenizer, exits, 2, checkpoint, force=True)
    assert (checkpoint / "exits.safetensors").exists()


# ---- the command line, on tiny-random built under a temporary BALSPEC_HOME ----

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An exits checkpoint for tiny-random and one for another (4-layer) base model."""
    from balspec.models import load_model

    root = tmp_path_factory.mktemp("balspec")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALSPEC_HOME", str(root / "home"))
        model, _ = load_model("tiny-random")
        exits = attach_exits(model, [2, 4])
        ours = save_exits(exits, model, root / "ours", training={"steps": 10, "loss": float("nan")})
        other_model = tiny_model(num_layers=4)
        theirs = save_exits(attach_exits(other_model, [2]), other_model, root / "theirs")
    return {"ours": ours, "theirs": theirs, "exits": exits, "root": root}


@pytest.fixture
def home(checkpoints, monkeypatch):
    monkeypatch.setenv("BALSPEC_HOME", str(checkpoints["root"] / "home"))
    return checkpoints


def run_main(monkeypatch, capsys, *args):
    """`balspec ARGS` through main(), which turns a BalspecError into one line and exit code 1."""
    from balspec.cli import main

    monkeypatch.setattr(sys, "argv", ["balspec", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_export_then_info_json(home, tmp_path):
    from typer.testing import CliRunner

    from balspec.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", "--exit", "4", "--output", str(tmp_path / "d"), "--model", "tiny-random",
                                 "--exits-path", str(home["ours"])])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_hidden_layers"] == 5

    result = runner.invoke(app, ["info", "--exits-path", str(home["ours"]), "--model", "tiny-random", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # exactly one JSON document, NaN loss included
    assert {"base_model", "exits", "parameters_per_exit", "norm_init", "training", "checksum_ok"} <= info.keys()
    assert info["exits"] == [2, 4] and info["base_model"]["name"] == "tiny-random"
    assert info["parameters_per_exit"] == {str(e): home["exits"].num_parameters(e) for e in (2, 4)}
    assert info["checksum_ok"] and info["base_model_check"] == "matches"
    assert info["layer_path"] == "lean"  # a Llama model: balspec's own layer forward passed its check
    assert info["training"] == {"steps": 10, "loss": None}


def test_cli_info_table(home):
    from typer.testing import CliRunner

    from balspec.cli import app

    result = CliRunner().invoke(app, ["info", "--exits-path", str(home["ours"])])
    assert result.exit_code == 0, result.output
    for text in ("tiny-random", "parameters, exit 4", "training.steps", "not checked"):
        assert text in result.stdout


def test_info_on_exits_with_a_draft_vocabulary(tmp_path):
    # The reduced draft head's token ids live in exits.safetensors beside the balconies: not an exit's weights.
    from rich.console import Console

    from balspec.info import describe_checkpoint, render_table

    model = tiny_model()
    exits = attach_exits(model, [2])
    exits.draft_vocab = torch.tensor([5, 1, 9, 3])
    path = save_exits(exits, model, tmp_path / "vocab", draft_vocab_info={"heldout_coverage": 0.5})
    info = describe_checkpoint(path, model)
    assert info["parameters_per_exit"] == {"2": exits.num_parameters(2)}
    assert info["parameters_total"] == exits.num_parameters(2)
    assert info["draft_vocab"] == {"size": 4, "heldout_coverage": 0.5} and info["checksum_ok"]
    console = Console(record=True, width=200)
    console.print(render_table(info))
    assert "4 tokens, 50.0% of held-out answer tokens" in console.export_text()


def test_info_table_flattens_stage_lists_instead_of_cutting_them():
    # balspec.json keeps earlier stages and added exits as lists of dicts; the table must show their fields
    # row by row (a long repr was cut to "..."), with a stage's recipe left to --json.
    from balspec.info import _flatten

    training = {"steps": 10, "config": {"optim": {"lr": 1e-3}},
                "added_exits": [{"exits": [2], "kinds": {"2": "draft"},
                                 "training": {"steps": 3000, "config": {"optim": {"lr": 2e-4}},
                                              "earlier_stages": [{"steps": 10000, "tokens_seen": 10240000}]}}]}
    rows = dict(_flatten(training))
    assert rows["config.optim.lr"] == 1e-3  # the top-level recipe stays flattened in full
    assert rows["added_exits[0].exits"] == [2] and rows["added_exits[0].kinds.2"] == "draft"
    assert rows["added_exits[0].training.steps"] == 3000
    assert rows["added_exits[0].training.earlier_stages[0].tokens_seen"] == 10240000
    assert rows["added_exits[0].training.config"].endswith("(balspec info --json)")
    assert not any(key.startswith("added_exits[0].training.config.") for key in rows)


@pytest.mark.integration
def test_info_on_the_shipped_exits():
    from balspec.generate import default_exits_path
    from balspec.info import describe_checkpoint

    info = describe_checkpoint(default_exits_path(None))
    assert info["checksum_ok"] and info["draft_vocab"]["size"] == 8195  # 8192 counted + 3 control tokens
    assert set(info["parameters_per_exit"]) == {str(e) for e in info["exits"]} >= {"8", "12", "16"}
    assert all(n > 0 for n in info["parameters_per_exit"].values())
    assert info["defaults"]["mode"] in ("full", "speculative") and info["training"]["steps"] > 0


@pytest.mark.parametrize("case", ["missing exit", "output not empty", "other base (export)", "other base (info)",
                                  "no shipped exits"])
def test_cli_errors_are_one_line(case, home, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    args, expected = {
        "missing exit": (["export", "--exit", "3", "--output", tmp_path / "x", "--exits-path", home["ours"],
                          "--model", "tiny-random"], "has no exit 3 (it has 2,4)"),
        "output not empty": (["export", "--exit", "2", "--output", full, "--exits-path", home["ours"],
                              "--model", "tiny-random"], "is not empty; pass --force"),
        "other base (export)": (["export", "--exit", "2", "--output", tmp_path / "x", "--exits-path", home["theirs"],
                                 "--model", "tiny-random"], "was trained for another base model"),
        "other base (info)": (["info", "--exits-path", home["theirs"], "--model", "tiny-random"],
                              "was trained for another base model"),
        "no shipped exits": (["export", "--exit", "2", "--output", tmp_path / "x", "--model", "tiny-random"],
                             "balspec ships no exits for tiny-random"),
    }[case]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]  # transformers may print progress bars above it
    assert last.startswith("error: ") and expected in last
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists() and (full / "notes.txt").read_text() == "keep me"


@pytest.mark.integration
def test_default_model_exit_8_export(tmp_path):
    # The real default model comes from the user's balspec cache (converted there once, about 20 s):
    # converting it again under a temporary BALSPEC_HOME would make this test slow.
    from balspec.models import load_model

    model, tokenizer = load_model()
    exits = attach_exits(model, [8]).eval()
    sub = load_plain(export_submodel(model, tokenizer, exits, 8, tmp_path / "exit8"))
    assert sub.config.num_hidden_layers == 9
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = sub(ids).logits
    torch.testing.assert_close(logits, composed_logits(model, exits, 8, ids), atol=1e-4, rtol=1e-5)
