from __future__ import annotations

import math

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
