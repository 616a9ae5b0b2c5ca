"""Reward functions named by import path (``module:function[:weight]``) in reward specs."""

import sys
import textwrap

import numpy as np
import pytest
from presets import preset

from jaxalign import rewards, rollout
from jaxalign.evals import suite

MODULE = '''
import math

NOT_A_FUNCTION = 3


def score(completions, records, ctx):
    """2 when the completion contains the answer, else 0."""
    return [2.0 * (str(r["answer"]) in c) for c, r in zip(completions, records)]


class Scorers:
    @staticmethod
    def length(completions, records, ctx):
        return [float(len(c)) for c in completions]


def short(completions, records, ctx):
    return [1.0]


def wide(completions, records, ctx):
    return [[1.0, 2.0] for _ in completions]


def nan(completions, records, ctx):
    return [math.nan for _ in completions]


def words(completions, records, ctx):
    return ["yes" for _ in completions]


def two_args(completions, records):
    return [0.0 for _ in completions]
'''


@pytest.fixture
def tmpmod(tmp_path, monkeypatch):
    """A module ``tmpmod`` and a package ``tmppkg.sub`` on ``sys.path``, both with MODULE."""
    (tmp_path / "tmpmod.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "tmppkg").mkdir()
    (tmp_path / "tmppkg" / "__init__.py").write_text("")
    (tmp_path / "tmppkg" / "sub.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "brokenmod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("tmpmod", "tmppkg", "tmppkg.sub", "brokenmod")
    for name in names:  # each test imports its own copy
        sys.modules.pop(name, None)
    yield
    for name in names:
        sys.modules.pop(name, None)


COMPLETIONS = ["it is 42", "41", "abc"]
RECORDS = [{"answer": "42"}, {"answer": "42"}, {"answer": "abc"}]


def _ctx(n=3):
    return rewards.RewardContext(lengths=np.ones(n), stopped=np.ones(n, bool),
                                 max_new_tokens=8)


def test_parse_spec_grammar():
    assert rewards.parse_spec("tmpmod:score, pkg.mod:Cls.fn:0.5,rm:runs/x:2") == [
        ("tmpmod:score", 1.0), ("pkg.mod:Cls.fn", 0.5), ("rm:runs/x", 2.0)]
    assert rewards.is_import_path("pkg.mod:fn")
    assert rewards.is_import_path("pkg.mod:Cls.fn")
    assert not rewards.is_import_path("exact_answer")
    assert not rewards.is_import_path("rm:runs/x")
    assert not rewards.is_import_path("pkg/mod:fn")
    assert not rewards.is_import_path("pkg.mod:fn:x")
    # An identifier is never a weight: "nan" / "inf" name attributes.
    assert rewards.parse_spec("m:nan,m:inf:-2,rm:inf") == [
        ("m:nan", 1.0), ("m:inf", -2.0), ("rm:inf", 1.0)]


@pytest.mark.usefixtures("tmpmod")
def test_import_path_scores_and_weights():
    total, parts = rewards.Rewards("tmpmod:score")(COMPLETIONS, RECORDS, _ctx())
    np.testing.assert_array_equal(total, [2.0, 0.0, 2.0])
    assert list(parts) == ["tmpmod.score"]
    total, parts = rewards.Rewards("tmpmod:score:0.5")(COMPLETIONS, RECORDS, _ctx())
    np.testing.assert_array_equal(total, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(parts["tmpmod.score"], [2.0, 0.0, 2.0])
    # Mixed with registered names, a dotted module and a dotted attribute.
    spec = "exact_answer:2, tmppkg.sub:score:0.25, tmpmod:Scorers.length:-0.5"
    total, parts = rewards.Rewards(spec)(COMPLETIONS, RECORDS, _ctx())
    exact = np.asarray([0.0, 0.0, 1.0])
    np.testing.assert_allclose(total, 2 * exact + 0.25 * np.asarray([2.0, 0.0, 2.0])
                               - 0.5 * np.asarray([8.0, 2.0, 3.0]))
    assert set(parts) == {"exact_answer", "tmppkg.sub.score", "tmpmod.Scorers.length"}
    assert rewards.check_spec(spec) == [("exact_answer", 2.0), ("tmppkg.sub:score", 0.25),
                                        ("tmpmod:Scorers.length", -0.5)]


def test_registered_names_unchanged():
    total, parts = rewards.Rewards("exact_answer:2,contains_answer:0.5")(
        COMPLETIONS, RECORDS, _ctx())
    np.testing.assert_array_equal(total, np.asarray([0.5, 0.0, 2.5], np.float32))
    assert set(parts) == {"exact_answer", "contains_answer"}


@pytest.mark.usefixtures("tmpmod")
@pytest.mark.parametrize("spec,match", [
    ("nope_mod:f", r"'nope_mod:f'.*cannot import module 'nope_mod'.*ModuleNotFoundError"),
    ("exact_answer,tmppkg.nope:f:0.5", r"'tmppkg.nope:f'.*ModuleNotFoundError"),
    ("brokenmod:f", r"'brokenmod:f'.*RuntimeError: boom at import"),
    ("tmpmod:missing", r"'tmpmod:missing'.*has no attribute 'missing'"),
    ("tmpmod:Scorers.nope:2", r"'tmpmod:Scorers.nope'.*no attribute"),
    ("tmpmod:NOT_A_FUNCTION", r"'tmpmod:NOT_A_FUNCTION'.*is a int, not a function"),
    ("tmpmod:two_args", r"'tmpmod:two_args'.*cannot be called as fn\(completions"),
    ("exact_answer:x", r"'exact_answer' is a registered reward.*weight must be a number"),
    ("tmpmod.score", r"unknown reward 'tmpmod.score'.*module.name:function"),
    ("exact_answer:inf", r"'exact_answer' is a registered reward"),
    ("exact_answer:-inf", r"'exact_answer' in rl.rewards has the weight -inf"),
    ("tmpmod:score:1e400", r"'tmpmod:score' in rl.rewards has the weight inf"),
])
def test_bad_import_paths_fail_when_checked(spec, match):
    with pytest.raises(ValueError, match=match):
        rewards.check_spec(spec)
    with pytest.raises(ValueError, match=match):
        rewards.Rewards(spec)


@pytest.mark.usefixtures("tmpmod")
@pytest.mark.parametrize("fn,match", [
    ("short", r"reward 'tmpmod:short' returned 1 scores for 3 completions.*expected \(3,\)"),
    ("wide", r"reward 'tmpmod:wide' returned 6 scores for 3 .*shape \(3, 2\)"),
    ("nan", r"reward 'tmpmod:nan' returned a non-finite score"),
    ("words", r"reward 'tmpmod:words' returned non-numeric scores"),
])
def test_bad_returns_fail_when_called(fn, match):
    scorer = rewards.Rewards(f"tmpmod:{fn}")
    with pytest.raises(ValueError, match=match):
        scorer(COMPLETIONS, RECORDS, _ctx())


@pytest.mark.usefixtures("tmpmod")
def test_non_finite_is_still_a_floating_point_error():
    with pytest.raises(FloatingPointError):
        rewards.Rewards("tmpmod:nan")(COMPLETIONS, RECORDS, _ctx())


@pytest.mark.usefixtures("tmpmod")
def test_grpo_config_check_rejects_bad_import_path():
    with pytest.raises(ValueError, match=r"'nope\.mod:f' in rl\.rewards.*cannot import"):
        rollout.check_config(preset("grpo", **{"rl.rewards": "nope.mod:f"}))
    rollout.check_config(preset("grpo", **{"rl.rewards": "tmpmod:score:0.5"}))


@pytest.mark.usefixtures("tmpmod")
def test_eval_check_accepts_import_paths():
    opts = suite.resolve_options("task", {"kind": "task", "check": "tmppkg.sub:score:0.5"})
    assert opts["check"] == "tmppkg.sub:score:0.5"
    with pytest.raises(ValueError, match=r"'tmpmod:nope' in evals\.t\.check"):
        suite.resolve_options("t", {"kind": "task", "check": "tmpmod:nope"})
    with pytest.raises(ValueError, match=r"evals\.r\.check"):
        suite.resolve_options("r", {"kind": "reward", "check": "nope.mod:f"})
