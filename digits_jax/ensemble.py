"""Ensembles: several trained models' class probabilities, averaged or voted, and their accuracy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digits_jax import checkpoint, train

METHODS = ("mean", "vote")
Member = tuple[Callable[..., jax.Array], Any]  # (apply_fn, variables), as TrainState.apply_fn and .variables


@functools.partial(jax.jit, static_argnames=("apply_fn", "tta_shift"))
def _probabilities(apply_fn: Callable[..., jax.Array], variables: Any, images: jax.Array, tta_shift: int) -> jax.Array:
    return jnp.exp(train.log_probabilities(apply_fn, variables, train.preprocess(images), tta_shift))


def probabilities(apply_fn: Callable[..., jax.Array], variables: Any, images: np.ndarray, batch_size: int = 1000,
                  tta_shift: int = 0) -> np.ndarray:
    """float32 (N, C) class probabilities of uint8 (N, H, W, C) images; the last batch is padded, then cut."""
    n = len(images)
    out = []
    for begin in range(0, n, batch_size):
        batch = np.asarray(images[begin:begin + batch_size])
        size = len(batch)
        batch = np.pad(batch, [(0, batch_size - size)] + [(0, 0)] * (batch.ndim - 1))  # one compiled shape
        out.append(np.asarray(_probabilities(apply_fn, variables, batch, tta_shift))[:size])
    return np.concatenate(out)


def combine(member_probabilities: np.ndarray, method: str = "mean") -> np.ndarray:
    """Predicted classes int (N,) from float (M, N, C) per-member probabilities.

    "mean": the class of highest mean probability. "vote": the class most members predict, ties going to
    the tied class of highest mean probability.
    """
    mean = member_probabilities.mean(axis=0)
    if method == "mean":
        return mean.argmax(axis=-1)
    if method == "vote":
        num_classes = member_probabilities.shape[-1]
        votes = np.eye(num_classes, dtype=np.int64)[member_probabilities.argmax(axis=-1)].sum(axis=0)  # (N, C)
        tied = votes == votes.max(axis=-1, keepdims=True)
        return np.where(tied, mean, -1.0).argmax(axis=-1)
    raise ValueError(f"ensemble method {method!r}: choose one of {METHODS}")


def evaluate(members: Sequence[Member], eval_data: dict[str, np.ndarray], method: str = "mean",
             batch_size: int = 1000, tta_shift: int = 0) -> dict[str, Any]:
    """Accuracy of the ensemble of `members` on {'image': uint8 (N, H, W, C), 'label': int (N,)}.

    Returns:
      {'accuracy': the ensemble's fraction right, 'member_accuracies': [each member's], 'count': N}.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    labels = np.asarray(eval_data["label"])
    stacked = np.stack([probabilities(fn, variables, eval_data["image"], batch_size, tta_shift)
                        for fn, variables in members])
    return {"accuracy": float(np.mean(combine(stacked, method) == labels)),
            "member_accuracies": [float(np.mean(p.argmax(-1) == labels)) for p in stacked], "count": len(labels)}


def restore_members(run_dirs: Sequence[str | Path], step: int | str = "best") -> list[Member]:
    """(apply_fn, variables) of each run directory's checkpoint (the best by validation accuracy by default)."""
    members = []
    for run_dir in run_dirs:
        state = checkpoint.restore(run_dir, step=step).state
        members.append((state.apply_fn, state.variables))
    return members
