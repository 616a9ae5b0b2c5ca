"""Evaluate a run: ``python -m launch.eval --workdir=DIR [--source=builtin:tasks --split=eval]``.

Prints greedy pass@1 on the verifiable records of the source (records with an
``answer``) and writes it to ``DIR/eval_report.json``.
"""

import json
import os

from absl import app, flags, logging
from flax import nnx

from jaxalign.data.chat import get_template
from jaxalign.data.sources import load_records
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.evals import task_accuracy
from jaxalign.models import init_from
from jaxalign.models.export import restore_params
from jaxalign.models.transformer import Transformer, TransformerConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_SOURCE = flags.DEFINE_string("source", "builtin:tasks", "Records with prompt and answer.")
_SPLIT = flags.DEFINE_string("split", "eval", "Split of the source.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run = init_from.read_run_config(_WORKDIR.value)
    cfg = TransformerConfig.from_mapping(run["model"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, restore_params(_WORKDIR.value, cfg))
    nnx.update(model, params)
    tokenizer = load_tokenizer(run["tokenizer"])
    template = get_template(run["data"].get("chat_template", "auto"), tokenizer)
    records = [r for r in load_records(_SOURCE.value, _SPLIT.value) if r.get("answer")]
    report = task_accuracy(model, tokenizer, template, records)
    with open(os.path.join(_WORKDIR.value, "eval_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
