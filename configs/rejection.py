"""Rejection sampling / expert iteration: sample n, keep the best, train on them, repeat.

Each round samples ``rejection.num_samples`` completions per prompt from the current
policy, scores them (``rejection.rewards``), writes the best as SFT records
(``rejection.mode=sft``) or best-vs-worst pairs (``mode=dpo``) to
``WORKDIR/round_<r>/data.jsonl`` and trains on them in ``WORKDIR/round_<r>/``; the
next round samples from that checkpoint. Every other section (``model``, ``data``,
``train``, ``optim``, ``checkpoint``, ``dpo``, ...) configures each round's training.

Presets: ``demo`` (from the SFT world preset's workdir, ``runs/sft-world``, on the
builtin world's RL prompts with the exact-answer reward; held-out greedy accuracy
before and after every round) and ``test`` (tiny, from scratch, seconds).

    python -m launch.train --config=configs/rejection.py:demo --workdir=runs/rejection-demo
    python -m launch.train --config=configs/rejection.py:demo --workdir=runs/rejection-dpo \\
        --config.rejection.mode=dpo --config.rejection.threshold=1
"""

import ml_collections

from jaxalign.config import base_config, model_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The rejection-sampling preset ``arg`` (``demo``, ``test``) over the library defaults.

    ``dpo`` (used when ``rejection.mode=dpo``) keeps the DPO stage's defaults.
    """
    config = base_config("rejection")
    config.data.train = ""  # each round trains on its own generated records
    config.data.eval = ""  # the rounds are judged by the greedy held-out evaluation
    config.data.overlong = "truncate_left"
    if arg == "demo":
        config.model = model_config("small")
        config.model.init_from = "workdir:runs/sft-world"
        config.data.max_len = 64
        config.data.max_prompt_len = 40
        config.rejection.rounds = 2
        config.rejection.num_samples = 8
        config.rejection.max_new_tokens = 24
        config.rejection.prompts_per_round = 1024
        config.rejection.batch_size = 128
        # Only correct answers are worth imitating (STaR-style filtering).
        config.rejection.threshold = 1.0
        config.rejection.epochs = 1.0
        config.train.batch_size = 32
        config.train.log_every = 10
        config.optim.learning_rate = 3e-4
        config.optim.warmup_steps = 5
        config.optim.schedule = "constant"
        config.checkpoint.save_every = 100
    elif arg == "test":
        config.model = model_config("tiny")
        config.data.max_len = 32
        config.data.max_prompt_len = 24
        config.rejection.rounds = 2
        config.rejection.num_samples = 4
        config.rejection.max_new_tokens = 4
        config.rejection.prompts_per_round = 16
        config.rejection.batch_size = 16
        config.rejection.rewards = "length_penalty"
        config.rejection.eval_limit = 16
        config.train.steps = 3
        config.train.batch_size = 8
        config.train.log_every = 1
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 1
        config.checkpoint.save_every = 3
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
        config.metrics.tensorboard = False
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/rejection.py; known: demo, test")
    config.lock()
    return config
