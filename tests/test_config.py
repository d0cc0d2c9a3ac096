"""Training config: recipes mirror the dataclasses, overrides apply in order, mistakes name the key."""

from pathlib import Path

import pytest

from balspec.errors import BalspecError
from balspec.training.config import (
    TrainingConfig,
    changed_keys,
    config_from_dict,
    config_to_dict,
    known_keys,
    resolve_config,
)

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")
                 if not p.name.startswith("accelerate-"))  # accelerate configs (tests/test_distributed.py)


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_resolve(recipe):
    config = resolve_config(recipe)
    assert config.exits.layers and config.train.max_steps >= 1
    header = recipe.read_text().split("\n\n")[0]  # each opens with what it is for and its command
    assert header.startswith("#") and f"train --recipe recipes/{recipe.name}" in header


def test_paper_recipe_settings():
    config = resolve_config(next(r for r in RECIPES if r.name == "llama3-8b.yaml"))
    assert config.optim.lr == 5e-4 and config.train.max_steps == 30000
    assert config.optim.batch_size * config.optim.grad_accum * 8 == 256 and config.data.block_size == 4096
    assert config.data.streaming and config.data.hub_config == "cosmopedia-v2"


def test_precedence_defaults_recipe_set_flags(tmp_path):
    recipe = write(tmp_path, "optim:\n  lr: 1.0e-3\n  batch_size: 2\ntrain:\n  max_steps: 7\n")
    config = resolve_config(recipe, ["optim.batch_size=3", "train.max_steps=8"], {"train.max_steps": 9})
    assert config.optim.lr == 1e-3  # recipe over default
    assert config.optim.batch_size == 3  # --set over recipe
    assert config.train.max_steps == 9  # flag over --set
    assert config.optim.warmup_steps == TrainingConfig().optim.warmup_steps  # untouched default


def test_set_parses_values_by_field_type():
    config = resolve_config(None, ["exits.layers=4,2", "data.heldout=null", "data.streaming=true",
                                   "optim.lr=3e-4", "data.hub_config=7", "loss.ce_weight=1"])
    assert config.exits.layers == [4, 2] and config.data.heldout is None and config.data.streaming is True
    assert config.optim.lr == 3e-4 and config.data.hub_config == "7" and config.loss.ce_weight == 1.0


def test_yaml_float_without_dot_is_accepted(tmp_path):
    assert resolve_config(write(tmp_path, "optim:\n  lr: 5e-4\n")).optim.lr == 5e-4


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lrr: 1\n", "unknown key 'optim.lrr' (did you mean optim.lr?)"),
    ("optimizer:\n  lr: 1\n", "unknown key 'optimizer' (did you mean optim?)"),
    ("optim: 3\n", "'optim' is a section"),
    ("optim:\n  batch_size: 2.5\n", "optim.batch_size: expected int, got 2.5"),
    ("exits:\n  layers: 8\n", "exits.layers: expected a list"),
    ("train:\n  mixed_precision: no\n", "quote it"),
    ("train:\n  mixed_precision: fp8\n", "train.mixed_precision: must be one of"),
    ("data:\n  block_size: 1\n", "data.block_size: must be at least 2"),
    ("- a list\n", "must hold a mapping"),
    ("optim: [\n", "not valid YAML"),
])
def test_recipe_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(BalspecError) as err:
        resolve_config(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("item, message", [
    ("optim.lr", "expected key=value"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("train.cpu=maybe", "train.cpu: expected true or false"),
    ("nosuch.key=1", "--set: unknown key 'nosuch.key'"),
])
def test_set_mistakes_name_the_key(item, message):
    with pytest.raises(BalspecError) as err:
        resolve_config(None, [item])
    assert message in str(err.value)


@pytest.mark.parametrize("item, message", [
    ("optim.lr=inf", "optim.lr: must be a finite number > 0, got inf"),
    ("optim.weight_decay=inf", "optim.weight_decay: must be a finite number >= 0"),
    ("optim.beta1=2", "optim.beta1: must be in [0, 1), got 2.0"),
    ("optim.beta2=-0.5", "optim.beta2: must be in [0, 1)"),
    ("optim.eps=-1", "optim.eps: must be a finite number > 0"),
    ("optim.eps=0", "optim.eps: must be a finite number > 0"),
    ("optim.grad_clip=inf", "optim.grad_clip: must be a finite number >= 0"),
    ("loss.ce_weight=inf", "loss.ce_weight: must be a finite number >= 0"),
    ("train.seed=-1", "train.seed: must be in [0, 2**32)"),
    ("train.seed=4294967296", "train.seed: must be in [0, 2**32)"),
])
def test_numbers_that_pass_the_type_check_but_cannot_train(item, message):
    """AdamW's and numpy's own checks would raise a traceback after the model loads; inf trains to NaN."""
    with pytest.raises(BalspecError) as err:
        resolve_config(None, [item])
    assert message in str(err.value)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model:\n  name: tiny-random\n# caf\xe9\n")
    with pytest.raises(BalspecError, match="--recipe: .* is not UTF-8 text"):
        resolve_config(path)


def test_missing_recipe():
    with pytest.raises(BalspecError, match="--recipe: .* does not exist"):
        resolve_config("no/such/recipe.yaml")


def test_round_trip_and_changed_keys():
    config = resolve_config(None, ["optim.lr=1e-4", "exits.layers=1,2"])
    again = config_from_dict(config_to_dict(config), "checkpoint")
    assert again == config and changed_keys(config, again) == []
    other = resolve_config(None, ["optim.lr=2e-4", "exits.layers=1,2"])
    assert changed_keys(config, other) == ["optim.lr"]
    assert "train.max_steps" in known_keys() and "optim.grad_accum" in known_keys()
