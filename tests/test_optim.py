from __future__ import annotations

import math

import numpy as np
import optax
import pytest

from digits_jax import config, optim

STEPS_PER_EPOCH, PEAK = 10, 0.01


def lr_at(**changes):
    c = config.default().replace(learning_rate=PEAK, epochs=5, **changes)
    return optim.schedule(c, STEPS_PER_EPOCH)


def test_constant_is_a_plain_float_so_the_seed_recipe_is_exactly_adam():
    assert lr_at(schedule="constant") == PEAK
    assert isinstance(optim.optimizer(config.seed(), 100), optax.GradientTransformation)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (5, PEAK / 2), (10, PEAK),  # linear warm-up over one epoch
    (30, PEAK * 0.5 * (1 + math.cos(math.pi * 20 / 40))), (50, 0.0),  # cosine to zero at the last step
])
def test_cosine_with_warmup(step, expected):
    assert float(lr_at(schedule="cosine", warmup_epochs=1.0)(step)) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("step,expected", [(0, PEAK / 25), (15, PEAK), (50, PEAK / 25 / 1e4)])
def test_onecycle_peaks_at_30_percent(step, expected):
    assert float(lr_at(schedule="onecycle")(step)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (10, PEAK), (30, PEAK * 0.1 ** 0.5), (50, PEAK * 0.1)])
def test_exponential_with_warmup(step, expected):
    schedule = lr_at(schedule="exponential", warmup_epochs=1.0, decay_rate=0.1)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_a_warmup_that_rounds_up_to_the_whole_run_is_refused(schedule):
    # 4.96 epochs of 10 steps round to 50: all 50 steps of the 5 epochs (cosine had no steps left to decay over,
    # exponential never reached its peak).
    with pytest.raises(ValueError, match=r"warmup_epochs = 4.96 is 50 steps .* the whole run \(50 steps\)"):
        lr_at(schedule=schedule, warmup_epochs=4.96)


def numpy_steps(name, grads, param, lr, b1, b2, weight_decay, eps=1e-8):
    """`param` after one step per gradient, written out from the optimizers' definitions."""
    m = v = np.zeros_like(param)
    for t, g in enumerate(grads, 1):
        if name == "sgd":  # L2 on the gradient, heavy-ball momentum
            m = (g + weight_decay * param) + b1 * m
            param = param - lr * m
            continue
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        param = param - lr * (step + weight_decay * param)  # decoupled decay (0 for adam)
    return param


@pytest.mark.parametrize("changes", [
    {"optimizer": "adam", "b1": 0.7, "b2": 0.9},
    {"optimizer": "adamw", "b1": 0.8, "b2": 0.95, "weight_decay": 0.1},
    {"optimizer": "sgd", "b1": 0.5, "weight_decay": 0.01},
])
def test_optimizers_follow_their_definitions_with_the_configs_settings(changes):
    c = config.default().replace(schedule="constant", learning_rate=PEAK, **changes)
    rng = np.random.default_rng(0)
    param, grads = rng.normal(size=5), [rng.normal(size=5) for _ in range(3)]
    tx = optim.optimizer(c, STEPS_PER_EPOCH)
    ours, state = np.asarray(param, np.float64), tx.init(param)
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
    expected = numpy_steps(c.optimizer, grads, param, PEAK, c.b1, c.b2, c.weight_decay)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
