"""Metrics as values: sums and counts that merge by addition and are divided out only at the end."""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


def batch(losses: jax.Array, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> Metrics:
    """Sums for one batch.

    Args:
      losses: (B,) float32 per-example loss.
      logits: (B, C) float32.
      labels: (B,) int32 class ids.
      mask: optional (B,) bool; False rows (padding) are not counted.
    Returns:
      {'loss': sum of losses, 'correct': number right, 'count': examples,
       'confusion': (C, C) int32 counts, rows = true class, columns = predicted}.
    """
    keep = jnp.ones(losses.shape, bool) if mask is None else mask
    num_classes = logits.shape[-1]
    predicted = jnp.argmax(logits, axis=-1)
    true_onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * keep.astype(jnp.int32)[:, None]
    pred_onehot = jax.nn.one_hot(predicted, num_classes, dtype=jnp.int32)
    # Sums in float32 and counts in int32 whatever the model's dtype: bfloat16 counts stop being exact at 256.
    return {
        "loss": jnp.sum(jnp.where(keep, losses.astype(jnp.float32), 0.0)),
        "correct": jnp.sum((predicted == labels) & keep, dtype=jnp.int32),
        "count": jnp.sum(keep, dtype=jnp.int32),
        "confusion": true_onehot.T @ pred_onehot,
    }


def merge(a: Metrics, b: Metrics) -> Metrics:
    """Adds two metric sums: device arrays on the device, NumPy arrays on the host."""
    return jax.tree.map(operator.add, a, b)


def compute(m: Metrics) -> dict[str, Any]:
    """Turns sums into {'loss': mean loss, 'accuracy': fraction right, 'count': examples}."""
    count = int(m["count"])
    return {"loss": float(m["loss"]) / count, "accuracy": float(m["correct"]) / count, "count": count}


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """(C,) fraction of each true class predicted right; NaN for a class with no examples."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(confusion) / totals
