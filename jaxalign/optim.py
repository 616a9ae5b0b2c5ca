"""optax optimizer and learning-rate schedule from config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> Callable[[Any], Any]:
    """Linear warmup to ``cfg.learning_rate`` then cosine/linear/constant decay.

    Decay ends at ``learning_rate * final_lr_fraction`` on ``total_steps``. Warmup lasts
    ``warmup_steps``, or ``round(warmup_ratio * total_steps)`` when the ratio is set.
    """
    peak = float(cfg["learning_rate"])
    ratio = float(cfg.get("warmup_ratio", 0.0))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"optim.warmup_ratio={ratio}; expected a fraction in [0, 1)")
    warmup = round(ratio * total_steps) if ratio else int(cfg["warmup_steps"])
    end = peak * float(cfg["final_lr_fraction"])
    decay_steps = max(total_steps - warmup, 1)
    kind = cfg["schedule"]
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.schedule={kind!r}; expected cosine, linear or constant")
    if warmup <= 0:
        return decay
    joined = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
    # Shift by one so the first update already has a non-zero rate.
    return lambda count: joined(count + 1)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms and biases (rank < 2) are skipped."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """AdamW with global-norm clipping; returns ``(tx, schedule)``."""
    if cfg["name"] != "adamw":
        raise ValueError(f"optim.name={cfg['name']!r}; only 'adamw' is available")
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg["grad_clip_norm"] and cfg["grad_clip_norm"] > 0:
        parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
    parts.append(optax.adamw(schedule, b1=float(cfg["b1"]), b2=float(cfg["b2"]),
                             eps=float(cfg["eps"]), weight_decay=float(cfg["weight_decay"]),
                             mask=decay_mask))
    return optax.chain(*parts), schedule
