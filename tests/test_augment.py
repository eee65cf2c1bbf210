"""On-device augmentation: exact against NumPy for translations and quarter turns, pure in its key, per-image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digits_jax import augment, train
from digits_jax.augment import Augment


def images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28, 1), np.float32)
    x[:, 6:22, 8:20] = rng.uniform(0, 1, (n, 16, 12, 1))  # ink away from the border
    return jnp.asarray(x)


def test_none_is_the_identity_and_validation_names_the_field():
    x = images()
    assert augment.apply(Augment.none(), jax.random.PRNGKey(0), x) is x
    with pytest.raises(ValueError, match="Augment.rotate_degrees = -1"):
        Augment(rotate_degrees=-1)
    with pytest.raises(ValueError, match="Augment.scale = 1.5"):
        Augment(scale=1.5)
    with pytest.raises(ValueError, match="Augment.rotate_degrees = True: must be a finite number >= 0"):
        Augment(rotate_degrees=True)
    assert Augment(translate_pixels=np.float32(2)).translate_pixels == 2  # a NumPy number is a number
    with pytest.raises(TypeError, match=r"augment.apply takes an Augment, got 'affine'; for a preset name use "
                                        r"augment.PRESETS\[name\]"):
        augment.apply("affine", jax.random.PRNGKey(0), x)  # config.augment is a name: was an AttributeError


@pytest.mark.parametrize("shift", [(2, -1), (-3, 0), (0, 3)])
def test_integer_translation_equals_a_shift_with_zero_fill(shift):
    x = images(2)
    m = augment.affine_matrix(0.0, 1.0, 0.0, jnp.array(shift, jnp.float32))[None].repeat(2, 0)
    expected = np.zeros_like(np.asarray(x))
    dy, dx = shift
    src = np.asarray(x)[:, max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)]
    expected[:, max(0, dy):28 - max(0, -dy), max(0, dx):28 - max(0, -dx)] = src
    np.testing.assert_allclose(augment.warp(x, m), expected, atol=1e-6)


def test_quarter_turn_equals_numpy_rot90():
    x = images(2)
    m = augment.affine_matrix(np.pi / 2, 1.0, 0.0, jnp.zeros(2))[None].repeat(2, 0)
    np.testing.assert_allclose(augment.warp(x, m), np.rot90(np.asarray(x), 1, axes=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_presets_keep_range_shape_and_are_pure_in_the_key(name):
    config = augment.PRESETS[name]
    x = jnp.repeat(images(1), 8, axis=0)  # eight copies of one digit
    key = jax.random.PRNGKey(3)
    jitted = jax.jit(augment.apply, static_argnums=0)
    out = jitted(config, key, x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, jitted(config, key, x))
    np.testing.assert_allclose(out, augment.apply(config, key, x), atol=1e-5)  # eager: other float rounding only
    assert not np.allclose(out, jitted(config, jax.random.PRNGKey(4), x))
    # Each image draws its own transform, and a small one: most of the ink stays.
    assert len({np.asarray(o).tobytes() for o in out}) == 8
    assert 0.7 < float(out.sum()) / float(x.sum()) < 1.3


def test_elastic_field_moves_pixels_about_as_simard_describes():
    """alpha 34, sigma 4 displaces by ~1.4 px RMS per axis (see Augment)."""
    config = Augment(0, 0, 0, 0, elastic_alpha=34.0, elastic_sigma=4.0)
    # A horizontal ramp: a pixel's value is its column, so the output minus the input is the column shift.
    ramp = jnp.broadcast_to(jnp.arange(28, dtype=jnp.float32)[None, None, :, None] / 100, (64, 28, 28, 1))
    shifted = augment.apply(config, jax.random.PRNGKey(0), ramp)
    inner = np.asarray(shifted - ramp)[:, 6:22, 6:22] * 100  # away from edges where zeros enter
    rms = float(np.sqrt(np.mean(inner ** 2)))
    assert 0.7 < rms < 2.5, rms


def test_training_with_augmentation_learns_and_keeps_labels(tiny_config, tiny_data):
    from tests.test_train import fresh_state

    config = tiny_config.replace(augment="elastic", learning_rate=1e-3, schedule="constant")
    state = fresh_state(config, tiny_data)
    assert state.options.augment == augment.PRESETS["elastic"]
    batch = {k: v[:64] for k, v in tiny_data["train"].items()}
    losses = []
    for _ in range(20):
        state, sums = train.train_step(state, batch)
        losses.append(float(sums["loss"] / sums["count"]))
    assert losses[-1] < 0.6 * losses[0], losses
    # Same state and batch, same augmented step: resume stays exact.
    again, _ = train.train_step(fresh_state(config, tiny_data), batch)
    first, _ = train.train_step(fresh_state(config, tiny_data), batch)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(first.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_rejects_unknown_augmentation(tiny_config):
    with pytest.raises(ValueError, match=r"config.augment = 'flip': choose one of \['affine', 'elastic', 'none'\]"):
        tiny_config.replace(augment="flip")
