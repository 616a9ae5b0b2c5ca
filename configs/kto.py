"""KTO on unpaired completions (``builtin:world`` split ``kto``: each preference pair
split into a desirable and an undesirable example).

Presets: ``hf``/``hf_lora`` (from a pretrained checkpoint,
``--config.model.init_from=hf:<dir>``; ``configs/common.py:hf_preset``), ``demo`` (from
the SFT demo's workdir) and ``test`` (tiny, seconds).

    python -m launch.train --config=configs/kto.py:demo --workdir=runs/kto-demo
"""

import ml_collections

from configs.common import preference_data, preference_preset
from jaxalign.config import base_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The KTO preset ``arg`` (``demo``, ``test``, ``hf``, ``hf_lora``) over the library
    defaults."""
    config = base_config("kto")
    preference_data(config)
    config.data.train_split, config.data.eval_split = "kto", "kto_eval"
    preference_preset(config, arg, demo_steps=200, demo_lr=5e-4)
    config.lock()
    return config
