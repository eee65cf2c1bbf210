"""Train state, the pure train step, on-device epochs and evaluation, and `train_and_evaluate`.

Randomness never comes from a global generator: every draw is `fold_in` of the state's key with a
stream id and a counter (epoch for the data order, step for dropout), so a resumed run draws the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from digits_jax import augment, checkpoint, data, metrics, models, optim, parallel, progress
from digits_jax.config import Config

Batch = dict[str, jax.Array]  # {'image': (B, H, W, C) uint8, 'label': (B,) int32}
SHUFFLE_STREAM, STEP_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """What `train_step` does beyond the plain loss: static, so each setting compiles its own step."""

    label_smoothing: float = 0.0  # see Config.label_smoothing
    ema_decay: float = 0.0  # see Config.ema_decay; 0 keeps no average
    augment: augment.Augment = augment.Augment.none()  # random transforms of each training image


class TrainState(train_state.TrainState):
    """Flax TrainState plus what exact resume needs; the whole pytree is what gets checkpointed.

    Attributes beyond flax's (step, params, opt_state):
      epoch: int32 scalar, completed epochs.
      rng: uint32 (2,) key; per-epoch and per-step keys are folded from it.
      model_state: non-parameter variable collections (e.g. batch statistics); empty for the seed CNN.
      ema_params: the moving average of params when options.ema_decay > 0, else None.
      options: TrainOptions (static, not checkpointed: `train_options(config, epoch)` gives each epoch's).
    """

    epoch: jax.Array
    rng: jax.Array
    model_state: dict[str, Any] = struct.field(default_factory=dict)
    ema_params: Any = None
    options: TrainOptions = struct.field(pytree_node=False, default=TrainOptions())

    @property
    def variables(self) -> dict[str, Any]:
        """What evaluation applies: the moving average of the parameters when one is kept."""
        params = self.params if self.ema_params is None else self.ema_params
        return {"params": params, **self.model_state}


def create_train_state(config: Config, model: nn.Module, image_shape: tuple[int, ...],
                       tx: optax.GradientTransformation) -> TrainState:
    """A fresh TrainState for `model`.

    Args:
      config: its `seed` draws the initial parameters and the state's RNG key.
      model: a Flax module called as model(x, train=...) on float32 (B, H, W, C) -> (B, classes) logits.
      image_shape: (H, W, C) of one example.
      tx: the optax transformation.
    Returns:
      TrainState with step and epoch int32 scalars at 0, rng a uint32 (2,) key, model_state the module's
      non-parameter collections, options those of epoch 0 (a loop of your own replaces them with each epoch's
      `train_options` when `config.clean_epochs` is set).
    """
    if np.ndim(image_shape) != 1 or len(image_shape) != 3:
        raise ValueError(f"image_shape = {image_shape!r}: give (height, width, channels), e.g. (28, 28, 1)")
    try:
        logits, variables, rng = _init_variables(model, jax.random.PRNGKey(config.seed), tuple(image_shape))
    except ZeroDivisionError:  # what Flax's initializers raise for a layer whose input has no elements
        raise ValueError(f"{type(model).__name__} cannot take images of {tuple(image_shape)} (height, width, "
                         "channels): its convolutions and pools leave nothing of them; give larger images or another "
                         "model") from None
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != 1:
        # e.g. a convolutional head not flattened, or reshaped to (-1, classes): the loss fails deep in JAX
        given = f"logits of shape {shape}" if shape is not None else f"a {type(logits).__name__}"
        raise ValueError(f"the model gives {given} for a batch of 1 image: give a model that returns (batch, "
                         "num_classes) logits (flatten its last features)")
    if logits.shape[-1] != config.num_classes:  # the loss would ignore the classes beyond it, or miscount
        raise ValueError(f"the model gives {logits.shape[-1]} logits per image, config.num_classes is "
                         f"{config.num_classes}: give a model with one output per class, or set num_classes")
    params = variables.pop("params")
    opt_state, ema_params = _init_optimizer(tx, params, bool(config.ema_decay))
    # Counters from NumPy: made with jnp, each would be one more small compile at start-up.
    return TrainState(step=jnp.asarray(np.zeros((), np.int32)), apply_fn=model.apply, params=params, tx=tx,
                      opt_state=opt_state, epoch=jnp.asarray(np.zeros((), np.int32)), rng=rng, model_state=variables,
                      options=train_options(config, 0), ema_params=ema_params)


def train_options(config: Config, epoch: int) -> TrainOptions:
    """What `train_step` does in epoch `epoch` (0-based) of a run of `config`: augmentation, unless the epoch is
    one of the last `config.clean_epochs`."""
    clean = epoch >= config.epochs - config.clean_epochs
    return TrainOptions(label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
                        augment=augment.Augment.none() if clean else augment.PRESETS[config.augment])


# Start-up is dominated by compiles: run op by op, each distinct operation and shape compiles a small program
# (~20 ms each; ~2.5 s in all for the model's random initialisation). So initialisation is one program per
# (model, image shape), shared by every call, and the optimizer's is one program per call.
@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def _init_variables(model: nn.Module, key: jax.Array,
                    image_shape: tuple[int, ...]) -> tuple[jax.Array, dict[str, Any], jax.Array]:
    init_key, rng = jax.random.split(key)
    logits, variables = model.init_with_output(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return logits, dict(variables), rng


def _init_optimizer(tx: optax.GradientTransformation, params: Any, ema: bool) -> tuple[Any, Any]:
    return jax.jit(lambda p: (tx.init(p), jax.tree.map(jnp.copy, p) if ema else None))(params)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (B, H, W, C) -> float32 in [0, 1]. Raises ValueError for any other dtype (checked when traced)."""
    # Images already scaled to [0, 1] would be divided by 255 again and train or score near chance, silently.
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 pixels 0-255 (as data.load gives them), got {images.dtype}: "
                         "convert with (x * 255).round().astype(np.uint8) if they were scaled to [0, 1]")
    return images.astype(jnp.float32) / 255.0


def _logits(state: TrainState, params: Any, x: jax.Array, train: bool,
            key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    variables = {"params": params, **state.model_state}
    rngs = {"dropout": key} if key is not None else {}
    if train and state.model_state:
        return state.apply_fn(variables, x, train=True, rngs=rngs, mutable=list(state.model_state))
    return state.apply_fn(variables, x, train=train, rngs=rngs), state.model_state


@jax.jit
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, metrics.Metrics]:
    """One optimizer step on a batch; pure and jitted.

    Args:
      state: TrainState.
      batch: {'image': (B, H, W, C) uint8, 'label': (B,) int32 in [0, num_classes): not checked here, being traced
        (a label outside gets an all-zero target); `data.check_split` checks them.
    Returns:
      (new state, metric sums for the batch: 'loss', 'correct', 'count' (see `metrics.compute`), 'steps' (1)
      and 'nonfinite' (1 if the loss was NaN or Inf)).
    """
    data.check_split(batch, "train_step()'s batch")  # at trace time: (B, 1) labels would broadcast in the loss
    step_key = jax.random.fold_in(jax.random.fold_in(state.rng, STEP_STREAM), state.step)
    dropout_key, augment_key = jax.random.split(step_key)
    options = state.options
    images = augment.apply(options.augment, augment_key, preprocess(batch["image"]))

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict[str, Any]]]:
        logits, model_state = _logits(state, params, images, train=True, key=dropout_key)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), options.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        return losses.mean(), (losses, logits, model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (losses, logits, model_state)), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads, model_state=model_state)
    if options.ema_decay:
        # Early on the average would mostly remember the random init; (1 + t) / (10 + t) caps its memory.
        decay = jnp.minimum(options.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        state = state.replace(ema_params=optax.incremental_update(state.params, state.ema_params, 1.0 - decay))
    batch_metrics = metrics.batch(losses, logits, batch["label"])
    del batch_metrics["confusion"]  # Training reports none; XLA then drops its computation.
    batch_metrics |= {"nonfinite": jnp.sum(~jnp.isfinite(losses.mean())), "steps": jnp.ones((), jnp.int32)}
    return state, batch_metrics


def _steps_per_epoch(n: int, batch_size: int, what: str = "batch_size") -> int:
    """n // batch_size, or ValueError where that is no step at all (an epoch that trains nothing)."""
    _check_batch_size(batch_size)
    if n < batch_size:
        raise ValueError(f"{what} ({batch_size}) is larger than the training split ({n} images): lower it or use "
                         "more data")
    return n // batch_size


def epoch_order(rng: jax.Array, epoch: jax.Array | int, n: int, batch_size: int) -> jax.Array:
    """The example indices of each step of `epoch`: (n // batch_size, batch_size) int32, a fresh shuffle per
    epoch drawn from (rng, epoch) alone, so a resumed run sees the same order."""
    key = jax.random.fold_in(jax.random.fold_in(rng, SHUFFLE_STREAM), epoch)
    steps = _steps_per_epoch(n, batch_size)
    return jax.random.permutation(key, n)[:steps * batch_size].reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size", "mesh"), donate_argnums=0)
def train_epoch(state: TrainState, train_data: Batch, batch_size: int,
                mesh: jax.sharding.Mesh | None = None) -> tuple[TrainState, metrics.Metrics]:
    """One shuffled pass over `train_data` as one compiled program; the incomplete last batch is skipped.

    Args:
      state: TrainState (donated: do not use it after the call).
      train_data: {'image': (N, H, W, C) uint8, 'label': (N,) int32}, resident on the device (on every
        device of `mesh`: `parallel.put(data, parallel.replicated(mesh))`).
      batch_size: examples per step (global); N // batch_size steps are taken.
      mesh: a `parallel.make_mesh` mesh: each step's batch is split over its devices; None: one device.
    Returns:
      (state after the epoch, metric sums over the epoch).
    """
    data.check_split(train_data, "train_epoch()'s train_data")  # at trace time; the gather would clamp indices
    order = epoch_order(state.rng, state.epoch, train_data["label"].shape[0], batch_size)

    def body(state: TrainState, indices: jax.Array) -> tuple[TrainState, metrics.Metrics]:
        batch = jax.tree.map(lambda a: a[indices], train_data)
        if mesh is not None:
            # Every device holds the whole dataset, so each gathers its own slice of the batch locally.
            batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
        return train_step(state, batch)

    state, step_metrics = jax.lax.scan(body, state, order)
    summed = jax.tree.map(lambda m: m.sum(axis=0), step_metrics)
    return state.replace(epoch=state.epoch + 1), summed


def translate(images: jax.Array, dy: int, dx: int) -> jax.Array:
    """(B, H, W, C) images moved down by `dy` and right by `dx` whole pixels, zeros shifted in."""
    _, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)))
    return padded[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def _check_tta_shift(tta_shift: int, size: tuple[int, ...]) -> None:
    """Raises ValueError unless `tta_shift` is a whole number of pixels >= 0 that leaves images of `size` (H, W)
    something to see."""
    if isinstance(tta_shift, bool) or not float(tta_shift).is_integer() or tta_shift < 0:
        raise ValueError(f"tta_shift = {tta_shift!r}: give a whole number of pixels >= 0")
    if tta_shift >= min(size):
        raise ValueError(f"tta_shift = {tta_shift}: images of {size[0]}x{size[1]} pixels shifted so far are blank; "
                         "use a shift of a pixel or two")


def log_probabilities(apply_fn: Callable[..., jax.Array], variables: Any, images: jax.Array,
                      tta_shift: int = 0) -> jax.Array:
    """(B, C) float32 log class probabilities of float (B, H, W, C) images, in inference mode.

    With `tta_shift` > 0 (test-time augmentation), the probabilities are averaged over each image and its
    four copies moved by `tta_shift` pixels up, down, left and right (one model call on a 5x batch).
    """
    _check_tta_shift(tta_shift, images.shape[1:3])
    if not tta_shift:
        return jax.nn.log_softmax(apply_fn(variables, images, train=False))
    s = int(tta_shift)
    views = [images] + [translate(images, dy, dx) for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s))]
    log_p = jax.nn.log_softmax(apply_fn(variables, jnp.concatenate(views), train=False))
    # log(mean(p)) in log space: a probability that underflows to 0 in every view would give log 0 = -inf, and the
    # cross-entropy 0 * -inf = NaN even where the prediction is right.
    return jax.nn.logsumexp(log_p.reshape(len(views), images.shape[0], -1), axis=0) - jnp.log(len(views))


@functools.partial(jax.jit, static_argnames=("apply_fn", "tta_shift"))
def eval_step(apply_fn: Callable[..., jax.Array], variables: Any, batch: Batch, mask: jax.Array | None = None,
              tta_shift: int = 0) -> metrics.Metrics:
    """Metric sums (with the confusion matrix) for one batch; rows where `mask` (B,) bool is False are padding
    (None: every row counts). `apply_fn` is static: pass the same function each call (e.g. `state.apply_fn`), as a new
    lambda compiles the step again.

    `tta_shift`: see `log_probabilities`; the loss is the cross-entropy of the averaged probabilities.
    """
    log_p = log_probabilities(apply_fn, variables, preprocess(batch["image"]), tta_shift)
    losses = optax.softmax_cross_entropy(log_p, jax.nn.one_hot(batch["label"], log_p.shape[-1]))
    return metrics.batch(losses, log_p, batch["label"], mask)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size", "tta_shift", "mesh"))
def _eval_slice(apply_fn: Callable[..., jax.Array], variables: Any, eval_data: Batch, begin: jax.Array,
                count: jax.Array, batch_size: int, tta_shift: int, mesh: jax.sharding.Mesh | None) -> metrics.Metrics:
    """`eval_step` on rows [begin, begin + batch_size) of the first `count` rows of `eval_data` (rows from `count` on
    are padding, masked). A batch that would run past the end of the arrays ends at their end instead, its rows
    before `begin` (counted by the batch before) masked: data of at least one batch is never padded."""
    start = jnp.minimum(begin, eval_data["label"].shape[0] - batch_size)
    batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch_size), eval_data)
    rows = start + jnp.arange(batch_size)
    mask = (rows >= begin) & (rows < count)
    if mesh is not None:
        batch, mask = jax.lax.with_sharding_constraint((batch, mask), parallel.batch_sharding(mesh))
    return eval_step(apply_fn, variables, batch, mask, tta_shift)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}: must be an integer >= 1")


def padded_batches(arrays: dict[str, Any], batch_size: int) -> Iterator[tuple[dict[str, Any], int]]:
    """Consecutive `batch_size`-row slices of equally long (N, ...) arrays, the last one zero-padded so that
    every batch has one compiled shape; yields (batch, number of real rows)."""
    _check_batch_size(batch_size)
    n = len(next(iter(arrays.values())))
    for begin in range(0, n, batch_size):
        batch = {k: v[begin:begin + batch_size] for k, v in arrays.items()}
        size = len(next(iter(batch.values())))
        if size < batch_size:
            batch = {k: jnp.pad(v, [(0, batch_size - size)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
        yield batch, size


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Accuracy (fraction), mean loss, example count and (C, C) confusion (rows true, columns predicted)."""

    accuracy: float
    loss: float
    count: int
    confusion: np.ndarray

    @property
    def per_class_accuracy(self) -> np.ndarray:
        return metrics.per_class_accuracy(self.confusion)


def _eval_arrays(eval_data: dict[str, Any], batch_size: int,
                 mesh: jax.sharding.Mesh | None) -> tuple[dict[str, Any], int]:
    """`eval_data` as `_eval_slice` takes it (padded to at least one batch, on the device or replicated over `mesh`)
    and the batch size rounded up to a multiple of the mesh's device count."""
    n = len(eval_data["label"])
    batch_size = min(batch_size, n)  # a larger batch would only evaluate padding (40,000 rows for 128 images)
    if mesh is not None:
        batch_size = -(-batch_size // mesh.size) * mesh.size  # padding is masked, so any size is exact
    if n < batch_size:  # pad once so that every batch is a full slice of the data
        eval_data = {k: np.pad(np.asarray(v), [(0, batch_size - n)] + [(0, 0)] * (np.ndim(v) - 1))
                     for k, v in eval_data.items()}
    if mesh is None:
        eval_data = jax.device_put(eval_data)  # once, not per batch; device arrays stay where they are
    elif any(getattr(v, "sharding", None) != parallel.replicated(mesh) for v in eval_data.values()):
        eval_data = parallel.put(eval_data, parallel.replicated(mesh))
    return eval_data, batch_size


def evaluate(apply_fn: Callable[..., jax.Array], variables: Any, eval_data: dict[str, Any],
             batch_size: int = 1000, mesh: jax.sharding.Mesh | None = None, tta_shift: int = 0) -> EvalResult:
    """Evaluates every example of `eval_data` on the device, in batches of one compiled shape (see `_eval_slice`).

    Args:
      apply_fn: `model.apply`, called as apply_fn(variables, images, train=False) -> (B, C) logits; part of the
        compiled program's key, so pass the same function each call (`state.apply_fn`), not a new lambda.
      variables: {'params': ..., other collections}; `TrainState.variables` gives it.
      eval_data: {'image': (N, H, W, C) uint8, 'label': (N,) int32}, NumPy or device arrays.
      batch_size: examples per compiled step; with a mesh, rounded up to a multiple of its device count.
      mesh: a `parallel.make_mesh` mesh to split each batch over (`variables` must live on its devices);
        None: wherever `variables` are.
      tta_shift: > 0 averages predictions over 1-pixel-or-more translations (see `log_probabilities`).
    Returns:
      EvalResult: accuracy (fraction of all N), mean loss, count N, (C, C) int confusion, per-class accuracy.
    """
    data.check_split(eval_data, "evaluate()'s eval_data")  # (N, 1) labels broadcast into a wrong accuracy
    _check_batch_size(batch_size)
    n = len(eval_data["label"])
    if n == 0:
        raise ValueError("evaluate() needs at least one example")
    given, (eval_data, batch_size) = eval_data, _eval_arrays(eval_data, batch_size, mesh)
    # One compiled program slices, masks and evaluates a batch; a short host loop over ~10 batches costs nothing.
    # In one process every batch is dispatched before any result is fetched, so the device never waits for the host.
    batch_sums = []
    for begin in range(0, n, batch_size):
        batch_sums.append(_eval_slice(apply_fn, variables, eval_data, np.int32(begin), np.int32(n), batch_size,
                                      tta_shift, mesh))
        if jax.process_count() > 1 or (mesh is not None and mesh.size > 1):
            # Queued back to back, the batches' collectives sometimes paired up out of order on CPU: two processes
            # hung (AVX-512 machine, 2026-12-03), and so did one process's fake devices, until XLA aborted it
            # after 40 s with only some of them at the all-reduce (the suite, beside other work, 2026-12-04).
            jax.block_until_ready(batch_sums[-1])
    sums = functools.reduce(metrics.merge, map(parallel.to_host, batch_sums))
    # Now that the model's number of classes is known: a label outside them counts nothing but its image.
    data.check_split(given, "evaluate()'s eval_data", num_classes=len(sums["confusion"]))
    summary = metrics.compute(sums)
    return EvalResult(accuracy=summary["accuracy"], loss=summary["loss"], count=summary["count"],
                      confusion=np.asarray(sums["confusion"]))


def _train_record(state: TrainState, sums: metrics.Metrics, seconds: float,
                  image_shape: tuple[int, ...]) -> dict[str, Any]:
    summary = metrics.compute(sums)
    return {"epoch": int(state.epoch), "step": int(state.step), "image_shape": list(image_shape),
            "train_loss": summary["loss"], "train_accuracy": summary["accuracy"], "train_seconds": seconds,
            "images_per_second": summary["count"] / seconds}


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or Inf; the run stops and keeps its last good checkpoint."""


@jax.jit  # one program rather than a small compile per parameter shape
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def _compile_evaluation(state: TrainState, datasets: dict[str, dict[str, Any]], config: Config,
                       mesh: jax.sharding.Mesh) -> None:
    """Runs `evaluate`'s program for each non-empty split of `datasets` (as `train_and_evaluate` passes them) on no
    rows, and the finiteness check, so that they compile (or load from the compilation cache) before the first
    step instead of inside the first epoch's time: on an H200 they were most of the fast preset's 0.45-0.68 s to 99%
    from the first step (0.06-0.08 s without them)."""
    for split in ("validation", "test"):
        if len(datasets[split]["label"]):
            arrays, batch_size = _eval_arrays(datasets[split], config.eval_batch_size, mesh)
            jax.block_until_ready(_eval_slice(state.apply_fn, state.variables, arrays, np.int32(0), np.int32(0),
                                              batch_size, config.tta_shift, mesh))
    jax.block_until_ready(_all_finite(state.params))


def _check_finite(state: TrainState, sums: metrics.Metrics, workdir: Path) -> None:
    bad_steps = int(sums["nonfinite"])
    params_finite = bool(_all_finite(state.params))
    if bad_steps == 0 and params_finite:
        return
    epoch, steps = int(state.epoch), int(sums["steps"])
    what = f"the loss was NaN or Inf in {bad_steps} of its {steps} steps" if bad_steps else "the loss stayed finite"
    what += "" if params_finite else " and the parameters hold NaN or Inf"
    kept = (f"the last good checkpoint in {workdir} is kept" if epoch > 1
            else f"no epoch finished, so {workdir} holds no checkpoint")
    raise NonFiniteError(f"epoch {epoch} (steps {int(state.step) - steps + 1}-{int(state.step)}): {what}. Stopped "
                         f"without saving it; {kept}. Train again with a lower learning_rate in a new --workdir "
                         "(--resume keeps the run's config), or check the data for corrupt values")


def _check_settings_take_effect(config: Config, steps_per_epoch: int) -> None:
    """Raises ValueError for settings a new run would ignore (Config refuses most; these need the steps per
    epoch, or came after runs were saved with them)."""
    if config.b2 != Config.b2 and config.optimizer == "sgd":
        raise ValueError(f"config.b2 = {config.b2!r} has no effect with optimizer='sgd' (b1 is its momentum): set it "
                         f"back to {Config.b2}, or use adam or adamw")
    if config.warmup_epochs > 0 and round(config.warmup_epochs * steps_per_epoch) == 0:
        raise ValueError(f"config.warmup_epochs = {config.warmup_epochs!r} is less than half a step of "
                         f"{steps_per_epoch} per epoch: no warm-up at all; raise it or set 0")


def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False, model: nn.Module | None = None,
                       tx: optax.GradientTransformation | None = None,
                       datasets: dict[str, dict[str, np.ndarray]] | None = None) -> TrainState:
    """Trains `config` for its epochs, checkpointing into `workdir` after each, and reports test accuracy.

    Args:
      config: the run's Config.
      workdir: run directory; gets config.json, metrics.jsonl and checkpoints/.
      resume: continue from the newest checkpoint in `workdir` (required if one exists).
      model: a Flax module called as model(x, train=...) -> logits; default `models.create(config.model)`.
      tx: an optax transformation; default `optim.optimizer(config, ...)`.
      datasets: {'train', 'validation', 'test'} splits as from `data.load`; default `data.load(config)`. Taken as
        given but for config.train_limit, which cuts their train split too (config.validation_size does not apply).
    Returns:
      The final TrainState.
    Raises:
      ValueError (bad config or data), FileExistsError (a run is in `workdir` and resume is False, or
      `workdir` holds a config.json that no run wrote),
      RunInUseError (another process writes `workdir`), NonFiniteError (NaN/Inf in loss or parameters).
    """
    config = config.validated()
    parallel.initialize()
    start = time.perf_counter()
    # Marks this call's records: a resumed run's wall time is the sum over its calls (see experiments/ladder.py).
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_divisible(mesh, config.batch_size)
    log = progress.Progress(config.epochs)
    if datasets is None:
        datasets = data.load(config)
    else:  # what `data.load` checks in the data it reads, and the limit it applies
        data.check(datasets, config.num_classes)
        if config.train_limit is not None:
            datasets = datasets | {"train": {k: v[:config.train_limit] for k, v in datasets["train"].items()}}
    train = datasets["train"]
    steps_per_epoch = _steps_per_epoch(len(train["label"]), config.batch_size, "config.batch_size")
    _check_tta_shift(config.tta_shift, train["image"].shape[1:3])  # before the run directory is made
    if checkpoint.latest_epoch(workdir) is None:  # a run that starts now, not one saved by an older version
        _check_settings_take_effect(config, steps_per_epoch)
    registered = models.create(config.model, config.num_classes)
    model = model if model is not None else registered
    # A module other than config.model's is recorded, so that restoring the run asks for it.
    custom_model = None if model == registered else checkpoint.module_name(model)
    custom_tx = tx is not None  # recorded: resuming such a run needs it again
    tx = tx if tx is not None else optim.optimizer(config, steps_per_epoch)
    state = create_train_state(config, model, train["image"].shape[1:], tx)
    state = parallel.put(state, parallel.state_shardings(state, mesh, config.shard_params))

    # Data given by the caller may have no validation split whatever config.validation_size says.
    has_validation = len(datasets["validation"]["label"]) > 0
    with checkpoint.RunDir(workdir, config, keep=config.keep_checkpoints, track_best=has_validation) as run:
        data_sha256 = data.fingerprint(datasets)
        state = run.restore_or_start(state, resume=resume, data_sha256=data_sha256, custom_model=custom_model,
                                     custom_tx=custom_tx)
        log.start(config, int(state.epoch), steps_per_epoch, len(train["label"]), mesh.size, custom_model)
        device_data = parallel.put(datasets, parallel.replicated(mesh))
        programs: dict[TrainOptions, Any] = {}  # compiled epochs: the options are static, each its own program
        first_step = 0.0
        while int(state.epoch) < config.epochs:
            state = state.replace(options=train_options(config, int(state.epoch)))
            if state.options not in programs:
                compile_start = time.perf_counter()
                programs[state.options] = train_epoch.lower(state, device_data["train"], config.batch_size,
                                                            mesh).compile()
                if not first_step:
                    _compile_evaluation(state, device_data, config, mesh)
                log.compiled(time.perf_counter() - compile_start)
                first_step = first_step or time.perf_counter()
            epoch_start = time.perf_counter()
            state, sums = programs[state.options](state, device_data["train"])
            sums = parallel.to_host(sums)
            _check_finite(state, sums, run.path)
            record = _train_record(state, sums, time.perf_counter() - epoch_start, train["image"].shape[1:])
            if custom_model:  # config.model does not describe it: restoring must be given the module
                record["custom_model"] = custom_model
            if custom_tx:
                record["custom_tx"] = True
            record["data_sha256"] = data_sha256
            for split in ("validation", "test"):
                if len(datasets[split]["label"]):
                    result = evaluate(state.apply_fn, state.variables, device_data[split], config.eval_batch_size,
                                      mesh, config.tta_shift)
                    record[f"{split}_loss"], record[f"{split}_accuracy"] = result.loss, result.accuracy
            now = time.perf_counter()
            record |= {"started": started, "wall_seconds": now - start, "seconds_from_first_step": now - first_step}
            run.save(state, record)
            log.epoch(record)
    log.finish(run.summary())
    return state
