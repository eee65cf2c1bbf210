"""Flax CNNs mapping images (N, H, W, C) float32 in [0, 1] to logits (N, num_classes), and a registry by name.

Convolutions are computed as im2col (the k*k shifted slices concatenated along channels, then one 2-D
matmul; the seed CNN's second one by Winograd's minimal filtering instead) and max-pooling as crop +
reshape + max: on XLA:CPU these are several times faster than `nn.Conv` and `nn.max_pool` (whose
gradient, select-and-scatter, is the slowest op there) and they stay fast inside `lax.scan`. Parameters
are laid out exactly as `nn.Conv`'s, so results match it. Batch norm has its training gradient written
out (`BatchNorm`), with `nn.BatchNorm`'s variables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

# The seed project was Keras: glorot-uniform kernels and zero biases.
KERAS_INIT: Initializer = nn.initializers.glorot_uniform()


class Conv(nn.Module):
    """Square convolution, NHWC, the same stride along both axes; kernel (k, k, Cin, features) as in `nn.Conv`.

    Training uses im2col or Winograd (`patches`), whose gradients are fast on XLA:CPU inside `lax.scan`;
    inference (`train=False`) uses XLA's own convolution, whose forward pass is about 3x faster there. All
    give the same numbers up to float32 rounding.
    """

    features: int
    kernel_size: int = 3
    padding: str = "VALID"  # "VALID" or "SAME" (as lax: ceil(H / strides) outputs, any odd padding at the end)
    strides: int = 1
    kernel_init: Initializer = KERAS_INIT
    use_bias: bool = True  # False before a batch norm, whose own shift replaces it
    # How the matmul sees the k x k windows; the same numbers up to float32 summation order, different speed:
    # "full": the k * k shifted slices concatenated along channels, one (rows, k*k*Cin) x (k*k*Cin, features) matmul.
    # "by_rows": the same patches built in two steps (the k column shifts, then the k row shifts of those).
    # "columns": only the k column shifts, (rows, k*Cin), times all k kernel rows at once, (k*Cin, k*features);
    #   then each output row sums its k shifted input rows' products. No k*k-wide patches in either direction
    #   (nor their gradient's k*k-way sum), for (out_rows + k - 1) / out_rows times the matmul FLOPs at stride 1.
    # "winograd": no patches; 3x3 at stride 1 only, by Winograd's F(2x2, 3x3) (`winograd_conv3x3`): 2.25x fewer
    #   multiplications at even output sides, equal to the others up to float32 rounding (~1e-6 of the largest output).
    # On XLA:CPU "by_rows" made the seed CNN's training step ~8% faster than "full" and the "bn" model's ~15%
    # slower; "columns" made the steps of "s2d16" (second convolution) and "bn" (all but the first) ~10-16% faster
    # and the seed CNN's no faster than "by_rows" (AVX2 machine, 2026-12-02).
    patches: str = "full"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if self.patches not in ("full", "by_rows", "columns", "winograd"):
            raise ValueError(f"Conv.patches must be 'full', 'by_rows', 'columns' or 'winograd'; got {self.patches!r}")
        if self.padding not in ("VALID", "SAME"):  # lax takes "same" too: training and inference would differ
            raise ValueError(f"Conv.padding must be 'VALID' or 'SAME'; got {self.padding!r}")
        k, s, cin = self.kernel_size, self.strides, x.shape[-1]
        if self.patches == "winograd" and (k, s) != (3, 1):
            raise ValueError(f"Conv.patches='winograd' needs kernel_size 3 and strides 1; got {k} and {s}")
        # float32 as nn.Conv's, also where jax_enable_x64 makes the initializers' default float64.
        kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else 0.0
        if not train:
            return jax.lax.conv_general_dilated(x, kernel, (s, s), self.padding,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
        if self.padding == "SAME":
            pads = [max((-(-side // s) - 1) * s + k - side, 0) for side in x.shape[1:3]]
            x = jnp.pad(x, ((0, 0), *((p // 2, p - p // 2) for p in pads), (0, 0)))
        if self.patches == "winograd":
            return winograd_conv3x3(x, kernel) + bias
        n, h, w, _ = x.shape
        oh, ow = (h - k) // s + 1, (w - k) // s + 1
        # Window offset i spans input rows i, i + s, ..., i + s * (oh - 1); the same for columns.
        span_h, span_w = s * (oh - 1) + 1, s * (ow - 1) + 1
        if self.patches == "columns":
            rows = jnp.concatenate([x[:, :, j:j + span_w:s, :] for j in range(k)], axis=-1)  # (N, H, OW, (dj, c))
            # Column block i of the weights is kernel row i.
            weights = kernel.reshape(k, k * cin, self.features).transpose(1, 0, 2).reshape(k * cin, k * self.features)
            products = (rows.reshape(n * h * ow, k * cin) @ weights).reshape(n, h, ow, k, self.features)
            # Split first: the gradient then stacks the k shifted copies of the output gradient (a split's transpose
            # is a concatenation). Sliced straight from `products`, the transpose summed k zero-padded copies of
            # the whole product array, which was the slowest op of the "bn" model's step; split, training steps
            # took 81.6 instead of 93.3 ms ("bn", batch 128), 10.2 instead of 11.5 ("fast", 256), 126.6 instead of
            # 137.5 ("strided", 128) on an Intel Xeon machine, 2026-12-03.
            parts = jnp.split(products, k, axis=3)
            y = parts[0][:, :span_h:s, :, 0, :]
            for i in range(1, k):
                y = y + parts[i][:, i:i + span_h:s, :, 0, :]
            return y + bias
        # Feature order (di, dj, c) matches kernel.reshape(k * k * cin, features).
        if self.patches == "by_rows":
            rows = jnp.concatenate([x[:, :, j:j + span_w:s, :] for j in range(k)], axis=-1)
            patches = jnp.concatenate([rows[:, i:i + span_h:s] for i in range(k)], axis=-1)
        else:
            patches = jnp.concatenate([x[:, i:i + span_h:s, j:j + span_w:s, :] for i in range(k) for j in range(k)],
                                      axis=-1)
        y = patches.reshape(n * oh * ow, k * k * cin) @ kernel.reshape(k * k * cin, self.features)
        return y.reshape(n, oh, ow, self.features) + bias


# Winograd's F(2x2, 3x3) (Lavin and Gray, 2016): a 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A for the 3x3
# kernel g and the 4x4 input tile d around it. G transforms the kernel; B^T and A^T are written out below.
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def _winograd_input(x: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
    """B^T along `axis` (2 * tiles + 2 entries long): 4 arrays with `tiles` entries there, one per row of B^T."""
    pairs = x.reshape(*x.shape[:axis], tiles + 1, 2, *x.shape[axis + 1:])  # tile t's rows are pairs t and t + 1

    def row(pair: int, parity: int) -> jax.Array:  # one slice: its transpose in the gradient is one pad
        return pairs[(slice(None),) * axis + (slice(pair, pair + tiles), parity)]

    d0, d1, d2, d3 = row(0, 0), row(0, 1), row(1, 0), row(1, 1)
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID, stride-1 3x3 convolution by Winograd's F(2x2, 3x3): 16 matmuls (N*T, Cin) x (Cin, F) over the T
    2x2 output tiles, against im2col's one (N*OH*OW, 9*Cin) x (9*Cin, F): 2.25x fewer multiplications when the
    output sides are even, and no patches.

    Args:
      x: float32 (N, H, W, Cin), H and W >= 3.
      kernel: float32 (3, 3, Cin, F), laid out as `nn.Conv`'s.
    Returns:
      float32 (N, H - 2, W - 2, F), equal to `lax.conv_general_dilated(..., "VALID")` up to float32 rounding
      (~1e-6 of the largest output).
    """
    n, h, w, cin = x.shape
    features = kernel.shape[-1]
    tiles_h, tiles_w = -(-(h - 2) // 2), -(-(w - 2) // 2)
    # An odd output side gets one extra row (column) of zeros in, whose outputs are cropped at the end.
    x = jnp.pad(x, ((0, 0), (0, 2 * tiles_h + 2 - h), (0, 2 * tiles_w + 2 - w), (0, 0)))
    tiles = [t for rows in _winograd_input(x, 1, tiles_h) for t in _winograd_input(rows, 2, tiles_w)]
    u = jnp.einsum("ai,ijcf,bj->abcf", _WINOGRAD_G, kernel, _WINOGRAD_G).reshape(16, cin, features)
    # Separate 2-D matmuls: one batched dot_general of the 16 made the seed CNN's training step ~1.5x slower (XLA:CPU,
    # AVX-512 machine, 2026-12-04, one process alternating the two).
    m = [(t.reshape(-1, cin) @ u[i]).reshape(n, tiles_h, tiles_w, features) for i, t in enumerate(tiles)]
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] along rows (m[4 * a + b]: row a, column b of the 4x4 tile), then columns.
    rows = [[m[b] + m[4 + b] + m[8 + b] for b in range(4)], [m[4 + b] - m[8 + b] - m[12 + b] for b in range(4)]]
    out = [jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=3) for r in rows]  # each (N, Th, Tw, 2, F)
    y = jnp.stack(out, axis=2).reshape(n, 2 * tiles_h, 2 * tiles_w, features)
    return y[:, :h - 2, :w - 2]


def _pool_windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def max_pool(x: jax.Array) -> jax.Array:
    """2x2 non-overlapping max-pool of NHWC `x`, odd edges dropped: `nn.max_pool(x, (2, 2), (2, 2))`, derivative
    included (each window's output follows its first maximum, in row-major order).

    The derivative is written out because `jnp.max`'s own splits it between tied maxima, which costs a
    count of the ties per window: on XLA:CPU a reduction as slow as the forward pass. It is a JVP, so
    JAX's transpose gives the gradient and forward-mode (`jax.jvp`, `jax.hessian`) works too.
    """
    return _pool_windows(x).max(axis=(2, 4))


@max_pool.defjvp
def _max_pool_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    y = max_pool(x)
    windows = _pool_windows(x)
    # Each window's first maximum as one int8 index (row-major, 0-3), compared with each element's position.
    # A mask stacked from per-position "equal and none before" tests made XLA:CPU rebuild that chain for every
    # element of the gradient: the seed CNN's training step ran ~5-10% slower (AVX2 machine, 2026-12-02).
    first = jnp.where(windows[:, :, 0, :, 0] == y, 0,
                      jnp.where(windows[:, :, 0, :, 1] == y, 1, jnp.where(windows[:, :, 1, :, 0] == y, 2, 3)))
    position = jnp.arange(4, dtype=jnp.int8).reshape(2, 1, 2, 1)
    taken = first.astype(jnp.int8)[:, :, None, :, None, :] == position  # (N, H/2, 2, W/2, 2, C)
    # One masked sum, so that its transpose (the gradient) is one masked broadcast.
    return y, jnp.where(taken, _pool_windows(dx), 0.0).sum(axis=(2, 4))


class Dropout(nn.Module):
    """`nn.Dropout` without broadcast dimensions, `deterministic` set at construction only, and its mask drawn as
    one flat vector and reshaped: the same mask bit for bit, since Threefry's numbers depend only on each
    element's flat index; but on XLA:CPU a many-axis draw such as (128, 12, 12, 32) compiles slowly, and drawn
    flat the "bn" model's training epoch compiled in 7.4 s instead of 11.2 s. Needs a 'dropout' RNG unless
    `deterministic`."""

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate == 0.0 or self.deterministic:
            return x
        if self.rate == 1.0:  # as nn.Dropout: x / 0 would make the gradient NaN
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (x.size,)).reshape(x.shape)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


def used_extent(side: int, convs: Sequence[tuple[int, int]]) -> int:
    """How many of `side` input rows (or columns) reach the output of a stack of (features, k) VALID k x k
    convolutions, each followed by a 2x2 max-pool that drops an odd last row and column."""
    for _, k in convs:
        side = (side - k + 1) // 2
    for _, k in reversed(convs):
        side = 2 * side + k - 1
    return side


class CNN(nn.Module):
    """Per entry (features, kernel size) of `convs`: a VALID convolution, ReLU and 2x2 max-pool; then a
    ReLU dense layer of `dense` units and the `num_classes` logits.

    Input rows and columns that no output depends on are cropped first (the seed CNN's last 2 of 28: its
    pools drop the odd last row and column of 26 and of 11), so no convolution computes values that a pool
    throws away: 16% fewer FLOPs per image, the same logits and gradients.
    """

    convs: Sequence[tuple[int, int]] = ((32, 3), (64, 3))
    dense: int = 128
    patches: Sequence[str] = ("by_rows", "by_rows")  # each convolution's `Conv.patches`
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x[:, :used_extent(x.shape[1], self.convs), :used_extent(x.shape[2], self.convs)]
        for i, ((features, kernel_size), patches) in enumerate(zip(self.convs, self.patches, strict=True), 1):
            x = max_pool(nn.relu(Conv(features, kernel_size, patches=patches, name=f"conv{i}")(x, train)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.dense, kernel_init=KERAS_INIT, name="dense1")(x))
        return nn.Dense(self.num_classes, kernel_init=KERAS_INIT, name="dense2")(x)


class BNCNN(nn.Module):
    """Per entry of `blocks`: two 3x3 VALID convolutions, each with batch norm and ReLU, then a 2x2 max-pool
    and dropout; then a dense layer with batch norm, ReLU and dropout, and the `num_classes` logits.

    Batch statistics live in the 'batch_stats' collection (TrainState.model_state); `train=True` needs a
    'dropout' RNG when `dropout` > 0.
    """

    blocks: Sequence[int] = (32, 64)
    dense: int = 256
    dropout: float = 0.25
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, features in enumerate(self.blocks, 1):
            for j in (1, 2):
                # "columns" made the training step ~10-16% faster (AVX2 machine, 2026-12-02), except on the
                # one-channel image, where its matmul would have 3 inputs and 3x the outputs.
                patches = "full" if (i, j) == (1, 1) else "columns"
                x = _conv_bn_relu(x, train, f"{i}_{j}", features, 3, patches=patches)
            x = Dropout(self.dropout, deterministic=not train)(max_pool(x))
        return _dense_head(x, train, self.dense, self.dropout, self.num_classes)


class StridedCNN(nn.Module):
    """No pooling, the layout of a well-known Kaggle MNIST ensemble (C. Deotte, 2018): per entry of `blocks`, two
    3x3 VALID convolutions and a 5x5 stride-2 SAME one, each with batch norm and ReLU, then dropout; the strided
    convolution halves the resolution where a pool would, with weights (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4).
    Then a dense layer (the original's 4x4 VALID convolution) with batch norm, ReLU and dropout, and the logits.

    Variables and RNGs as `BNCNN`'s.
    """

    blocks: Sequence[int] = (32, 64)
    dense: int = 128
    dropout: float = 0.4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, features in enumerate(self.blocks, 1):
            # "columns" as in BNCNN: ~10% faster training steps (AVX2 machine, 2026-12-02); not for the strided
            # convolution, whose column products would be computed for every input row, twice the rows it needs.
            x = _conv_bn_relu(x, train, f"{i}_1", features, 3, patches="full" if i == 1 else "columns")
            x = _conv_bn_relu(x, train, f"{i}_2", features, 3, patches="columns")
            x = _conv_bn_relu(x, train, f"{i}_3", features, 5, padding="SAME", strides=2)
            x = Dropout(self.dropout, deterministic=not train)(x)
        return _dense_head(x, train, self.dense, self.dropout, self.num_classes)


class BatchNorm(nn.Module):
    """(..., C) float32 -> the same shape: `nn.BatchNorm(momentum=0.9)` over every axis but the last, with the
    same variables (params 'scale' and 'bias', batch_stats 'mean' and 'var') and the same numbers up to float32
    rounding. In training its gradient is written out, two sums and one elementwise pass; autodiff of
    `nn.BatchNorm` made XLA:CPU run three sums and several elementwise passes, and training steps took 75.9
    instead of 81.3 ms ("bn") and 118.6 instead of 126.7 ms ("strided"; Intel Xeon machine, 2026-12-03).
    That gradient is a `jax.custom_vjp`: reverse mode (`jax.grad`, `jax.hessian`) works through a training-mode
    model, forward mode alone (`jax.jvp`) does not."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)  # float32 under x64 too, as Conv
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        if self.use_running_average:
            return (x - mean.value) * (scale * jax.lax.rsqrt(var.value + self.epsilon)) + bias
        y, batch_mean, batch_var = _batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            mean.value = self.momentum * mean.value + (1 - self.momentum) * jax.lax.stop_gradient(batch_mean)
            var.value = self.momentum * var.value + (1 - self.momentum) * jax.lax.stop_gradient(batch_var)
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                      epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> tuple[Any, Any]:
    axes = tuple(range(x.ndim - 1))
    mean, mean_sq = x.mean(axes), jnp.square(x).mean(axes)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)  # as nn.BatchNorm: E[x^2] - E[x]^2, clipped at 0
    inv = jax.lax.rsqrt(var + epsilon)
    return ((x - mean) * (scale * inv) + bias, mean, var), (x, mean, inv, scale)


def _batch_norm_train_bwd(epsilon: float, residuals: Any, cotangents: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    # Only y's cotangent matters: the batch statistics feed the running averages, never the loss.
    x, mean, inv, scale = residuals
    g = cotangents[0]
    axes = tuple(range(x.ndim - 1))
    rows = x.size // x.shape[-1]
    g_sum = g.sum(axes)
    g_xhat_sum = inv * ((g * x).sum(axes) - mean * g_sum)  # sum of g * (x - mean) * inv
    a = scale * inv
    dx = a * g - (a * inv * g_xhat_sum / rows) * (x - mean) - a * g_sum / rows
    return dx, g_xhat_sum, g_sum


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _batch_norm(train: bool, name: str) -> BatchNorm:
    return BatchNorm(use_running_average=not train, name=name)


def _conv_bn_relu(x: jax.Array, train: bool, suffix: str, features: int, kernel_size: int, padding: str = "VALID",
                  strides: int = 1, patches: str = "full") -> jax.Array:
    # Called inside a compact module's __call__: the layers (conv{suffix}, bn{suffix}) become that module's.
    y = Conv(features, kernel_size, padding, strides, use_bias=False, patches=patches, name=f"conv{suffix}")(x, train)
    return nn.relu(_batch_norm(train, f"bn{suffix}")(y))


def _dense_head(x: jax.Array, train: bool, dense: int, dropout: float, num_classes: int) -> jax.Array:
    x = nn.Dense(dense, use_bias=False, name="dense1")(x.reshape(x.shape[0], -1))
    x = nn.relu(_batch_norm(train, "bn_dense")(x))
    x = Dropout(dropout, deterministic=not train)(x)
    return nn.Dense(num_classes, name="dense2")(x)


def space_to_depth(x: jax.Array, block: int = 2) -> jax.Array:
    """(N, H, W, C) -> (N, H / block, W / block, block * block * C): each block x block patch of pixels becomes
    one pixel whose channels are ordered (row in patch, column in patch, c). H and W must divide by `block`."""
    n, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f"space_to_depth needs image sides divisible by {block}; got {h}x{w}")
    x = x.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // block, w // block, block * block * c)


class SpaceToDepthCNN(nn.Module):
    """For speed: 2x2 space-to-depth (28x28x1 -> 14x14x4), then two ReLU 3x3 VALID convolutions of `convs`
    features (14 -> 12 -> 10), one 2x2 max-pool, a ReLU dense layer of `dense` units and the logits.

    The first convolution sees every pixel at half resolution (like a 6x6 stride-2 convolution), so no
    full-resolution activations are made: on XLA:CPU those, not the matmuls, were most of the time of
    the 5x5-conv-and-pool layout of "fast".
    """

    convs: tuple[int, int] = (32, 32)
    dense: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(Conv(self.convs[0], 3, name="conv1")(space_to_depth(x), train))
        x = max_pool(nn.relu(Conv(self.convs[1], 3, patches="columns", name="conv2")(x, train)))
        x = nn.relu(nn.Dense(self.dense, kernel_init=KERAS_INIT, name="dense1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, kernel_init=KERAS_INIT, name="dense2")(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    # The seed project's CNN: conv32 3x3 -> pool -> conv64 3x3 -> pool -> dense128 -> dense.
    # Winograd for its second convolution: the compiled epoch 1.09x faster on average (0.93-1.21x in 4 pairs of
    # alternating processes), the per-step path 1.02-1.25x (AVX-512 machine, 2026-12-04). Not for the first: on the
    # one-channel image each of its 16 matmuls would have one input.
    "seed": functools.partial(CNN, convs=((32, 3), (64, 3)), dense=128, patches=("by_rows", "winograd")),
    # The layout of a well-known fast PyTorch MNIST recipe, about half the seed's FLOPs.
    "fast": functools.partial(CNN, convs=((24, 5), (32, 3)), dense=256),
    # Space-to-depth, then two 3x3 convs at half resolution. The fast preset's until 2026-12-02; kept so that
    # runs made with it still restore.
    "s2d": functools.partial(SpaceToDepthCNN, convs=(32, 32), dense=256),
    # Time to 99%: "s2d" with a 16-feature first conv, as accurate and ~1.7x faster to train; the fast preset's.
    "s2d16": functools.partial(SpaceToDepthCNN, convs=(16, 32), dense=256),
    # For accuracy: 2 x (conv-BN-ReLU x2, pool, dropout) with 32 then 64 channels, dense 256; ~4x the seed's FLOPs.
    "bn": functools.partial(BNCNN, blocks=(32, 64), dense=256, dropout=0.25),
    # For ensembles: 2 x (conv-BN-ReLU 3x3, 3x3, 5x5 stride 2; dropout), dense 128, dropout 0.4; no pooling.
    "strided": functools.partial(StridedCNN, blocks=(32, 64), dense=128, dropout=0.4),
}


def create(name: str, num_classes: int) -> nn.Module:
    """Returns the registered model `name` with `num_classes` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes)
