"""Length buckets and grouping: bucket choice, ``repad``, bucketed batches against full-width
batches (every format), losses and gradients, multi-process agreement, grouping by length
and exact resume."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import step as step_lib
from jaxalign.algos import dpo, sft
from jaxalign.config import check_config, model_config, shared_config
from jaxalign.data import buckets, packing
from jaxalign.data.builtin import load_builtin
from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.records import Location
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models.transformer import Transformer, TransformerConfig

# Name -> (builtin split, settings). Packed layouts keep max_len unless every row is short.
FORMATS = {
    "sft": ("train", dict(fmt="sft", max_len=128)),
    "packed": ("train", dict(fmt="sft", max_len=128, pack=True, pack_window=12)),
    "packed_pairs": ("preference", dict(fmt="preference", max_len=96, pack=True,
                                        pack_window=12)),
    "packed_kto": ("kto", dict(fmt="unpaired", max_len=64, pack=True, pack_window=12,
                               buckets="12")),
    "unpaired": ("kto", dict(fmt="unpaired", max_len=64, buckets="12")),  # 12, 24, ... 64
    "preference": ("preference", dict(fmt="preference", max_len=96)),
    "prompt": ("rl", dict(fmt="prompt", max_len=64, max_prompt_len=40)),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:world")


@pytest.fixture(scope="module")
def data():
    return {split: load_builtin("world", split)[:400]
            for split in ("train", "kto", "preference", "rl")}


def _make(tok, records, process_index=0, process_count=1, **kw):
    settings = DataSettings(**{"source": "test", "split": "train", "fmt": "sft", "batch_size": 4,
                               "max_len": 64, "overlong": "drop", "shuffle": True, **kw})
    return Loader(settings, tok, records=records, process_index=process_index,
                  process_count=process_count)


def _format(tok, data, name, **kw):
    split, settings = FORMATS[name]
    return _make(tok, data[split], **{**settings, **kw})


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def _real_rows(batch):
    """Each row's non-padding input ids (sequence formats)."""
    return [tuple(batch["inputs_bt"][r][batch["segment_ids_bt"][r] > 0])
            for r in range(len(batch["inputs_bt"]))]


# --- bucket widths --------------------------------------------------------------------


@pytest.mark.parametrize("spec, limit, want", [
    ("pow2", 48, (16, 32, 48)),
    ("pow2", 64, (16, 32, 64)),
    ("pow2", 16, (16,)),
    ("pow2", 10, (10,)),
    (" POW2:32 ", 100, (32, 64, 100)),
    ("pow2:24", 100, (24, 48, 96, 100)),
    ("max_len", 48, (48,)),
    ("16", 48, (16, 32, 48)),
    ("20", 48, (20, 40, 48)),
    ("100", 48, (48,)),
    ("64, 16,32", 48, (16, 32, 48)),
    ("16,48,16", 48, (16, 48)),
])
def test_parse_buckets(spec, limit, want):
    assert buckets.parse_buckets(spec, limit) == want


@pytest.mark.parametrize("spec", ["", "pow3", "0", "-8", "16,x", "pow2:0", "1.5", "1"])
def test_parse_buckets_rejects_bad_specs(spec):
    # "1" is well formed but would compile the step 1000 times.
    with pytest.raises(ValueError, match="data.buckets"):
        buckets.parse_buckets(spec, 1000)


def test_pick_width_edges():
    widths = (16, 32, 48)
    assert buckets.pick_width(32, widths) == 32  # exactly a bucket
    assert buckets.pick_width(33, widths) == 48
    assert buckets.pick_width(48, widths) == 48  # max_len
    assert buckets.pick_width(1, widths) == 16  # longest row of one position
    assert buckets.pick_width(0, widths) == 16  # only padding rows
    assert buckets.pick_width(5, (48,)) == 48  # buckets off
    with pytest.raises(ValueError, match="exceeds the widest bucket 48"):
        buckets.pick_width(49, widths)


def test_agree_takes_the_largest_of_each(monkeypatch):
    def no_collective(values):
        raise AssertionError("one process needs no collective")

    monkeypatch.setattr(buckets, "_allgather", no_collective)
    assert buckets.agree((32, 24), 1) == (32, 24)
    # Four processes' (width, loss positions): the widest width, the most positions.
    monkeypatch.setattr(buckets, "_allgather", lambda values: np.array(
        [[16, 16], list(values), [64, 32], [32, 32]]))
    assert buckets.agree((32, 24), 4) == (64, 32)


def test_loss_index_sizes():
    assert buckets.loss_index_sizes(128) == (16, 24, 32, 48, 64, 96, 128)
    assert buckets.loss_index_sizes(100) == (16, 24, 32, 48, 64, 96, 100)
    assert buckets.loss_index_sizes(16) == (16,)


# --- repad ----------------------------------------------------------------------------


def _rows(loader, n):
    """The first ``n`` batches' worth of rows of ``loader``'s records, unshuffled."""
    s = loader.settings
    examples = [loader.encoder(r, Location("t", i)) for i, r in enumerate(loader.source)]
    examples = [e for e in examples if "dropped" not in e][:n]
    return packing.pack_rows(s.fmt, examples, s.max_len, s.pack)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_repad_equals_collating_wider(tok, data, name):
    loader = _format(tok, data, name)
    fmt, pad_id, widths = loader.settings.fmt, tok.pad_id, loader.batch_widths()
    pack, full = loader.settings.pack, widths[-1]

    def collate(chunk, width):
        return packing.collate(fmt, chunk, width, width, pad_id, pack=pack)

    rows = _rows(loader, 24)
    # Three rows and one padding row per batch; packed rows also cut to one or two
    # segments (rows short enough for a narrower bucket).
    chunks = [rows[i:i + 3] + [[]] for i in range(0, len(rows), 3)]
    chunks += [[row[:1], row[1:3]] for row in rows] if pack else []
    seen = set()
    for chunk in chunks:
        batch = buckets.fit(collate(chunk, full), fmt, widths, pad_id)
        width = packing.batch_width(batch)
        seen.add(width)
        # The bucket is the smallest that fits, and cropping dropped only padding.
        assert width == buckets.pick_width(packing.used_width(batch, fmt, pad_id), widths)
        _same(batch, collate(chunk, width))
        for wider in [w for w in widths if w > width] + [full + 7]:
            _same(packing.repad(batch, wider, fmt, pad_id), collate(chunk, wider))
        if width > 1:
            with pytest.raises(ValueError, match="narrower"):
                packing.repad(batch, width - 1, fmt, pad_id)
    assert len(seen) > 1, seen


def test_repad_covers_any_sequence_field():
    """Fields ``collate`` does not know yet (other row layouts) widen by their name."""
    batch = {"x_inputs_bt": np.array([[5, 6]], np.int32), "x_slot_mask_bt": np.ones((1, 2)),
             "label_b": np.ones((1,), np.float32), "extras": [{}]}
    out = packing.repad(batch, 4, "sft", pad_id=3)
    np.testing.assert_array_equal(out["x_inputs_bt"], [[5, 6, 3, 3]])
    np.testing.assert_array_equal(out["x_slot_mask_bt"], [[1, 1, 0, 0]])
    assert out["label_b"] is batch["label_b"] and out["extras"] is batch["extras"]
    left = packing.repad({"prompt_tokens_bt": np.array([[7]], np.int32)}, 3, "prompt", 0)
    np.testing.assert_array_equal(left["prompt_tokens_bt"], [[0, 0, 7]])


# --- the loader -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_bucketed_batches_equal_full_width_batches(tok, data, name):
    """Same records, same order; widened back to max_len, equal to unbucketed batches."""
    bucketed = _format(tok, data, name)
    full = _format(tok, data, name, buckets="max_len")
    fmt, widths = bucketed.settings.fmt, bucketed.batch_widths()
    assert full.batch_widths() == (widths[-1],)
    pairs = [(bucketed.iterator(), full.iterator())]
    pairs.append((bucketed.eval_batches(), full.eval_batches()))
    seen = set()
    for got_it, want_it in pairs:
        for got, want in itertools.islice(zip(got_it, want_it, strict=False), 30):
            width = packing.batch_width(got)  # one width for every field (both sides)
            assert width == buckets.pick_width(packing.used_width(got, fmt, tok.pad_id), widths)
            seen.add(width)
            _same(packing.repad(got, widths[-1], fmt, tok.pad_id), want)
    packed = bucketed.settings.pack
    assert len(seen) > 1 or packed, seen
    it_b, it_f = pairs[0]
    m_b, m_f = it_b.metrics(), it_f.metrics()
    assert m_b["data_records"] == m_f["data_records"]
    assert m_b["data_packing_efficiency"] > m_f["data_packing_efficiency"] or packed


def test_settings_are_validated(tok, data):
    records = data["train"][:8]
    with pytest.raises(ValueError, match="data.buckets must be"):
        _make(tok, records, buckets="pow3")
    with pytest.raises(ValueError, match="data.group_by_length=-1"):
        _make(tok, records, group_by_length=-1)
    with pytest.raises(ValueError, match="0 with data.pack"):
        _make(tok, records, group_by_length=2, pack=True)
    config = shared_config("sft")
    assert (config.data.buckets, config.data.group_by_length) == ("pow2", 0)
    settings = DataSettings.from_config(config.data, "train", "sft", 8)
    assert (settings.buckets, settings.group_by_length) == ("pow2", 0)
    config.data.group_by_length = -2
    with pytest.raises(ValueError, match="data.group_by_length=-2 must be a whole number"):
        check_config(config)


def test_batch_spec_describes_the_widest_bucket(tok, data):
    loader = _make(tok, data["train"][:8], max_len=48)
    assert loader.batch_widths() == (16, 32, 48)
    assert loader.batch_spec()["inputs_bt"] == ((4, 48), np.dtype(np.int32))
    assert loader.batch_spec(16)["loss_mask_bt"] == ((4, 16), np.dtype(np.float32))
    with pytest.raises(ValueError, match="not a bucket"):
        loader.batch_spec(20)
    prompts = _make(tok, data["rl"][:8], fmt="prompt", max_len=64, max_prompt_len=40)
    assert prompts.batch_widths() == (16, 32, 40)
    assert prompts.batch_spec()["prompt_tokens_bt"] == ((4, 40), np.dtype(np.int32))
    assert prompts.batch_spec(32)["prompt_mask_bt"] == ((4, 32), np.dtype(np.int32))


# --- losses ---------------------------------------------------------------------------


def _tiny_model(seed):
    cfg = TransformerConfig.from_mapping(model_config("tiny"))
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def _loss_and_grads(loss_fn, weights_fn, batch, frozen=None):
    graphdef, params, rest = nnx.split(_tiny_model(0), nnx.Param, ...)

    def objective(params, batch):
        model = nnx.merge(graphdef, params, rest)
        args = (frozen,) if frozen is not None else ()
        out = loss_fn(model, batch, *args)
        return step_lib.combine(out.terms, weights_fn(batch))

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, grads = jax.jit(jax.value_and_grad(objective))(params, batch)
    return float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("name", ["sft", "preference"])
def test_losses_and_gradients_match_full_width(tok, data, name):
    loader = _format(tok, data, name)
    fmt, widths = loader.settings.fmt, loader.batch_widths()
    batch = next(b for b in loader.iterator() if packing.batch_width(b) < widths[-1])
    wide = packing.repad(batch, widths[-1], fmt, tok.pad_id)
    if name == "sft":
        loss_fn, weights_fn = sft.make_loss(None)
        frozen = None
    else:
        from configs import dpo as dpo_config

        loss_fn, weights_fn = dpo.make_loss(dpo_config.get_config("test"))
        frozen = {"reference": _tiny_model(1)}
    _assert_same_loss(loss_fn, weights_fn, frozen, batch, wide, grad_rtol=1e-6)


def _assert_same_loss(loss_fn, weights_fn, frozen, batch, want_batch, grad_rtol):
    """``batch`` and ``want_batch`` give one (positive) loss and the same gradients."""
    loss, grads = _loss_and_grads(loss_fn, weights_fn, batch, frozen)
    want_loss, want_grads = _loss_and_grads(loss_fn, weights_fn, want_batch, frozen)
    assert np.isfinite(loss) and loss > 0
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for g, want_g in zip(grads, want_grads, strict=True):
        scale = float(np.max(np.abs(want_g)))
        np.testing.assert_allclose(g, want_g, rtol=grad_rtol, atol=1e-6 * scale)


def _stage_loss(name, packed):
    """``(loss_fn, weights_fn, frozen)`` of SFT or DPO (test preset) for ``name`` batches."""
    if name == "sft":
        return (*sft.make_loss(None), None)
    from configs import dpo as dpo_config

    config = dpo_config.get_config("test")
    with config.unlocked():
        config.data.pack = packed
    return (*dpo.make_loss(config), {"reference": _tiny_model(1)})


@pytest.mark.parametrize("name", ["sft", "preference"])
@pytest.mark.parametrize("pack", [False, True])
def test_loss_index_gives_the_full_loss_and_gradients(tok, data, name, pack):
    """The unembedding run only at the loss positions (``k`` per row) gives the loss and
    gradients of the whole rows."""
    loader = _format(tok, data, name, pack=pack, loss_index=True)
    batches = itertools.islice(loader.iterator(), 6)
    sides = packing.LOSS_SIDES[name]
    batch = next(b for b in batches if b[f"{sides[0]}loss_index_bk"].shape[1]
                 < packing.batch_width(b))  # really fewer positions than the row has
    for side in sides:
        index_bk = batch[f"{side}loss_index_bk"]
        mask_bt = batch[f"{side}loss_mask_bt"]
        gathered = np.take_along_axis(mask_bt, index_bk, axis=1)
        np.testing.assert_array_equal(gathered.sum(axis=1), mask_bt.sum(axis=1))
    full = {k: v for k, v in batch.items() if "loss_index" not in k}
    _assert_same_loss(*_stage_loss(name, pack), batch, full, grad_rtol=1e-5)


# --- several processes ----------------------------------------------------------------


@pytest.mark.parametrize("name, loss_index", [("sft", False), ("preference", False),
                                              ("prompt", False), ("sft", True),
                                              ("preference", True)])
def test_processes_agree_on_the_widest_bucket(tok, data, name, loss_index, monkeypatch):
    """With a fake allgather, the processes' pieces form exactly the one-process batch
    (and agree on the number of loss positions per row, if the batches carry them)."""
    kw = dict(batch_size=8, loss_index=loss_index)
    parts = [_format(tok, data, name, process_index=p, process_count=2, **kw) for p in range(2)]
    whole = _format(tok, data, name, **kw).iterator()
    steps = 8
    sizes = buckets.loss_index_sizes(parts[0].settings.max_len)

    def local_shape(batch):
        k = (buckets.pick_width(packing.loss_positions(batch, name), sizes)
             if loss_index else 0)
        return packing.batch_width(batch), k

    local = [[local_shape(b) for b in itertools.islice(iter(p.dataset()), steps)]
             for p in parts]
    assert any(a != b for a, b in zip(*local, strict=True)), local  # the local buckets do differ
    calls = []

    def fake_allgather(values):
        step, process = divmod(len(calls), 2)
        calls.append(values)
        assert tuple(values) == local[process][step]
        return np.array([local[0][step], local[1][step]], np.int32)

    monkeypatch.setattr(buckets, "_allgather", fake_allgather)
    its = [p.iterator() for p in parts]
    for step in range(steps):
        got = [next(it) for it in its]
        want = next(whole)
        for key, value in want.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), value)
            else:
                assert got[0][key] + got[1][key] == value
        assert packing.batch_width(want) == max(local[0][step][0], local[1][step][0])
        if loss_index:
            k = min(max(local[0][step][1], local[1][step][1]), packing.batch_width(want))
            for side in packing.LOSS_SIDES[name]:
                assert want[f"{side}loss_index_bk"].shape == (8, k)
    assert len(calls) == 2 * steps


@pytest.mark.parametrize("name", ["sft", "prompt"])
def test_eval_batches_agree_across_processes(tok, data, name, monkeypatch):
    """Eval widths agree without a collective: every process measures every process's rows."""
    monkeypatch.setattr(buckets, "_allgather", None)  # never called
    parts = [_format(tok, data, name, batch_size=8, process_index=p, process_count=2)
             for p in range(2)]
    whole = list(_format(tok, data, name, batch_size=8).eval_batches())
    for _ in range(2):  # the widths are measured once, then reused
        got = [list(p.eval_batches()) for p in parts]
        assert len(got[0]) == len(got[1]) == len(whole)
        for a, b, want in zip(*got, whole, strict=True):
            for key, value in want.items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), value)
    assert len({packing.batch_width(b) for b in whole}) > 1


# --- grouping and resume --------------------------------------------------------------


def test_grouping_sorts_windows_and_keeps_their_records(tok, data):
    kw = dict(batch_size=4, max_len=128, seed=1)
    plain = _make(tok, data["train"][:200], **kw).iterator()
    grouped_loader = _make(tok, data["train"][:200], group_by_length=4, **kw)
    grouped = grouped_loader.iterator()
    windows, sizes = 6, {"plain": 0, "grouped": 0}
    unsorted = 0
    for _ in range(windows):
        want = [next(plain) for _ in range(4)]
        got = [next(grouped) for _ in range(4)]
        # The window holds the same records as the ungrouped batches it replaces.
        assert sorted(sum(map(_real_rows, got), [])) == sorted(sum(map(_real_rows, want), []))
        spans = [(min(map(len, _real_rows(b))), max(map(len, _real_rows(b)))) for b in got]
        for (lo, hi), (lo2, hi2) in itertools.combinations(spans, 2):
            assert hi <= lo2 or hi2 <= lo  # each batch a run of the length-sorted window
        unsorted += spans != sorted(spans)
        sizes["plain"] += sum(b["inputs_bt"].size for b in want)
        sizes["grouped"] += sum(b["inputs_bt"].size for b in got)
    assert unsorted > 0  # the batch order is shuffled
    assert sizes["grouped"] < sizes["plain"], sizes  # less padding
    assert plain.metrics()["data_dropped"] == 0
    # Seeded: a fresh iterator repeats the order, another seed changes it.
    again = grouped_loader.iterator()
    other = _make(tok, data["train"][:200], group_by_length=4, **{**kw, "seed": 2}).iterator()
    first = [next(again) for _ in range(4)]
    assert _real_rows(first[0]) == _real_rows(next(grouped_loader.iterator()))
    assert [_real_rows(b) for b in first] != [_real_rows(next(other)) for _ in range(4)]


def test_grouped_windows_read_past_dropped_records(tok, data):
    """Dropped records never leave a grouped batch short or misaligned."""
    it = _make(tok, data["train"][:200], batch_size=4, max_len=40, group_by_length=3).iterator()
    for _ in range(15):
        batch = next(it)
        assert (batch["segment_ids_bt"].max(axis=1) > 0).all()  # no padding rows
    assert it.metrics()["data_dropped"] > 0


@pytest.mark.parametrize("group", [0, 3])
def test_resume_mid_epoch_is_exact(tok, data, group):
    """Bucketed (and grouped) batches after a restore equal the uninterrupted run's."""
    kw = dict(batch_size=4, max_len=48, seed=3, group_by_length=group)
    records = data["train"][:70]  # an epoch is about 17 batches: the run crosses one
    full_it = _make(tok, records, **kw).iterator()
    full = [next(full_it) for _ in range(24)]
    assert full_it.metrics()["data_dropped"] > 0
    assert len({packing.batch_width(b) for b in full}) > 1
    first = _make(tok, records, **kw).iterator()
    for want in full[:7]:  # mid-window when grouped (windows of 3 batches)
        _same(next(first), want)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _make(tok, records, **kw).iterator()
    resumed.set_state(state)
    _same(next(resumed), full[7])
    # A second restore inside the window the first one replayed (a run killed twice).
    state = json.loads(json.dumps(resumed.get_state()))
    resumed = _make(tok, records, **kw).iterator()
    resumed.set_state(state)
    for want in full[8:]:
        _same(next(resumed), want)
    assert resumed.metrics() == full_it.metrics()


@pytest.mark.slow
def test_resume_is_exact_with_workers(tok, data):
    kw = dict(batch_size=4, max_len=48, seed=3, group_by_length=3, num_workers=2)
    records = data["train"][:70]
    full_it = _make(tok, records, **kw).iterator()
    full = [next(full_it) for _ in range(16)]
    full_it.close()
    first = _make(tok, records, **kw).iterator()
    for want in full[:5]:
        _same(next(first), want)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = _make(tok, records, **kw).iterator()
    resumed.set_state(state)
    for want in full[5:]:
        _same(next(resumed), want)
    resumed.close()
