"""Logits parity with transformers for every supported family, and the exact round trip.

Each case builds a tiny random model offline from a config (no downloads), saves
it with ``save_pretrained``, imports it with ``jaxalign.models.hf.load_model`` and
compares float32 logits and 16-token greedy continuations. The import is then
exported again and must hold bitwise-identical tensors that transformers loads
into a model giving identical logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (the dev extra)")
transformers = pytest.importorskip("transformers",
                                   reason="parity tests need transformers (the dev extra)")
from safetensors.numpy import load_file  # noqa: E402

from jaxalign.models import hf, hf_config  # noqa: E402

pytestmark = pytest.mark.slow  # against transformers in torch

VOCAB, PROMPT, NEW = 96, 8, 16
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)

# One tiny model per family, each switching on the features that family adds.
CASES = {
    "llama": (transformers.LlamaConfig, dict(
        num_hidden_layers=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, dict(
        num_hidden_layers=2, sliding_window=6, head_dim=16,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0))),
    "qwen2": (transformers.Qwen2Config, dict(
        num_hidden_layers=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0))),
    "qwen3": (transformers.Qwen3Config, dict(
        num_hidden_layers=2, head_dim=32, tie_word_embeddings=False)),
    "gemma": (transformers.GemmaConfig, dict(
        num_hidden_layers=2, num_key_value_heads=1, head_dim=32,
        hidden_act="gelu_pytorch_tanh")),
    "gemma2": (transformers.Gemma2Config, dict(
        num_hidden_layers=4, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=4, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters=dict(
            full_attention=dict(rope_type="linear", rope_theta=1_000_000.0, factor=2.0),
            sliding_attention=dict(rope_type="default", rope_theta=10_000.0)))),
}


def _build(family, path):
    config_cls, extra = CASES[family]
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    zero_centred = family.startswith("gemma")
    with torch.no_grad():
        # Random everything (norms included) so a swapped or ignored weight shows up.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if zero_centred else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _hf_logits(model, tokens_bt):
    with torch.no_grad():
        return model(torch.as_tensor(tokens_bt)).logits.float().numpy()


def _hf_greedy(model, prompt_t):
    seq = list(prompt_t)
    for _ in range(NEW):
        seq.append(int(_hf_logits(model, np.array([seq]))[0, -1].argmax()))
    return seq[len(prompt_t):]


def _jax_greedy(model, prompt_t):
    # A fixed-length buffer: causal attention makes the zeros after `cur` irrelevant,
    # and one shape means one compilation.
    buf = np.zeros((1, len(prompt_t) + NEW), np.int32)
    buf[0, :len(prompt_t)] = prompt_t
    forward = jax.jit(lambda t: model(t))
    for cur in range(len(prompt_t), buf.shape[1]):
        buf[0, cur] = int(np.asarray(forward(jnp.asarray(buf)))[0, cur - 1].argmax())
    return buf[0, len(prompt_t):].tolist()


@pytest.mark.parametrize("family", list(CASES))
def test_logits_greedy_and_round_trip(family, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    ref_model = _build(family, src)
    rng = np.random.default_rng(0)
    tokens_bt = rng.integers(3, VOCAB, size=(2, 24)).astype(np.int32)

    model = hf.load_model(src)
    assert model.cfg.family == family and model.cfg.param_dtype == "float32"
    want = _hf_logits(ref_model, tokens_bt)
    got = np.asarray(model(jnp.asarray(tokens_bt)))
    delta = float(np.abs(got - want).max())
    print(f"{family}: max |dlogit| = {delta:.2e}")
    assert delta <= 1e-4, f"{family}: max |dlogit| = {delta}"

    prompt = tokens_bt[0, :PROMPT]
    assert _jax_greedy(model, prompt) == _hf_greedy(ref_model, prompt)

    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    hf.save_pretrained(params, model.cfg, out, source_dir=src)
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        assert a[name].tobytes() == b[name].tobytes(), f"{family}: {name} changed"
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        exported = json.load(f)
    assert hf_config.config_from_hf(exported) == model.cfg
    again = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    assert type(again) is type(ref_model)
    np.testing.assert_array_equal(_hf_logits(again, tokens_bt), want)
