"""Comparing finished and unfinished runs: one pandas row per run directory."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from digits_jax.checkpoint import best_record, read_records

if TYPE_CHECKING:
    import pandas as pd

CONFIG_COLUMNS = ("name", "model", "optimizer", "learning_rate", "schedule", "batch_size", "epochs", "seed")


def table(workdirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run directory that has a config.json: key config fields, final and best-by-validation
    accuracy (percent), epochs done and training seconds. Directories without a config are skipped."""
    import pandas as pd  # here, not at the top: it would add 0.2 s to the start of every training process

    rows = []
    for workdir in map(Path, workdirs):
        config_path = workdir / "config.json"
        if not config_path.exists():
            continue
        config = json.loads(config_path.read_text())
        records = read_records(workdir)
        row = {"run": str(workdir), **{k: config[k] for k in CONFIG_COLUMNS}, "epochs_done": len(records)}
        if records:
            final, best = records[-1], best_record(records)
            row |= {"final_test_%": 100 * final.get("test_accuracy", float("nan")),
                    "best_epoch": best["epoch"],
                    "best_val_%": 100 * best.get("validation_accuracy", float("nan")),
                    "best_test_%": 100 * best.get("test_accuracy", float("nan")),
                    "train_s": sum(r["train_seconds"] for r in records),
                    "img_per_s": final["images_per_second"]}
        rows.append(row)
    return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()
