"""A tiny end-to-end run through the command line, in fresh processes, as a user would type it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from digits_jax import checkpoint, data, ensemble
from tests.conftest import REPO, one_device
from tests.test_data import write_idx


def digits_jax(*args, check=True, env=None):
    result = subprocess.run([sys.executable, "-m", "digits_jax", *args], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env=one_device(env))  # one device, as a user's machine has
    if check and result.returncode != 0:
        raise AssertionError(f"digits-jax {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    """XDG_CACHE_HOME for the module's training run, so that its compilation cache can be inspected."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, mnist_dir, cli_cache):
    workdir = tmp_path_factory.mktemp("cli") / "tiny"
    cache_settings = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                      "JAX_ENABLE_COMPILATION_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in cache_settings} | {"XDG_CACHE_HOME": str(cli_cache)}
    result = digits_jax("train", "--config", "tiny", "--workdir", str(workdir), "--data-dir", str(mnist_dir), env=env)
    return workdir, result.stdout


def test_eval_and_report_read_other_idx_data_as_dataset_custom(cli_run, tmp_path):
    """A model trained on MNIST scored on other IDX files: the MNIST checksums refuse them until --dataset says so."""
    workdir, _ = cli_run
    rng = np.random.default_rng(0)
    image_name, label_name = data.IDX_FILES["test"]  # test files only: the training files were needed too
    write_idx(tmp_path / f"{image_name}.gz", rng.integers(0, 256, (50, 28, 28)))
    write_idx(tmp_path / f"{label_name}.gz", rng.integers(0, 10, 50))
    refused = digits_jax("eval", "--checkpoint", str(workdir), "--data-dir", str(tmp_path), check=False)
    assert refused.returncode == 1 and "checksum mismatch" in refused.stderr
    assert "`eval`/`report --dataset custom`" in refused.stderr
    scored = digits_jax("eval", "--checkpoint", str(workdir), "--data-dir", str(tmp_path), "--dataset", "custom",
                        "--json")
    scored = json.loads(scored.stdout)
    assert scored["count"] == 50 and scored["recorded_accuracy"] is None  # MNIST's, not these images'
    digits_jax("report", str(workdir), "--data-dir", str(tmp_path), "--dataset", "custom", "--out",
               str(tmp_path / "report"))
    assert "(50 images, " in (tmp_path / "report" / "report.md").read_text()
    refused = digits_jax("eval", "--checkpoint", str(workdir), "--data-dir", str(tmp_path), "--dataset", "custom",
                         "--split", "train", check=False)
    assert refused.returncode == 1 and f"{tmp_path}: missing file: looked for train-images-idx3-ubyte" in refused.stderr


def test_train_keeps_compiled_programs_in_the_default_cache(cli_run, cli_cache):
    cached = [p for p in (cli_cache / "digits_jax" / "xla").rglob("*") if p.is_file()]
    assert cached  # at least the epoch, whose compilation takes seconds


def test_train_prints_line_oriented_progress_when_piped(cli_run):
    _, stdout = cli_run
    lines = stdout.splitlines()
    assert lines[0].startswith("start config=tiny model=seed train_images=512")
    epochs = [dict(part.split("=", 1) for part in line.split()[1:]) for line in lines if line.startswith("epoch ")]
    assert [e["epoch"] for e in epochs] == ["1", "2"]
    assert not {"image_shape", "data_sha256", "started"} & set(epochs[0])
    # experiments/bench.py times the fast preset to 99% by these two keys.
    assert all(0 < float(e["test_accuracy"]) <= 1 and float(e["seconds_from_first_step"]) > 0 for e in epochs)
    assert lines[-1].startswith("done ") and "final_test_accuracy=" in lines[-1]


def test_eval_in_a_fresh_process_reproduces_the_recorded_accuracy(cli_run):
    workdir, _ = cli_run
    report = json.loads(digits_jax("eval", "--checkpoint", str(workdir), "--step", "latest", "--json").stdout)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert report["epoch"] == 2 and report["count"] == 10_000
    assert report["accuracy"] == records[-1]["test_accuracy"] == report["recorded_accuracy"]
    assert len(report["per_class_accuracy"]) == 10 and len(report["confusion"]) == 10


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, mnist_dir):
    """A second tiny run with a 5-image validation split (the same test split, another validation split, and
    digits without validation examples) and test-time shifts, which its ensemble member must keep."""
    workdir = tmp_path_factory.mktemp("cli") / "tiny-val5"
    digits_jax("train", "--config", "tiny", "--workdir", str(workdir), "--data-dir", str(mnist_dir),
               "--set", "validation_size=5", "--set", "epochs=1", "--set", "tta_shift=1")
    return workdir


def test_eval_json_of_a_split_missing_digits_is_strict_json(other_run):
    out = digits_jax("eval", "--checkpoint", str(other_run), "--split", "validation", "--json").stdout

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads(out, parse_constant=refuse)
    per_class = report["per_class_accuracy"]
    assert report["count"] == 5 and len(per_class) == 10
    assert per_class.count(None) >= 5 and all(0 <= a <= 1 for a in per_class if a is not None)
    text = digits_jax("eval", "--checkpoint", str(other_run), "--split", "validation").stdout
    shown = text.split("per-class accuracy: ")[1].splitlines()[0]
    assert shown.count("no examples") == per_class.count(None) and "nan" not in shown


def test_eval_of_several_checkpoints_scores_their_ensemble(cli_run, other_run):
    workdir, _ = cli_run
    report = json.loads(digits_jax("eval", "--checkpoint", str(workdir), "--checkpoint", str(other_run),
                                   "--json").stdout)
    assert report["split"] == "test" and report["method"] == "mean" and report["count"] == 10_000
    recorded = []
    for run, epoch in zip((workdir, other_run), report["epochs"], strict=True):
        records = {r["epoch"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
        recorded.append(records[epoch]["test_accuracy"])  # the epoch "best" picked, scored when it was saved
    assert report["member_accuracies"] == pytest.approx(recorded, abs=1e-4)  # at most one near-tie's argmax
    # The ensemble's own score: the library's (tested against NumPy in test_ensemble.py) on the same checkpoints.
    members = [checkpoint.restore(run, step=epoch) for run, epoch in zip((workdir, other_run), report["epochs"],
                                                                          strict=True)]
    expected = ensemble.evaluate([(m.state.apply_fn, m.state.variables) for m in members],
                                 data.load(members[0].config)["test"], tta_shift=[m.config.tta_shift for m in members])
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-4)


def test_an_ensemble_of_runs_with_different_splits_is_refused(cli_run, other_run):
    workdir, _ = cli_run
    result = digits_jax("eval", "--checkpoint", str(workdir), "--checkpoint", str(other_run), "--split", "validation",
                        check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{other_run}: its validation split differs from {workdir}'s" in result.stderr


def test_runs_table_lists_the_run(cli_run):
    workdir, _ = cli_run
    out = digits_jax("runs", str(workdir)).stdout
    assert str(workdir) in out and "best_test_%" in out


def test_runs_table_skips_damaged_and_missing_directories_with_warnings(cli_run, tmp_path):
    workdir, _ = cli_run
    config = json.loads((workdir / "config.json").read_text())
    older, damaged, missing = tmp_path / "older", tmp_path / "damaged", tmp_path / "missing"
    older.mkdir()  # as from a digits_jax before the config had a seed
    (older / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "seed"}))
    (older / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": 0.5}) + "\n")  # fewer fields
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    result = digits_jax("runs", str(damaged), str(workdir), str(older), str(missing))
    header, *lines = result.stdout.splitlines()
    rows = {line.split()[0]: dict(zip(header.split(), line.split()[1:], strict=False)) for line in lines}
    assert set(rows) == {"run", str(workdir), str(older)}  # "run": the index's name, on a line of its own
    assert rows[str(older)]["name"] == config["name"] and rows[str(older)]["seed"] == "NaN"
    assert rows[str(older)]["epochs_done"] == "1" and rows[str(older)]["final_test_%"] == "50.0"
    assert rows[str(older)]["train_s"] == rows[str(older)]["img_per_s"] == "NaN"
    assert f"digits-jax: warning: skipping {damaged}: {damaged / 'config.json'} is not JSON" in result.stderr
    assert f"digits-jax: warning: skipping {missing}: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_step_other_than_the_named_checkpoints_is_refused(cli_run, tmp_path, command):
    workdir, _ = cli_run
    digit = Image.new("L", (28, 28))
    digit.paste(255, (12, 4, 16, 24))  # a stroke: a blank image would be an error of its own
    digit.save(tmp_path / "one.png")
    files = [str(tmp_path / "one.png")] if command == "predict" else []
    named = workdir / "checkpoints" / "2"
    result = digits_jax(command, "--checkpoint", str(named), "--step", "1", *files, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{named} is the checkpoint of epoch 2, not 1" in result.stderr


def test_training_into_a_finished_run_is_refused_with_a_hint(cli_run, mnist_dir):
    workdir, _ = cli_run
    result = digits_jax("train", "--config", "tiny", "--workdir", str(workdir), "--data-dir", str(mnist_dir),
                        check=False)
    assert result.returncode == 1
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_step_is_a_usage_error():
    result = digits_jax("eval", "--checkpoint", "x", "--step", "newest", check=False)
    assert result.returncode == 2 and "'newest' is not an epoch number, 'best' or 'latest'" in result.stderr


def test_bad_override_is_a_one_line_error():
    result = digits_jax("train", "--set", "batch_size=0", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "digits-jax train: error: config.batch_size = 0: must be an integer >= 1"


def test_ctrl_c_is_one_line_and_exit_code_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    from digits_jax import cli

    assert cli.reporting_errors("digits-jax train", interrupted, "; rerun with --resume") == 130
    assert capsys.readouterr().err == "digits-jax train: interrupted; rerun with --resume\n"
    assert cli.reporting_errors("best.py", interrupted) == 130  # no --resume to name there
    assert capsys.readouterr().err == "best.py: interrupted\n"


def test_resume_of_a_directory_without_checkpoints_says_it_starts_anew(tmp_path, mnist_dir, capsys):
    """A mistyped --workdir with --resume retrained from scratch without a word (`best` for 13-23 minutes)."""
    from digits_jax import cli

    workdir = tmp_path / "typo"
    assert cli.main(["train", "--config", "tiny", "--workdir", str(workdir), "--data-dir", str(mnist_dir),
                     "--resume", "--set", "epochs=1"]) == 0
    assert f"nothing to resume in {workdir} (no checkpoint there): starting a new run" in capsys.readouterr().err
    assert cli.main(["train", "--config", "tiny", "--workdir", str(workdir), "--data-dir", str(mnist_dir),
                     "--resume", "--set", "epochs=1"]) == 0  # finished: resuming has nothing to train
    assert "nothing to resume" not in capsys.readouterr().err
    # A directory that is refused is refused without the notice first.
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text('{"name": "my-app", "port": 8080}')
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "project"), "--data-dir",
                     str(mnist_dir), "--resume"]) == 1
    assert capsys.readouterr().err.startswith(f"digits-jax train: error: {tmp_path / 'project' / 'config.json'} is "
                                              "not a digits_jax run's config")


def test_an_empty_workdir_is_an_error_not_the_default(tmp_path, capsys, monkeypatch):
    """`--workdir "$DIR"` with DIR unset trained into runs/CONFIG_NAME, another run's place."""
    from digits_jax import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", "tiny", "--workdir", ""]) == 1
    assert capsys.readouterr().err == ("digits-jax train: error: --workdir is empty: give a directory, or leave "
                                       "--workdir out for runs/CONFIG_NAME\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_closed_pipe_ends_quietly(cli_run, unbuffered):
    """`digits-jax runs ... | true` printed 'error: [Errno 32] Broken pipe' (exit 1) where stdout was unbuffered, and
    Python's own "Exception ignored ... BrokenPipeError" (exit 120) where it was buffered, at exit."""
    env = {k: v for k, v in one_device().items() if k != "PYTHONUNBUFFERED"}
    runs = subprocess.Popen([sys.executable, "-m", "digits_jax", "runs", str(cli_run[0])], cwd=REPO, env=env | (
        {"PYTHONUNBUFFERED": unbuffered} if unbuffered else {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs.stdout.close()  # the reader goes away before anything is written
    assert runs.wait(timeout=120) == 141 and runs.stderr.read() == b""


def test_a_broken_pipe_other_than_stdout_is_an_error(capsys):
    from digits_jax import cli

    def child_gone() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    assert cli.reporting_errors("bench.py", child_gone) == 1
    assert capsys.readouterr().err == "bench.py: error: [Errno 32] Broken pipe\n"


@pytest.mark.parametrize("option", ["--data-dir", "--dataset"])
def test_an_empty_data_option_is_an_error_not_the_default(cli_run, capsys, option):
    """`eval --data-dir "$DIR" --dataset custom` with DIR unset scored the run's own MNIST test set as "custom"."""
    from digits_jax import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--checkpoint", str(cli_run[0]), option, ""])
    assert exit_info.value.code == 2
    assert f"argument {option}: empty: give a value, or leave the option out for its default" in capsys.readouterr().err


def test_dataset_naming_the_runs_own_is_its_default(cli_run, mnist_dir, capsys):
    """`--dataset mnist` for an MNIST run held no validation split out and dropped the recorded accuracy."""
    from digits_jax import cli

    assert cli.main(["eval", "--checkpoint", str(cli_run[0]), "--data-dir", str(mnist_dir), "--dataset", "mnist",
                     "--split", "validation", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["count"] == 128 and scored["recorded_accuracy"] == scored["accuracy"]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/tmp/x"])
def test_a_name_that_makes_no_run_directory_under_runs_is_refused(tmp_path, capsys, monkeypatch, name):
    """`--set name=` trained into runs/ itself (hiding the runs inside from `digits-jax runs runs`), '..' into the
    project folder."""
    from digits_jax import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", "tiny", "--set", f"name={name}"]) == 1
    assert capsys.readouterr().err == (f"digits-jax train: error: config.name = {name!r} makes no run directory "
                                       "under runs/ (the default --workdir runs/NAME): give a name, or --workdir\n")
    assert not (tmp_path / "runs").exists()


def test_closed_event_loop_callbacks_after_a_failed_read_are_not_printed(capsys, monkeypatch, tmp_path):
    """TensorStore's callbacks into Orbax's closed loop printed up to ~1,000 lines of tracebacks after the error."""
    from digits_jax import cli

    class RaisesWhenCollected:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    cli.main(["runs", str(tmp_path)])  # any command installs it
    checkpoint.quiet_closed_loop_callbacks()  # once: the hook is not wrapped twice
    assert sys.unraisablehook.args == (passed_on.append,)
    RaisesWhenCollected(RuntimeError("Event loop is closed"))
    RaisesWhenCollected(RuntimeError("something else"))
    assert [str(u.exc_value) for u in passed_on] == ["something else"]  # to the hook that was there before


def test_runs_table_of_a_folder_of_runs_lists_the_runs_inside(tmp_path):
    """`digits-jax runs runs/` found "no runs" and exited 0: only runs/* named each run."""
    from digits_jax import runs

    for name in ("b", "a"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text(json.dumps({"name": name, "seed": 0}))
        (tmp_path / "runs" / name / "metrics.jsonl").write_text("")
    (tmp_path / "runs" / "notes").mkdir()  # not a run: skipped
    (tmp_path / "afile").write_text("")
    with pytest.warns(UserWarning, match=f"skipping {tmp_path / 'afile'}: not a directory"):
        table = runs.table([tmp_path / "runs", tmp_path / "afile"])
    assert list(table.index) == [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")]
    assert list(table["name"]) == ["a", "b"]


def test_runs_table_shows_what_tells_the_runs_apart(tmp_path):
    """Runs that differed in tta_shift or ema_decay, or trained a module or tx given from Python, showed the same
    columns; a record edited by hand ('5', a null accuracy) was a traceback that hid every other run."""
    from digits_jax import runs

    def run(name, config, records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name, "model": "seed", **config}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    run("plain", {"tta_shift": 0, "ema_decay": 0.0}, [{"epoch": 1, "test_accuracy": 0.5}])
    run("ema", {"tta_shift": 0, "ema_decay": 0.9}, [{"epoch": 1, "test_accuracy": 0.6}])
    run("mlp", {"tta_shift": 1, "ema_decay": 0.0, "learning_rate": 0.001, "schedule": "onecycle"},
        [{"epoch": 1, "custom_model": "my.MLP", "custom_tx": True}])
    run("null", {}, [{"epoch": 1, "validation_accuracy": 0.5}, {"epoch": 2, "validation_accuracy": None}])
    run("number", {}, [{"epoch": 1}])
    (tmp_path / "number" / "metrics.jsonl").write_text('5\n{"epoch": 1}\n')
    run("text", {}, [{"epoch": 1, "test_accuracy": "0.98"}])  # showed "0.98" 100 times as a percentage
    with pytest.warns(UserWarning) as caught:
        table = runs.table([tmp_path])
    assert sorted(str(w.message) for w in caught) == [
        f"skipping {tmp_path / 'null'}: {tmp_path / 'null' / 'metrics.jsonl'} holds a record that cannot be "
        "compared ('>' not supported between instances of 'float' and 'NoneType')",
        f"skipping {tmp_path / 'number'}: {tmp_path / 'number' / 'metrics.jsonl'}, line 1: not a JSON record (not an "
        "object with an integer 'epoch'); the file was edited or damaged: delete that line (each checkpoint also "
        "holds its epoch's record)",
        f"skipping {tmp_path / 'text'}: {tmp_path / 'text' / 'metrics.jsonl'} holds a record that cannot be "
        "compared (test_accuracy of epoch 1 is '0.98', not a number)"]
    assert list(table.index) == [str(tmp_path / name) for name in ("ema", "mlp", "plain")]
    assert table["ema_decay"].tolist() == [0.9, 0.0, 0.0] and table["tta_shift"].tolist() == [0, 1, 0]
    assert table["model"].tolist() == ["seed", "my.MLP", "seed"]
    assert table.loc[str(tmp_path / "mlp"), "optimizer"] == "custom tx"
    assert table.loc[str(tmp_path / "mlp"), ["learning_rate", "schedule"]].isna().all()  # config's, never used
    assert "name" in table.columns and "null" not in table.columns


def test_eval_report_and_runs_answer_surprising_input_plainly(cli_run, tmp_path, capsys):
    """--method with one checkpoint was ignored; report on a missing directory blamed its metrics.jsonl and --out
    naming a file gave a bare "[Errno 17]"; runs printed 98.76543209876543."""
    from digits_jax import cli

    workdir, _ = cli_run
    assert cli.main(["eval", "--checkpoint", str(workdir), "--method", "vote"]) == 1
    assert "--method vote combines several --checkpoint; one was given" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nosuch")]) == 1
    assert f"{tmp_path / 'nosuch'}: no such run directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert cli.main(["report", str(workdir), "--out", str(tmp_path / "afile")]) == 1
    assert f"--out {tmp_path / 'afile'} is a file: give a directory" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": 80 / 81}) + "\n")
    (run / "config.json").write_text(json.dumps({"name": "x", "learning_rate": 1e-4}))
    assert cli.main(["runs", str(run), str(tmp_path)]) == 0  # the run, and the folder it is in: one row
    out = capsys.readouterr().out
    assert "98.77" in out and "98.765" not in out and "0.0001" in out  # measured columns rounded, config not
    assert out.count(str(run)) == 1


def test_ctrl_c_during_a_compilation_exits_130_not_with_a_crash(tmp_path):
    """Interrupted while XLA compiled (whose threads outlive the KeyboardInterrupt), `digits-jax train` printed its
    one line and then crashed in Python's teardown: "Fatal Python error: Segmentation fault", exit -11, 6 of 6 tries."""
    # The child handles SIGINT whatever this process does with it (a pytest-xdist worker may ignore it).
    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('digits_jax', run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", code, "train", "--config", "tiny", "--set", "epochs=1",
                                "--workdir", str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=one_device() | {"JAX_COMPILATION_CACHE_DIR": ""})
    assert process.stdout.readline().startswith("start ")  # the epoch's compilation comes next
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.startswith("digits-jax train: interrupted;") and "Fatal Python error" not in stderr
    assert "compiled" not in stdout  # it was interrupted there, not after
