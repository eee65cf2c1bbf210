from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits_jax import models
from digits_jax.train import create_train_state, train_step


# Run op by op, every operation and shape compiles its own small program, and XLA:CPU took up to 4 s for each
# jax.random draw of a small many-axis shape such as (2, 9, 8, 6): most of the 88 s this module took before.
# So inputs come from NumPy and each model call is compiled as one program.
def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def uniform(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.fixture(autouse=True)
def classic_threefry():
    """These tests run on the classic Threefry, not JAX's default partitionable one: the models' initialisers'
    (3, 3, cin, cout) draws compile in a fraction of the time, and the tests compare modules on the same random
    numbers, whatever made them. (The dropout test checks both.)"""
    with jax.threefry_partitionable(False):
        yield


def jitted(module: nn.Module, **kwargs):
    """module.apply(variables, x, **kwargs) as one compiled program."""
    return jax.jit(functools.partial(module.apply, **kwargs))


class ReferenceSeedCNN(nn.Module):
    """The seed CNN written the plain Flax way, as an independent reference."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128, name="dense1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="dense2")(x)


def test_seed_cnn_parameter_shapes_and_count():
    params = jax.eval_shape(models.create("seed", 10).init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"conv1": {"kernel": (3, 3, 1, 32), "bias": (32,)},
                      "conv2": {"kernel": (3, 3, 32, 64), "bias": (64,)},
                      "dense1": {"kernel": (5 * 5 * 64, 128), "bias": (128,)},
                      "dense2": {"kernel": (128, 10), "bias": (10,)}}
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (1600 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.size for p in jax.tree.leaves(params)) == expected == 225_034


@pytest.mark.parametrize(("side", "convs", "expected"), [
    (28, ((32, 3), (64, 3)), 26),  # seed: 28 -> 26 -> 13 -> 11 -> 5 uses 26 -> 24 -> 12 -> 10 -> 5
    (28, ((24, 5), (32, 3)), 28),  # "fast": 28 -> 24 -> 12 -> 10 -> 5, nothing dropped
    (29, ((8, 3),), 28),
    (12, ((8, 3), (8, 3)), 10),  # 12 -> 10 -> 5 -> 3 -> 1: the second pool drops its odd row
])
def test_used_extent(side, convs, expected):
    assert models.used_extent(side, convs) == expected


def test_pixels_the_seed_cnn_crops_do_not_reach_the_plain_flax_model_output():
    # Independent of our CNN: the plain flax model's logits do not depend on the last 2 rows and columns.
    # The input gradient of a random mix of the logits is non-zero wherever any logit depends on a pixel.
    x = uniform(1, (2, 28, 28, 1))
    reference = ReferenceSeedCNN()
    params = jax.jit(reference.init)(jax.random.PRNGKey(0), x)
    mix = normal(2, (2, 10))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(reference.apply(params, v) * mix)))(x)
    assert np.abs(grad[:, :26, :26]).max() > 0
    assert np.all(grad[:, 26:] == 0) and np.all(grad[:, :, 26:] == 0)


def test_seed_cnn_matches_plain_flax_forward_and_gradient():
    x = uniform(1, (4, 28, 28, 1))
    ours = models.create("seed", 10)
    params = jax.jit(ours.init)(jax.random.PRNGKey(0), x)
    reference = ReferenceSeedCNN()

    def loss(apply, p):
        return jnp.sum(apply(p, x, train=True) ** 2)

    for train in (True, False):
        np.testing.assert_allclose(jitted(ours, train=train)(params, x), jitted(reference)(params, x), rtol=1e-5,
                                   atol=1e-5)
    g_ours = jax.jit(jax.grad(lambda p: loss(ours.apply, p)))(params)
    g_ref = jax.jit(jax.grad(lambda p: loss(reference.apply, p)))(params)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("patches", ["full", "by_rows", "columns"])
@pytest.mark.parametrize("kernel_size,padding,strides,cin", [
    (3, "VALID", 1, 1), (3, "SAME", 1, 4), (5, "VALID", 1, 3), (5, "SAME", 1, 2),
    # 11 x 10 images: SAME with stride 2 pads 2 + 2 rows and 1 + 2 columns; VALID leaves the last row unused.
    (5, "SAME", 2, 2), (3, "VALID", 2, 3)])
def test_conv_matches_flax_conv(kernel_size, padding, strides, cin, patches, train):
    x = normal(0, (2, 11, 10, cin))
    assert_conv_matches(models.Conv(6, kernel_size, padding, strides, patches=patches),
                        nn.Conv(6, (kernel_size, kernel_size), strides=strides, padding=padding), x, train)


def assert_conv_matches(ours, reference, x, train):
    """Outputs and gradients (parameters and input) of `ours` equal those of the flax `reference` on `x`."""
    params = jax.jit(ours.init)(jax.random.PRNGKey(1), x)
    expected = jitted(reference)(params, x)
    np.testing.assert_allclose(jitted(ours, train=train)(params, x), expected, rtol=1e-5, atol=1e-5)
    weights = normal(2, expected.shape)
    grad_ours = jax.jit(jax.grad(lambda p, v: jnp.sum(ours.apply(p, v, train) * weights), argnums=(0, 1)))(params, x)
    grad_ref = jax.jit(jax.grad(lambda p, v: jnp.sum(reference.apply(p, v) * weights), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(grad_ours), jax.tree.leaves(grad_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,padding", [((2, 12, 12, 5), "VALID"), ((2, 11, 8, 3), "VALID"),
                                           ((2, 8, 11, 3), "VALID"), ((1, 3, 3, 2), "VALID"), ((2, 9, 10, 4), "SAME")])
def test_winograd_conv_matches_flax_conv(shape, padding):
    # Even and odd output sides (odd ones go through a zero-padded extra tile), the smallest input, SAME padding.
    x = normal(0, shape)
    assert_conv_matches(models.Conv(7, 3, padding, patches="winograd"), nn.Conv(7, (3, 3), padding=padding), x, True)


def test_winograd_conv3x3_against_numpy():
    # An independent reference: the convolution as nine shifted NumPy products, in float64.
    x, kernel = normal(3, (2, 7, 6, 3)), normal(4, (3, 3, 3, 5))
    expected = sum(np.einsum("nhwc,cf->nhwf", x[:, i:i + 5, j:j + 4].astype(np.float64), kernel[i, j])
                   for i in range(3) for j in range(3))
    np.testing.assert_allclose(jax.jit(models.winograd_conv3x3)(x, kernel), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["same", "CIRCULAR"])
def test_conv_rejects_paddings_its_training_path_does_not_make(padding):
    """Training padded only for "SAME"; lax took "same" at inference: 10 x 10 outputs in training, 12 x 12 after."""
    with pytest.raises(ValueError, match=f"Conv.padding must be 'VALID' or 'SAME'; got '{padding}'"):
        models.Conv(6, padding=padding).init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1)))


def test_conv_rejects_unknown_patches_mode():
    with pytest.raises(ValueError, match="'full', 'by_rows', 'columns' or 'winograd'; got 'rows'"):
        models.Conv(6, patches="rows").init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))
    with pytest.raises(ValueError, match="'winograd' needs kernel_size 3 and strides 1; got 5 and 1"):
        models.Conv(6, 5, patches="winograd").init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))
    with pytest.raises(ValueError, match="'winograd' needs kernel_size 3 and strides 1; got 3 and 2"):
        models.Conv(6, 3, strides=2, patches="winograd").init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))


@pytest.mark.parametrize("shape", [(2, 26, 26, 3), (1, 11, 11, 2), (3, 4, 7, 1)])
def test_max_pool_matches_flax(shape):
    x = normal(0, shape)
    np.testing.assert_array_equal(models.max_pool(x), nn.max_pool(x, (2, 2), (2, 2)))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*seed"):
        models.create("resnet", 10)


class ReferenceBNCNN(nn.Module):
    """The "bn" model written with plain flax layers (nn.Conv, nn.max_pool), as an independent reference."""

    @nn.compact
    def __call__(self, x, train=False):
        for i, features in enumerate((32, 64), 1):
            for j in (1, 2):
                x = nn.Conv(features, (3, 3), padding="VALID", use_bias=False, name=f"conv{i}_{j}")(x)
                x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}_{j}")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Dense(256, use_bias=False, name="dense1")(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_dense")(x))
        return nn.Dense(10, name="dense2")(x)


class ReferenceStridedCNN(nn.Module):
    """The "strided" model with plain flax layers (nn.Conv with strides and SAME padding)."""

    @nn.compact
    def __call__(self, x, train=False):
        def conv_bn_relu(x, features, kernel_size, name, **conv):
            x = nn.Conv(features, (kernel_size, kernel_size), use_bias=False, name=f"conv{name}", **conv)(x)
            return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{name}")(x))

        for i, features in enumerate((32, 64), 1):
            x = conv_bn_relu(x, features, 3, f"{i}_1", padding="VALID")
            x = conv_bn_relu(x, features, 3, f"{i}_2", padding="VALID")
            x = conv_bn_relu(x, features, 5, f"{i}_3", padding="SAME", strides=(2, 2))
        assert x.shape[1:] == (4, 4, 64)
        x = nn.Dense(128, use_bias=False, name="dense1")(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_dense")(x))
        return nn.Dense(10, name="dense2")(x)


@pytest.mark.parametrize("name,reference", [("bn", ReferenceBNCNN), ("strided", ReferenceStridedCNN)])
def test_batch_norm_models_match_plain_flax_in_both_modes(name, reference):
    x = uniform(1, (8, 28, 28, 1))
    ours = models.create(name, 10).clone(dropout=0.0)  # dropout off: the reference has none
    variables = jax.jit(ours.init)(jax.random.PRNGKey(0), x)
    reference = reference()
    reference_shapes = jax.eval_shape(reference.init, jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference_shapes)
    ours_train, ours_stats = jitted(ours, train=True, mutable=["batch_stats"])(variables, x)
    ref_train, ref_stats = jitted(reference, train=True, mutable=["batch_stats"])(variables, x)
    np.testing.assert_allclose(ours_train, ref_train, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(ours_stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    updated = {"params": variables["params"], **ref_stats}
    np.testing.assert_allclose(jitted(ours)(updated, x), jitted(reference)(updated, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (16, 7)])
def test_batch_norm_matches_flax_batch_norm_with_gradients(shape):
    x = 2.0 + 3.0 * normal(0, shape)  # mean and scale far from 0 and 1, so the statistics matter
    ours, reference = models.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False,
                                                                                  momentum=0.9)
    variables = reference.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, variables)
    c = shape[-1]
    variables = {"params": {"scale": 1 + normal(1, (c,)), "bias": normal(2, (c,))},
                 "batch_stats": {"mean": normal(3, (c,)), "var": 1 + uniform(4, (c,))}}
    weights = normal(5, shape)

    def loss(module, params, x):
        y, stats = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                mutable=["batch_stats"])
        return jnp.sum(y * weights), (y, stats)

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1),
                                                        has_aux=True))(variables["params"], x)
    (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(functools.partial(loss, reference), argnums=(0, 1),
                                                            has_aux=True)(variables["params"], x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves((stats, grads)), jax.tree.leaves((stats_ref, grads_ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    inference, inference_ref = models.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True)
    np.testing.assert_allclose(inference.apply(variables, x), inference_ref.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_bn_model_dropout_depends_only_on_its_key():
    x = uniform(1, (8, 28, 28, 1))
    model = models.create("bn", 10)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

    @jax.jit
    def run(seed):
        return model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(seed)},
                           mutable=["batch_stats"])[0]

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))
    @jax.jit
    def infer(seed):
        return model.apply(variables, x, rngs={"dropout": jax.random.PRNGKey(seed)})

    np.testing.assert_array_equal(infer(0), infer(1))  # inference: no dropout, whatever the key


@pytest.mark.parametrize("partitionable", [True, False])  # True: JAX's default, what training uses
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.4, 1.0])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (5, 7), (3,)])
def test_dropout_masks_exactly_as_flax_does(shape, rate, partitionable):
    with jax.threefry_partitionable(partitionable):
        check_dropout_against_flax(shape, rate)


def check_dropout_against_flax(shape, rate):
    x = uniform(0, shape) + 0.5
    rngs = {"dropout": jax.random.PRNGKey(3)}

    @jax.jit
    def both(x):
        reference = nn.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs)
        return (models.Dropout(rate).apply({}, x, rngs=rngs), reference,
                jax.grad(lambda v: jnp.sum(models.Dropout(rate).apply({}, v, rngs=rngs)))(x))

    ours, reference, grad = both(x)
    np.testing.assert_array_equal(ours, reference)
    assert np.isfinite(grad).all()
    if 0 < rate < 1 and len(shape) == 4:
        assert 0 < np.mean(ours == 0) < 1  # some, not all, dropped
    np.testing.assert_array_equal(models.Dropout(rate, deterministic=True).apply({}, x), x)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 11, 11, 2), (3, 5, 6, 1)])
def test_max_pool_gradient_matches_flax_with_ties(shape):
    # Integers from {0, 1, 2} tie often inside a window; the gradient must go to the first maximum, as
    # nn.max_pool's (select-and-scatter) does, and never be split or duplicated.
    x = np.random.default_rng(0).integers(0, 3, shape).astype(np.float32)
    weights = normal(1, models.max_pool(x).shape)
    ours = jax.grad(lambda v: jnp.sum(models.max_pool(v) * weights))(x)
    reference = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), (2, 2)) * weights))(x)
    np.testing.assert_array_equal(ours, reference)
    assert float(jnp.sum(ours)) == pytest.approx(float(jnp.sum(weights)), rel=1e-5)


def test_space_to_depth_orders_channels_row_column_channel():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    reference = jnp.concatenate([x[:, i::2, j::2, :] for i in range(2) for j in range(2)], axis=-1)
    np.testing.assert_array_equal(models.space_to_depth(x), reference)
    with pytest.raises(ValueError, match="divisible by 2; got 5x6"):
        models.space_to_depth(jnp.zeros((1, 5, 6, 1)))


class ReferenceSpaceToDepthCNN(nn.Module):
    """The "s2d" models with plain flax layers, the first convolution written as the 6x6 stride-2 convolution
    that space-to-depth + 3x3 amounts to (kernel rearranged from the 3x3x4 one)."""

    convs: tuple[int, int]

    @nn.compact
    def __call__(self, x, train=False):
        c1, c2 = self.convs
        kernel = self.param("kernel1", nn.initializers.zeros_init(), (3, 3, 4, c1))
        bias = self.param("bias1", nn.initializers.zeros_init(), (c1,))
        # (a, b, (di, dj)) -> (2a + di, 2b + dj): the 6x6 kernel over original pixels.
        big = kernel.reshape(3, 3, 2, 2, c1).transpose(0, 2, 1, 3, 4).reshape(6, 6, 1, c1)
        x = jax.lax.conv_general_dilated(x, big, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = nn.relu(x + bias)
        x = nn.max_pool(nn.relu(nn.Conv(c2, (3, 3), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256, name="dense1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="dense2")(x)


@pytest.mark.parametrize(("name", "convs"), [("s2d", (32, 32)), ("s2d16", (16, 32))])
def test_space_to_depth_model_matches_a_strided_convolution(name, convs):
    x = uniform(1, (4, 28, 28, 1))
    ours = models.create(name, 10)
    params = jax.jit(ours.init)(jax.random.PRNGKey(0), x)["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 4, convs[0])
    reference_params = {"kernel1": params["conv1"]["kernel"], "bias1": params["conv1"]["bias"],
                        **{k: params[k] for k in ("conv2", "dense1", "dense2")}}
    expected = jitted(ReferenceSpaceToDepthCNN(convs))({"params": reference_params}, x)
    for train in (True, False):
        np.testing.assert_allclose(jitted(ours, train=train)({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def test_max_pool_forward_mode_matches_flax():
    x = normal(0, (2, 9, 8, 3))
    tangent = normal(1, x.shape)
    ours = jax.jvp(models.max_pool, (x,), (tangent,))
    reference = jax.jvp(lambda v: nn.max_pool(v, (2, 2), (2, 2)), (x,), (tangent,))
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_models_keep_float32_parameters_under_x64(tiny_config):
    """Under jax_enable_x64 the package's Conv and BatchNorm made float64 parameters, and every registered model
    failed at its first convolution (float32 images, float64 kernel)."""
    config = tiny_config.replace(augment="affine")
    batch = {"image": np.zeros((4, 28, 28, 1), np.uint8), "label": np.arange(4)}
    with jax.enable_x64(True):  # "bn" has both layers that make parameters of their own, Conv and BatchNorm
        state = create_train_state(config, models.create("bn", 10), (28, 28, 1), optax.adam(1e-3))
        assert {a.dtype for a in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
        state, sums = train_step(state, batch)
        assert {a.dtype for a in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
        assert float(sums["loss"]) == pytest.approx(4 * np.log(10), rel=1e-5)  # zero images: uniform
