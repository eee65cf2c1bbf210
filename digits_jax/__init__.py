"""digits_jax: train and evaluate handwritten-digit classifiers with JAX, Flax, Optax and Orbax."""

from digits_jax import config, data, ensemble, metrics, models, optim, parallel, predict, runs
from digits_jax.checkpoint import (
    CheckpointSkippedWarning,
    ModelNeededError,
    OptimizerStateAsSavedWarning,
    Restored,
    RunDir,
    RunInUseError,
    best_record,
    read_records,
    restore,
    state_digest,
)
from digits_jax.config import Config
from digits_jax.data import DataError, load
from digits_jax.train import (
    EvalResult,
    NonFiniteError,
    TrainState,
    create_train_state,
    epoch_order,
    eval_step,
    evaluate,
    train_and_evaluate,
    train_epoch,
    train_step,
)

__all__ = [
    "CheckpointSkippedWarning", "Config", "DataError", "EvalResult", "ModelNeededError", "NonFiniteError",
    "OptimizerStateAsSavedWarning", "Restored", "RunDir", "RunInUseError", "TrainState", "best_record", "config",
    "create_train_state", "data", "ensemble", "epoch_order", "eval_step", "evaluate", "load", "metrics", "models",
    "optim", "parallel", "predict", "read_records", "restore", "runs", "state_digest", "train_and_evaluate",
    "train_epoch", "train_step",
]
