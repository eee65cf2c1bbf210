"""Ensembles: several trained models' class probabilities, averaged or voted, and their accuracy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digits_jax import data, train

METHODS = ("mean", "vote")
Member = tuple[Callable[..., jax.Array], Any]  # (apply_fn, variables), as TrainState.apply_fn and .variables


@functools.partial(jax.jit, static_argnames=("apply_fn", "tta_shift"))
def _probabilities(apply_fn: Callable[..., jax.Array], variables: Any, images: jax.Array, tta_shift: int) -> jax.Array:
    return jnp.exp(train.log_probabilities(apply_fn, variables, train.preprocess(images), tta_shift))


def probabilities(apply_fn: Callable[..., jax.Array], variables: Any, images: np.ndarray, batch_size: int = 1000,
                  tta_shift: int = 0) -> np.ndarray:
    """float32 (N, C) class probabilities of uint8 (N, H, W, C) images; the last batch is padded, then cut."""
    return np.concatenate([np.asarray(_probabilities(apply_fn, variables, batch["image"], tta_shift))[:size]
                           for batch, size in train.padded_batches({"image": images}, batch_size)])


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


def _as_member(member: Any) -> Member:
    if isinstance(member, tuple | list) and len(member) == 2:
        return member[0], member[1]
    state = getattr(member, "state", member)  # a checkpoint.Restored holds its TrainState as .state
    if hasattr(state, "apply_fn") and hasattr(state, "variables"):
        return state.apply_fn, state.variables
    raise TypeError(f"an ensemble member is an (apply_fn, variables) pair, a TrainState or a restored checkpoint, "
                    f"not {type(member).__name__}")


def evaluate(members: Sequence[Any], eval_data: dict[str, np.ndarray], method: str = "mean",
             batch_size: int = 1000, tta_shift: int | Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy of the ensemble of `members` on {'image': uint8 (N, H, W, C), 'label': int (N,)}.

    Each member is an (apply_fn, variables) pair, a TrainState or a `checkpoint.Restored`. `tta_shift` is one for
    all members or one per member; None: a Restored's own config.tta_shift (as `digits-jax eval` and `Predictor`
    evaluate it), 0 for the others.

    Returns:
      {'accuracy': the ensemble's fraction right, 'member_accuracies': [each member's], 'count': N}.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if tta_shift is None:
        tta_shift = [getattr(getattr(member, "config", None), "tta_shift", 0) for member in members]
    per_member = np.ravel(tta_shift).tolist()  # as given: log_probabilities refuses 0.9 (int() would make it 0)
    shifts = per_member if np.ndim(tta_shift) else per_member * len(members)
    if len(shifts) != len(members):
        raise ValueError(f"{len(shifts)} tta_shift values for {len(members)} ensemble members: give one per member")
    data.check_split(eval_data, "ensemble.evaluate()'s eval_data")
    labels = np.asarray(eval_data["label"])
    if not len(labels):
        raise ValueError("ensemble.evaluate() needs at least one example")
    stacked = np.stack([probabilities(fn, variables, eval_data["image"], batch_size, shift)
                        for (fn, variables), shift in zip(map(_as_member, members), shifts, strict=True)])
    data.check_split(eval_data, "ensemble.evaluate()'s eval_data", num_classes=stacked.shape[-1])
    return {"accuracy": float(np.mean(combine(stacked, method) == labels)),
            "member_accuracies": [float(np.mean(p.argmax(-1) == labels)) for p in stacked], "count": len(labels)}

