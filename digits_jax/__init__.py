"""digits_jax: train and evaluate handwritten-digit classifiers with JAX, Flax, Optax and Orbax."""

from digits_jax import config, data, metrics, models, optim
from digits_jax.checkpoint import Restored, restore
from digits_jax.config import Config
from digits_jax.data import DataError, load
from digits_jax.train import (
    EvalResult,
    TrainState,
    create_train_state,
    evaluate,
    train_and_evaluate,
    train_epoch,
    train_step,
)

__all__ = [
    "Config", "DataError", "EvalResult", "Restored", "TrainState", "config", "create_train_state", "data",
    "evaluate", "load", "metrics", "models", "optim", "restore", "train_and_evaluate", "train_epoch", "train_step",
]
