"""The DPO family on preference pairs; ``config.dpo.loss_type`` picks the objective.

``loss_type``: TRL's ``sigmoid`` (DPO; with ``label_smoothing`` > 0, conservative
DPO), ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``,
``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
``discopop``, plus the reference-free ``simpo`` and ``orpo``; ``rpo_alpha`` > 0
adds RPO's NLL on the chosen completions.

Presets: ``demo`` (from the SFT demo's workdir, on the builtin world's pairs),
``test`` (tiny, seconds).

    python -m launch.train --config=configs/dpo.py:demo --workdir=runs/dpo-demo \\
        --config.dpo.loss_type=ipo
"""

import ml_collections

from configs.rm import preference_data
from jaxalign.config import base_config, model_config


def get_config(arg: str = "demo"):
    config = base_config("dpo")
    config.dpo = ml_collections.ConfigDict(dict(
        loss_type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05, simpo_gamma=0.5,
        rpo_alpha=0.0, reference="in_step"))
    preference_data(config)
    if arg == "demo":
        config.model = model_config("small")
        config.model.init_from = "workdir:runs/sft-demo"
        config.train.steps = 200
        config.train.batch_size = 32
        config.train.log_every = 20
        config.train.eval_every = 100
        config.optim.learning_rate = 5e-4
        config.optim.warmup_steps = 20
        config.optim.weight_decay = 0.0
        config.checkpoint.save_every = 100
    elif arg == "test":
        config.model = model_config("tiny")
        config.data.max_len = 48
        config.train.steps = 20
        config.train.batch_size = 16
        config.train.log_every = 5
        config.train.eval_every = 10
        config.train.eval_batches = 2
        config.data.eval_batch_size = 16
        config.optim.learning_rate = 3e-3
        config.optim.warmup_steps = 2
        config.checkpoint.save_every = 10
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/dpo.py; known: demo, test")
    config.lock()
    return config
