"""Distillation: a student trained towards a frozen teacher (``jaxalign.algos.distill``).

The teacher is any checkpoint with the student's tokenizer:
``--config.distill.teacher=workdir:<DIR>`` (a run of this project), ``hf:<dir>`` or
``gguf:<file>``. The loss is GKD's generalised JSD (``distill.loss``: forward_kl,
reverse_kl, jsd, nll), per completion token; ``distill.on_policy_fraction`` λ is the
share of steps trained on the student's own samples (``rl.*`` sampling settings).

Presets: ``hf``/``hf_lora`` (a pretrained student, ``--config.model.init_from=hf:<dir>``,
and its teacher; ``configs/common.py:hf_preset``), ``demo`` (the builtin world: the
``small`` SFT model ``runs/sft-world`` distilled towards ``runs/sft-world-medium``, the
``medium`` model of ``configs/sft.py:world_medium``, λ = 0.5) and ``test`` (tiny, seconds;
give the teacher).

    python -m launch.train --config=configs/sft.py:world --workdir=runs/sft-world
    python -m launch.train --config=configs/sft.py:world_medium --workdir=runs/sft-world-medium
    python -m launch.train --config=configs/distill.py:demo --workdir=runs/distill-demo

Off-policy on the dataset's completions with the teacher's top-64 logits computed once:

    --config.distill.on_policy_fraction=0 --config.distill.top_k=64 \\
    --config.distill.teacher_logits=precomputed

Sequence-level KD (SFT on the teacher's samples): ``--config.distill.sequence_kd=True
--config.distill.loss=nll``.
"""

import ml_collections

from configs.common import HF_PRESETS, hf_preset
from jaxalign.config import base_config, model_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The distillation preset ``arg`` (``demo``, ``test``, ``hf``, ``hf_lora``) over the
    library defaults."""
    config = base_config("distill")
    if arg == "demo":
        # GKD's recipe: a student already fine-tuned on the demonstrations (the small
        # world SFT model) distilled towards a larger teacher, half the steps on the
        # demonstrations, half on its own answers to their prompts.
        config.model = model_config("small")
        config.model.init_from = "workdir:runs/sft-world"
        config.distill.teacher = "workdir:runs/sft-world-medium"
        config.distill.on_policy_fraction = 0.5
        config.data.train = config.data.eval = "builtin:world"
        config.data.eval_split = "eval"
        config.data.overlong = "truncate_left"
        config.data.max_len = 128
        config.data.pack = True
        config.data.max_prompt_len = 64
        config.data.eval_batch_size = 64
        config.rl.max_new_tokens = 16
        config.rl.rewards = "exact_answer,refusal_correct:0.5"
        config.train.steps = 300
        config.train.batch_size = 16
        config.train.log_every = 10
        config.train.eval_every = 100
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 10
        config.optim.schedule = "constant"
        config.checkpoint.save_every = 100
    elif arg in HF_PRESETS:
        # the world's demonstrations: half the steps on them, half on the student's own
        # answers to their prompts
        config.data.train = config.data.eval = "builtin:world"
        config.data.eval_split = "eval"
        config.data.overlong = "truncate_left"
        hf_preset(config, arg)
        config.distill.teacher = "hf:"  # required
        config.distill.on_policy_fraction = 0.5
    elif arg == "test":
        config.model = model_config("tiny")
        config.data.max_len = config.data.max_prompt_len = 24
        config.data.eval_batch_size = 16
        config.rl.max_new_tokens = 6
        config.train.steps = 8
        config.train.batch_size = 16
        config.train.log_every = 2
        config.train.eval_every = 4
        config.train.eval_batches = 1
        config.optim.learning_rate = 1e-2
        config.optim.warmup_steps = 1
        config.checkpoint.save_every = 4
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/distill.py; known: demo, test, "
                         "hf, hf_lora")
    config.lock()
    return config
