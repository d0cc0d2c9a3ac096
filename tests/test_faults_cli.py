"""Values that pass type checks but cannot work, text that is not UTF-8, devices, output paths: one line, exit 1,
checked before any work; a file that cannot be written at the end still leaves the results printed."""

import json
import os
import subprocess
import sys

import pytest

from balspec import generate as generate_lib
from tests.test_cli_generate import base_args, exits_dir, run_cli  # noqa: F401 (fixture)


def one_line_error(code, err, message):
    assert code == 1, err
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("extra, message", [
    (["--mode", "speculative", "--exit", "4", "--draft-len", "1000000"], "--draft-len must lie in 1..64"),
    (["--mode", "speculative", "--exit", "4", "--draft-width", "100000"], "--draft-width must be a whole number in 1..64"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "1", "--seed", "-1"], "--seed must lie in [0, 2**64)"),
    (["--temperature", "1", "--seed", str(2 ** 64)], "--seed must lie in [0, 2**64)"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
])
def test_generate_values_that_cannot_work(exits_dir, capsys, monkeypatch, extra, message):  # noqa: F811
    code, out, err = run_cli(["generate", "hello", *base_args(exits_dir), *extra], capsys, monkeypatch)
    one_line_error(code, err, message)
    assert out == ""  # nothing was generated first


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch(exits_dir, capsys, monkeypatch):  # noqa: F811
    code, _, err = run_cli(["generate", "hello", *base_args(exits_dir), "--device", "cuda"], capsys, monkeypatch)
    one_line_error(code, err, "no CUDA device is available")


def test_a_prompt_that_is_not_utf8(exits_dir, capsys, monkeypatch):  # noqa: F811
    # undecodable argv bytes reach Python as lone surrogates (surrogateescape)
    code, _, err = run_cli(["generate", "caf\udce9 au lait", *base_args(exits_dir)], capsys, monkeypatch)
    one_line_error(code, err, "the prompt is not valid UTF-8 text")


def test_a_stop_string_that_is_not_utf8(exits_dir, capsys, monkeypatch):  # noqa: F811
    code, out, err = run_cli(["generate", "hello", *base_args(exits_dir), "--stop", "caf\udce9"], capsys, monkeypatch)
    one_line_error(code, err, "--stop: a stop string is not valid UTF-8 text (at character 3)")
    assert out == ""


def test_a_prompt_with_invalid_bytes_from_a_shell(exits_dir, tmp_path):  # noqa: F811
    env = {**os.environ, "BALSPEC_HOME": os.environ.get("BALSPEC_HOME", str(tmp_path))}
    result = subprocess.run([sys.executable, "-m", "balspec.cli", "generate", b"caf\xe9 au lait",
                             *base_args(exits_dir)], capture_output=True, env=env, timeout=300)
    err = result.stderr.decode()
    one_line_error(result.returncode, err, "the prompt is not valid UTF-8 text")


def fail_if_loaded(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were checked")


@pytest.mark.parametrize("extra, message", [
    (["--output", "/nonexistent/dir/x.json"], "--output: the directory /nonexistent/dir does not exist"),
    (["--output", "/tmp"], "--output: /tmp is a directory"),
    (["--draft-len", "100"], "--draft-len: draft lengths must lie in 1..64"),
    (["--draft-width", "1000"], "--draft-width: expected distinct whole numbers in 1..64"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--seed", "-3"], "--seed must lie in [0, 2**64)"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
])
def test_bench_checks_before_loading_anything(exits_dir, capsys, monkeypatch, extra, message):  # noqa: F811
    monkeypatch.setattr(generate_lib, "load", fail_if_loaded)
    code, _, err = run_cli(["bench", *base_args(exits_dir), *extra], capsys, monkeypatch)
    one_line_error(code, err, message)


def test_bench_on_a_full_disk_still_prints_the_results(exits_dir, capsys, monkeypatch):  # noqa: F811
    code, out, err = run_cli(["bench", *base_args(exits_dir), "--num-prompts", "1", "--max-new-tokens", "4",
                              "--json", "--output", "/dev/full", "--no-early-exit"], capsys, monkeypatch)
    error = err.strip().splitlines()[-1]  # after the progress lines
    assert code == 1 and error.startswith("error: --output") and "No space left on device" in error
    assert json.loads(out)["results"]


def test_an_unwritable_balspec_home_is_one_line(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BALSPEC_HOME", str(blocker / "home"))  # root ignores permission bits: use a file
    code, _, err = run_cli(["generate", "hello", "--model", "tiny-random"], capsys, monkeypatch)
    one_line_error(code, err, "cannot write the model cache")


@pytest.mark.parametrize("command", [
    ["train", "--recipe", "recipes/tiny.yaml", "--output"],
    ["export", "--model", "tiny-random", "--exit", "2", "--output"],
])
def test_an_output_directory_that_cannot_be_made_is_one_line(exits_dir, capsys, monkeypatch, tmp_path,  # noqa: F811
                                                              command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    extra = ["--exits-path", exits_dir] if command[0] == "export" else []
    code, _, err = run_cli([*command, str(blocker / "run"), *extra], capsys, monkeypatch)
    one_line_error(code, err, f"cannot be a directory: {blocker} is a file")
