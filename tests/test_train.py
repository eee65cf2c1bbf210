from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits_jax import augment, checkpoint, data, ensemble, models, optim, train
from digits_jax.predict import Predictor


def fresh_state(config, data):
    steps = len(data["train"]["label"]) // config.batch_size
    model = models.create(config.model, config.num_classes)
    return train.create_train_state(config, model, data["train"]["image"].shape[1:], optim.optimizer(config, steps))


def test_loss_falls_over_a_few_steps_on_real_digits(tiny_config, tiny_data):
    config = tiny_config.replace(learning_rate=1e-3, schedule="constant")
    state = fresh_state(config, tiny_data)
    batch = {k: v[:64] for k, v in tiny_data["train"].items()}
    losses = []
    for _ in range(15):
        state, sums = train.train_step(state, batch)
        losses.append(float(sums["loss"] / sums["count"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_step_is_pure(tiny_config, tiny_data):
    state = fresh_state(tiny_config, tiny_data)
    batch = {k: v[:32] for k, v in tiny_data["train"].items()}
    first, first_metrics = train.train_step(state, batch)
    second, second_metrics = train.train_step(state, batch)
    for a, b in zip(jax.tree.leaves((first, first_metrics)), jax.tree.leaves((second, second_metrics)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(first.step) == 1 and int(state.step) == 0


def test_epoch_equals_per_step_loop_in_the_same_order(tiny_config, tiny_data):
    """The compiled epoch must be exactly the per-step path over the same shuffled batches."""
    config = tiny_config
    data = tiny_data["train"]
    state = fresh_state(config, tiny_data)
    b = config.batch_size
    order = np.asarray(train.epoch_order(state.rng, 0, len(data["label"]), b))
    looped = state
    total = 0.0
    for indices in order:
        looped, sums = train.train_step(looped, {k: v[indices] for k, v in data.items()})
        total += float(sums["loss"])
    epoch_state, epoch_sums = train.train_epoch(state, jax.device_put(data), b)
    assert int(epoch_state.epoch) == 1 and int(epoch_state.step) == len(order)
    assert float(epoch_sums["count"]) == len(order) * b
    assert float(epoch_sums["loss"]) == pytest.approx(total, rel=1e-5)
    for a, c in zip(jax.tree.leaves(epoch_state.params), jax.tree.leaves(looped.params), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,batch_size", [(100, 10), (103, 10), (64, 64)])
def test_epoch_order_covers_distinct_examples_and_reshuffles(n, batch_size):
    rng = jax.random.PRNGKey(0)
    orders = [np.asarray(train.epoch_order(rng, epoch, n, batch_size)) for epoch in (0, 1)]
    for order in orders:
        assert order.shape == (n // batch_size, batch_size) and order.dtype == np.int32
        assert len(set(order.ravel())) == order.size and order.min() >= 0 and order.max() < n
    assert not np.array_equal(*orders)
    np.testing.assert_array_equal(orders[0], train.epoch_order(rng, 0, n, batch_size))


def test_train_and_evaluate_compiles_no_evaluation_after_its_first_step(tmp_path, tiny_config, tiny_data,
                                                                        monkeypatch):
    """Evaluation is compiled before the clock of seconds_from_first_step starts, not inside the first epoch."""
    config = tiny_config.replace(epochs=1, eval_batch_size=320)  # a batch size no other test evaluates with
    compiled = []

    def counting(*args, real=train.evaluate, **kwargs):
        before = train._eval_slice._cache_size()
        result = real(*args, **kwargs)
        compiled.append(train._eval_slice._cache_size() - before)
        return result

    monkeypatch.setattr(train, "evaluate", counting)
    before = train._eval_slice._cache_size()
    train.train_and_evaluate(config, tmp_path / "run", datasets=tiny_data)
    assert compiled == [0, 0]  # the validation and test evaluations of epoch 1
    assert train._eval_slice._cache_size() == before + 2  # compiled ahead, one program per split length


def test_train_and_evaluate_writes_records_and_checkpoints(tmp_path, tiny_config, tiny_data):
    state = train.train_and_evaluate(tiny_config, tmp_path / "run", datasets=tiny_data)
    steps = len(tiny_data["train"]["label"]) // tiny_config.batch_size
    assert int(state.epoch) == tiny_config.epochs and int(state.step) == tiny_config.epochs * steps
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) == tiny_config.epochs
    assert (tmp_path / "run" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


@pytest.mark.parametrize("changes", [
    {},
    # Everything that draws random numbers or keeps extra state: dropout, augmentation, batch norm, EMA.
    {"model": "bn", "augment": "elastic", "ema_decay": 0.9, "label_smoothing": 0.1},
    {"augment": "affine", "clean_epochs": 1},  # resumed in the clean epoch: its own program from the start
], ids=["seed", "bn-augment-ema", "clean-epochs"])
def test_resume_continues_at_the_right_epoch_and_matches_uninterrupted(tmp_path, tiny_config, tiny_data, changes,
                                                                       capsys):
    tiny_config = tiny_config.replace(**changes)
    whole = train.train_and_evaluate(tiny_config, tmp_path / "whole", datasets=tiny_data)
    assert capsys.readouterr().out.count("compiled") == (2 if "clean_epochs" in changes else 1)
    # A crash before epoch 2 was saved looks like this on disk: that run with its checkpoint 2 absent.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    shutil.rmtree(crashed / "checkpoints" / "2")
    with pytest.raises(FileExistsError, match="pass --resume"):
        train.train_and_evaluate(tiny_config, crashed, datasets=tiny_data)
    capsys.readouterr()
    resumed = train.train_and_evaluate(tiny_config, crashed, resume=True, datasets=tiny_data)
    assert capsys.readouterr().out.count("compiled") == 1  # only the program of the epoch left to train
    assert int(resumed.epoch) == int(whole.epoch) and int(resumed.step) == int(whole.step)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    records = checkpoint.read_records(crashed)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["started"] == checkpoint.read_records(tmp_path / "whole")[0]["started"] != records[1]["started"]
    if "model" in changes:  # batch statistics were learned, and a restore evaluates to the recorded accuracy
        fresh = fresh_state(tiny_config, tiny_data)
        assert not np.allclose(whole.model_state["batch_stats"]["bn1_1"]["mean"],
                               fresh.model_state["batch_stats"]["bn1_1"]["mean"])
        restored = checkpoint.restore(crashed, step="latest")
        result = train.evaluate(restored.state.apply_fn, restored.state.variables, tiny_data["test"],
                                tiny_config.eval_batch_size)
        assert result.accuracy == restored.record["test_accuracy"]


def test_train_options_drop_augmentation_in_the_last_clean_epochs(tiny_config):
    config = tiny_config.replace(augment="affine", epochs=6, clean_epochs=2)
    assert [train.train_options(config, e).augment.is_identity for e in range(6)] == [False] * 4 + [True] * 2


def test_clean_epochs_train_the_last_epochs_on_unaugmented_images(tmp_path, tiny_config, tiny_data):
    config = tiny_config.replace(augment="affine", clean_epochs=1)
    run = train.train_and_evaluate(config, tmp_path / "run", datasets=tiny_data)
    images = jax.device_put(tiny_data["train"])

    def by_hand(second_epoch_augment):
        state, _ = train.train_epoch(fresh_state(config, tiny_data), images, config.batch_size)
        options = dataclasses.replace(state.options, augment=second_epoch_augment)
        return train.train_epoch(state.replace(options=options), images, config.batch_size)[0]

    assert fresh_state(config, tiny_data).options.augment == augment.PRESETS["affine"]
    # Equal up to float32 rounding (the run goes through its device mesh), unlike augmenting the second epoch too.
    clean, augmented = by_hand(augment.Augment.none()), by_hand(augment.PRESETS["affine"])
    for ours, clean_leaf in zip(jax.tree.leaves(run.params), jax.tree.leaves(clean.params), strict=True):
        np.testing.assert_allclose(ours, clean_leaf, rtol=1e-4, atol=1e-7)
    assert not all(np.allclose(a, b, rtol=1e-2, atol=1e-4)
                   for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(augmented.params), strict=True))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d | {"train": d["train"] | {"label": np.where(d["train"]["label"] == 0, 10, d["train"]["label"])}},
     r"the train split: \d+ labels outside \[0, 10\) \(e.g. \[10\]\)"),  # SVHN stores digit 0 as 10
    (lambda d: d | {"test": d["test"] | {"image": d["test"]["image"] / np.float32(255)}},
     r"the test split: images are float32 of shape \(2000, 28, 28, 1\); give uint8"),
    (lambda d: d | {"validation": d["validation"] | {"image": d["validation"]["image"][:, :27]}},
     r"differ in size .* the validation split \(27, 28, 1\)"),
    (lambda d: {k: v for k, v in d.items() if k != "validation"}, "the validation split: missing"),
])
def test_train_and_evaluate_checks_the_datasets_it_is_given(tmp_path, tiny_config, tiny_data, change, message):
    """As data.load checks what it reads: a label of 10 would train as an all-zero one-hot target, with no loss."""
    with pytest.raises(data.DataError, match=message):
        train.train_and_evaluate(tiny_config, tmp_path / "run", datasets=change(tiny_data))
    assert not (tmp_path / "run").exists()


def test_resume_with_a_different_config_is_refused(tmp_path, tiny_config, tiny_data):
    train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, datasets=tiny_data)
    with pytest.raises(ValueError, match=r"\['learning_rate'\] differ"):
        train.train_and_evaluate(tiny_config.replace(epochs=1, learning_rate=0.5), tmp_path, resume=True,
                                 datasets=tiny_data)


def test_a_tta_shift_as_large_as_the_images_is_refused_before_the_run_directory_is_made(tmp_path, tiny_config,
                                                                                        tiny_data):
    with pytest.raises(ValueError, match=r"tta_shift = 28: images of 28x28 pixels shifted so far are blank"):
        train.train_and_evaluate(tiny_config.replace(tta_shift=28), tmp_path / "run", datasets=tiny_data)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes,message", [
    ({"optimizer": "sgd", "b2": 0.9}, r"config.b2 = 0.9 has no effect with optimizer='sgd' \(b1 is its momentum\): "
                                      r"set it back to 0.999"),
    ({"schedule": "cosine", "warmup_epochs": 0.01}, r"config.warmup_epochs = 0.01 is less than half a step of 8 per "
                                                    r"epoch: no warm-up at all"),
])
def test_settings_a_new_run_would_ignore_are_refused_but_saved_runs_restore(tmp_path, tiny_config, tiny_data,
                                                                             changes, message):
    """Both trained silently (no warm-up at all, b2 unused). As Config rules they had refused to restore runs saved
    with them, with advice to downgrade: they apply to runs that start, not to saved ones."""
    config = tiny_config.replace(epochs=1, **changes)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path / "new", datasets=tiny_data)
    assert not (tmp_path / "new").exists()
    saved = tmp_path / "saved"  # as an older version saved it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "_check_settings_take_effect", lambda *args: None)
        train.train_and_evaluate(config, saved, datasets=tiny_data)
    assert checkpoint.restore(saved).config == config
    train.train_and_evaluate(config, saved, resume=True, datasets=tiny_data)  # finished: nothing to train


def test_batch_larger_than_training_split_is_an_error(tmp_path, tiny_config, tiny_data):
    with pytest.raises(ValueError, match=r"batch_size \(4096\) is larger than the training split"):
        train.train_and_evaluate(tiny_config.replace(batch_size=4096), tmp_path, datasets=tiny_data)
    # train_epoch (a loop of one's own) took no step, counted the epoch and returned counts of 0.
    state, train_data = fresh_state(tiny_config, tiny_data), jax.device_put(tiny_data["train"])
    with pytest.raises(ValueError, match=r"^batch_size \(1024\) is larger than the training split \(512 images\)"):
        train.train_epoch(state, train_data, 1024)
    with pytest.raises(ValueError, match=r"batch_size = 0: must be an integer >= 1"):
        train.train_epoch(state, train_data, 0)
    with pytest.raises(data.DataError, match=r"train_epoch\(\)'s train_data: labels are int32 of shape \(512,\) for "
                                             r"500 images"):  # trained on: the gather clamped indices past 500
        train.train_epoch(state, {"image": train_data["image"][:500], "label": train_data["label"]}, 64)


def test_preprocess_scales_uint8_to_unit_interval():
    out = train.preprocess(jnp.asarray([0, 51, 255], jnp.uint8))
    np.testing.assert_allclose(out, [0.0, 0.2, 1.0])
    assert out.dtype == jnp.float32


def test_float_images_are_refused_by_evaluate_train_step_and_ensembles(tiny_config, tiny_data):
    """Images already in [0, 1] were divided by 255 again: evaluation scored near chance and training ran, silently."""
    state = fresh_state(tiny_config, tiny_data)
    scaled = {"image": tiny_data["test"]["image"][:64] / np.float32(255), "label": tiny_data["test"]["label"][:64]}
    message = r"images must be uint8 pixels 0-255 .*got float32"
    with pytest.raises(ValueError, match=r"evaluate\(\)'s eval_data: images are float32 of shape \(64, 28, 28, 1\); "
                                         r"give uint8 pixels 0-255"):
        train.evaluate(state.apply_fn, state.variables, scaled, 32)
    with pytest.raises(ValueError, match=r"train_step\(\)'s batch: images are float32 .* give uint8 pixels 0-255"):
        train.train_step(state, scaled)
    with pytest.raises(ValueError, match=message):
        ensemble.probabilities(state.apply_fn, state.variables, scaled["image"], 32)


@pytest.mark.parametrize("labels", [lambda y: y[:, None], lambda y: y[:1], lambda y: y.astype(np.float32)])
def test_evaluate_and_ensembles_refuse_labels_that_are_not_one_per_image(tiny_config, tiny_data, labels):
    """(N, 1) labels broadcast against (N,) predictions: evaluate() scored an accuracy of 101.8 on 2,000 images."""
    state = fresh_state(tiny_config, tiny_data)
    given = {"image": tiny_data["test"]["image"][:64], "label": labels(tiny_data["test"]["label"][:64])}
    with pytest.raises(data.DataError, match=r"evaluate\(\)'s eval_data: labels are .* for 64 images; give one "
                                             r"integer class per image"):
        train.evaluate(state.apply_fn, state.variables, given, 32)
    with pytest.raises(data.DataError, match=r"ensemble.evaluate\(\)'s eval_data: labels are"):
        ensemble.evaluate([state], given)
    with pytest.raises(data.DataError, match=r"train_step\(\)'s batch: labels are"):
        train.train_step(state, given)


def test_evaluate_and_ensembles_refuse_labels_outside_the_models_classes(tiny_config, tiny_data):
    """1-based labels: each 10 added nothing to the loss and dropped out of the confusion matrix (47 of 50)."""
    state = fresh_state(tiny_config, tiny_data)
    given = {"image": tiny_data["test"]["image"][:64], "label": tiny_data["test"]["label"][:64] + 1}
    outside = int(np.sum(given["label"] == 10))
    with pytest.raises(data.DataError, match=rf"evaluate\(\)'s eval_data: {outside} labels outside \[0, 10\) "
                                             r"\(e.g. \[10\]\)"):
        train.evaluate(state.apply_fn, state.variables, given, 32)
    with pytest.raises(data.DataError, match=rf"ensemble.evaluate\(\)'s eval_data: {outside} labels outside"):
        ensemble.evaluate([state], given)
    as_list = given | {"label": given["label"].tolist()}
    with pytest.raises(data.DataError, match=r"evaluate\(\)'s eval_data: the labels are a list; give a NumPy or JAX "
                                             r"array"):
        train.evaluate(state.apply_fn, state.variables, as_list, 32)


def test_an_image_shape_without_channels_is_named(tiny_config):
    with pytest.raises(ValueError, match=r"image_shape = \(28, 28\): give \(height, width, channels\)"):
        train.create_train_state(tiny_config, Linear(), (28, 28), optax.sgd(0.5))
    with pytest.raises(ValueError, match=r"image_shape = 784: give \(height, width, channels\)"):
        train.create_train_state(tiny_config, Linear(), 784, optax.sgd(0.5))


class Unflattened(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(10, (28, 28), padding="VALID")(x)  # (B, 1, 1, 10)


class Reshaped(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(10, (3, 3), strides=14)(x).reshape(-1, 10)  # (B, 2, 2, 10) -> (4 B, 10)


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        logits = nn.Dense(10)(x.reshape(x.shape[0], -1))
        return logits, logits


def test_a_model_whose_logits_are_not_batch_by_classes_is_named(tiny_config):
    """Its loss failed to broadcast deep inside JAX at the first step, evaluate() with a dot_general TypeError."""
    with pytest.raises(ValueError, match=r"the model gives logits of shape \(1, 1, 1, 10\) for a batch of 1 image: "
                                         r"give a model that returns \(batch, num_classes\) logits"):
        train.create_train_state(tiny_config, Unflattened(), (28, 28, 1), optax.sgd(0.5))
    with pytest.raises(ValueError, match=r"the model gives logits of shape \(4, 10\) for a batch of 1 image"):
        train.create_train_state(tiny_config, Reshaped(), (28, 28, 1), optax.sgd(0.5))  # failed at the first step
    with pytest.raises(ValueError, match=r"the model gives a tuple for a batch of 1 image"):
        train.create_train_state(tiny_config, Pair(), (28, 28, 1), optax.sgd(0.5))  # was an AttributeError


def test_a_model_with_another_number_of_outputs_than_classes_is_refused(tiny_config):
    """A 5-output model with num_classes=10 trained on, its loss blind to labels 5-9 and its confusion 5 x 5."""
    with pytest.raises(ValueError, match=r"the model gives 3 logits per image, config.num_classes is 10: give a "
                                         r"model with one output per class, or set num_classes"):
        train.create_train_state(tiny_config, Linear(), (2, 2, 1), optax.sgd(0.5))
    assert linear_state(tiny_config).params["out"]["kernel"].shape == (4, 3)  # num_classes=3


@pytest.mark.parametrize("model", ["seed", "bn", "strided", "s2d16"])
def test_images_too_small_for_the_model_are_named(tiny_config, model):
    """8 x 8 images (scikit-learn's digits) were a 39-line traceback ending in a ZeroDivisionError inside Flax."""
    with pytest.raises(ValueError, match=r"CNN cannot take images of \(8, 8, 1\) \(height, width, channels\): its "
                                         r"convolutions and pools leave nothing of them; give larger images"):
        train.create_train_state(tiny_config, models.create(model, 10), (8, 8, 1), optax.sgd(0.1))


def test_datasets_given_are_cut_to_train_limit_and_without_validation_track_no_metric(tmp_path, tiny_config,
                                                                                     tiny_data, caplog):
    """config.train_limit was recorded but ignored for data given by the caller; an empty validation split with the
    default validation_size made Orbax warn about a missing metric at every save."""
    given = tiny_data | {"validation": {k: v[:0] for k, v in tiny_data["validation"].items()}}
    run_config = tiny_config.replace(epochs=1, train_limit=128, batch_size=64)
    with caplog.at_level("WARNING"):
        state = train.train_and_evaluate(run_config, tmp_path, datasets=given)
    assert int(state.step) == 2  # 128 images of the 512 given, batch 64
    assert "tracked_metric" not in caplog.text
    assert checkpoint.restore(tmp_path).epoch == 1


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, tiny_data):
    poisoned = optax.chain(optax.adam(1e-3), optax.scale(float("nan")))  # every update turns parameters to NaN
    with pytest.raises(train.NonFiniteError, match=r"epoch 1 \(steps 1-8\): the loss was NaN or Inf in 7 of its 8 "
                                                   r"steps and the parameters hold NaN or Inf\. Stopped without "
                                                   r"saving it; no epoch finished, so .* holds no checkpoint\. Train "
                                                   r"again with a lower learning_rate in a new --workdir"):
        train.train_and_evaluate(tiny_config, tmp_path, tx=poisoned, datasets=tiny_data)
    assert checkpoint.read_records(tmp_path) == []
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_run_directory_has_one_writer(tmp_path, tiny_config):
    in_use = pytest.raises(checkpoint.RunInUseError, match=rf"{tmp_path} is in use by pid {os.getpid()}")
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1), in_use:
        checkpoint.RunDir(tmp_path, tiny_config, keep=1)
    checkpoint.RunDir(tmp_path, tiny_config, keep=1).close()  # released on close


def test_a_dead_writer_does_not_hold_the_run_directory(tmp_path, tiny_config):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from digits_jax import checkpoint, config\n"
        f"run = checkpoint.RunDir({str(tmp_path)!r}, config.tiny(), keep=1)\n"
        "print('locked', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(checkpoint.RunInUseError, match=f"in use by pid {holder.pid}"):
        checkpoint.RunDir(tmp_path, tiny_config, keep=1)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    checkpoint.RunDir(tmp_path, tiny_config, keep=1).close()


def test_an_unwritable_run_directory_is_named(tmp_path, tiny_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"cannot write to run directory {blocker}/run"):
        checkpoint.RunDir(blocker / "run", tiny_config, keep=1)


def test_resume_on_different_data_is_refused(tmp_path, tiny_config, tiny_data):
    train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, datasets=tiny_data)
    other = {split: dict(arrays) for split, arrays in tiny_data.items()}
    other["train"]["label"] = np.roll(other["train"]["label"], 1)
    with pytest.raises(ValueError, match=r"the data differ from what it was trained on"):
        train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, resume=True, datasets=other)
    # Images of another size would not fit the saved arrays: still told as other data, no checkpoint called damaged.
    cropped = {split: {"image": arrays["image"][:, 2:-2, 2:-2], "label": arrays["label"]}
               for split, arrays in tiny_data.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.CheckpointSkippedWarning)
        with pytest.raises(ValueError, match=r"the data differ from what it was trained on"):
            train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, resume=True, datasets=cropped)
    train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, resume=True, datasets=tiny_data)
    # The same data from another directory (e.g. --data-dir where $DIGITS_JAX_DATA_DIR was) resumes.
    moved = tiny_config.replace(epochs=1, data_dir=str(tmp_path / "elsewhere"))
    assert int(train.train_and_evaluate(moved, tmp_path, resume=True, datasets=tiny_data).epoch) == 1


def test_a_run_trained_with_a_tx_from_python_resumes_only_with_one(tmp_path, tiny_config, tiny_data):
    """Resumed without its tx (as `digits-jax train --resume` does), it went on with config's optimizer silently."""
    config = tiny_config.replace(epochs=2)
    tx = optax.sgd(0.05, momentum=0.9)  # its state has another structure than the config's Adam
    train.train_and_evaluate(config, tmp_path, tx=tx, datasets=tiny_data)
    assert all(r["custom_tx"] for r in checkpoint.read_records(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"trained with an optimizer given from Python \(tx=\), this call gives "
                                         r"none; resume from Python with the same tx"):
        train.train_and_evaluate(config, tmp_path, resume=True, datasets=tiny_data)
    assert int(train.train_and_evaluate(config, tmp_path, resume=True, tx=tx, datasets=tiny_data).epoch) == 2
    # Restored without it (digits-jax eval, Predictor), it evaluates as recorded; it failed as another structure.
    with pytest.warns(UserWarning, match=r"trained with an optimizer given from Python \(tx=\); restored without "
                                         r"it, its state evaluates, but pass tx= to train it on"):
        restored = checkpoint.restore(tmp_path)
    result = train.evaluate(restored.state.apply_fn, restored.state.variables, tiny_data["test"],
                            config.eval_batch_size)
    assert result.accuracy == restored.record["test_accuracy"]
    with_tx = checkpoint.restore(tmp_path, tx=tx)
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(with_tx.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_with_its_own_tx_saved_before_the_variables_digest_restores_without_it(tmp_path, tiny_config,
                                                                                      tiny_data):
    """Its whole state's SHA-256 orders the optimizer state's fields as the tx does (apply_if_finite: not
    alphabetically); read as saved they come sorted, and the intact run was called damaged."""
    train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, tx=optax.apply_if_finite(optax.sgd(0.05), 5),
                             datasets=tiny_data)
    saved = tmp_path / "checkpoints" / "1" / "record" / "metadata"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "variables_sha256"}))
    with pytest.warns(UserWarning, match="restored without it, its state evaluates"):
        assert checkpoint.restore(tmp_path).epoch == 1


def test_a_loop_of_ones_own_with_its_own_tx_restores_without_it(tmp_path, tiny_config, tiny_data):
    """RunDir.save records no custom_tx: a run saved by one's own loop (the README's, with a constant Adam where the
    config has one-cycle) was refused by Predictor, eval and report as a state of another structure."""
    tx = optax.adam(1e-3)
    state = train.create_train_state(tiny_config, models.create("seed", 10), (28, 28, 1), tx)
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1, track_best=False) as run:
        state = run.restore_or_start(state, resume=False)
        state, _ = train.train_epoch(state, jax.device_put(tiny_data["train"]), 64)
        run.save(state, {"epoch": int(state.epoch), "step": int(state.step), "image_shape": [28, 28, 1]})
    with pytest.warns(UserWarning, match=r"its optimizer state is not that of the config's optimizer \('adam', "
                                         r"schedule 'onecycle'\): trained with a tx of its own\? Restored without it"):
        restored = checkpoint.restore(tmp_path)
    for a, b in zip(jax.tree.leaves(restored.state.variables), jax.tree.leaves(state.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    with_tx = checkpoint.restore(tmp_path, tx=tx).state
    for a, b in zip(jax.tree.leaves(with_tx), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():  # predicting needs no optimizer state: no warning to pass a tx= it cannot take
        warnings.simplefilter("error")
        predictor = Predictor.from_checkpoint(tmp_path)
    images = tiny_data["test"]["image"][:4]
    np.testing.assert_allclose(predictor.predict(images), ensemble.probabilities(
        state.apply_fn, state.variables, images), rtol=1e-5)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


def linear_state(tiny_config, **changes):
    c = tiny_config.replace(num_classes=3, **changes)
    return train.create_train_state(c, Linear(), (2, 2, 1), optax.sgd(0.5))


def linear_batch():
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (6, 2, 2, 1)).astype(np.uint8), "label": np.array([0, 1, 2, 0, 1, 2])}


def test_label_smoothing_loss_matches_numpy(tiny_config):
    state = linear_state(tiny_config, label_smoothing=0.2)
    batch = linear_batch()
    logits = np.asarray(state.apply_fn(state.variables, train.preprocess(batch["image"])), np.float64)
    targets = np.eye(3)[batch["label"]] * 0.8 + 0.2 / 3
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    _, sums = train.train_step(state, batch)
    assert float(sums["loss"]) / 6 == pytest.approx(-(targets * log_probs).sum(1).mean(), rel=1e-5)


def test_ema_update_rule_and_evaluation_uses_the_average(tiny_config):
    state = linear_state(tiny_config, ema_decay=0.9)
    before = np.asarray(state.params["out"]["kernel"])
    state, _ = train.train_step(state, linear_batch())
    decay = min(0.9, (1 + 1) / (10 + 1))  # capped early: step is 1 after the first update
    expected = decay * before + (1 - decay) * np.asarray(state.params["out"]["kernel"])
    np.testing.assert_allclose(state.ema_params["out"]["kernel"], expected, rtol=1e-6, atol=1e-7)
    assert state.variables["params"] is state.ema_params
    assert linear_state(tiny_config).ema_params is None


COUNT_COMPILES = """
import sys
import jax
import numpy as np
from digits_jax import config, train
compiles = []
jax.monitoring.register_event_duration_secs_listener(lambda event, seconds, **_: compiles.append(event))
rng = np.random.default_rng(0)
split = lambda n: {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                   "label": rng.integers(0, 10, n).astype(np.int32)}
train.train_and_evaluate(config.tiny(), sys.argv[1], datasets={"train": split(256), "validation": split(64),
                                                               "test": split(100)})
print(compiles.count("/jax/core/compile/backend_compile_duration"))
"""


def test_a_run_compiles_a_handful_of_programs_not_one_per_operation(tmp_path):
    """Start-up is mostly compile time: a run compiles its epoch, its eval step and a few small programs. Run op by
    op, initialisation, the finiteness check and evaluation compiled ~50 (1.9 s of a 10 s fast run). A fresh
    process on one device, so that nothing is compiled already."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_COMPILATION_CACHE_DIR": ""}
    result = subprocess.run([sys.executable, "-c", COUNT_COMPILES, str(tmp_path / "run")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) <= 10


def test_tta_log_probabilities_stay_finite_for_confident_predictions():
    # Logit gaps beyond float32's exp range in every view: log(mean(softmax)) would be log 0 = -inf for the other
    # classes, and the loss 0 * -inf = NaN although the prediction is right.
    def apply_fn(variables, images, train=False):
        brightness = images.reshape(images.shape[0], -1).mean(axis=1)
        return jnp.stack([200.0 + brightness, brightness, 10.0 * brightness], axis=1)

    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)).astype(np.uint8)
    log_p = train.log_probabilities(apply_fn, {}, train.preprocess(images), tta_shift=1)
    views = [train.preprocess(images)] + [train.translate(train.preprocess(images), dy, dx)
                                          for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    logits = np.stack([np.asarray(apply_fn({}, v), np.float64) for v in views])  # (5, B, C)
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.log(np.exp(log_softmax - log_softmax.max(0)).mean(0)) + log_softmax.max(0)
    np.testing.assert_allclose(log_p, expected, rtol=1e-5)
    sums = train.eval_step(apply_fn, {}, {"image": images, "label": np.zeros(4, np.int32)}, np.ones(4, bool), 1)
    assert np.isfinite(float(sums["loss"])) and float(sums["loss"]) < 1e-6
    with pytest.raises(ValueError, match="tta_shift = 8: images of 8x8 pixels shifted so far are blank"):
        train.log_probabilities(apply_fn, {}, train.preprocess(images), tta_shift=8)


@pytest.mark.parametrize("changes,random", [
    ({"augment": "affine"}, True),  # augmentation draws per step
    ({"model": "bn"}, True),  # dropout draws per step
    ({}, False),  # the seed CNN without augmentation draws nothing: the step number changes nothing
])
def test_each_step_draws_its_own_augmentation_and_dropout(tiny_config, tiny_data, changes, random):
    # A constant learning rate, so that only the random keys depend on the step number.
    config = tiny_config.replace(schedule="constant", **changes)
    state = fresh_state(config, tiny_data)
    batch = {k: v[:32] for k, v in tiny_data["train"].items()}
    now, _ = train.train_step(state, batch)
    later, _ = train.train_step(state.replace(step=state.step + 1), batch)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(now.params), jax.tree.leaves(later.params),
                                                    strict=True))
    assert same != random


def test_eval_step_counts_every_row_without_a_mask(tiny_config, tiny_data):
    state = fresh_state(tiny_config, tiny_data)
    batch = {k: v[:16] for k, v in tiny_data["test"].items()}
    unmasked = train.eval_step(state.apply_fn, state.variables, batch)
    masked = train.eval_step(state.apply_fn, state.variables, batch, np.ones(16, bool))
    assert int(unmasked["count"]) == 16
    for key in masked:
        np.testing.assert_array_equal(unmasked[key], masked[key])
