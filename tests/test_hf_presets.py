"""The ``hf``/``hf_lora`` presets of every stage run on a (tiny, random) HF checkpoint
given only ``model.init_from``: its tokenizer and chat template come with it."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs.common import HF_LEARNING_RATES
from jaxalign import optim
from jaxalign.models import hf
from jaxalign.models.transformer import Transformer, TransformerConfig, resolve_dtype
from jaxalign.train import train
from tests.hf_tokenizer_files import write_hf_dir
from tests.presets import preset

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    cfg = TransformerConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=8, mlp_dim=64, tie_embeddings=True)
    model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    hf.save_pretrained(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))), cfg,
                       str(path))
    write_hf_dir(path, "chatml", chat_template=CHATML)
    return path


def test_hf_preset_defaults():
    for stage in HF_LEARNING_RATES:
        full, lora = preset(stage, "hf"), preset(stage, "hf_lora")
        assert (full.tokenizer, full.model.dtype, full.data.max_len) == ("auto", "auto", 1024)
        assert full.data.pack and full.data.chat_template == "auto"
        assert full.model.lora.rank == 0 and lora.model.lora.rank == 16
        assert full.optim.learning_rate < lora.optim.learning_rate
        assert full.optim.schedule == "cosine" and full.optim.warmup_ratio == 0.03
    assert preset("sft", "hf").optim.learning_rate == 2e-5
    assert resolve_dtype("auto") == np.float32  # the tests run on CPU
    schedule = optim.make_schedule(dict(preset("sft", "hf").optim), 1000)
    # 30 warmup steps (3% of 1000): the rate peaks at step 29 and is below it before.
    assert float(schedule(28)) < 2e-5 and float(schedule(29)) == pytest.approx(2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage,arg", [("sft", "hf"), ("rm", "hf_lora"), ("dpo", "hf"),
                                       ("kto", "hf_lora"), ("grpo", "hf"), ("ppo", "hf"),
                                       ("distill", "hf_lora")])
def test_hf_preset_trains_two_steps_from_init_from_alone(hf_dir, tmp_path, stage, arg):
    overrides = {"model.init_from": f"hf:{hf_dir}", "train.steps": 2, "train.batch_size": 8,
                 "train.eval_batches": 1, "data.eval_batch_size": 8,
                 "checkpoint.async_save": False, "metrics.peak_flops": 1e11}
    if stage in ("grpo", "ppo", "distill"):
        overrides.update({"rl.max_new_tokens": 8, "data.max_prompt_len": 64})
    if stage == "distill":  # the checkpoint distilled into its own LoRA student
        overrides["distill.teacher"] = f"hf:{hf_dir}"
    workdir = tmp_path / "run"
    summary = train(preset(stage, arg, **overrides), str(workdir))
    assert np.isfinite(summary["train"]["loss"]) and summary["eval"]
    written = json.loads((workdir / "config.json").read_text())
    assert written["tokenizer"] == str(hf_dir)  # tokenizer=auto took the checkpoint's
    assert written["model"]["vocab_size"] == 448
