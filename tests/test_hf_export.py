"""``model.init_from`` (hf:, workdir:) in the trainer, and ``launch.export_hf`` end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from presets import preset

from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models import export, hf, init_from, lineage
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    # The source checkpoints here ship no tokenizer: the run names the builtin one.
    return preset("sft", **{"train.steps": 3, "train.log_every": 1, "data.eval": "",
                            "checkpoint.save_every": 3, "tokenizer": "builtin:world",
                            **overrides})


def _params(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A Llama-3-shaped HF checkpoint (tied, scaled RoPE) and an SFT run started from it."""
    root = tmp_path_factory.mktemp("hf_run")
    vocab = load_tokenizer(lineage.resolve_tokenizer(_config()).tokenizer).vocab_size
    # (transformers 5 forces its own byte-level tokenizer class onto any qwen2 model_type, so
    # a model shipping the builtin SentencePiece tokenizer is Llama-shaped here.)
    cfg = TransformerConfig(family="llama", vocab_size=vocab, d_model=48, n_layers=2, n_heads=4,
                            n_kv_heads=2, head_dim=12, mlp_dim=64, tie_embeddings=True,
                            rope_theta=5e5, rope_scaling="llama3", rope_factor=8.0,
                            rope_original_max_len=32, max_position_embeddings=256)
    model = Transformer(cfg, rngs=nnx.Rngs(params=3))
    src_params = _params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    src = str(root / "src")
    hf.save_pretrained(src_params, cfg, src)
    workdir = str(root / "sft")
    config = _config(**{"model.init_from": f"hf:{src}"})
    trainer = Trainer(config, workdir)
    initial = _params(trainer.state["params"])
    trainer.fit()
    trainer.close()
    return dict(src=src, cfg=cfg, src_params=src_params, initial=initial, workdir=workdir,
                final=_params(trainer.state["params"]), root=root)


@pytest.mark.slow
def test_hf_init_takes_shape_and_weights_from_the_checkpoint(hf_run):
    _assert_trees_equal(hf_run["initial"], hf_run["src_params"])
    with open(os.path.join(hf_run["workdir"], "config.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    # The stage config said tiny (d_model=32, untied, no bias); the checkpoint decides.
    assert (model["d_model"], model["head_dim"], model["family"]) == (48, 12, "llama")
    assert model["tie_embeddings"] and model["rope_scaling"] == "llama3"
    assert model["init_from"] == f"hf:{hf_run['src']}"


@pytest.mark.slow
def test_export_cli_loads_in_transformers(hf_run):
    transformers = pytest.importorskip("transformers", reason="needs transformers (dev extra)")
    torch = pytest.importorskip("torch", reason="needs torch==2.13.0 (dev extra)")
    out = str(hf_run["root"] / "export")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.export_hf", f"--workdir={hf_run['workdir']}",
         f"--out={out}", "--max_shard_size=40KB"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.model", "tokenizer_config.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1

    trained = export.restore_params(hf_run["workdir"], hf_run["cfg"])
    _assert_trees_equal(_params(trained), hf_run["final"])
    graphdef, state = hf.abstract_model(hf_run["cfg"])
    nnx.replace_by_pure_dict(state, trained)
    ours = nnx.merge(graphdef, state)
    tokens = np.array([[4, 90, 17, 250, 3, 61, 8, 100, 42, 7]], np.int32)
    want = np.asarray(ours(jnp.asarray(tokens)))

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        got = theirs(torch.as_tensor(tokens)).logits.numpy()
    assert float(np.abs(got - want).max()) <= 1e-4

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_tokenizer(lineage.resolve_tokenizer(_config()).tokenizer)
    text = "What is 23 + 58? Reverse the word: stone"
    assert tok(text)["input_ids"] == [ours_tok.bos_id, *ours_tok.encode(text)]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["eos_token_id"] == ours_tok.eos_id
    # jaxalign reads the exported directory's tokenizer (tokenizer.json) back the same way.
    again = hf.load_tokenizer(out)
    assert again.encode(text) == ours_tok.encode(text)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (
        ours_tok.bos_id, ours_tok.eos_id, ours_tok.vocab_size)


@pytest.mark.slow
def test_workdir_chain_and_resume_prefers_own_checkpoints(hf_run, tmp_path):
    chained = str(tmp_path / "dpo")
    config = _config(**{"model.init_from": f"workdir:{hf_run['workdir']}", "train.steps": 2,
                        "checkpoint.save_every": 2})
    trainer = Trainer(config, chained)
    assert int(trainer.state["step"]) == 0
    _assert_trees_equal(_params(trainer.state["params"]), hf_run["final"])
    trainer.fit()
    trainer.close()
    after = _params(trainer.state["params"])
    assert init_from.hf_source_dir(f"workdir:{chained}") == hf_run["src"]

    # Restarting the same workdir resumes its own step-2 checkpoint, not init_from's params.
    again = Trainer(config, chained)
    assert int(again.state["step"]) == 2
    _assert_trees_equal(_params(again.state["params"]), after)
    again.close()


def test_init_from_errors(tmp_path):
    with pytest.raises(ValueError,
                       match="expected 'scratch', 'hf:<dir>', 'gguf:<file>' or 'workdir:<dir>'"):
        init_from.parse("s3://bucket/model")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        Trainer(_config(**{"model.init_from": f"hf:{tmp_path}"}), str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="needs the directory of an earlier jaxalign run"):
        Trainer(_config(**{"model.init_from": f"workdir:{tmp_path}"}), str(tmp_path / "run"))


@pytest.mark.slow
def test_partial_init_for_a_model_with_other_params(hf_run):
    """A target with a param the sources lack (a new head) gets the rest loaded."""
    cfg = hf_run["cfg"]
    _, abstract = hf.abstract_model(cfg)
    target = dict(nnx.to_pure_dict(abstract))
    target["head"] = jax.ShapeDtypeStruct((cfg.d_model,), jnp.float32)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, target)
    for spec, want in ((f"hf:{hf_run['src']}", hf_run["src_params"]),
                       (f"workdir:{hf_run['workdir']}", hf_run["final"])):
        loaded = _params(init_from.load_params(spec, cfg, target, shardings))
        assert "head" not in loaded
        _assert_trees_equal(loaded, want)
        fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
        full = init_from.overlay(fresh, loaded)
        assert jax.tree.structure(full) == jax.tree.structure(fresh)
        np.testing.assert_array_equal(full["embed"], want["embed"])
        assert not full["head"].any()
