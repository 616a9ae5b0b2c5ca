"""The distillation stage end to end on tiny models: a teacher of its own shape, in-step
and precomputed teacher logits, on-policy batches, invariances and exact resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from presets import preset

from jaxalign.data.records import Location, RecordError, validate_prompt
from jaxalign.evals.report import resolve_reference
from jaxalign.mesh import make_mesh
from jaxalign.metrics import read_jsonl
from jaxalign.train import Trainer, train


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny SFT model one layer deeper and wider than the test student."""
    workdir = tmp_path_factory.mktemp("teacher")
    train(preset("sft", **{"train.steps": 12, "data.eval": "", "model.n_layers": 3,
                           "model.d_model": 48}), str(workdir))
    return str(workdir)


def _config(teacher, **overrides):
    return preset("distill", **{"distill.teacher": f"workdir:{teacher}", "train.log_every": 1,
                                **overrides})


def _run(config, workdir, mesh=None, num_steps=None):
    trainer = Trainer(config, str(workdir), mesh=mesh)
    try:
        trainer.fit(num_steps)
        params = jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))
    finally:
        trainer.close()
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return params, [r for r in rows if r["split"] == "train"], [
        r for r in rows if r["split"] == "eval"]


def _close(rows_a, rows_b, keys, atol):
    for key in keys:
        np.testing.assert_allclose([r[key] for r in rows_a], [r[key] for r in rows_b],
                                   atol=atol, rtol=0, err_msg=key)


def test_student_equal_to_teacher_has_zero_loss_and_gradient(teacher, tmp_path):
    """Starting from the teacher itself (its shape comes with init_from): every divergence
    and its gradient are zero, and so is the eval's KL to the teacher."""
    for loss in ("forward_kl", "jsd"):
        config = _config(teacher, **{"model.init_from": f"workdir:{teacher}",
                                     "distill.loss": loss, "train.steps": 2,
                                     "train.eval_every": 2, "optim.learning_rate": 0.0})
        _, rows, evals = _run(config, tmp_path / loss)
        assert all(abs(r["loss"]) < 1e-6 and r["grad_norm"] < 1e-6 for r in rows), rows
        assert abs(evals[-1]["distill/teacher_kl"]) < 1e-6


def test_teacher_of_another_shape_trains_the_student(teacher, tmp_path):
    """The loss falls from a scratch student towards a deeper, wider teacher; the teacher's
    params stay out of the state."""
    config = _config(teacher, **{"train.steps": 10, "distill.loss": "reverse_kl"})
    _, rows, evals = _run(config, tmp_path / "run")
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["model"]["n_layers"] == 2 and run["model"]["d_model"] == 32
    assert evals[-1]["distill/teacher_kl"] < evals[0]["distill/teacher_kl"]
    # The eval suite's KL is to the teacher with --reference=teacher.
    assert resolve_reference("teacher", str(tmp_path / "run")) == f"workdir:{teacher}"


def test_precomputed_and_chunked_top_k_equal_in_step_top_k(teacher, tmp_path):
    """The teacher's top-k logits cached before training, or student and teacher logits
    made 4 positions at a time, give the in-step full-logits loss and gradients."""
    common = {"train.steps": 3, "distill.top_k": 8, "data.eval": ""}
    _, in_step, _ = _run(_config(teacher, **common), tmp_path / "in_step")
    _, pre, _ = _run(_config(teacher, **common, **{"distill.teacher_logits": "precomputed"}),
                     tmp_path / "pre")
    assert os.path.exists(tmp_path / "pre" / "precomputed_teacher.npz")
    _close(pre, in_step, ("loss", "grad_norm", "nll"), atol=1e-6)
    _, chunked, _ = _run(_config(teacher, **common, **{"model.logits_chunk": 4}),
                         tmp_path / "chunked")
    _close(chunked, in_step, ("loss", "grad_norm", "token_accuracy"), atol=1e-6)


@pytest.mark.slow
def test_one_device_matches_eight(teacher, tmp_path):
    common = {"train.steps": 3, "data.eval": "", "data.buckets": "max_len",
              "optim.learning_rate": 1e-3}
    one = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    eight = make_mesh(dict(data=2, fsdp=2, tensor=2))
    _, a, _ = _run(_config(teacher, **common), tmp_path / "one", mesh=one)
    _, b, _ = _run(_config(teacher, **common), tmp_path / "eight", mesh=eight)
    _close(b, a, ("loss", "grad_norm", "nll"), atol=1e-5)


@pytest.mark.slow
def test_on_policy_resume_is_exact(teacher, tmp_path):
    """λ = 0.5: the coin, the samples and both data positions resume exactly."""
    common = {"train.steps": 8, "checkpoint.save_every": 4, "data.eval": "",
              "distill.on_policy_fraction": 0.5}
    full, full_rows, _ = _run(_config(teacher, **common), tmp_path / "full")
    assert {r["distill/on_policy"] for r in full_rows} == {0.0, 1.0}
    _run(_config(teacher, **common), tmp_path / "split", num_steps=4)
    resumed, rows, _ = _run(_config(teacher, **common), tmp_path / "split")
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(x, y)
    _close(rows[-4:], full_rows[-4:], ("loss", "distill/on_policy"), atol=0)


def test_sequence_kd_trains_on_teacher_samples(teacher, tmp_path):
    config = _config(teacher, **{"train.steps": 4, "data.eval": "", "distill.loss": "nll",
                                 "distill.sequence_kd": True})
    _, rows, _ = _run(config, tmp_path / "run")
    assert all(r["distill/on_policy"] == 0.0 and np.isfinite(r["loss"]) for r in rows)
    assert all(r["completion/length"] > 0 for r in rows)


def test_teacher_with_another_vocabulary_is_refused(teacher, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    run = json.loads((other / "config.json").read_text())
    run["model"]["vocab_size"] = 1024
    (other / "config.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="vocabulary of 1024 ids but the student's has 512"):
        Trainer(_config(str(other)), str(tmp_path / "run"))


@pytest.mark.parametrize("key,value,match", [
    ("distill.teacher", "", "distill.teacher is empty"),
    ("distill.teacher", "scratch", "must be trained weights"),
    ("distill.loss", "kl", "known: forward_kl"),
    ("distill.beta", 1.5, r"must be in \[0, 1\]"),
    ("distill.on_policy_fraction", -0.1, r"must be in \[0, 1\]"),
    ("distill.teacher_logits", "precomputed", "set distill.top_k"),
    ("rl.num_samples", 4, "one completion per prompt"),
])
def test_config_errors(teacher, tmp_path, key, value, match):
    config = _config(teacher, **{key: value})
    with pytest.raises(ValueError, match=match):
        Trainer(config, str(tmp_path / "run"))


def test_an_sft_chat_is_a_prompt_up_to_its_last_assistant_turn():
    chat = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}], "task": "addition"}
    ex = validate_prompt(chat, Location("jsonl:x.jsonl", 3, unit="line"))
    assert [m["content"] for m in ex.prompt] == ["hi", "hello", "2+2?"]
    assert ex.extras == {"task": "addition", "response": "4"}
    bad = {"messages": [{"role": "system", "content": "s"},
                        {"role": "assistant", "content": "a"}]}
    with pytest.raises(RecordError, match=r"jsonl:x.jsonl, line 3, field 'messages\[1\]'"):
        validate_prompt(bad, Location("jsonl:x.jsonl", 3, unit="line"))


def test_params_digest_tells_retrained_weights_apart():
    """The precomputed-columns cache is keyed by the frozen model's values, so a teacher
    (or reference) retrained at the same path is never read through a stale cache."""
    from jaxalign.precompute import params_digest
    tree = {"a": jax.numpy.arange(6.0).reshape(2, 3), "b": {"c": jax.numpy.ones(4)}}
    same = jax.tree.map(lambda x: x + 0, tree)
    assert params_digest(tree) == params_digest(same)
    nudged = {**tree, "b": {"c": tree["b"]["c"].at[2].add(1e-3)}}
    assert params_digest(nudged) != params_digest(tree)
    reshaped = {**tree, "a": tree["a"].reshape(3, 2)}
    assert params_digest(reshaped) != params_digest(tree)
