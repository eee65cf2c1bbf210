"""Comparing finished and unfinished runs: one pandas row per run directory."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digits_jax.checkpoint import METRICS, best_record, read_records

if TYPE_CHECKING:
    import pandas as pd

CONFIG_COLUMNS = ("name", "model", "optimizer", "learning_rate", "schedule", "batch_size", "epochs", "seed")


def table(workdirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run directory that has a config.json: key config fields (NaN where the config or a record lacks one)
    and every other config field whose value differs between the runs listed, final and best-by-validation accuracy
    (percent), epochs done and training seconds. A module or optimizer given from Python shows as its class name in
    `model`, "custom tx" in `optimizer`. A directory without a config stands for the runs directly inside it (`runs/`
    for every run there); paths that do not exist or are not directories and runs whose files cannot be read are
    skipped with a warning, so that one damaged directory does not hide the others."""
    import pandas as pd  # here, not at the top: it would add 0.2 s to the start of every training process

    found = []
    for workdir in _run_dirs(map(Path, workdirs)):
        try:
            config = _read_config(workdir / "config.json")
            records = read_records(workdir)
            found.append((workdir, config, records, _results(records)))
        except (OSError, ValueError) as error:  # each names its file
            warnings.warn(f"skipping {workdir}: {error}", stacklevel=2)
        except TypeError as error:  # a record edited by hand: e.g. "validation_accuracy": null
            warnings.warn(f"skipping {workdir}: {workdir / METRICS} holds a record that cannot be compared ({error})",
                          stacklevel=2)
    others = sorted({key for _, config, _, _ in found for key in config} - set(CONFIG_COLUMNS))
    differing = [key for key in others if len({json.dumps(config.get(key)) for _, config, _, _ in found}) > 1]
    rows = []
    for workdir, config, records, results in found:
        row = {"run": str(workdir), **{k: config.get(k, float("nan")) for k in (*CONFIG_COLUMNS, *differing)}}
        if records and records[-1].get("custom_model"):
            row["model"] = records[-1]["custom_model"]
        if records and records[-1].get("custom_tx"):  # config's optimizer settings were not used
            row |= {"optimizer": "custom tx", "learning_rate": float("nan"), "schedule": float("nan")}
        rows.append(row | results)
    return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()


def _results(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Epochs done, final and best-by-validation accuracy (percent), training seconds of one run's records."""
    results: dict[str, Any] = {"epochs_done": records[-1]["epoch"] if records else 0}  # a lost record: still done
    if records:
        final, best = records[-1], best_record(records)
        results |= {"final_test_%": 100 * _number(final, "test_accuracy"),
                    "best_epoch": best["epoch"],
                    "best_val_%": 100 * _number(best, "validation_accuracy"),
                    "best_test_%": 100 * _number(best, "test_accuracy"),
                    "train_s": sum(_number(r, "train_seconds") for r in records),
                    "img_per_s": _number(final, "images_per_second")}
    return results


def _number(record: dict[str, Any], key: str) -> float:
    """record[key] as a float, NaN where it is missing; TypeError where it is not a number (a record edited by hand:
    "0.98" would be repeated 100 times as a percentage)."""
    value = record.get(key, float("nan"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} of epoch {record['epoch']} is {value!r}, not a number")
    return float(value)


def _run_dirs(paths: Iterable[Path]) -> Iterable[Path]:
    seen: set[Path] = set()  # a run named twice, or inside a folder also named, is one row
    for path in paths:
        if not path.is_dir():
            what = "not a directory" if path.exists() else "no such file or directory"
            warnings.warn(f"skipping {path}: {what}", stacklevel=3)
            continue
        inside = [path] if (path / "config.json").exists() else sorted(  # else a folder of runs, e.g. runs/
            p for p in path.iterdir() if (p / "config.json").exists())
        for run in inside:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                yield run


def _read_config(path: Path) -> dict[str, Any]:
    """The JSON object in config.json `path`; ValueError naming `path` when it holds none."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}): it was damaged, or the directory is not a digits-jax "
                         "run") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object: the directory is not a digits-jax run")
    return config
