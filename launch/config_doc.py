"""Write the reference of every config key: ``python -m launch.config_doc [--out=docs/config.md]``.

The page is rendered by ``jaxalign.config_reference.render``; ``tests/test_config_doc.py``
fails when the checked-in file is stale.
"""

from __future__ import annotations

import os

from absl import flags

from jaxalign.config_reference import count_keys, render
from launch import run, start

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "docs", "config.md")


def main(argv: list[str]) -> None:
    start(argv, quiet=False)
    out = flags.FLAGS.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {out} ({count_keys()} keys)")


if __name__ == "__main__":
    # Defined only when run: other entry points define an --out flag of their own.
    flags.DEFINE_string("out", DEFAULT_OUT, "Where to write the Markdown reference.")
    run(main)
