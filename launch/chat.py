"""Chat with a checkpoint in the terminal, or answer prompts for a script.

    python -m launch.chat --workdir=DIR                  # a run's latest checkpoint
    python -m launch.chat --model=hf:DIR                 # or workdir:DIR, gguf:FILE, ...
        [--system=TEXT] [--temperature=0.7] [--top_p=1] [--top_k=0]
        [--max_new_tokens=256] [--seed=0]
    python -m launch.chat --workdir=DIR --prompt="What is 2 + 3?"
    python -m launch.chat --model=hf:DIR --prompts=in.jsonl --out=out.jsonl

Prompts are rendered with the checkpoint's chat template (a run's ``data.chat_template``
and tokenizer; an HF directory's own). Interactively, every turn re-encodes the whole
conversation; ``/reset`` forgets it, ``/exit`` or the end of input quits. Replies (and
``--prompt``'s) stream to stdout as they are generated. ``--prompts`` reads JSONL records
holding ``prompt`` (a string) or ``messages`` (a chat list) and writes each with a
``reply`` to ``--out`` (``-``: stdout), ``--batch_size`` prompts per sampler call.
"""

import sys

import jax
from absl import app, flags

from jaxalign import chat_session, sampling
from launch import run, start

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: chat with its latest checkpoint.")
_MODEL = flags.DEFINE_string("model", None, "Checkpoint: workdir:DIR, hf:DIR or any other "
                             "model.init_from source (gguf:FILE).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer replacing the checkpoint's.")
_TEMPLATE = flags.DEFINE_string("chat_template", None, "Chat template replacing the "
                                "checkpoint's (a built-in name or a .jinja file).")
_SYSTEM = flags.DEFINE_string("system", None, "System prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest reply, in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Params and compute dtype (default: the run's, or float32).")
_PROMPT = flags.DEFINE_string("prompt", None, "Answer this one prompt and exit.")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL file of requests to answer.")
_OUT = flags.DEFINE_string("out", "-", "Where --prompts writes its replies ('-': stdout).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per sampler call with --prompts.")


def main(argv):
    start(argv)
    if (_WORKDIR.value is None) == (_MODEL.value is None):
        raise app.UsageError("give exactly one of --workdir and --model")
    if _PROMPT.value is not None and _PROMPTS.value is not None:
        raise app.UsageError("give at most one of --prompt and --prompts")
    settings = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                    top_k=_TOP_K.value, top_p=_TOP_P.value)
    sampling.SamplingConfig(**settings)  # bad settings are refused before a model loads
    spec = _MODEL.value or f"workdir:{_WORKDIR.value}"
    model = chat_session.load_chat_model(spec, tokenizer=_TOKENIZER.value,
                                         chat_template=_TEMPLATE.value, dtype=_DTYPE.value)
    cfg = model.sampling_config(**settings)
    if _PROMPTS.value is not None:
        rng = jax.random.PRNGKey(_SEED.value)
        if _OUT.value == "-":
            chat_session.reply_jsonl(model, _PROMPTS.value, sys.stdout, cfg, rng,
                                     batch_size=_BATCH.value, system=_SYSTEM.value)
            return
        with open(_OUT.value, "w", encoding="utf-8") as out:
            n = chat_session.reply_jsonl(model, _PROMPTS.value, out, cfg, rng,
                                         batch_size=_BATCH.value, system=_SYSTEM.value)
        print(f"wrote {n} replies to {_OUT.value}", file=sys.stderr)
        return
    # Replies stream to stdout as the sampler generates them.
    session = chat_session.ChatSession(model, cfg, system=_SYSTEM.value, seed=_SEED.value,
                                       stream=sys.stdout)
    if _PROMPT.value is not None:
        session.send(_PROMPT.value)
        return
    print(f"chatting with {model.name} (template {model.template.name}); /reset forgets the "
          "conversation, /exit quits", file=sys.stderr)
    chat_session.interact(session, sys.stdin, sys.stdout, sys.stderr)


if __name__ == "__main__":
    run(main)
