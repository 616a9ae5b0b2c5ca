"""Released-model presets: abstract init (no memory) against published parameter counts."""

import jax
import pytest
from flax import nnx

from jaxalign.config import model_config
from jaxalign.models import hf_config
from jaxalign.models.presets import PRESETS, PUBLISHED_PARAMS, get_preset
from jaxalign.models.transformer import Transformer, TransformerConfig

# Totals from the releases' safetensors metadata, where the model card rounds.
EXACT = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "gemma2-2b": 2_614_341_888,
    "gemma3-1b": 999_885_952,
}
REQUIRED = {"llama3.2-1b", "llama3.1-8b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b",
            "qwen3-0.6b", "qwen3-8b", "gemma2-2b", "gemma3-1b"}


def test_required_presets_exist():
    assert REQUIRED <= set(PRESETS) and set(PRESETS) == set(PUBLISHED_PARAMS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count(name):
    cfg = TransformerConfig.from_mapping(model_config(name))
    assert cfg == TransformerConfig(**get_preset(name))
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    count = sum(x.size for x in jax.tree.leaves(abstract))
    published = PUBLISHED_PARAMS[name]
    assert abs(count - published) / published < 2.5e-3, (name, count, published)
    if name in EXACT:
        assert count == EXACT[name]
    hf_config.check_exportable(cfg)  # every preset maps onto its HF architecture
