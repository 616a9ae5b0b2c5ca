"""Loading never runs code: no unpickling anywhere, chat templates in Jinja's sandbox.

Every directory gets planted pickles whose unpickling would create a marker file,
and ``pickle``'s loaders are replaced by ones that fail the test, while checkpoints,
safetensors weights, tokenizers and cached columns are loaded.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as np_jax
import numpy as np
import pytest
from hf_tokenizer_files import hf_tokenizer, write_hf_dir

from jaxalign.checkpoint import Checkpointer, abstract_with_shardings
from jaxalign.data.encode import Encoder
from jaxalign.data.records import Location, RecordError
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.mesh import make_mesh
from jaxalign.models import hf
from jaxalign.precompute import PrecomputedColumns
from jaxalign.sharding import replicated

PICKLE_NAMES = ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth",
                "model.ckpt", "tokenizer.pkl")


class _Plant:
    """Unpickling this creates ``path``: the proof that something unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """A path no load may create; pickle's loaders fail the test while it is active."""
    path = tmp_path / "code_ran"

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    real_np_load = np.load

    def np_load(*args, allow_pickle=False, **kwargs):
        assert not allow_pickle, "np.load(allow_pickle=True)"
        return real_np_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(np, "load", np_load)
    had_torch = "torch" in sys.modules
    yield path
    assert not path.exists(), "a planted pickle was executed"
    # Nothing here may need torch (let alone torch.load); other tests may have imported it.
    assert had_torch or "torch" not in sys.modules, "loading imported torch"


def _plant(directory: Path, marker: Path, names=PICKLE_NAMES) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(_Plant(str(marker)))
    for name in names:
        (directory / name).write_bytes(payload)


def _tiny_hf(path: Path) -> dict:
    from flax import nnx

    from jaxalign.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=hf_tokenizer().vocab_size, d_model=16, n_layers=1,
                            n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(
        Transformer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)))
    hf.save_pretrained(params, cfg, str(path))
    write_hf_dir(path)
    return params


@pytest.mark.slow
def test_hf_directory_loads_only_safetensors_and_json(tmp_path, marker):
    path = tmp_path / "hf"
    want = _tiny_hf(path)
    _plant(path, marker)
    model = hf.load_model(str(path))
    from flax import nnx

    got = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert hf.load_tokenizer(str(path)).vocab_size == hf_tokenizer().vocab_size
    # Only pickles left: refused with the file names, never opened.
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"found model.ckpt, optimizer.pt, "
                                                 r"pytorch_model.bin.*never loaded"):
        hf.load_model(str(path))


def test_tokenizer_files_holding_pickles_are_refused(tmp_path, marker):
    only = tmp_path / "only_pickles"
    _plant(only, marker)
    with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor "
                                                "tokenizer.model"):
        load_tokenizer(str(only))
    for name in ("tokenizer.json", "tokenizer.model"):
        directory = tmp_path / name.replace(".", "_")
        _plant(directory, marker, names=(name,))
        for spec in (directory, directory / name):
            with pytest.raises(ValueError, match=f"unsupported tokenizer file "
                                                 f"'{directory / name}'"):
                load_tokenizer(str(spec))


def test_checkpoint_restore_ignores_planted_pickles(tmp_path, marker):
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    state = {"w": jax.device_put(np_jax.arange(8.0), replicated(mesh)),
             "step": jax.device_put(np_jax.int32(3), replicated(mesh))}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=0)
    ckpt.save(3, state, {"position": 3})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "3"
    _plant(step_dir, marker)
    _plant(step_dir / "state", marker, names=("checkpoint.pkl", "_sharding.pkl"))
    again = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=0)
    abstract = abstract_with_shardings(jax.eval_shape(lambda: state),
                                       jax.tree.map(lambda x: x.sharding, state))
    step, restored, data = again.restore_latest_intact(abstract)
    again.close()
    assert step == 3 and data == {"position": 3}
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))


class _Batches:
    """A closable iterator, like the loader's."""

    def __init__(self, batches):
        self._it = iter(batches)

    def __next__(self):
        return next(self._it)

    def close(self):
        pass


def test_cached_columns_holding_pickles_are_recomputed(tmp_path, marker):
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    path = tmp_path / "precomputed_reference.npz"
    batches = [{"x": np.full((2, 3), i, np.float32)} for i in range(2)]
    columns = PrecomputedColumns(str(path), {"k": 1}, lambda b: {"ref": b["x"].sum(-1)},
                                 mesh, lambda host: host)
    for planted in (pickle.dumps(_Plant(str(marker))), None):
        if planted is None:  # an .npz whose array is an object array (pickled inside)
            with open(path, "wb") as f:
                np.savez(f, key=np.asarray(columns.key),
                         ref=np.asarray([_Plant(str(marker))], dtype=object))
        else:
            path.write_bytes(planted)
        assert columns.prepare_train(lambda: _Batches(batches), 2)  # recomputed, not loaded
        np.testing.assert_array_equal(columns.train["ref"], [[0, 0], [3, 3]])


# Templates that try to reach Python: attribute walks to os/subprocess, mutation of the
# caller's data, and a render that hides the assistant text.
HOSTILE_TEMPLATES = [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{% for m in messages %}{{ m.content.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ self.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['sys'].modules['os'].system('touch MARKER') }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{{ messages.pop() }}",
    "{{ raise_exception.__globals__ }}",
    "{% for i in range(10 ** 9) %}{% endfor %}",
]


@pytest.mark.parametrize("source", HOSTILE_TEMPLATES)
def test_chat_templates_cannot_reach_python(tmp_path, marker, source):
    directory = write_hf_dir(tmp_path / "tok", chat_template=source.replace(
        "MARKER", str(marker)))
    encoder = Encoder("sft", load_tokenizer(str(directory)), template="auto", max_len=32)
    with pytest.raises(RecordError, match=r"^data.jsonl, line 1, field 'response': chat "
                                          r"template 'tokenizer' (failed: (SecurityError|"
                                          r"OverflowError): .*(unsafe|MAX_RANGE)|rendered no "
                                          r"trained token)"):
        encoder({"prompt": "hi", "response": "hello"}, Location("data.jsonl", 1, "line"))
    assert not os.path.exists(marker)
