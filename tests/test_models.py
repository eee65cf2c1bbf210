from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digits_jax import models


class ReferenceSeedCNN(nn.Module):
    """The seed CNN written the plain Flax way, as an independent reference."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128, name="dense1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="dense2")(x)


def test_seed_cnn_parameter_shapes_and_count():
    params = models.create("seed", 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"conv1": {"kernel": (3, 3, 1, 32), "bias": (32,)},
                      "conv2": {"kernel": (3, 3, 32, 64), "bias": (64,)},
                      "dense1": {"kernel": (5 * 5 * 64, 128), "bias": (128,)},
                      "dense2": {"kernel": (128, 10), "bias": (10,)}}
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (1600 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.size for p in jax.tree.leaves(params)) == expected == 225_034


def test_seed_cnn_matches_plain_flax_forward_and_gradient():
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    ours = models.create("seed", 10)
    params = ours.init(jax.random.PRNGKey(0), x)
    reference = ReferenceSeedCNN()

    def loss(apply, p):
        return jnp.sum(apply(p, x, train=True) ** 2)

    for train in (True, False):
        np.testing.assert_allclose(ours.apply(params, x, train=train), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda p: loss(ours.apply, p))(params)
    g_ref = jax.grad(lambda p: loss(reference.apply, p))(params)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kernel_size,padding,cin", [(3, "VALID", 1), (3, "SAME", 4), (5, "VALID", 3), (5, "SAME", 2)])
def test_conv_matches_flax_conv(kernel_size, padding, cin, train):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 10, cin))
    ours = models.Conv(6, kernel_size, padding)
    params = ours.init(jax.random.PRNGKey(1), x)
    reference = nn.Conv(6, (kernel_size, kernel_size), padding=padding)
    np.testing.assert_allclose(ours.apply(params, x, train), reference.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 26, 26, 3), (1, 11, 11, 2), (3, 4, 7, 1)])
def test_max_pool_matches_flax(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    np.testing.assert_array_equal(models.max_pool(x), nn.max_pool(x, (2, 2), (2, 2)))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*seed"):
        models.create("resnet", 10)
