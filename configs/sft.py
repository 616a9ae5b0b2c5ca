"""Supervised fine-tuning on prompt/response records.

Presets: ``hf``/``hf_lora`` (a pretrained checkpoint:
``--config.model.init_from=hf:<dir>`` is the only key to give; see
``configs/common.py:hf_preset``), ``demo`` (the main job: a ~2M-parameter model learns
the embedded tasks on a 2-core CPU in a few minutes), ``world`` (the same model on the
builtin world's demonstrations — tasks, refusals, benign look-alikes, multi-turn chats —
packed into 128-position rows; ``world_medium``: the same with the ~2.6x ``medium``
model, the distillation demo's teacher) and ``test`` (tiny, seconds).

    python -m launch.train --config=configs/sft.py:demo --workdir=runs/sft-demo

LoRA instead of full fine-tuning (only the adapters train; see the README's LoRA section):

    python -m launch.train --config=configs/sft.py:demo --workdir=runs/sft-lora \\
        --config.model.lora.rank=8 --config.model.lora.alpha=16

Sweeps (``get_sweep``): ``lr`` and ``batch``, e.g.

    python -m launch.sweep --config=configs/sft.py:demo --sweep=lr --workdir=runs/sft-lr
"""

import ml_collections

from configs.common import HF_PRESETS, hf_preset
from jaxalign.config import base_config, model_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The SFT preset ``arg`` (``demo``, ``world``, ``world_medium``, ``test``, ``hf``,
    ``hf_lora``) over the library defaults."""
    config = base_config("sft")
    if arg == "demo":
        config.model = model_config("small")
        config.data.max_len = 32
        config.train.steps = 600
        config.train.batch_size = 64
        config.train.log_every = 25
        config.train.eval_every = 150
        config.optim.learning_rate = 3e-3
        config.optim.warmup_steps = 50
        config.checkpoint.save_every = 150
    elif arg in ("world", "world_medium"):
        config.model = model_config("small" if arg == "world" else "medium")
        config.data.train = config.data.eval = "builtin:world"
        # Lengths are skewed (median ~19 ids, longest ~160): packing fills ~97% of each
        # row, and the few longest chats lose prompt ids from the left.
        config.data.max_len = 128
        config.data.pack = True
        config.data.overlong = "truncate_left"
        config.data.eval_batch_size = 16
        config.train.steps = 600
        config.train.batch_size = 16
        config.train.log_every = 25
        config.train.eval_every = 150
        config.optim.learning_rate = 3e-3
        config.optim.warmup_steps = 50
        config.checkpoint.save_every = 150
    elif arg in HF_PRESETS:
        config.data.train = config.data.eval = "builtin:world"
        config.data.overlong = "truncate_left"
        hf_preset(config, arg)
    elif arg == "test":
        config.model = model_config("tiny")
        config.train.steps = 30
        config.train.batch_size = 32
        config.train.log_every = 5
        config.train.eval_every = 15
        config.train.eval_batches = 2
        config.optim.learning_rate = 1e-2
        config.optim.warmup_steps = 3
        config.checkpoint.save_every = 10
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/sft.py; known: demo, world, "
                         "world_medium, test, hf, hf_lora")
    config.lock()
    return config


def get_sweep(arg: str = "lr", preset: str = "demo") -> list[dict]:
    """Override lists for ``launch.sweep --sweep=<arg>``, scaled to the preset.

    ``lr``: three learning rates around the preset's own (1e-2 for ``test``, 3e-3
    for ``demo``/``world``). ``batch``: batch size with the learning rate scaled by
    its square root.
    """
    if arg == "lr":
        lrs = (3e-3, 1e-2, 3e-2) if preset == "test" else (1e-3, 3e-3, 1e-2)
        return [{"optim.learning_rate": lr} for lr in lrs]
    if arg == "batch":
        bs, lr = (32, 1e-2) if preset == "test" else (64, 3e-3)
        return [{"train.batch_size": int(bs * f), "optim.learning_rate": round(lr * f**0.5, 6)}
                for f in (0.5, 1, 2)]
    raise ValueError(f"unknown sweep {arg!r} for configs/sft.py; known: lr, batch")
