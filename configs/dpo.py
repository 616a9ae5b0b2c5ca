"""The DPO family on preference pairs; ``config.dpo.loss_type`` picks the objective.

``loss_type``: TRL's ``sigmoid`` (DPO; with ``label_smoothing`` > 0, conservative
DPO), ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``,
``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
``discopop``, plus the reference-free ``simpo`` and ``orpo``; ``rpo_alpha`` > 0
adds RPO's NLL on the chosen completions.

Presets: ``hf``/``hf_lora`` (from a pretrained checkpoint,
``--config.model.init_from=hf:<dir>``; ``configs/common.py:hf_preset``), ``demo`` (from
the SFT demo's workdir, on the builtin world's pairs), ``test`` (tiny, seconds).

    python -m launch.train --config=configs/dpo.py:demo --workdir=runs/dpo-demo \\
        --config.dpo.loss_type=ipo

Sweeps (``get_sweep``): ``beta`` and ``loss_type``, e.g.

    python -m launch.sweep --config=configs/dpo.py:demo --sweep=loss_type --workdir=runs/dpo-sweep
"""

import ml_collections

from configs.common import preference_data, preference_preset
from jaxalign.config import base_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The DPO preset ``arg`` (``demo``, ``test``, ``hf``, ``hf_lora``) over the library
    defaults."""
    config = base_config("dpo")
    preference_data(config)
    # demo: beta 0.3, 100 steps. At 5e-4 held-out implicit accuracy was 0.904 but greedy task
    # pass@1 fell 0.277 -> 0.225 (vs the SFT demo); 1e-4 gives 0.902 and keeps 0.277.
    preference_preset(config, arg, demo_steps=100, demo_lr=1e-4)
    if arg == "demo":
        config.dpo.beta = 0.3
        config.train.eval_every = 50
        config.optim.weight_decay = 0.0
    config.lock()
    return config


def get_sweep(arg: str = "beta", preset: str = "demo") -> list[dict]:
    """Override lists for ``launch.sweep --sweep=<arg>`` (the same for every preset).

    ``beta``: the KL strength of sigmoid DPO. ``loss_type``: four objectives at
    their usual settings (SimPO is reference-free and wants a larger beta).
    """
    del preset
    if arg == "beta":
        return [{"dpo.beta": b} for b in (0.03, 0.1, 0.3)]
    if arg == "loss_type":
        return [{"dpo.loss_type": "sigmoid"}, {"dpo.loss_type": "ipo"},
                {"dpo.loss_type": "hinge"}, {"dpo.loss_type": "simpo", "dpo.beta": 2.0}]
    raise ValueError(f"unknown sweep {arg!r} for configs/dpo.py; known: beta, loss_type")
