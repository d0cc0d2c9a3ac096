"""Faults around files: what balspec may delete or replace, the model directories and balspec.json it reads,
the partials a killed run leaves, and the modes of what it writes."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from balspec import cli
from balspec.checkpoint import load_exits, read_meta, save_exits
from balspec.errors import BalspecError
from balspec.exits import attach_exits
from balspec.export import export_submodel
from balspec.models import load_model, write_model_dir
from balspec.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """tiny-random built under a temporary BALSPEC_HOME, and an exits checkpoint for it."""
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALSPEC_HOME", str(root / "home"))
        model, tokenizer = load_model("tiny-random")
        exits = save_exits(attach_exits(model, [2, 4]), model, root / "exits")
    return {"root": root, "exits": exits, "model": model, "tokenizer": tokenizer}


@pytest.fixture
def env(home, monkeypatch):
    monkeypatch.setenv("BALSPEC_HOME", str(home["root"] / "home"))
    return home


def run_cli(monkeypatch, capsys, *args):
    """`balspec ARGS` through main(): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["balspec", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(code, out, err, expected):
    assert code == 1 and out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # transformers may log above it
    assert last.startswith("error: ") and expected in last, err


def dead_pid() -> int:
    """The id of a process that has exited (ids are reused only after the kernel wraps around)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def users_files(directory: Path) -> Path:
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("my notes")
    (directory / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return directory


def assert_users_files_kept(directory: Path) -> None:
    assert (directory / "notes.txt").read_text() == "my notes"
    assert (directory / "sub" / "data.csv").read_text() == "a,b\n1,2\n"


# ---- 1. --force replaces only what balspec wrote ----

def test_cli_export_force_keeps_a_users_directory(env, tmp_path, monkeypatch, capsys):
    output = users_files(tmp_path / "mine")
    result = run_cli(monkeypatch, capsys, "export", "--exit", "4", "--output", output, "--force",
                     "--model", "tiny-random", "--exits-path", env["exits"])
    assert_one_line_error(*result, "holds files balspec did not export (notes.txt, sub)")
    assert_users_files_kept(output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial left beside it


@pytest.mark.parametrize("added", ["notes.txt", "sub/data.csv"])
def test_export_force_keeps_a_file_added_to_an_earlier_export(env, tmp_path, added):
    model, tokenizer = env["model"], env["tokenizer"]
    exits, _ = load_exits(model, env["exits"])
    output = export_submodel(model, tokenizer, exits, 2, tmp_path / "draft")
    (output / added).parent.mkdir(exist_ok=True)
    (output / added).write_text("mine")
    with pytest.raises(BalspecError, match="did not export"):
        export_submodel(model, tokenizer, exits, 4, output, force=True)
    assert (output / added).read_text() == "mine"
    (output / added).unlink()
    if added.startswith("sub/"):
        (output / "sub").rmdir()
    export_submodel(model, tokenizer, exits, 4, output, force=True)  # the export alone is replaced
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 5


def test_export_force_refuses_a_forged_or_unreadable_provenance(env, tmp_path):
    model, tokenizer = env["model"], env["tokenizer"]
    exits, _ = load_exits(model, env["exits"])
    output = users_files(tmp_path / "mine")
    (output / "config.json").write_text("{}")
    (output / "balspec_export.json").write_text("not json")
    with pytest.raises(BalspecError, match="did not export"):
        export_submodel(model, tokenizer, exits, 2, output, force=True)
    assert_users_files_kept(output)


def test_export_force_refuses_a_symlinked_output(env, tmp_path):
    model, tokenizer = env["model"], env["tokenizer"]
    exits, _ = load_exits(model, env["exits"])
    real = export_submodel(model, tokenizer, exits, 2, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(BalspecError, match="symbolic link"):
        export_submodel(model, tokenizer, exits, 4, link, force=True)
    assert link.is_symlink() and json.loads((real / "config.json").read_text())["num_hidden_layers"] == 3


def test_model_cache_never_replaces_a_directory_it_did_not_write(tmp_path):
    target = users_files(tmp_path / "models" / "tiny-random")
    with pytest.raises(BalspecError, match="holds no model balspec wrote"):
        write_model_dir(target, tiny_model(), tiny_tokenizer())
    assert_users_files_kept(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-random"]


# ---- 2. model directories: one line, exit 1, never unpickled ----

class _Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def model_dir(env, tmp_path, name) -> Path:
    directory = tmp_path / name
    shutil.copytree(Path(os.environ["BALSPEC_HOME"]) / "models" / "tiny-random", directory)
    return directory


def test_pickled_model_weights_are_refused_unopened(env, tmp_path, monkeypatch, capsys):
    directory = model_dir(env, tmp_path, "pickled")
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for command in (["generate", "hi", "--mode", "full"], ["info", "--exits-path", env["exits"]]):
        result = run_cli(monkeypatch, capsys, *command, "--model", directory)
        assert_one_line_error(*result, "holds its weights as pickles (pytorch_model.bin)")
    assert not marker.exists()


def test_pickles_beside_safetensors_are_never_opened(env, tmp_path, monkeypatch):
    import torch

    directory = model_dir(env, tmp_path, "both")
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "pickle-ran")))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on a model directory")

    monkeypatch.setattr(torch, "load", refuse)
    model, _ = load_model(str(directory))
    assert model.config.num_hidden_layers == 6 and not (tmp_path / "pickle-ran").exists()


def _wrong_type(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "six"}))


@pytest.mark.parametrize("damage, expected", [
    (_wrong_type, "num_hidden_layers"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "Error while deserializing header"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "Error while deserializing header"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "no-such-model"})), "no-such-model"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "model_type"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "cannot load"),
], ids=["config type", "truncated weights", "empty weights", "unknown model type", "config not an object",
        "tokenizer not json"])
def test_damaged_model_directory_is_one_line(env, tmp_path, monkeypatch, capsys, damage, expected):
    directory = model_dir(env, tmp_path, "damaged")
    damage(directory)
    result = run_cli(monkeypatch, capsys, "generate", "hi", "--mode", "full", "--model", directory)
    assert_one_line_error(*result, f"--model: cannot load '{directory}'")
    assert expected in result[2]


# ---- 7. balspec.json is validated whole on load ----

def edited_checkpoint(env, tmp_path, edit) -> Path:
    path = tmp_path / "edited"
    shutil.copytree(env["exits"], path)
    meta = json.loads((path / "balspec.json").read_text())
    edit(meta)
    (path / "balspec.json").write_text(json.dumps(meta))
    return path


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        for key in keys[:-1]:
            meta = meta.setdefault(key, {})
        meta[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        del meta[keys[-1]]
    return edit


CORRUPTIONS = {
    "exits as strings": (_set("exits", ["2", "4"]), "exits[0] must be a whole number"),
    "exits not a list": (_set("exits", "2,4"), "exits must be a list"),
    "exit out of range": (_set("exits", [2, 6]), "exits must be distinct layers in 1..5"),
    "exit 0 as a sub-model": (_set("exits", [0, 4]), "exits must be distinct layers in 1..5, or 0 for a draft-kind"),
    "duplicate exits": (_set("exits", [2, 2]), "exits must be distinct layers"),
    "base_model null": (_set("base_model", None), "base_model must be an object"),
    "base_model name missing": (_drop("base_model", "name"), "base_model.name is missing"),
    "num_layers a string": (_set("base_model", "num_layers", "6"), "base_model.num_layers must be"),
    "fingerprint a number": (_set("base_model", "config_fingerprint", 7), "base_model.config_fingerprint"),
    "norm_init unknown": (_set("norm_init", "middle"), "norm_init must be one of final, next-input"),
    "balcony_layers a string": (_set("balcony_layers", "1"), "balcony_layers must be a whole number >= 1"),
    "balcony_layers zero": (_set("balcony_layers", 0), "balcony_layers must be a whole number >= 1"),
    "kinds a list": (_set("kinds", ["draft"]), "kinds must be an object"),
    "kind unknown": (_set("kinds", "2", "fast"), "kinds.2 must be one of sub-model, draft"),
    "kind of no exit": (_set("kinds", "3", "draft"), "kinds.3 must be an exit of the checkpoint"),
    "checksum missing": (_drop("weights_sha256"), "weights_sha256 is missing"),
    "training a list": (_set("training", []), "training must be an object"),
    "training config a string": (_set("training", "config", "x"), "training.config must be an object"),
    "defaults null": (_set("defaults", None), "defaults must be an object"),
    "draft_vocab without size": (_set("draft_vocab", {"heldout_coverage": 0.5}), "draft_vocab.size is missing"),
    "coverage a string": (_set("draft_vocab", {"size": 4, "heldout_coverage": "95%"}), "draft_vocab.heldout_coverage"),
    "empty document": (lambda meta: meta.clear(), "format_version is missing"),
    "format_version a string": (_set("format_version", "1"), "format_version must be a whole number"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_hand_edited_balspec_json_names_the_field(env, tmp_path, case):
    edit, expected = CORRUPTIONS[case]
    path = edited_checkpoint(env, tmp_path, edit)
    with pytest.raises(BalspecError, match="balspec.json is corrupt: ") as error:
        read_meta(path)
    assert expected in str(error.value)


def test_balspec_json_not_an_object_or_not_json(env, tmp_path):
    path = edited_checkpoint(env, tmp_path, lambda meta: None)
    (path / "balspec.json").write_text("[1, 2]")
    with pytest.raises(BalspecError, match="balspec.json is corrupt: the document must be an object"):
        read_meta(path)
    (path / "balspec.json").write_text('{"exits": [2,')
    with pytest.raises(BalspecError, match="balspec.json is corrupt: not valid JSON"):
        read_meta(path)


@pytest.mark.parametrize("command", ["generate", "info", "export", "bench"])
def test_every_command_reports_a_corrupt_balspec_json_in_one_line(env, tmp_path, monkeypatch, capsys, command):
    path = edited_checkpoint(env, tmp_path, _set("exits", ["2", "4"]))
    args = {"generate": ["generate", "hi"], "info": ["info", "--model", "tiny-random"],
            "export": ["export", "--exit", "2", "--output", tmp_path / "out"],
            "bench": ["bench", "--num-prompts", "1"]}[command]
    if command != "info":
        args += ["--model", "tiny-random"]
    result = run_cli(monkeypatch, capsys, *args, "--exits-path", path)
    assert_one_line_error(*result, "balspec.json is corrupt: exits[0] must be a whole number")


@pytest.mark.parametrize("defaults, expected", [
    ({"mode": "speculative", "exit": 2, "draft_len": 0}, "defaults.draft_len must be a whole number >= 1 or \"auto\""),
    ({"mode": "speculative", "exit": 2, "draft_len": "four"}, "defaults.draft_len"),
    ({"mode": "speculative", "exit": 3}, "defaults.exit must be one of the exits (2,4)"),
    ({"mode": "speculative", "exit": "2"}, "defaults.exit must be a whole number"),
    ({"mode": "turbo"}, "defaults.mode must be one of full, early-exit, speculative"),
    ({"mode": "speculative", "draft_width": 0}, "defaults.draft_width must be a whole number >= 1"),
])
def test_invalid_recorded_defaults_blame_the_checkpoint_not_a_flag(env, tmp_path, monkeypatch, capsys, defaults,
                                                                   expected):
    path = edited_checkpoint(env, tmp_path, _set("defaults", defaults))
    result = run_cli(monkeypatch, capsys, "generate", "hi", "--model", "tiny-random", "--exits-path", path)
    assert_one_line_error(*result, f"balspec.json is corrupt: {expected}")
    assert "error: --" not in result[2]  # no flag the user did not pass is named


def test_draft_kind_default_exit_in_early_exit_blames_the_default(env, tmp_path, monkeypatch, capsys):
    model = env["model"]
    path = save_exits(attach_exits(model, [2, 4], draft_exits=[4]), model, tmp_path / "draft",
                      defaults={"mode": "speculative", "exit": 4})
    result = run_cli(monkeypatch, capsys, "generate", "hi", "--mode", "early-exit", "--model", "tiny-random",
                     "--exits-path", path)
    assert_one_line_error(*result, "the checkpoint's default exit 4 is a draft-kind exit")
    recorded = tmp_path / "recorded"
    shutil.copytree(path, recorded)
    meta = json.loads((recorded / "balspec.json").read_text())
    (recorded / "balspec.json").write_text(json.dumps({**meta, "defaults": {"mode": "early-exit", "exit": 4}}))
    with pytest.raises(BalspecError, match="corrupt: defaults.exit must be a sub-model exit with mode early-exit"):
        read_meta(recorded)


def test_the_shipped_and_the_written_balspec_json_pass_the_schema(env):
    from balspec.generate import DEFAULT_EXITS_DIR

    assert read_meta(DEFAULT_EXITS_DIR)["exits"]
    assert read_meta(env["exits"])["exits"] == [2, 4]


# ---- 12. partials of killed runs are removed on the next start, and only those ----

def test_conversion_partials_of_killed_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("BALSPEC_HOME", str(tmp_path))
    models = tmp_path / "models"
    dead, alive = dead_pid(), os.getppid()
    stale = models / f"tiny-random.partial-{dead}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    kept = [models / f"tiny-random.partial-{alive}",  # a conversion still running
            models / f"other-model.partial-{dead}",  # another target's
            models / "tiny-random.partial-notes"]  # not a partial's name
    for path in kept:
        users_files(path)
    load_model("tiny-random")
    assert not stale.exists()
    for path in kept:
        assert_users_files_kept(path)
    assert (models / "tiny-random" / "config.json").exists()


def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")


def full_disk_safetensors(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("failing", ["tokenizer", "model"])
def test_a_failed_conversion_leaves_no_partial(tmp_path, failing):
    """A full disk under the model's weights is reported by safetensors in its own error type."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    if failing == "tokenizer":
        tokenizer.save_pretrained = full_disk
    else:
        model.save_pretrained = full_disk_safetensors
    with pytest.raises(BalspecError, match=r"cannot write the model cache .* \(No space left on device\)"):
        write_model_dir(tmp_path / "models" / "tiny-random", model, tokenizer)
    assert list((tmp_path / "models").iterdir()) == []


def test_export_on_a_full_disk_is_one_line_and_leaves_no_partial(env, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk_safetensors)
    result = run_cli(monkeypatch, capsys, "export", "--exit", "2", "--output", tmp_path / "draft",
                     "--model", "tiny-random", "--exits-path", env["exits"])
    assert_one_line_error(*result, f"--output: cannot write {tmp_path / 'draft'} (No space left on device)")
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_draft_exit_is_refused_before_loading_the_model(env, tmp_path, monkeypatch, capsys):
    """A draft-kind exit has no sub-model: one line naming the sub-model exits, and the model is never loaded."""
    mixed = save_exits(attach_exits(env["model"], [2, 4], draft_exits=[2]), env["model"], tmp_path / "mixed")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr("balspec.models.load_model", no_load)
    result = run_cli(monkeypatch, capsys, "export", "--exit", "2", "--output", tmp_path / "draft",
                     "--model", "tiny-random", "--exits-path", mixed)
    assert_one_line_error(*result, "--exit: exit 2 is a draft-kind exit")
    assert "pick a sub-model exit (4)" in result[2] and not (tmp_path / "draft").exists()


def test_export_partials_of_killed_runs_are_removed_and_only_balspecs(env, tmp_path):
    model, tokenizer = env["model"], env["tokenizer"]
    exits, _ = load_exits(model, env["exits"])
    dead = dead_pid()
    ours = tmp_path / f".draft.partial-{dead}"  # killed while saving: only the marker and some files
    ours.mkdir()
    (ours / "balspec_export.json").write_text("{}\n")
    (ours / "config.json").write_text("{}")
    foreign = users_files(tmp_path / f".draft.partial-{dead_pid()}")  # a user's, named alike by chance
    export_submodel(model, tokenizer, exits, 2, tmp_path / "draft")
    assert not ours.exists()
    assert_users_files_kept(foreign)


def test_checkpoint_partial_files_of_killed_runs_are_removed(env, tmp_path):
    model = env["model"]
    path = tmp_path / "exits"
    path.mkdir()
    dead = dead_pid()
    stale = [path / f".exits.safetensors.partial-{dead}", path / f".balspec.json.partial-{dead}"]
    for file in stale:
        file.write_bytes(b"\0" * 64)
    save_exits(attach_exits(model, [2]), model, path)
    assert sorted(p.name for p in path.iterdir()) == ["balspec.json", "exits.safetensors"]


# ---- 13. written files follow the user's umask ----

@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mode & 0o777 for p in [directory, *directory.rglob("*")]}


def test_written_files_follow_the_umask(env, tmp_path, umask):
    model, tokenizer = env["model"], env["tokenizer"]
    exits = attach_exits(model, [2])
    written = {"exits": save_exits(exits, model, tmp_path / "exits"),
               "export": export_submodel(model, tokenizer, exits, 2, tmp_path / "export"),
               "model": write_model_dir(tmp_path / "models" / "tiny-random", tiny_model(), tiny_tokenizer())}
    for what, directory in written.items():
        for name, mode in modes(directory).items():
            expected = (0o777 if (directory / name).is_dir() else 0o666) & ~umask
            assert mode == expected, f"{what}/{name}: {oct(mode)}, expected {oct(expected)} under umask {oct(umask)}"
