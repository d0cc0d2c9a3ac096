"""`balspec generate` end to end on tiny-random: streaming, --json, and one-line errors for bad input."""

import json
import re
import sys

import pytest

from balspec import cli
from balspec.checkpoint import save_exits
from balspec.exits import attach_exits
from balspec.models import load_model


@pytest.fixture(scope="module")
def exits_dir(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("BALSPEC_HOME", str(home))
    model, _ = load_model("tiny-random")
    path = tmp_path_factory.mktemp("exits") / "exits"
    save_exits(attach_exits(model, [2, 4]), model, path)
    yield str(path)
    mp.undo()


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["balspec", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def base_args(exits_dir):
    return ["--model", "tiny-random", "--exits-path", exits_dir, "--max-new-tokens", "12"]


def test_generate_json_is_one_document(exits_dir, capsys, monkeypatch):
    code, out, _ = run_cli(["generate", "hello there", "--mode", "speculative", "--exit", "4", "--json",
                            "--compare", *base_args(exits_dir)], capsys, monkeypatch)
    assert code in (0, None)
    doc = json.loads(out)
    assert len(doc["token_ids"]) <= 12 and doc["identical_to_full"] is True
    assert 0 <= doc["stats"]["acceptance_rate"] <= 1 and doc["stats"]["mode"] == "speculative"


def test_generate_layer_path_generic(exits_dir, capsys, monkeypatch):
    from balspec import generate

    loaded, load = [], generate.load
    monkeypatch.setattr(generate, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    code, out, _ = run_cli(["generate", "hello there", "--mode", "speculative", "--exit", "4", "--json", "--compare",
                            "--layer-path", "generic", *base_args(exits_dir)], capsys, monkeypatch)
    assert code in (0, None)
    assert loaded[0].engine.layer_path == "generic" and json.loads(out)["identical_to_full"] is True


def test_generate_streams_text_and_reports_stats_on_stderr(exits_dir, capsys, monkeypatch):
    code, out, err = run_cli(["generate", "hello", "--mode", "full", *base_args(exits_dir)], capsys, monkeypatch)
    assert code in (0, None)
    assert "tok/s" in err and "tok/s" not in out


def test_generate_reports_its_lookup_cycles(exits_dir, capsys, monkeypatch):
    code, _, err = run_cli(["generate", "one two three one two three one two", "--mode", "speculative", "--exit", "4",
                            "--lookup-len", "3", "--compare", *base_args(exits_dir)], capsys, monkeypatch)
    assert code in (0, None)
    line = " ".join(err.split())  # rich may wrap the line
    assert "lookup-len 3" in line and "identical output" in line
    found = re.search(r"(\d+) of (\d+) cycles verified looked-up drafts", line)
    assert found and 0 < int(found.group(1)) <= int(found.group(2))  # the tiny model's greedy text repeats


@pytest.mark.parametrize("extra, message", [
    (["--mode", "speculative", "--exit", "3"], "exit 3 is not in the loaded checkpoint"),
    (["--mode", "speculative", "--exit", "4", "--draft-len", "0"], "--draft-len must lie in 1..64"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    (["--mode", "turbo"], "unknown mode"),
    (["--max-new-tokens", "5000"], "exceeds the model's context"),
    (["--layer-path", "fast"], "--layer-path: choose one of auto, lean, generic; got 'fast'"),
])
def test_bad_input_one_line_nonzero(exits_dir, capsys, monkeypatch, extra, message):
    code, out, err = run_cli(["generate", "hello", *base_args(exits_dir), *extra], capsys, monkeypatch)
    assert code == 1
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err


def test_empty_prompt_and_foreign_checkpoint(exits_dir, capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(["generate", "", *base_args(exits_dir)], capsys, monkeypatch)
    assert code == 1 and "prompt is empty" in err
    other, _ = load_model("tiny-random")
    other.model.layers = other.model.layers[:5]
    other.config.num_hidden_layers = 5
    foreign = tmp_path / "foreign"
    save_exits(attach_exits(other, [2]), other, foreign)
    code, _, err = run_cli(["generate", "hi", "--model", "tiny-random", "--exits-path", str(foreign)], capsys, monkeypatch)
    assert code == 1 and "trained for another base model" in err


def test_corrupt_checkpoint_is_refused(exits_dir, capsys, monkeypatch, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exits_dir, broken)
    data = (broken / "exits.safetensors").read_bytes()
    (broken / "exits.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["generate", "hi", "--model", "tiny-random", "--exits-path", str(broken)], capsys, monkeypatch)
    assert code == 1 and "corrupt or truncated" in err
