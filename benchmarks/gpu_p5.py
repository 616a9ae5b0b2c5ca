"""P5's jaxalign side on one accelerator: SFT of a ``llama3.2-1b``-shaped model (random
weights, bf16 compute, f32 AdamW state, cuDNN attention) through the real trainer on a
length-skewed chat JSONL, with the trainer's own throughput figures:

* ``tokens_per_s``: non-padding tokens per second (prompt + response, every segment);
* ``positions_per_s``: padded positions per second;
* ``mfu``: the non-padding tokens' model FLOPs (6·N_matmul + 6·L·T·D, T = each batch's
  padded width) per second over the card's datasheet bf16 peak (``metrics.peak_flops``).

Contenders (one at a time, in one process): the library's default length handling, and
every row padded to ``max_len`` (``data.buckets=max_len``), and packing. Medians over the
logged rows after the first (compile time is logged apart and left out of the window).

    python -m benchmarks.gpu_p5            # on a GPU: the 1B shape, max_len 1024
    python -m benchmarks.gpu_p5 --quick    # a small shape; runs anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
from typing import Any

import jax

from benchmarks.gpu import DATASHEET_BF16
from jaxalign.config import apply_overrides, load_config_file, model_config
from jaxalign.metrics import read_jsonl
from jaxalign.train import train

_WORDS = ("the", "model", "answer", "question", "data", "token", "length", "skewed", "chat",
          "what", "is", "a", "short", "reply", "longer", "explanation", "of", "numbers", "and")


def skewed_chats(path: str, n: int, median_words: int, seed: int = 0) -> dict[str, float]:
    """Writes ``n`` single-turn chats whose lengths follow a long-tailed (log-normal) law."""
    rng = random.Random(seed)
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            q = max(3, int(rng.lognormvariate(math.log(median_words / 3), 0.6)))
            a = max(2, int(rng.lognormvariate(math.log(median_words), 0.9)))
            lengths.append(q + a)
            f.write(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(q)),
                                "response": " ".join(rng.choice(_WORDS) for _ in range(a))})
                    + "\n")
    lengths.sort()
    return {"words_median": lengths[n // 2], "words_p90": lengths[int(0.9 * n)],
            "words_max": lengths[-1]}


def _config(data: str, workdir_steps: int, quick: bool, extra: dict[str, Any]):
    config = load_config_file("configs/sft.py:test")
    if quick:
        model = {k: v for k, v in model_config("tiny").items() if k not in ("lora", "init_from")}
        max_len, batch, peak = 256, 8, 1e11
    else:
        model = {k: v for k, v in model_config("llama3.2-1b").items()
                 if k not in ("lora", "init_from")}
        model.update(attention="cudnn", scan_layers=True)
        max_len, batch = 1024, 8
        name = jax.devices()[0].device_kind
        peak = next((v for k, v in DATASHEET_BF16.items() if k in name), 989e12)
    model.update(dtype="bfloat16", init_from="scratch")
    overrides = {f"model.{k}": v for k, v in model.items() if k in config.model}
    overrides.update({
        "data.train": f"jsonl:{data}", "data.eval": "", "data.max_len": max_len,
        "data.overlong": "truncate_right", "train.batch_size": batch,
        "train.steps": workdir_steps, "train.log_every": 5, "train.eval_every": 10_000,
        "optim.learning_rate": 5e-5, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "checkpoint.save_every": 10_000, "metrics.peak_flops": peak,
        "metrics.tensorboard": False, **extra})
    return apply_overrides(config, overrides)


CONTENDERS = {"default": {}, "packed": {"data.pack": True},
              "padded to max_len": {"data.buckets": "max_len"}}


def run(quick: bool, steps: int, names: list[str]) -> list[dict[str, Any]]:
    root = tempfile.mkdtemp(prefix="p5-gpu-")
    data = os.path.join(root, "chats.jsonl")
    shape = skewed_chats(data, 512, 40 if quick else 160)
    print(f"data: 512 chats, words per chat {shape}; device {jax.devices()[0].device_kind}")
    out = []
    for name in names:
        extra = CONTENDERS[name]
        workdir = os.path.join(root, name.replace(" ", "_"))
        try:
            config = _config(data, steps, quick, extra)
        except (KeyError, ValueError) as e:  # a key this tree does not have
            print(f"{name}: skipped ({e})")
            continue
        summary = train(config, workdir)
        rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                if r["split"] == "train"][1:]
        res = {"contender": name, "wall_s": round(summary["wall_s"], 1)}
        for k in ("tokens_per_s", "positions_per_s", "mfu", "data_packing_efficiency"):
            vals = [r[k] for r in rows if k in r]
            if vals:
                res[k] = statistics.median(vals)
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help=f"comma list of contenders among {list(CONTENDERS)}")
    args = parser.parse_args()
    results = run(args.quick, args.steps or (10 if args.quick else 40), args.only.split(","))
    print("\n| contender | non-pad tokens/s | positions/s | MFU (non-pad, datasheet) | "
          "packing eff. |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['contender']} | {r.get('tokens_per_s', 0):,.0f} | "
              f"{r.get('positions_per_s', 0):,.0f} | {r.get('mfu', 0):.3f} | "
              f"{r.get('data_packing_efficiency', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
