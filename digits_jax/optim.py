"""The optax optimizer and learning-rate schedule that a config names."""

from __future__ import annotations

import optax

from digits_jax.config import Config


def schedule(config: Config, steps_per_epoch: int) -> optax.ScalarOrSchedule:
    """Learning rate per step for `config.schedule`, peaking at `config.learning_rate`.

    "constant" is a plain float, so the seed recipe is exactly `optax.adam(1e-4)`.
    """
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        raise ValueError(f"config.warmup_epochs = {config.warmup_epochs!r} is {warmup} steps of {steps_per_epoch} per "
                         f"epoch: the whole run ({total} steps) would be warm-up; lower it")
    if config.schedule == "constant":
        return config.learning_rate
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, config.learning_rate)
    if config.schedule == "exponential":
        decay = optax.exponential_decay(config.learning_rate, max(total - warmup, 1), config.decay_rate)
        return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])
    raise ValueError(f"config.schedule = {config.schedule!r} is not implemented")


def optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation for `config.optimizer` with its schedule (`steps_per_epoch` sizes it)."""
    lr = schedule(config, steps_per_epoch)
    if config.optimizer == "adam":
        return optax.adam(lr, b1=config.b1, b2=config.b2)
    if config.optimizer == "adamw":
        return optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(lr, momentum=config.b1))
    raise ValueError(f"config.optimizer = {config.optimizer!r} is not implemented")
