"""Preset helpers shared by the config files (config files import only this and the library).

The defaults of every key are the library's (``jaxalign.config.base_config``; the
reference is ``docs/config.md``); these helpers set what several presets share, e.g.
for ``python -m launch.train --config=configs/dpo.py:demo --workdir=runs/dpo-demo``.
"""

import ml_collections

from jaxalign.config import eval_suite_config, model_config


def preference_data(config: ml_collections.ConfigDict, max_len: int = 64) -> None:
    """Points ``config.data`` at the builtin world's preference splits."""
    config.data.train = config.data.eval = "builtin:world"
    config.data.train_split = "preference"
    config.data.eval_split = "preference_eval"
    config.data.max_len = max_len
    config.data.overlong = "truncate_left"


def preference_preset(config: ml_collections.ConfigDict, arg: str, *, demo_steps: int,
                      demo_lr: float) -> None:
    """The ``demo``/``test``/``hf``/``hf_lora`` presets the pairwise stages (rm, dpo, kto)
    share."""
    if arg in HF_PRESETS:
        hf_preset(config, arg)
    elif arg == "demo":
        config.model = model_config("small")
        config.model.init_from = "workdir:runs/sft-demo"
        config.train.steps = demo_steps
        config.train.batch_size = 32
        config.train.log_every = 20
        config.train.eval_every = 100
        config.optim.learning_rate = demo_lr
        config.optim.warmup_steps = demo_steps // 10
        config.checkpoint.save_every = 100
        # Steps and rates here were tuned with one pair (example) per row, and the
        # README's demo table is measured so: a packed row would hold several.
        config.data.pack = False
    elif arg == "test":
        config.model = model_config("tiny")
        config.data.max_len = 48
        config.data.eval_batch_size = 16
        config.train.steps = 20
        config.train.batch_size = 16
        config.train.log_every = 5
        config.train.eval_every = 10
        config.train.eval_batches = 2
        config.optim.learning_rate = 3e-3
        config.optim.warmup_steps = 2
        config.checkpoint.save_every = 10
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/{config.stage}.py; known: demo, "
                         "test, hf, hf_lora")


def prompt_data(config: ml_collections.ConfigDict) -> None:
    """RL data (the builtin world's prompts, held-out eval prompts) and a flat schedule."""
    config.data.train = config.data.eval = "builtin:world"
    config.data.train_split = "rl"
    config.data.eval_split = "eval"
    config.data.overlong = "truncate_left"
    config.optim.weight_decay = 0.0
    config.optim.schedule = "constant"


def rl_preset(config: ml_collections.ConfigDict, arg: str, *, demo_steps: int, demo_batch: int,
              demo_every: int, test_steps: int, test_every: int) -> None:
    """The ``demo``/``test``/``hf``/``hf_lora`` presets the RL stages (grpo, ppo) share."""
    if arg in HF_PRESETS:
        hf_preset(config, arg)
    elif arg == "demo":
        config.model = model_config("small")
        config.model.init_from = "workdir:runs/sft-world"
        config.data.max_len = config.data.max_prompt_len = 32
        config.data.eval_batch_size = 64
        config.train.steps = demo_steps
        config.train.batch_size = demo_batch
        config.train.log_every = max(demo_every // 5, 1)
        config.train.eval_every = demo_every
        config.train.eval_at_start = True
        config.optim.learning_rate = 1e-4
        config.optim.warmup_steps = 5
        config.checkpoint.save_every = demo_every
    elif arg == "test":
        config.model = model_config("tiny")
        config.data.max_len = config.data.max_prompt_len = 24
        config.data.eval_batch_size = 16
        config.rl.max_new_tokens = 6
        config.rl.rewards = "stopped,length_penalty:0.5"
        config.train.steps = test_steps
        config.train.batch_size = 16
        config.train.log_every = 2
        config.train.eval_every = test_every
        config.train.eval_batches = 1
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 1
        config.checkpoint.save_every = test_every
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/{config.stage}.py; known: demo, "
                         "test, hf, hf_lora")


def _entry(kind: str, split: str, limit: int = 0, **options: object) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind=kind, source="builtin:world", split=split,
                                          limit=limit, **options))


def eval_suite(arg: str) -> ml_collections.ConfigDict:
    """The eval suites of ``configs/evals.py`` (``default``, ``test``), locked."""
    c = eval_suite_config()
    if arg == "default":
        c.evals.heldout = _entry("loss", "eval", max_len=0)
        c.evals.task = _entry("task", "eval", max_new_tokens=16, num_samples=8, k=4,
                              temperature=1.0, check="exact_answer", kinds=("task",))
        c.evals.preference = _entry("preference", "preference_eval", score="implicit",
                                    beta=0.1)
        c.evals.safety = _entry("safety", "eval", max_new_tokens=24)
        c.evals.redteam = _entry("safety", "redteam", max_new_tokens=24)
        c.evals.kl = _entry("kl", "eval", limit=128, max_new_tokens=16, num_samples=2)
        c.evals.reward = _entry("reward", "eval", max_new_tokens=24, check="exact_answer",
                                win_rate=True)
        c.gates = [
            dict(metric="task/pass@1", direction="higher", tolerance=0.02),
            dict(metric="preference/accuracy", direction="higher", tolerance=0.02),
            dict(metric="safety/refusal_rate", direction="higher", tolerance=0.05),
            dict(metric="redteam/refusal_rate", direction="higher", tolerance=0.05),
            dict(metric="safety/over_refusal_rate", direction="lower", tolerance=0.05),
            dict(metric="heldout/loss", direction="lower", tolerance=0.05),
        ]
    elif arg == "test":
        c.batch_size = 16
        c.reference = ""
        c.evals.heldout = _entry("loss", "eval", limit=8, max_len=0)
        c.evals.task = _entry("task", "eval", limit=6, max_new_tokens=6, num_samples=4, k=2,
                              temperature=1.0, check="exact_answer", kinds=("task",))
        c.evals.preference = _entry("preference", "preference_eval", limit=6, score="implicit",
                                    beta=0.1)
        c.evals.safety = _entry("safety", "eval", limit=6, max_new_tokens=6)
        c.evals.redteam = _entry("safety", "redteam", limit=4, max_new_tokens=6)
        c.evals.kl = _entry("kl", "eval", limit=4, max_new_tokens=6, num_samples=1)
        c.evals.reward = _entry("reward", "eval", limit=4, max_new_tokens=6,
                                check="exact_answer", win_rate=True)
        c.gates = [dict(metric="task/pass@1", direction="higher", tolerance=0.0)]
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/evals.py; known: default, test")
    c.lock()
    return c


# Peak learning rates of the hf presets per stage: (full fine-tuning, LoRA). SFT and RM
# follow the usual 1e-5..2e-5 / 1e-4..2e-4; the preference and RL stages move a pretrained
# policy much less per step (Zephyr's DPO used 5e-7, TRL's GRPO default is 1e-6).
HF_LEARNING_RATES = {"sft": (2e-5, 2e-4), "rm": (1e-5, 1e-4), "dpo": (1e-6, 2e-5),
                     "kto": (1e-6, 2e-5), "grpo": (1e-6, 1e-5), "ppo": (1e-6, 1e-5),
                     "distill": (1e-5, 1e-4)}
HF_PRESETS = ("hf", "hf_lora")


def hf_preset(config: ml_collections.ConfigDict, arg: str) -> None:
    """Defaults for post-training a pretrained checkpoint (``hf`` and ``hf_lora``).

    The model comes from ``--config.model.init_from=hf:<dir>`` (or ``gguf:<file>``,
    ``workdir:<dir>``), its architecture and tokenizer (``tokenizer=auto``) with it, and the
    chat template is the tokenizer's (``plain`` if it ships none). Rows up to 1024
    positions, packed (prompt batches cut to length buckets); bf16 compute on GPU/TPU, f32
    on CPU; warmup 3% of the steps, then cosine decay; ``hf_lora`` trains rank-16 adapters
    at a LoRA rate. The data default to the builtin world's splits for the stage; with
    ``--config.data.train=jsonl:<yours>`` evaluation holds out 5% of your records.
    """
    lora = arg == "hf_lora"
    config.model.init_from = "hf:"  # required: the checkpoint to start from
    config.model.dtype = "auto"
    config.data.max_len = 1024
    config.data.eval_batch_size = 16
    config.train.steps = 1000
    config.train.batch_size = 32
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 8
    config.optim.learning_rate = HF_LEARNING_RATES[config.stage][lora]
    config.optim.warmup_ratio = 0.03
    config.optim.schedule = "cosine"
    config.optim.final_lr_fraction = 0.0
    config.optim.b2 = 0.999
    config.optim.weight_decay = 0.0
    config.checkpoint.save_every = 200
    config.checkpoint.keep = 2
    if lora:
        config.model.lora.rank = 16
        config.model.lora.alpha = 32
    if config.stage == "distill":
        config.data.max_prompt_len = 512
        config.rl.max_new_tokens = 256
        config.train.batch_size = 16
    if config.stage in ("grpo", "ppo"):
        config.data.max_prompt_len = 512
        config.rl.max_new_tokens = 512
        config.train.batch_size = 16
        config.train.eval_every = 50
        config.checkpoint.save_every = 50
