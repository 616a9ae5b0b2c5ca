"""Export a run for Hugging Face: ``python -m launch.export_hf --workdir=DIR --out=OUT``.

Writes config.json, generation_config.json, safetensors (sharded above
``--max_shard_size``) and the tokenizer files; ``transformers``,
vLLM and llama.cpp's converter load the result.
"""

import re

from absl import app, flags

from jaxalign.models.export import export_workdir
from launch import run, start

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Dtype of the written tensors (default: the run's param_dtype).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB",
                                 "Largest safetensors file, e.g. 5GB, 500MB, 2GiB.")
flags.mark_flags_as_required(["workdir", "out"])

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"2GiB"`` -> 2 * 2**30; a bare number is bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise app.UsageError(f"--max_shard_size={text!r}: expected a size like 5GB or 500MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def main(argv):
    start(argv)
    files = export_workdir(_WORKDIR.value, _OUT.value, dtype=_DTYPE.value, step=_STEP.value,
                           max_shard_bytes=parse_size(_MAX_SHARD.value))
    print(f"wrote {_OUT.value}: {', '.join(files)}")


def run_main():
    """Console-script entry point (``jaxalign-export-hf``)."""
    run(main)


if __name__ == "__main__":
    run_main()
