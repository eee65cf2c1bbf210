"""The accuracy experiments' pipelines at tiny scale: they run and write their tables; the summary statistics
against NumPy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from digits_jax import checkpoint, data, train
from tests.conftest import REPO, experiment, one_device


def test_ladder_runs_every_rung_and_writes_csv_and_markdown(tmp_path, mnist_dir):
    out = tmp_path / "results" / "ladder"
    command = [sys.executable, "experiments/ladder.py", "--tiny", "--seeds", "1", "--runs", str(tmp_path / "runs"),
               "--out", str(out)]
    env = one_device()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_csv(out.with_suffix(".csv"))
    rungs = ["seed recipe", "bn architecture", "+ augmentation", "+ schedule", "+ EMA", "+ TTA", "ensemble of 1"]
    assert list(runs["rung"]) == rungs
    assert runs["test_accuracy"].between(0, 1).all()
    table = out.with_suffix(".md").read_text()
    assert "| rung" in table and "ensemble of 1" in table and "Hardware:" in table
    assert "nan" not in table  # one run per rung: no std, a blank
    assert "(1 seeds; 1 epochs for the seed recipe, 1 for the other rungs; tiny)" in table
    assert "bn-architecture-1epochs-seed0" in {p.name for p in (tmp_path / "runs").iterdir()}


def run_script(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """experiments/SCRIPT run with `arguments` from the repository root on one device; for calls it refuses."""
    return subprocess.run([sys.executable, f"experiments/{script}", *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=one_device())


def test_ladder_refuses_epochs_that_tiny_would_ignore():
    result = run_script("ladder.py", "--tiny", "--epochs", "3")
    assert result.returncode == 2 and "--tiny trains every rung for 1 epoch: leave out --epochs" in result.stderr


def test_ladder_summary_against_numpy():
    summarise = experiment("ladder").summarise
    accuracies = {"a": [0.99, 0.995, 0.993], "b": [0.9971, 0.9969]}
    runs = pd.DataFrame([{"rung": rung, "seed": i, "test_accuracy": acc, "wall_seconds": 10.0 * (i + 1)}
                         for rung, values in accuracies.items() for i, acc in enumerate(values)])
    table = summarise(runs)
    assert list(table.index) == ["a", "b"] and table["runs"].tolist() == [3, 2]
    for rung, values in accuracies.items():
        row = table.loc[rung]
        assert row["test accuracy % (mean)"] == round(100 * np.mean(values), 2)
        assert row["std"] == round(100 * np.std(values, ddof=1), 2)
        assert row["best"] == round(100 * max(values), 2)
        assert row["wall s (mean)"] == np.mean([10.0 * (i + 1) for i in range(len(values))])


def test_ladder_wall_time_adds_up_the_calls_of_a_resumed_run():
    training_wall_seconds = experiment("ladder").training_wall_seconds
    # Epochs 1-3 in one call (10, 20, 30 s), then resumed: epochs 4-5 at 12 and 22 s of the new call.
    records = [{"started": "a", "wall_seconds": w} for w in (10.0, 20.0, 30.0)]
    records += [{"started": "b", "wall_seconds": w} for w in (12.0, 22.0)]
    assert training_wall_seconds(records) == 52.0
    assert training_wall_seconds(records[:3]) == 30.0
    # Killed after its first epoch; the resumed call's first epoch (with its start-up) took longer than that.
    records = [{"started": "a", "wall_seconds": 54.8}, {"started": "b", "wall_seconds": 61.4},
               {"started": "b", "wall_seconds": 106.2}]
    assert training_wall_seconds(records) == 54.8 + 106.2


def test_best_recipe_trains_without_the_test_set_and_reuses_a_finished_run(tmp_path, tiny_config):
    train_blind = experiment("best").train_blind
    workdir = str(tmp_path / "run")
    splits = data.load(tiny_config)
    chosen = train_blind(tiny_config, workdir, splits)
    records = checkpoint.read_records(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all("validation_accuracy" in r and "test_accuracy" not in r for r in records)
    assert chosen.epoch == checkpoint.best_record(records)["epoch"]
    saved = (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns
    assert train_blind(tiny_config, workdir, splits).epoch == chosen.epoch  # finished: restored, not trained again
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns == saved
    with pytest.raises(ValueError, match=r"config fields \['learning_rate'\] differ"):
        train_blind(tiny_config.replace(learning_rate=0.5), workdir, splits)
    other = splits | {"validation": {k: v[::-1] for k, v in splits["validation"].items()}}
    with pytest.raises(ValueError, match="holds a run trained on other data"):
        train_blind(tiny_config, workdir, other)
    # Killed between its last record and that epoch's checkpoint (or that checkpoint deleted): finished if validation
    # picked an earlier epoch, else that epoch is trained again (both cases: test_checkpoint's is_finished test).
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
    assert train_blind(tiny_config, workdir, splits).epoch == chosen.epoch
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir() == (chosen.epoch == 2)
    # The same recipe trained by `digits-jax train` (the test split evaluated after each epoch) is reused too.
    train_run = tmp_path / "train"
    train.train_and_evaluate(tiny_config, train_run, datasets=splits)
    saved = (train_run / "metrics.jsonl").stat().st_mtime_ns
    assert train_blind(tiny_config, str(train_run), splits).epoch == chosen.epoch
    assert (train_run / "metrics.jsonl").stat().st_mtime_ns == saved
    # Unfinished, it cannot be finished blind (its records would mix both ways): said so, not "other data".
    train.train_and_evaluate(tiny_config.replace(epochs=1), tmp_path / "unfinished", datasets=splits)
    with pytest.raises(ValueError, match="holds an unfinished run that evaluated the test split after each epoch"):
        train_blind(tiny_config, str(tmp_path / "unfinished"), splits)


def test_best_and_ensemble_without_a_validation_split_test_the_last_epoch(tmp_path, mnist_dir):
    tiny = ["--set", "train_limit=256", "--set", "validation_size=0", "--set", "epochs=2", "--set", "batch_size=64",
            "--set", "tta_shift=0", "--set", f"data_dir={mnist_dir}"]
    env = one_device()

    def run(script: str, *args: str, then: tuple[str, ...] = ()) -> list[str]:
        result = subprocess.run([sys.executable, str(REPO / "experiments" / script), *args, *tiny, *then],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.splitlines()

    best = run("best.py")
    # Named by the fields that differ from the recipe (data_dir aside: where the data are read from).
    name = "best-bn-full-train_limit=256-batch_size=64-epochs=2-tta_shift=0-seed0"
    workdir = tmp_path / "runs" / name
    summary = json.loads(best[-1])
    assert summary["workdir"] == f"runs/{name}" and summary["chosen_epoch"] == 2
    assert summary["validation_accuracy"] is None and "the last epoch" in best[-2]
    records = checkpoint.read_records(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert not any("validation_accuracy" in r or "test_accuracy" in r for r in records)
    saved = (workdir / "metrics.jsonl").stat().st_mtime_ns
    ensemble = run("ensemble.py", "--seeds", "1")
    result = json.loads(ensemble[-1])
    assert result["epochs"] == [2] and "validation" not in result and "no validation split" in ensemble[-2]
    assert (workdir / "metrics.jsonl").stat().st_mtime_ns == saved  # the finished run is reused, not retrained
    # The same checkpoint through the ensemble's batching: at most a near-tie's argmax may differ.
    assert result["test"]["member_accuracies"][0] == pytest.approx(summary["test_accuracy"], abs=2e-4)
    refused = subprocess.run([sys.executable, "-m", "digits_jax", "eval", "--checkpoint", str(workdir), "--split",
                              "validation"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 1 and f"{workdir} has no validation split" in refused.stderr
    refused = subprocess.run([sys.executable, str(REPO / "experiments" / "ensemble.py"), "--seeds", "1",
                              "--validation-only", *tiny], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=env)
    assert refused.returncode == 2
    assert "--validation-only: these members hold out no validation split" in refused.stderr
    # With a validation split: scored there only.
    compared = run("ensemble.py", "--seeds", "1", "--validation-only", then=("--set", "validation_size=128"))
    result = json.loads(compared[-1])
    assert list(result) == ["members", "epochs", "validation"] and "test set not scored" in compared[-2]


@pytest.mark.parametrize("script", ["bench.py", "bench_peers.py"])
def test_benchmarks_refuse_one_epoch_that_would_be_all_warm_up(script):
    result = run_script(script, "--epochs", "1")
    assert result.returncode == 2 and "--epochs must be at least 2" in result.stderr


def test_bench_refuses_bad_device_counts_and_missing_data_in_one_line(tmp_path):
    """A bad --scaling-devices was found after minutes of timing, and a missing data directory was a traceback."""
    for counts in ("1,x", "3", "0"):
        result = run_script("bench.py", "--scaling-devices", counts)
        assert result.returncode == 2
        assert f"'{counts}': give device counts that divide the batch of 128, e.g. 1,2,4,8" in result.stderr
    result = subprocess.run([sys.executable, "experiments/bench.py"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=one_device() | {"DIGITS_JAX_DATA_DIR": str(tmp_path / "nowhere")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"bench.py: error: {tmp_path / 'nowhere'}: data directory does not exist")


def test_bench_peers_refuses_a_missing_peers_folder_before_timing(tmp_path):
    """Without ../shared/peers it ran our whole benchmark (51 s) and then failed with a bare errno."""
    result = run_script("bench_peers.py", "--pairs", "1", "--peers", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and result.stderr == (
        f"bench_peers.py: error: {tmp_path / 'nowhere'}: no keras_seed.py, torch_seed.py, flax_seed.py, torch_fast.py "
        "there; give --peers the folder of the peer scripts (../shared/peers beside the repository)\n")


def test_benchmarks_refuse_what_they_could_not_write_or_count_before_timing(tmp_path):
    """An --out that is a directory failed after all the timing, every result lost; --fast-seeds -1 did one
    unreported run; --rounds 0 wrote [] and exited 0, and --rounds beside --pairs was ignored."""
    peers = tmp_path / "peers"
    peers.mkdir()
    for name in ("keras_seed.py", "torch_seed.py", "flax_seed.py", "torch_fast.py"):
        (peers / name).write_text("")
    for script, arguments, message in [
        ("bench.py", ["--out", str(tmp_path)], f"--out {tmp_path} is a directory: give a file name in it"),
        ("bench.py", ["--fast-seeds", "-1"], "--fast-seeds must be 0 (no fast preset runs) or more"),
        ("bench_peers.py", ["--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
        ("bench_peers.py", ["--rounds", "0"], "--rounds must be at least 1"),
        ("bench_peers.py", ["--rounds", "2", "--pairs", "3"], "--rounds and --pairs: give one"),
    ]:
        result = run_script(script, *arguments, *(["--peers", str(peers)] if script == "bench_peers.py" else []))
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr[-2000:])
        assert "---" not in result.stdout and "seed CNN" not in result.stdout  # nothing was timed


def test_bench_peers_pairs_summary():
    bench_peers = experiment("bench_peers")
    pairs = [{"ours": 6000.0, "keras": 5000.0, "ratio": 1.2}, {"ours": 7000.0, "keras": 4000.0, "ratio": 1.75},
             {"ours": 5000.0, "keras": 5000.0, "ratio": 1.0}]
    lines = bench_peers.pairs_summary(pairs).splitlines()
    assert lines[1] == "pair 2: ours 7,000, keras 4,000 images/s: 1.75x"
    assert lines[-1] == "ours/keras over 3 pairs: median 1.20x, mean 1.32x, range 1.00-1.75x"  # mean 3.95 / 3


def test_bench_children_take_a_share_of_a_gpu_unless_told_otherwise(monkeypatch):
    bench = experiment("bench")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    env = bench.child_env(JAX_COMPILATION_CACHE_DIR="/tmp/cache")
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2" and env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/cache"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.1")  # the caller's own setting wins
    assert bench.child_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.1"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--set", "seed=3"], "--set seed=3: members take their seeds from --seeds and models from --models"),
    (["--set", "model=strided"], "--set model=strided: members take"),
    (["--models", "bn", "strided", "bn"], "--models bn strided bn: name each model once"),  # bn counted twice
    # Refused before any member trains (it was after all of them).
    (["--validation-only", "--set", "validation_size=0"], "--validation-only: these members hold out no validation"),
])
def test_ensemble_refuses_members_it_cannot_tell_apart(arguments, message):
    result = run_script("ensemble.py", *arguments)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize(("script", "arguments", "message"), [
    ("seed.py", ["--workdir", ""], "--workdir is empty"),  # it trained into the current directory
    ("chaos.py", ["--epochs", "1"], "--epochs must be at least 2: a damaged newest checkpoint needs an older one"),
    ("chaos.py", ["--kills", "-1"], "--kills must be 0 or more"),  # "injected -1 kills: 0/-1"
    ("fonts.py", ["--per-digit", "0"], "--per-digit must be at least 1"),  # "need at least one array to stack"
])
def test_scripts_refuse_impossible_arguments_before_any_work(script, arguments, message):
    result = run_script(script, *arguments)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("script", ["best.py", "ensemble.py"])
def test_scripts_report_bad_input_in_one_line_as_the_cli_does(script):
    result = run_script(script, "--set", "epochs=abc")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{script}: error: --set epochs=abc: cannot parse 'abc' as int")


@pytest.mark.parametrize("name", ["best", "ensemble", "ladder", "bench", "bench_peers", "seed", "chaos", "fonts",
                                  "profile_step"])
def test_help_describes_the_script_in_whole_sentences(name, monkeypatch, capsys):
    """--help showed the docstring's first line only, cut mid-sentence ("...trains it (or finishes ... and")."""
    module = experiment(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    summary = "".join(module.__doc__.split("\n\n")[0].split())  # argparse rewraps it, also at hyphens
    assert summary.endswith(".") and summary in "".join(capsys.readouterr().out.split())
