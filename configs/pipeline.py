"""The main job: SFT -> RM -> DPO -> GRPO on the builtin world, with eval gates.

Each stage starts from the one before it (the RM and DPO from the SFT model, GRPO
from the DPO policy); after each policy stage the evals below run once, its gates
compare it with the stage it started from, and the final table (``ROOT/report.md``)
shows task accuracy, preference accuracy, reward-model reward, KL to the SFT model,
refusal of must-refuse requests (incl. red-team rephrasings) and over-refusal, one
column per policy stage, the untrained model first. Re-running resumes.

Presets: ``demo`` (``make demo``, minutes on a 2-core CPU) and ``test`` (tiny).

    python -m launch.pipeline --config=configs/pipeline.py:demo --workdir=runs/pipeline
"""

from collections.abc import Sequence

import ml_collections

from configs.common import eval_suite
from jaxalign.config import pipeline_config

REPORT_METRICS = ("task/pass@1", "preference/accuracy", "reward/mean", "kl/mean",
                  "safety/refusal_rate", "redteam/refusal_rate", "safety/over_refusal_rate",
                  "heldout/loss")


# One step at learning rate 0: the initial weights, written as a checkpoint.
UNTRAINED = ("train.steps=1", "optim.learning_rate=0.0", "optim.warmup_steps=0", "data.eval=")


def _stage(name: str, config: str, init_from: str = "", overrides: Sequence[str] = (),
           gates: Sequence[dict] = ()) -> dict:
    return dict(name=name, config=config, init_from=init_from, overrides=list(overrides),
                gates=list(gates))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The pipeline preset ``arg`` (``demo``, ``real``, ``test``) over the library defaults."""
    c = pipeline_config()
    c.reference = "sft"      # KL and implicit preference rewards are measured against it
    c.reward_model = "rm"    # the RM stage scores replies for reward/mean
    c.report_metrics = list(REPORT_METRICS)
    if arg == "demo":
        c.stages = [
            # The untrained model, for the table's first column: one step at learning rate
            # 0 keeps the initial weights exactly (AdamW's update is lr times a finite
            # number) and writes them as a checkpoint the evals load and SFT starts from.
            _stage("base", "configs/sft.py:world", overrides=UNTRAINED),
            # Shorter than the stages' own demo presets, so the whole job fits in
            # about ten minutes on a 2-core CPU.
            _stage("sft", "configs/sft.py:world", init_from="base",
                   overrides=["train.steps=400"],
                   gates=[dict(metric="task/pass@1", direction="higher", tolerance=0.0)]),
            # The RM preset starts from scratch; here the RM starts from the world SFT
            # model at the rate measured for that start (3e-4 from it gave 0.81 held-out
            # accuracy).
            _stage("rm", "configs/rm.py:demo", init_from="sft",
                   overrides=["train.steps=150", "train.eval_every=150",
                              "optim.learning_rate=1e-3", "optim.warmup_steps=30"]),
            _stage("dpo", "configs/dpo.py:demo", init_from="sft",
                   # RPO's NLL on the chosen answers keeps DPO from trading the SFT
                   # model's task accuracy for preference margin.
                   overrides=["train.steps=120", "train.eval_every=120", "dpo.rpo_alpha=1.0",
                              "dpo.beta=0.1", "optim.learning_rate=3e-4",
                              "optim.warmup_steps=20"], gates=[
                       dict(metric="preference/accuracy", direction="higher", tolerance=0.0),
                       dict(metric="task/pass@1", direction="higher", tolerance=0.03)]),
            _stage("grpo", "configs/grpo.py:demo", init_from="dpo",
                   overrides=["train.steps=60", "train.eval_every=60",
                              "train.eval_at_start=False"],
                   gates=[dict(metric="task/pass@1", direction="higher", tolerance=0.03)]),
        ]
        # the held-out task's noise on 240 prompts, as the gates above
        c.rl_health.task_tolerance = 0.03
        evals = eval_suite("default")
        evals.unlock()
        for name, limit in (("task", 240), ("preference", 200), ("safety", 0),
                            ("redteam", 0), ("kl", 64), ("reward", 120), ("heldout", 256)):
            evals.evals[name].limit = limit
        evals.evals.task.num_samples = 4
        evals.evals.task.k = 4
        evals.evals.reward.win_rate = False
    elif arg == "real":
        c.stages, evals = _real_stages(), _real_evals()
        c.reward_model = ""
        c.report_metrics = list(REAL_REPORT_METRICS)
    elif arg == "test":
        tiny = ["model.init_from=scratch", "train.steps=4", "train.eval_every=100",
                "checkpoint.save_every=2"]
        c.stages = [
            _stage("base", "configs/sft.py:test", overrides=UNTRAINED),
            _stage("sft", "configs/sft.py:test", init_from="base", overrides=["train.steps=6"]),
            _stage("rm", "configs/rm.py:test", init_from="sft", overrides=tiny[1:]),
            _stage("dpo", "configs/dpo.py:test", init_from="sft", overrides=tiny[1:],
                   gates=[dict(metric="task/pass@1", direction="higher", tolerance=1.0)]),
            _stage("grpo", "configs/grpo.py:test", init_from="dpo", overrides=tiny[1:]),
            # A fresh student distilled from the GRPO policy ("@grpo" is its workdir).
            _stage("distill", "configs/distill.py:test",
                   overrides=[*tiny, "distill.teacher=workdir:@grpo"]),
        ]
        evals = eval_suite("test")
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/pipeline.py; known: demo, real, "
                         "test")
    c.evals = evals
    c.lock()
    return c


# ``real``: SmolLM2-135M-Instruct, the GGUF that ``make real-model`` fetches.
REAL_MODEL = "gguf:.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_REPORT_METRICS = ("task/pass@1", "task/pass@8", "task/sample_accuracy",
                       "task_contains/pass@1", "preference/accuracy", "kl/mean",
                       "safety/refusal_rate", "redteam/refusal_rate",
                       "safety/over_refusal_rate")


def _real_stages() -> list[dict]:
    """SFT -> DPO -> GRPO of SmolLM2-135M-Instruct on the builtin world (CPU-sized).

    Measured piecewise so far: SFT of 60 steps takes greedy exact-match on 200 held-out
    task prompts from 0 (the instruct model answers in sentences) to 0.475, pass@8 0.645;
    DPO reaches 0.97 training reward accuracy within 6 steps. GRPO's settings are not yet
    tuned: 20 steps at 1e-5 moved greedy pass@1 only to 0.49, and 24 steps at 5e-5
    collapsed it to 0.375; LoRA (``grpo.py:hf_lora``) at 1e-4 for 16 steps also gave 0.49
    (sample accuracy 0.361 -> 0.391). End to end on a 2-core CPU the whole preset takes
    ~66 min (SFT and DPO ~14 min each with their evals, GRPO ~30): SFT 0 -> 0.481 greedy
    but over-refusal 0.95 on benign look-alikes; DPO 0.506, preference accuracy 0.94,
    over-refusal 0.71; GRPO 0.500 (its gate stops the job), sample accuracy 0.426 -> 0.456.
    """
    cpu = ["data.eval=", "checkpoint.save_every=1000", "train.log_every=5"]
    # The SFT preset's batch (32 x 1024) needs ~170 GB of temporaries for one step of
    # this model on a CPU: the base's no-op step takes the SFT stage's shape.
    sft_shape = ["train.batch_size=8", "data.max_len=256"]
    return [
        _stage("base", "configs/sft.py:hf",
               overrides=[f"model.init_from={REAL_MODEL}", *UNTRAINED, *sft_shape]),
        _stage("sft", "configs/sft.py:hf", init_from="base", overrides=[
            *cpu, "train.steps=60", *sft_shape],
            gates=[dict(metric="task/pass@1", direction="higher", tolerance=0.0)]),
        _stage("dpo", "configs/dpo.py:hf", init_from="sft", overrides=[
            *cpu, "train.steps=20", "train.batch_size=8", "data.max_len=256",
            "optim.learning_rate=5e-6", "dpo.beta=0.1", "dpo.rpo_alpha=1.0"],
            gates=[dict(metric="preference/accuracy", direction="higher", tolerance=0.0)]),
        _stage("grpo", "configs/grpo.py:hf", init_from="dpo", overrides=[
            *cpu, "train.steps=20", "train.batch_size=64", "rl.num_samples=8",
            "rl.max_new_tokens=10", "data.max_len=128", "data.max_prompt_len=96",
            "rl.rewards=exact_answer", "grpo.dynamic_sampling=True", "grpo.oversample=2",
            "optim.learning_rate=1e-5"],
            gates=[dict(metric="task/pass@1", direction="higher", tolerance=0.0)]),
    ]


def _real_evals() -> ml_collections.ConfigDict:
    """The default suite, smaller, with pass@8 and a lenient (answer anywhere) task check."""
    evals = eval_suite("default")
    evals.unlock()
    for name, limit in (("task", 160), ("preference", 100), ("safety", 0), ("redteam", 0),
                        ("kl", 32)):
        evals.evals[name].limit = limit
    for name in ("heldout", "reward"):
        del evals.evals[name]
    evals.evals.task.num_samples = evals.evals.task.k = 8
    evals.evals.task.max_new_tokens = 12
    evals.evals.task_contains = dict(evals.evals.task)
    evals.evals.task_contains.update(num_samples=0, check="contains_answer",
                                     max_new_tokens=24)
    evals.gates = [g for g in evals.gates if not g["metric"].startswith(("heldout", "reward"))]
    return evals
