"""Test-time augmentation and ensembles against NumPy references."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from digits_jax import checkpoint, config, ensemble, train


def numpy_shift(images, dy, dx):
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (-2, 1), (0, -3)])
def test_translate_moves_pixels_and_fills_zeros(dy, dx):
    x = np.random.default_rng(0).uniform(size=(2, 6, 5, 1)).astype(np.float32)
    np.testing.assert_array_equal(train.translate(jnp.asarray(x), dy, dx), numpy_shift(x, dy, dx))


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def trained(tiny_config, tiny_data):
    from tests.test_train import fresh_state

    state = fresh_state(tiny_config.replace(learning_rate=1e-3, schedule="constant"), tiny_data)
    batch = {k: v[:128] for k, v in tiny_data["train"].items()}
    for _ in range(10):
        state, _ = train.train_step(state, batch)
    return state


def tta_views(x, shift):
    """The image batch and its 4 copies shifted by `shift` pixels, as train.evaluate's tta_shift averages them."""
    return [x] + [numpy_shift(x, dy, dx) for dy, dx in ((-shift, 0), (shift, 0), (0, -shift), (0, shift))]


def test_tta_averages_the_softmax_over_five_shifted_copies(trained, tiny_data):
    test = {k: v[:300] for k, v in tiny_data["test"].items()}
    x = test["image"].astype(np.float32) / 255
    views = tta_views(x, 2)
    probs = np.mean([softmax(np.asarray(trained.apply_fn(trained.variables, v, train=False), np.float64))
                     for v in views], axis=0)
    result = train.evaluate(trained.apply_fn, trained.variables, test, batch_size=128, tta_shift=2)
    assert result.accuracy == np.mean(probs.argmax(-1) == test["label"])
    np.testing.assert_allclose(result.loss, -np.mean(np.log(probs[np.arange(300), test["label"]])), rtol=1e-4)
    plain = train.evaluate(trained.apply_fn, trained.variables, test, batch_size=128)
    single = softmax(np.asarray(trained.apply_fn(trained.variables, x, train=False), np.float64))
    assert plain.accuracy == np.mean(single.argmax(-1) == test["label"])


def test_combine_mean_and_vote_against_a_direct_count():
    p = np.array([  # 3 members, 2 examples, 3 classes
        [[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]],
        [[0.1, 0.8, 0.1], [0.1, 0.45, 0.45]],
        [[0.2, 0.7, 0.1], [0.2, 0.3, 0.5]],
    ])
    np.testing.assert_array_equal(ensemble.combine(p, "mean"), [1, 2])  # means: [.3 .6 .1], [.13 .417 .45]
    np.testing.assert_array_equal(ensemble.combine(p, "vote"), [1, 1])  # votes: 1 twice; then 1, 1, 2
    tie = np.array([[[0.9, 0.1]], [[0.4, 0.6]]])  # one vote each: the higher mean probability (0.65) wins
    np.testing.assert_array_equal(ensemble.combine(tie, "vote"), [0])
    with pytest.raises(ValueError, match="choose one of"):
        ensemble.combine(p, "median")


def test_ensemble_of_copies_equals_the_member_and_probabilities_sum_to_one(trained, tiny_data):
    test = {k: v[:250] for k, v in tiny_data["test"].items()}
    member = (trained.apply_fn, trained.variables)
    probs = ensemble.probabilities(*member, test["image"], batch_size=100)
    assert probs.shape == (250, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    alone = train.evaluate(*member, test, batch_size=100).accuracy
    for method in ensemble.METHODS:
        result = ensemble.evaluate([member, member], test, method, batch_size=100)
        assert result["accuracy"] == alone and result["member_accuracies"] == [alone, alone]


def test_ensemble_of_different_members_against_numpy(trained, tiny_data, tiny_config):
    from tests.test_train import fresh_state

    other = fresh_state(tiny_config.replace(seed=1), tiny_data)
    members = [(trained.apply_fn, trained.variables), (other.apply_fn, other.variables)]
    test = {k: v[:200] for k, v in tiny_data["test"].items()}
    x = test["image"].astype(np.float32) / 255
    probs = np.stack([softmax(np.asarray(fn(v, x, train=False), np.float64)) for fn, v in members])
    # Else an ensemble that used only one member would pass unseen.
    assert all((probs.mean(0).argmax(-1) != p.argmax(-1)).any() for p in probs)
    expected = np.mean(probs.mean(0).argmax(-1) == test["label"])
    assert ensemble.evaluate(members, test, "mean", batch_size=64)["accuracy"] == pytest.approx(expected)


def test_each_member_has_its_own_tta_shift(trained, tiny_data):
    test = {k: v[:200] for k, v in tiny_data["test"].items()}
    member = (trained.apply_fn, trained.variables)
    x = test["image"].astype(np.float32) / 255
    per_view = [softmax(np.asarray(trained.apply_fn(trained.variables, v, train=False), np.float64))
                for v in tta_views(x, 2)]
    plain, shifted = per_view[0], np.mean(per_view, axis=0)
    assert (plain.argmax(-1) != shifted.argmax(-1)).any()  # else swapped or ignored shifts would pass unseen
    result = ensemble.evaluate([member, member], test, "mean", batch_size=64, tta_shift=[0, 2])
    assert result["accuracy"] == pytest.approx(np.mean(((plain + shifted) / 2).argmax(-1) == test["label"]))
    assert result["member_accuracies"] == pytest.approx([np.mean(p.argmax(-1) == test["label"])
                                                         for p in (plain, shifted)])
    assert ensemble.evaluate([member], test, tta_shift=np.int64(2))["accuracy"] == result["member_accuracies"][1]
    with pytest.raises(ValueError, match="1 tta_shift values for 2 ensemble members"):
        ensemble.evaluate([member, member], test, tta_shift=[1])
    for call in (lambda: ensemble.evaluate([member], test, tta_shift=0.9),  # was evaluated as 0
                 lambda: ensemble.probabilities(*member, test["image"], tta_shift=0.9),  # and these a TypeError
                 lambda: train.evaluate(*member, test, tta_shift=0.9)):
        with pytest.raises(ValueError, match=r"tta_shift = 0.9: give a whole number of pixels >= 0"):
            call()
    with pytest.raises(ValueError, match="needs at least one example"):
        ensemble.evaluate([member], {k: v[:0] for k, v in test.items()})


def test_members_may_be_train_states_or_restored_checkpoints(trained, tiny_data):
    """A TrainState or checkpoint.Restored given as a member failed with "cannot unpack non-iterable"."""
    test = {k: v[:200] for k, v in tiny_data["test"].items()}
    pair = ensemble.evaluate([(trained.apply_fn, trained.variables)], test, tta_shift=[1])
    restored = checkpoint.Restored(state=trained, config=None, record={}, epoch=1)
    as_list = [trained.apply_fn, trained.variables]
    assert ensemble.evaluate([trained, restored, as_list], test, tta_shift=np.array([1, 1, 1]))[
        "member_accuracies"] == pair["member_accuracies"] * 3
    # By default a Restored member is evaluated with its run's tta_shift, as digits-jax eval and Predictor do
    # (it was evaluated without), and the others without.
    shifted = checkpoint.Restored(state=trained, config=config.tiny().replace(tta_shift=1), record={}, epoch=1)
    assert ensemble.evaluate([shifted, trained], test)["member_accuracies"] == [
        pair["member_accuracies"][0], ensemble.evaluate([trained], test, tta_shift=0)["member_accuracies"][0]]
    with pytest.raises(TypeError, match=r"an \(apply_fn, variables\) pair, a TrainState or a restored checkpoint, "
                                        r"not dict"):
        ensemble.evaluate([{"params": trained.params}], test)
