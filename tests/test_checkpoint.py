from __future__ import annotations

import json
import shutil
import sys
import types
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

from digits_jax import checkpoint, ensemble, models, optim, report, train
from digits_jax.predict import Predictor


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config, tiny_data):
    workdir = tmp_path_factory.mktemp("run")
    state = train.train_and_evaluate(tiny_config, workdir, datasets=tiny_data)
    return workdir, state


def test_restore_gives_bitwise_equal_state_and_recorded_accuracy(finished_run, tiny_data, tiny_config):
    workdir, state = finished_run
    restored = checkpoint.restore(workdir, step="latest")
    assert restored.epoch == tiny_config.epochs and restored.config == tiny_config
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    result = train.evaluate(restored.state.apply_fn, restored.state.variables, tiny_data["test"],
                            tiny_config.eval_batch_size)
    assert result.accuracy == restored.record["test_accuracy"]
    assert result.loss == restored.record["test_loss"]


def test_restore_accepts_run_checkpoints_and_step_directories(finished_run):
    workdir, _ = finished_run
    by_step_dir = checkpoint.restore(workdir / "checkpoints" / "1")
    by_number = checkpoint.restore(workdir / "checkpoints", step=1)
    assert by_step_dir.epoch == by_number.epoch == 1
    np.testing.assert_array_equal(by_step_dir.state.params["dense2"]["kernel"],
                                  by_number.state.params["dense2"]["kernel"])
    best = checkpoint.restore(workdir)
    assert best.epoch == checkpoint.best_record(checkpoint.read_records(workdir))["epoch"]


def test_restored_model_names_images_of_another_size(finished_run):
    restored = checkpoint.restore(finished_run[0])
    data_config = restored.config.replace(data_dir="/d")
    restored.check_images(np.zeros((3, 28, 28, 1), np.uint8), "test", data_config)
    with pytest.raises(ValueError, match=r"the test split of /d: images of \(20, 24, 1\) \(height, width, "
                                         r"channels\), but this model was trained on \(28, 28, 1\)"):
        restored.check_images(np.zeros((3, 20, 24, 1), np.uint8), "test", data_config)


def test_restore_logs_no_warning_for_an_intact_run(finished_run, caplog):
    # Orbax warns about every read-only manager; a user evaluating a checkpoint should see only real problems.
    with caplog.at_level("WARNING"):
        checkpoint.restore(finished_run[0])
    assert not [r for r in caplog.records if r.levelno >= 30], [r.getMessage() for r in caplog.records]


def test_restore_errors_name_the_path(tmp_path, finished_run):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint found at {tmp_path}"):
        checkpoint.restore(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for epoch 7; it has \[1, 2\]"):
        checkpoint.restore(finished_run[0], step=7)
    with pytest.raises(ValueError, match=r"step 'bset': give an epoch number, 'best' or 'latest'"):
        checkpoint.restore(finished_run[0], step="bset")
    # A step given as text (as from a config file or a form) is a number too.
    with pytest.raises(ValueError, match=r"is the checkpoint of epoch 2, not 1"):
        checkpoint.restore(finished_run[0] / "checkpoints" / "2", step="1")
    assert checkpoint.restore(finished_run[0], step="1").epoch == 1
    assert checkpoint.restore(finished_run[0], step=np.int64(1)).epoch == 1
    for not_an_epoch in (1.9, True, "1.5", "\u00b2"):  # int() would have read 1.9 and True as epoch 1
        with pytest.raises(ValueError, match=r"give an epoch number, 'best' or 'latest'"):
            checkpoint.restore(finished_run[0], step=not_an_epoch)


def test_a_run_with_records_but_no_checkpoint_is_not_overwritten_without_resume(tmp_path, tiny_config, tiny_data):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config.replace(epochs=1), workdir, datasets=tiny_data)
    records = (workdir / "metrics.jsonl").read_text()
    shutil.rmtree(workdir / "checkpoints")  # kept the records, freed the space
    with pytest.raises(FileExistsError, match=r"holds the records of a run \(1 epochs in metrics.jsonl\) but no "
                                              r"checkpoint; pass --resume \(from Python: resume=True\) to train it "
                                              r"again from the start"):
        train.train_and_evaluate(tiny_config.replace(epochs=1, seed=5), workdir, datasets=tiny_data)
    assert (workdir / "metrics.jsonl").read_text() == records


def test_a_config_json_of_something_else_is_not_overwritten(tmp_path, tiny_config, tiny_data):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"their": "own"}')
    with pytest.raises(FileExistsError, match=rf"{project / 'config.json'} is not a digits_jax run's config and "
                                              rf"{project} holds no run: .*choose a new or empty --workdir"):
        train.train_and_evaluate(tiny_config.replace(epochs=1), project, resume=True, datasets=tiny_data)
    assert sorted(p.name for p in project.iterdir()) == ["config.json"]
    assert (project / "config.json").read_text() == '{"their": "own"}'
    # Other files are no obstacle (a log redirected there, .gitkeep); nor is the config.json a run left behind.
    for name in ("train.log", ".gitkeep"):
        (tmp_path / "made" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "made" / name).write_text("")
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / "config.json").write_text(tiny_config.to_json())
    for workdir in (tmp_path / "made", tmp_path / "left"):
        train.train_and_evaluate(tiny_config.replace(epochs=1), workdir, datasets=tiny_data)
        assert checkpoint.latest_epoch(workdir) == 1


def test_a_finished_run_keeping_only_its_best_checkpoint_is_finished(finished_run, tmp_path, tiny_config):
    """Runs brought back from a GPU with their chosen checkpoint only were 'unfinished': best.py retrained them."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    epochs = tiny_config.epochs
    assert epochs == 2 and checkpoint.is_finished(workdir, epochs) and not checkpoint.is_finished(workdir, 3)
    records = checkpoint.read_records(workdir)
    records[0]["validation_accuracy"] = 1.0  # validation picked epoch 1
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.rmtree(workdir / "checkpoints" / "2")
    assert checkpoint.is_finished(workdir, epochs)
    # Killed after epoch 1's checkpoint: its records end there.
    (workdir / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert not checkpoint.is_finished(workdir, epochs)
    # The records reach the end, but the checkpoint restore would pick is gone.
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r | {"validation_accuracy": 0.5 * r["epoch"]}) + "\n"
                                                   for r in records))
    assert not checkpoint.is_finished(workdir, epochs)
    assert not checkpoint.is_finished(tmp_path / "nothing", epochs)


def test_resume_does_not_replace_the_records_of_another_run(finished_run, tmp_path, tiny_config, tiny_data):
    """Scripts resume whatever is in their directory: another config's records without checkpoints were replaced."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    shutil.rmtree(workdir / "checkpoints")
    records = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"cannot resume .*: config fields \['seed'\] differ from the saved"):
        train.train_and_evaluate(tiny_config.replace(seed=9), workdir, resume=True, datasets=tiny_data)
    assert (workdir / "metrics.jsonl").read_text() == records
    # The same run's records: trained again from the start, replacing them.
    train.train_and_evaluate(tiny_config, workdir, resume=True, datasets=tiny_data)
    assert checkpoint.latest_epoch(workdir) == 2


@pytest.mark.parametrize("text", ["{", "", '{"epoch": 3}'])
def test_resume_names_a_damaged_config_json(finished_run, tmp_path, tiny_config, tiny_data, text):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    (workdir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{workdir / 'config.json'}: .*; fix the file, or start a new --workdir"):
        train.train_and_evaluate(tiny_config, workdir, resume=True, datasets=tiny_data)


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class OtherMLP(TinyMLP):
    pass


def test_a_run_of_a_module_given_from_python_restores_only_with_it(tmp_path, tiny_config, tiny_data, capsys):
    workdir = tmp_path / "mlp"
    train.train_and_evaluate(tiny_config.replace(epochs=1), workdir, model=TinyMLP(), datasets=tiny_data)
    assert checkpoint.read_records(workdir)[0]["custom_model"] == "tests.test_checkpoint.TinyMLP"
    assert "model=tests.test_checkpoint.TinyMLP " in capsys.readouterr().out  # not config.model's "seed"
    # Without it the config's model "seed" would be built: a CLI command must say what to do instead.
    with pytest.raises(checkpoint.ModelNeededError, match=r"trained with a model given from Python "
                                                          r"\(tests.test_checkpoint.TinyMLP\), not the registered "
                                                          r"model 'seed' of its config: give that module from Python: "
                                                          r"digits_jax.restore\(path, model=...\), Predictor"):
        checkpoint.restore(workdir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = checkpoint.restore(workdir, model=TinyMLP())
    assert restored.epoch == 1
    assert not [w for w in caught if "restoring it into" in str(w.message)]  # the module it was trained with
    with pytest.warns(UserWarning, match=r"trained with tests.test_checkpoint.TinyMLP; restoring it into "
                                         r"tests.test_checkpoint.OtherMLP"):
        checkpoint.restore(workdir, model=OtherMLP())  # the same parameter tree: it would restore silently
    images = tiny_data["test"]["image"][:8]
    predictor = Predictor.from_checkpoint(workdir, model=TinyMLP())
    # The report too (it had no model=: the error's advice led nowhere); on all 10,000 test images, 2,000 recorded.
    text = report.write_report(workdir, tmp_path / "report", model=TinyMLP()).read_text()
    assert "The checkpoint with the best validation accuracy is epoch 1;" in text
    assert "model `tests.test_checkpoint.TinyMLP`" in text  # not config.model's "seed"
    np.testing.assert_allclose(predictor.predict(images), ensemble.probabilities(  # other batch shapes: rounding
        restored.state.apply_fn, restored.state.variables, images, tta_shift=restored.config.tta_shift), rtol=1e-5)
    with pytest.raises(ValueError, match=r"trained with the module tests.test_checkpoint.TinyMLP given from Python, "
                                         r"this call gives config.model 'seed'; resume with the same model"):
        train.train_and_evaluate(tiny_config.replace(epochs=1), workdir, resume=True, datasets=tiny_data)


class WiderMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10)(jnp.concatenate([x, x], axis=-1).reshape(x.shape[0], -1))


class RenamedMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_a_module_of_other_shapes_is_named_not_called_damaged(tmp_path, tiny_config, tiny_data, monkeypatch):
    workdir = tmp_path / "mlp"
    train.train_and_evaluate(tiny_config.replace(epochs=1), workdir, model=TinyMLP(), datasets=tiny_data)
    # Named from the checkpoint's metadata before its arrays are read: a read refused for its shapes left TensorStore
    # callbacks that printed "Event loop is closed" tracebacks after the error, at random.
    reads, restore = [], ocp.CheckpointManager.restore

    def counting_state_reads(self, step, args=None, **kwargs):
        if args is not None and "state" in args:
            reads.append(step)
        return restore(self, step, args=args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", counting_state_reads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.CheckpointSkippedWarning)
        other_shapes = (r"checkpoints/1 holds arrays of other shapes than the train state built to restore it "
                        r"\(an array of shape \(784, 10\) in the checkpoint, \(1568, 10\) asked for\): give the model "
                        r"it was trained with \(its widths and num_classes\) and images of the size it was trained "
                        r"on")
        with (pytest.raises(ValueError, match=other_shapes),
              pytest.warns(UserWarning, match="restoring it into tests.test_checkpoint.WiderMLP")):
            checkpoint.restore(workdir, model=WiderMLP())
    assert reads == [] and (workdir / "checkpoints" / "1").is_dir()
    assert checkpoint.restore(workdir, model=TinyMLP()).epoch == 1 and reads == [1]
    # Other layer names, without tx= (the state read as saved, in case only the optimizer differed): the intact
    # checkpoint was called damaged, after a warning that its optimizer was its own.
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.CheckpointSkippedWarning)
        warnings.simplefilter("error", checkpoint.OptimizerStateAsSavedWarning)
        with (pytest.raises(ValueError, match=r"checkpoints/1 holds a train state of another structure"),
              pytest.warns(UserWarning, match="restoring it into tests.test_checkpoint.RenamedMLP")):
            checkpoint.restore(workdir, model=RenamedMLP())


def test_a_registered_model_given_explicitly_is_not_recorded_as_custom(tmp_path, tiny_config, tiny_data):
    model = models.create(tiny_config.model, tiny_config.num_classes)
    train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path, model=model, datasets=tiny_data)
    assert "custom_model" not in checkpoint.read_records(tmp_path)[0]
    assert checkpoint.restore(tmp_path).epoch == 1


@pytest.mark.parametrize("accuracies,best_epoch", [
    ([0.5, 0.9, 0.7], 2),
    ([0.9, 0.9, 0.8], 2),  # ties go to the later epoch, as Orbax's BestN keeps it
    ([None, None], 2),  # no validation split: the last epoch
])
def test_best_record(accuracies, best_epoch):
    records = [{"epoch": i + 1} | ({} if a is None else {"validation_accuracy": a}) for i, a in enumerate(accuracies)]
    assert checkpoint.best_record(records)["epoch"] == best_epoch


def test_a_config_this_version_cannot_build_is_an_error_not_damage(tmp_path, finished_run):
    import json
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    saved = workdir / "checkpoints" / "2" / "config" / "metadata"
    saved.write_text(json.dumps(json.loads(saved.read_text()) | {"from_the_future": 1}))
    with pytest.raises(ValueError, match=r"checkpoints/2 was saved with a config this digits_jax cannot use: "
                                         r"unknown config keys \['from_the_future'\]"):
        checkpoint.restore(workdir, step="latest")


def test_records_lost_with_metrics_jsonl_come_back_from_the_kept_checkpoints(tmp_path, tiny_config, tiny_data):
    """Only the resumed checkpoint's record came back: the best epoch's was lost, summaries chose another, and
    `runs` counted 2 epochs done of 3."""
    from digits_jax import runs

    config = tiny_config.replace(epochs=3, keep_checkpoints=3)
    train.train_and_evaluate(config, tmp_path, datasets=tiny_data)
    whole = checkpoint.read_records(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    train.train_and_evaluate(config, tmp_path, resume=True, datasets=tiny_data)
    rebuilt = checkpoint.read_records(tmp_path)
    assert [r["epoch"] for r in rebuilt] == [1, 2, 3]
    assert [r["validation_accuracy"] for r in rebuilt] == [r["validation_accuracy"] for r in whole]
    assert rebuilt[:2] == whole[:2] and "state_sha256" not in rebuilt[0]
    # Where a record is gone for good (its checkpoint deleted too), its epoch still counts as done.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rebuilt[1:]))
    assert runs.table([tmp_path])["epochs_done"].tolist() == [3]


def test_the_best_checkpoint_survives_a_resume(tmp_path, tiny_config):
    # Orbax keeps the best checkpoint only while it can read back each step's metrics; a resumed process must too.
    state = {"w": jax.numpy.zeros(3)}
    accuracies = {1: 0.9, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1) as run:
        run.restore_or_start(state, resume=False)
        for epoch in (1, 2, 3):
            run.save(state, {"epoch": epoch, "step": epoch, "image_shape": [3, 1, 1],
                            "validation_accuracy": accuracies[epoch]})
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1) as run:
        run.restore_or_start(state, resume=True)
        for epoch in (4, 5):
            run.save(state, {"epoch": epoch, "step": epoch, "image_shape": [3, 1, 1],
                            "validation_accuracy": accuracies[epoch]})
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 5]


def test_a_restored_state_trains_on_with_the_runs_schedule(tmp_path, tiny_config, tiny_data):
    config = tiny_config.replace(schedule="onecycle", learning_rate=1e-2)
    train.train_and_evaluate(config, tmp_path, datasets=tiny_data)
    steps_per_epoch = len(tiny_data["train"]["label"]) // config.batch_size
    default = checkpoint.restore(tmp_path, step=1).state  # mid-schedule
    explicit = checkpoint.restore(tmp_path, step=1, tx=optim.optimizer(config, steps_per_epoch)).state
    batch = {k: v[:config.batch_size] for k, v in tiny_data["train"].items()}
    for a, b in zip(jax.tree.leaves(train.train_step(default, batch)[0].params),
                    jax.tree.leaves(train.train_step(explicit, batch)[0].params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_line_in_the_records_is_named(tmp_path):
    (tmp_path / checkpoint.METRICS).write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n{"ep')
    with pytest.raises(ValueError, match=f"{tmp_path / checkpoint.METRICS}, line 2: not a JSON record"):
        checkpoint.read_records(tmp_path)
    (tmp_path / checkpoint.METRICS).write_text('{"epoch": 1}\n{"ep')  # a last line cut short by a crash
    assert checkpoint.read_records(tmp_path) == [{"epoch": 1}]


@pytest.mark.parametrize("record", [
    {"epoch": 0, "step": 40, "image_shape": [28, 28, 1]},  # train_step alone leaves state.epoch at 0
    {"epoch": 1, "step": 8},
    {"epoch": 1.0, "step": 8, "image_shape": [28, 28, 1]},
])
def test_a_record_restore_could_not_read_back_is_refused_before_saving(tmp_path, tiny_config, record):
    """restore() rebuilt the state from such records with a bare ZeroDivisionError or KeyError."""
    state = {"w": jax.numpy.zeros(3)}
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1, track_best=False) as run:
        run.restore_or_start(state, resume=False)
        with pytest.raises(ValueError, match=r"a record to save needs 'epoch' \(an int >= 1\), 'step' .*'image_shape'"):
            run.save(state, record)
    assert checkpoint.latest_epoch(tmp_path) is None and checkpoint.read_records(tmp_path) == []


def test_numpy_and_jax_values_in_a_record_are_saved_as_numbers(tmp_path, tiny_config):
    """A record built from train_epoch's metrics or NumPy values was a bare "not JSON serializable" TypeError."""
    state = {"w": jax.numpy.zeros(3)}
    record = {"epoch": np.int64(1), "step": jax.numpy.int32(4), "image_shape": np.array([3, 1, 1]),
              "train_loss": jax.numpy.float32(0.25), "validation_accuracy": np.float32(0.5), "note": "ok"}
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1) as run:
        run.restore_or_start(state, resume=False)
        run.save(state, record)
        with pytest.raises(ValueError, match=r"record\['opt'\] cannot be written to metrics.jsonl \(type object\)"):
            run.save(state, {"epoch": 2, "step": 8, "image_shape": [3, 1, 1], "opt": object()})
    expected = {"epoch": 1, "step": 4, "image_shape": [3, 1, 1], "train_loss": 0.25, "validation_accuracy": 0.5,
                "note": "ok"}
    assert checkpoint.read_records(tmp_path) == [expected]
    assert checkpoint.latest_epoch(tmp_path) == 1


def test_a_record_without_validation_accuracy_saves_quietly_with_track_best(tmp_path, tiny_config, caplog):
    """Orbax logged "Requested `tracked_metric`; did not provide metrics." at every save of one's own loop that
    kept RunDir's default (track_best with a validation split)."""
    state = {"w": jax.numpy.zeros(3)}
    absl_logging.set_verbosity(absl_logging.WARNING)  # the default, which conftest puts back after each test
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1) as run:
        run.restore_or_start(state, resume=False)
        for epoch in (1, 2):
            run.save(state, {"epoch": epoch, "step": epoch, "image_shape": [3, 1, 1]})
    assert "tracked_metric" not in caplog.text and checkpoint.latest_epoch(tmp_path) == 2


def test_a_validation_accuracy_without_track_best_is_refused(tmp_path, tiny_config):
    """Orbax would keep only the latest checkpoints: the best one named by the records would be deleted unseen."""
    state = {"w": jax.numpy.zeros(3)}
    with checkpoint.RunDir(tmp_path, tiny_config, keep=1, track_best=False) as run:
        run.restore_or_start(state, resume=False)
        with pytest.raises(ValueError, match=r"has 'validation_accuracy' but this RunDir was made with "
                                             r"track_best=False.*make it with track_best=True"):
            run.save(state, {"epoch": 1, "step": 1, "image_shape": [3, 1, 1], "validation_accuracy": 0.9})


def test_restoring_past_a_damaged_checkpoint_quiets_the_reads_it_left_behind(finished_run, tmp_path, monkeypatch):
    """From Python (the CLI drops them), falling back past truncated array files printed up to ~100 lines of
    "Event loop is closed" tracebacks afterwards, at random: the failed read's TensorStore callbacks."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    for array_file in (workdir / "checkpoints" / "2" / "state" / "d").iterdir():
        array_file.write_bytes(array_file.read_bytes()[:array_file.stat().st_size // 2])
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    with pytest.warns(checkpoint.CheckpointSkippedWarning, match="skipping damaged checkpoint"):
        assert checkpoint.restore(workdir, step="latest").epoch == 1
    assert sys.unraisablehook.args == (passed_on.append,)  # installed over the hook that was there
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("something else")))
    assert [str(u.exc_value) for u in passed_on] == ["something else"]


def test_a_damaged_epoch_asked_for_by_number_names_the_intact_ones(finished_run, tmp_path):
    """The error said "no intact checkpoint ... train again" while epoch 2 was intact, after a warning that ended in a
    dump of TensorStore's whole spec."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    largest = max((p for p in (workdir / "checkpoints" / "1" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4000] = bytes(4000)
    largest.write_bytes(bytes(data))
    refused = pytest.raises(FileNotFoundError, match=r"the checkpoint of epoch 1 in .* is damaged; epochs \[2\] are "
                                                     r"there: give the run directory with --step one of them")
    with pytest.warns(checkpoint.CheckpointSkippedWarning, match="skipping damaged checkpoint") as caught, refused:
        checkpoint.restore(workdir, step=1)
    assert not any("TensorStore details" in str(w.message) for w in caught)
    assert checkpoint.restore(workdir, step=2).epoch == 2


@pytest.mark.parametrize("error", [EOFError(), ValueError("")])
def test_a_read_error_without_a_message_is_named_by_its_type(error):
    """An empty message raised IndexError in the warning, which stopped the fall-back to an older checkpoint."""
    with pytest.warns(checkpoint.CheckpointSkippedWarning, match=f"skipping damaged checkpoint x/3: "
                                                                 f"{type(error).__name__}$"):
        checkpoint._warn_skipped(Path("x/3"), error)
