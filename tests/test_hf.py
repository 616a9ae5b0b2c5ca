"""HF checkpoint import/export without torch: config styles, layouts, sharding, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxalign.mesh import make_mesh
from jaxalign.models import hf, hf_config, hf_weights
from jaxalign.models.transformer import Transformer, TransformerConfig

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            mlp_dim=48, rope_theta=1_000_000.0)


def _save_tiny(path, max_shard_bytes=hf.DEFAULT_MAX_SHARD_BYTES, **overrides):
    """A random tiny model written as an HF checkpoint; returns (cfg, params)."""
    cfg = TransformerConfig(**{**TINY, **overrides})
    model = Transformer(cfg, rngs=nnx.Rngs(params=1))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    # Distinct values everywhere (biases and norms start constant).
    params = jax.tree.map(lambda x: x + np.random.default_rng(x.size).normal(
        0, 0.05, x.shape).astype(x.dtype), params)
    hf.save_pretrained(params, cfg, str(path), max_shard_bytes=max_shard_bytes)
    return cfg, params


# -- config.json ---------------------------------------------------------------


def test_transformers_4x_and_5x_configs_parse_alike():
    """The same models described in both config.json styles give the same config."""
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=12,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    llama3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
    pairs = {
        "llama": (
            dict(architectures=["LlamaForCausalLM"], rope_theta=500000.0, rope_scaling=llama3),
            dict(architectures=["LlamaForCausalLM"],
                 rope_parameters=dict(llama3, rope_theta=500000.0))),
        "gemma3": (
            dict(architectures=["Gemma3ForCausalLM"], rope_theta=1e6, rope_local_base_freq=1e4,
                 rope_scaling=dict(rope_type="linear", factor=8.0), sliding_window=512,
                 sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=256),
            dict(architectures=["Gemma3ForCausalLM"], sliding_window=512,
                 layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                              for i in range(12)],
                 rope_parameters=dict(
                     full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                     sliding_attention=dict(rope_type="default", rope_theta=1e4)),
                 hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256)),
        "qwen2": (
            dict(architectures=["Qwen2ForCausalLM"], rope_theta=1e6, use_sliding_window=False,
                 sliding_window=4096, max_window_layers=21),
            dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                 sliding_window=None, layer_types=["full_attention"] * 12,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    }
    for family, (old, new) in pairs.items():
        a = hf_config.config_from_hf({**shape, **old})
        b = hf_config.config_from_hf({**shape, **new})
        assert a == b, family
        assert a.family == family
    gemma3 = hf_config.config_from_hf({**shape, **pairs["gemma3"][0]})
    assert gemma3.layer_types == ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",)
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e6, 1e4)
    assert (gemma3.rope_scaling, gemma3.rope_factor, gemma3.sliding_window) == ("linear", 8.0, 512)
    assert gemma3.norm_plus_one and gemma3.scale_embeddings and gemma3.post_norms
    assert gemma3.qk_norm and gemma3.tie_embeddings and gemma3.mlp_activation == "gelu_tanh"
    llama = hf_config.config_from_hf({**shape, **pairs["llama"][0]})
    assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_max_len) == (
        "llama3", 32.0, 8192)
    # Gemma 2 without layer_types alternates sliding/full from layer 0.
    g2 = hf_config.config_from_hf({**shape, "architectures": ["Gemma2ForCausalLM"],
                                   "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                                   "final_logit_softcapping": 30.0})
    assert g2.layer_types[:4] == ("sliding", "full", "sliding", "full")
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar) == (50.0, 30.0, 256.0)


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64)),
    ("mistral", dict(sliding_window=5, layer_types=("sliding", "sliding"))),
    ("qwen2", dict(qkv_bias=True, tie_embeddings=True)),
    ("qwen3", dict(qk_norm=True)),
    ("gemma", dict(norm_plus_one=True, scale_embeddings=True, tie_embeddings=True,
                   mlp_activation="gelu_tanh")),
    ("gemma2", dict(norm_plus_one=True, scale_embeddings=True, post_norms=True,
                    attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=16.0,
                    sliding_window=4, layer_types=("sliding", "full"))),
    ("gemma3", dict(norm_plus_one=True, scale_embeddings=True, post_norms=True, qk_norm=True,
                    local_rope_theta=10_000.0, rope_scaling="linear", rope_factor=8.0,
                    query_pre_attn_scalar=8.0, sliding_window=4,
                    layer_types=("sliding", "full"))),
])
def test_config_json_round_trip(family, overrides):
    cfg = TransformerConfig(**{**TINY, "family": family, **overrides})
    exported = json.loads(json.dumps(hf_config.config_to_hf(cfg)))
    assert exported["architectures"] == [hf_config.FAMILIES[family].architecture]
    assert hf_config.config_from_hf(exported) == cfg
    # The legacy keys alone (what transformers 4.x reads) describe the same model.
    legacy = {k: v for k, v in exported.items() if k != "rope_parameters"}
    assert hf_config.config_from_hf(legacy) == cfg


def test_export_refuses_what_the_family_cannot_express():
    cfg = TransformerConfig(**TINY, family="llama", qkv_bias=True)
    with pytest.raises(ValueError, match=r"family='llama' \(LlamaForCausalLM\) cannot express: "
                                         r"qkv_bias=True \(needs False\)"):
        hf_config.config_to_hf(cfg)
    cfg = TransformerConfig(**TINY, family="mistral", sliding_window=4,
                            layer_types=("sliding", "full"))
    with pytest.raises(ValueError, match="Mistral slides every layer or none"):
        hf_config.config_to_hf(cfg)


# -- tensor layouts ------------------------------------------------------------


def test_tensor_map_reads_any_slice_and_inverts():
    """Reading a shard straight from the HF layout equals converting the whole tensor."""
    cfg = TransformerConfig(**{**TINY, "qkv_bias": True})
    rng = np.random.default_rng(0)
    maps = {m.path[-1]: m for m in hf_weights.tensor_maps(cfg) if m.path[:2] == ("layers", 1)}
    assert maps["q_proj"].name == "model.layers.1.self_attn.q_proj.weight"
    for key in ("q_proj", "k_proj", "o_proj", "q_bias", "gate_proj", "down_proj"):
        m = maps[key]
        full_hf = rng.normal(size=m.hf_shape).astype(np.float32)
        ours = m.to_ours(full_hf)
        assert ours.shape == m.shape
        assert m.to_hf(ours).tobytes() == full_hf.tobytes()
        for _ in range(5):
            index = []
            for size in m.shape:
                a = int(rng.integers(0, size))
                index.append(slice(a, int(rng.integers(a + 1, size + 1))))
            np.testing.assert_array_equal(m.read(full_hf, tuple(index)), ours[tuple(index)])
    # q heads: HF row r = head * head_dim + j; ours [d, head, j].
    m = maps["q_proj"]
    full_hf = np.arange(np.prod(m.hf_shape), dtype=np.float32).reshape(m.hf_shape)
    assert m.to_ours(full_hf)[5, 2, 3] == full_hf[2 * 8 + 3, 5]


@pytest.mark.slow
def test_sharded_checkpoint_on_8_devices_equals_single_device(tmp_path):
    cfg, _ = _save_tiny(tmp_path / "ckpt", max_shard_bytes=20_000, qkv_bias=True,
                        family="qwen2")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert hf_weights.INDEX_FILE in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and all(os.path.getsize(tmp_path / "ckpt" / f) < 40_000
                                   for f in shards)
    single = hf.load_model(str(tmp_path / "ckpt"))
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    sharded = hf.load_model(str(tmp_path / "ckpt"), mesh=mesh)
    p1 = nnx.to_pure_dict(nnx.state(single, nnx.Param))
    p8 = nnx.to_pure_dict(nnx.state(sharded, nnx.Param))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p8),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
    q = p8["layers"][0]["attn"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (16, 2, 8)
    tokens = jnp.array([[5, 17, 3, 60, 2, 9, 33, 1]])
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(single(tokens)),
                               atol=1e-5)


def test_bfloat16_export_and_import(tmp_path):
    cfg, params = _save_tiny(tmp_path / "f32")
    hf.save_pretrained(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    assert embed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(embed, params["embed"].astype(jnp.bfloat16))
    model = hf.load_model(str(tmp_path / "bf16"))  # keeps the declared dtype
    assert model.cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    assert hf.load_model(str(tmp_path / "bf16"), dtype="float32").embed[...].dtype == jnp.float32


# -- bad input -----------------------------------------------------------------


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        hf.load_model(str(tmp_path))


def test_unsupported_architecture_lists_the_supported(tmp_path):
    _save_tiny(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: unsupported architecture "
                                         r"GPT2LMHeadModel; jaxalign supports "
                                         r"Gemma2ForCausalLM, .*LlamaForCausalLM"):
        hf.load_model(str(tmp_path))
    config.update(architectures=["Gemma3ForConditionalGeneration"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="multimodal Gemma 3 is not supported"):
        hf.load_model(str(tmp_path))


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_extra_and_misshapen_tensors(tmp_path):
    _save_tiny(tmp_path)
    file = tmp_path / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(file, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"tensor '{name}' is missing"):
        hf.load_model(str(tmp_path))

    _save_tiny(tmp_path)
    _rewrite(file, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3, "f4")}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor "
                                         r"'model\.layers\.0\.mlp\.extra\.weight'"):
        hf.load_model(str(tmp_path))

    _save_tiny(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor "
                                         r"'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                                         r"shape \[48, 32\], but config\.json implies \[40, 32\]"):
        hf.load_model(str(tmp_path))


def test_index_naming_a_missing_shard(tmp_path):
    _save_tiny(tmp_path, max_shard_bytes=20_000)
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"is in shard '{shard}', which is not a file"):
        hf.load_model(str(tmp_path))


def test_pickle_checkpoints_are_refused_not_read(tmp_path):
    _save_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    # Unpickling this would run code; the loader must never open it.
    (tmp_path / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'exit 1'\ntR.")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin: pickle checkpoints are "
                                                 r"never loaded"):
        hf.load_model(str(tmp_path))


def test_tokenizer_larger_than_the_embedding(tmp_path):
    _save_tiny(tmp_path)
    vocab = {f"t{i}": i for i in range(90)}
    tokenizer = {"model": {"type": "BPE", "vocab": vocab, "merges": []},
                 "added_tokens": [{"id": 120, "content": "<|im_end|>", "special": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer has 121 ids but the "
                                         r"model's embedding has vocab_size=96 rows"):
        hf.load_tokenizer(str(tmp_path))


def _train_sentencepiece(**options):
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "hello", "world", "data", "naïve", "ﬁne", "2024",
             "x=3+4", "<|im_end|>"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=out,
                                   model_type="bpe", minloglevel=2, **options)
    return out.getvalue()


def test_sentencepiece_bpe_ships_as_an_equivalent_tokenizer_json():
    """The exported tokenizer.json splits text exactly as SentencePiece does."""
    import random

    import sentencepiece as spm

    tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers library")
    from jaxalign.models import hf_tokenizer

    protos = {
        "builtin": hf._sentencepiece_proto("builtin:tasks"),
        "dummy-prefix": _train_sentencepiece(vocab_size=120),
        "nfkc+digits+user": _train_sentencepiece(
            vocab_size=300, normalization_rule_name="nmt_nfkc", split_digits=True,
            byte_fallback=True, user_defined_symbols=["<|im_end|>"]),
    }
    rng = random.Random(1)
    alphabet = "thecatsonmwrld HELO 0123456789=+?ïé\n\t😀"
    texts = ["What is 23 + 58? Reverse the word: stone", "  two  spaces ", "naïve ﬁne ２０２４",
             "x=3+4<|im_end|>hello"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for name, proto in protos.items():
        sp = spm.SentencePieceProcessor(model_proto=proto)
        tok = tokenizers.Tokenizer.from_str(hf_tokenizer.tokenizer_json(proto))
        for text in texts:
            want = sp.encode(text)
            assert tok.encode(text, add_special_tokens=False).ids == want, (name, text)
            assert tok.encode(text).ids == [sp.bos_id(), *want], (name, text)
            if sp.unk_id() not in want:
                assert tok.decode(want) == sp.decode(want), (name, text)


def test_export_carries_tokenizer_files_and_generation_config(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    cfg, params = _save_tiny(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "bos_token_id": 1,
                                                 "eos_token_id": [2, 7]}))
    tokenizer = {"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(90)},
                           "merges": []}, "added_tokens": []}
    files = {"tokenizer.json": json.dumps(tokenizer),
             "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}),
             "generation_config.json": json.dumps({"eos_token_id": [2, 7], "temperature": 0.6})}
    for name, text in files.items():
        (src / name).write_text(text)
    written = hf.save_pretrained(params, cfg, str(out), source_dir=str(src))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(written)
    for name, text in files.items():
        assert json.loads((out / name).read_text()) == json.loads(text), name
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, [2, 7])
    with pytest.raises(ValueError, match="is the directory the model or tokenizer comes from"):
        hf.save_pretrained(params, cfg, str(src), source_dir=str(src))
