"""Config defaults in the library: the key reference is current, every key has a meaning,
config files hold presets only, and the one loader and override parser."""

import ast
import glob
import importlib
import os

import ml_collections
import pytest

from jaxalign import config as config_lib
from jaxalign import config_reference
from jaxalign.config import apply_overrides, base_config, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_is_current():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        checked_in = f.read()
    assert checked_in == config_reference.render(), (
        "docs/config.md is stale: regenerate it with `python -m launch.config_doc`")


def _keys(node: ml_collections.ConfigDict, path: str = ""):
    for key in node.keys():
        full = f"{path}.{key}" if path else key
        if isinstance(node[key], ml_collections.ConfigDict) and not config_lib.meaning(full):
            assert config_lib.section_doc(full), f"section {full} has no description"
            yield from _keys(node[key], full)
        else:
            yield full


@pytest.mark.parametrize("stage", config_lib.config_stages())
def test_every_key_has_a_meaning(stage):
    keys = list(_keys(base_config(stage)))
    assert len(keys) >= 99  # the shared sections alone
    assert [k for k in keys if not config_lib.meaning(k).strip()] == []


def test_eval_and_pipeline_keys_have_a_meaning():
    for name, build in (("eval_suite", config_lib.eval_suite_config),
                        ("pipeline", config_lib.pipeline_config)):
        assert [k for k in build().keys() if not config_lib.meaning(f"{name}.{k}")] == []


def test_base_config_brings_the_stage_sections():
    assert base_config("dpo").dpo.loss_type == "sigmoid"
    assert base_config("grpo").rl.num_samples == 8
    ppo = base_config("ppo")
    assert (ppo.rl.num_samples, ppo.rl.epochs, ppo.ppo.lam) == (1, 2, 0.95)
    rejection = base_config("rejection")
    assert rejection.rejection.threshold is None and "dpo" in rejection
    assert "dpo" not in base_config("sft")
    with pytest.raises(ValueError, match="not a training stage"):
        base_config("bogus")


def test_presets_start_from_the_library_defaults():
    """A preset's stage section differs from the library's only where it says so."""
    config = importlib.import_module("configs.dpo").get_config("demo")
    assert config.dpo.to_dict() == dict(base_config("dpo").dpo.to_dict(), beta=0.3)


def test_config_files_import_only_common_and_the_library():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("configs") or name == "configs.common", (path, name)


def test_load_config_file():
    config = load_config_file("configs/dpo.py:test", root_dir=ROOT)
    assert config.is_locked and config.stage == "dpo"
    assert config.to_dict() == importlib.import_module("configs.dpo").get_config(
        "test").to_dict()
    assert load_config_file("configs/evals.py", root_dir=ROOT).batch_size == 64  # its default
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config_file("configs/nope.py", root_dir=ROOT)
    with pytest.raises(ValueError, match="unknown preset 'bogus' for configs/sft.py"):
        load_config_file("configs/sft.py:bogus", root_dir=ROOT)


def test_overrides_are_typed_like_the_default():
    config = load_config_file("configs/rejection.py:test", root_dir=ROOT)
    out = apply_overrides(config, [
        "train.steps=5", "optim.learning_rate=1e-4", "optim.b1=1", "data.eval=",
        "train.eval_at_start=false", "rejection.threshold=1",
        "rejection.rewards=exact_answer,rm:runs/rm:0.2", "model.layer_types=('full',)"])
    assert (out.train.steps, out.optim.learning_rate, out.data.eval) == (5, 1e-4, "")
    assert type(out.optim.b1) is float and type(out.rejection.threshold) is float
    assert out.train.eval_at_start is False and out.model.layer_types == ("full",)
    assert out.rejection.rewards == "exact_answer,rm:runs/rm:0.2"
    assert out.is_locked and config.train.steps == 3  # a copy; the input is unchanged
    typed = apply_overrides(config, {"train.steps": 5, "optim.learning_rate": 1e-4,
                                     "optim.b1": 1, "rejection.threshold": None})
    assert (typed.train.steps, typed.optim.b1, typed.rejection.threshold) == (5, 1.0, None)


@pytest.mark.parametrize("bad", [
    ["train.steps=1.5"], ["train.eval_at_start=maybe"], ["train.steps"], ["model=small"],
    {"train.steps": "5"}, {"train.steps": True}, {"optim.learning_rate": None},
    {"optim.learning_rate": "1e-3"}])
def test_overrides_reject_mistyped_values(bad):
    config = load_config_file("configs/sft.py:test", root_dir=ROOT)
    with pytest.raises(ValueError, match="override"):
        apply_overrides(config, bad)


def test_unknown_override_keys_are_key_and_value_errors():
    config = load_config_file("configs/sft.py:test", root_dir=ROOT)
    with pytest.raises(KeyError, match=r"stage 'sft': override 'train.stpes' names no config "
                       r"key \(did you mean train.steps\?\)"):
        apply_overrides(config, ["train.stpes=3"], where="stage 'sft'")
    with pytest.raises(ValueError, match="'nope.x' names no config key"):
        apply_overrides(config, {"nope.x": 1})
