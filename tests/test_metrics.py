from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits_jax import metrics, train


def numpy_reference(logits, labels):
    """Accuracy, mean cross-entropy and confusion computed with NumPy only."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((logits.shape[1],) * 2, np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return (predicted == labels).mean(), -log_probs[np.arange(len(labels)), labels].mean(), confusion


@pytest.mark.parametrize("n,classes", [(1, 10), (37, 10), (500, 3)])
def test_batch_metrics_match_numpy(n, classes):
    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    labels = rng.integers(0, classes, n).astype(np.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
    sums = metrics.batch(losses, jnp.asarray(logits), jnp.asarray(labels))
    accuracy, loss, confusion = numpy_reference(logits, labels)
    summary = metrics.compute(sums)
    assert summary["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_array_equal(sums["confusion"], confusion)


def test_mask_excludes_padding_and_merge_adds():
    logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    labels = jnp.asarray([0, 0, 1])
    losses = jnp.asarray([1.0, 2.0, 3.0])
    masked = metrics.batch(losses, logits, labels, mask=jnp.asarray([True, True, False]))
    assert metrics.compute(masked) == {"loss": 1.5, "accuracy": 0.5, "count": 2}
    both = metrics.merge(masked, masked)
    assert metrics.compute(both) == {"loss": 1.5, "accuracy": 0.5, "count": 4}
    np.testing.assert_array_equal(both["confusion"], [[2, 2], [0, 0]])


def test_per_class_accuracy():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    np.testing.assert_allclose(metrics.per_class_accuracy(confusion), [0.75, np.nan, 0.5])


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("n,batch_size", [(10, 4), (8, 8), (3, 16)])
def test_evaluate_counts_every_example_and_matches_numpy(n, batch_size, on_device):
    """The last batch overlaps the one before it (or, below one batch, is padded); masking its repeated or
    padded rows must leave every number as NumPy computes it, for host and device data alike."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 4, 4, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, n).astype(np.int32)
    weights = rng.normal(size=(16, 3)).astype(np.float32)

    def apply_fn(variables, x, train):
        return x.reshape(x.shape[0], -1) @ variables["params"]["w"]

    split = {"image": images, "label": labels}
    result = train.evaluate(apply_fn, {"params": {"w": weights}}, jax.device_put(split) if on_device else split,
                            batch_size)
    logits = (images.reshape(n, -1).astype(np.float32) / 255.0) @ weights
    accuracy, loss, confusion = numpy_reference(logits, labels)
    assert result.count == n
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    np.testing.assert_array_equal(result.confusion, confusion)


def test_a_batch_larger_than_the_split_is_cut_to_it():
    """128 images took 6 s to evaluate at eval_batch_size 40,000 (0.03 s at 256): the split was padded to it."""
    split = {"image": np.zeros((5, 4, 4, 1), np.uint8), "label": np.zeros(5, np.int32)}
    arrays, batch_size = train._eval_arrays(split, 40_000, None)
    assert batch_size == 5 and arrays["image"].shape == (5, 4, 4, 1)


@pytest.mark.parametrize("batch_size", [0, -4, 2.5])
def test_evaluation_batch_sizes_below_one_are_named(batch_size):
    """0 was "range() arg 3 must not be zero", a negative one "reduce() of empty iterable"."""
    split = {"image": np.zeros((5, 4, 4, 1), np.uint8), "label": np.zeros(5, np.int32)}
    with pytest.raises(ValueError, match=rf"batch_size = {batch_size}: must be an integer >= 1"):
        train.evaluate(lambda variables, x, train: x.reshape(x.shape[0], -1), {}, split, batch_size)
    with pytest.raises(ValueError, match=rf"batch_size = {batch_size}: must be an integer >= 1"):
        list(train.padded_batches(split, batch_size))
