"""B11: train-state bytes per parameter, and how FSDP divides them (shapes only).

For fsdp = 1, 2, 4, 8 on fake CPU devices it lays out the SFT train state of the
27M benchmark model (params + AdamW moments, with the gradients counted as one more
params-sized buffer), reads every leaf's per-device shard shape from its sharding,
and reports bytes per device × devices ÷ params (16 for f32 Adam when nothing is
replicated) and bytes per device ÷ params (which should fall as 16 / fsdp).

    JAX_NUM_CPU_DEVICES=8 python -m benchmarks.state_bytes
"""

from __future__ import annotations

import math

import jax

from benchmarks import report
from benchmarks.sft_step import SHAPES
from jaxalign import sharding as shd
from jaxalign.config import base_config
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import TransformerConfig
from jaxalign.optim import make_optimizer
from jaxalign.train import state_layout


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of ``abstract`` laid out as ``shardings``."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def measure(fsdp: int, model: dict) -> tuple[float, float]:
    """``(bytes/device × devices / params, bytes/device / params)`` at this fsdp size."""
    config = base_config("sft")
    config.model.update(model)
    model_cfg = TransformerConfig.from_mapping(config.model)
    mesh = make_mesh(dict(data=1, fsdp=fsdp, tensor=1), devices=jax.devices()[:fsdp])
    rules = shd.rules_from_config(config.sharding.rules)
    tx, _ = make_optimizer(config.optim, 1000)
    _, abstract, shardings, _ = state_layout(config, model_cfg, tx, mesh, rules)
    n = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    held = (per_device_bytes(abstract["params"], shardings["params"]) * 2  # + gradients
            + per_device_bytes(abstract["opt_state"], shardings["opt_state"]))
    return held * fsdp / n, held / n


def main() -> None:
    args = report.parser(__doc__, reps=None).parse_args()
    model = SHAPES["quick" if args.quick else "full"]["model"]
    sizes = [f for f in (1, 2, 4, 8) if f <= jax.device_count()]
    got = {f: measure(f, model) for f in sizes}
    figure = "; ".join(f"fsdp {f}: {tot:.2f} ({dev:.2f} per device)"
                       for f, (tot, dev) in got.items())
    report.emit([report.row(
        "B11", "(params + grads + optimizer) bytes per device x devices / params", None,
        "16 (f32 Adam), per device divides by the fsdp size", f"{model}", figure=figure,
        median=got[sizes[-1]][0])], args.json)


if __name__ == "__main__":
    main()
