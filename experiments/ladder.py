"""The accuracy ladder: seed -> better architecture -> + augmentation -> + schedule -> + EMA -> + TTA -> ensemble,
each training rung with several seeds, summarised as a pandas table (CSV and Markdown).

    make ladder                    # = .venv/bin/python experiments/ladder.py [--seeds 3] [--epochs 15]

Each rung adds one thing to the one before: "bn architecture" is the batch-norm CNN with dropout and
constant Adam 1e-3; "+ augmentation" adds on-device affine distortions; "+ schedule" switches to
one-cycle Adam 2e-3 with label smoothing 0.1; "+ EMA" evaluates an exponential moving average (0.999) of
the weights; "+ TTA" evaluates the same checkpoints averaged over 1-pixel shifts; "ensemble" averages the
probabilities of the "+ TTA" models of all seeds. Every run's epoch is chosen on the validation split; the
test accuracy of that epoch is what the table reports (mean, std over seeds, best) with the wall time.
Runs live in runs/ladder/RUNG-EPOCHSepochs-seedN and are reused when finished, so an interrupted ladder continues
(and one with other --epochs trains its own).
`--tiny` runs the same pipeline on 512 training images for 1 epoch and tests on the first 1,000 test images (a
smoke test, seconds per rung).
"""

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import pandas as pd
from best import RERUN

from digits_jax import checkpoint, cli, config, data, ensemble, train
from digits_jax.config import Config


def training_rungs(tiny: bool, epochs: int) -> list[tuple[str, Config]]:
    """(rung name, config) of each rung that trains, in ladder order."""
    base = config.tiny().replace(epochs=1) if tiny else config.best().replace(epochs=epochs)
    architecture = base.replace(name="ladder", model="bn", augment="none", schedule="constant", learning_rate=1e-3,
                                label_smoothing=0.0, ema_decay=0.0, tta_shift=0)
    augmented = architecture.replace(augment="affine")
    scheduled = augmented.replace(schedule="onecycle", learning_rate=2e-3, label_smoothing=0.1)
    averaged = scheduled.replace(ema_decay=0.9 if tiny else 0.999)
    seed_recipe = config.tiny().replace(epochs=1, learning_rate=1e-4, schedule="constant") if tiny else config.seed()
    return [("seed recipe", seed_recipe), ("bn architecture", architecture), ("+ augmentation", augmented),
            ("+ schedule", scheduled), ("+ EMA", averaged)]


def slug(rung: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in rung.strip("+ ")).strip("-")


def training_wall_seconds(records: list[dict]) -> float:
    """Wall seconds a run's training calls took, from its per-epoch records: each record's wall_seconds counts
    from the start of its call to `train_and_evaluate` (its "started"), so a resumed run sums its calls' last."""
    last: dict[str, float] = {}
    for record in records:
        last[record["started"]] = record["wall_seconds"]
    return sum(last.values())


def run_ladder(rungs: list[tuple[str, Config]], seeds: int, tiny: bool, root: Path) -> pd.DataFrame:
    """Trains (or reuses) every run of `rungs`; one row per (rung, seed) plus one each for TTA and the ensemble."""
    splits = data.load(rungs[0][1])  # every rung trains on the same splits: read MNIST once
    if tiny:
        splits = splits | {"test": {key: array[:1000] for key, array in splits["test"].items()}}
    rows = []
    for rung, rung_config in rungs:
        for seed in range(seeds):
            workdir = root / f"{slug(rung)}-{rung_config.epochs}epochs-seed{seed}"
            train.train_and_evaluate(rung_config.replace(seed=seed), workdir, resume=True, datasets=splits)
            records = checkpoint.read_records(workdir)
            chosen = checkpoint.best_record(records)
            rows.append({"rung": rung, "seed": seed, "test_accuracy": chosen["test_accuracy"],
                         "epoch": chosen["epoch"], "wall_seconds": training_wall_seconds(records),
                         "workdir": str(workdir)})
    ema_runs = [r for r in rows if r["rung"] == "+ EMA"]
    test = splits["test"]
    members = []
    for r in ema_runs:  # + TTA: the same checkpoints, evaluated over shifted copies
        start = time.perf_counter()
        state = checkpoint.restore(r["workdir"]).state
        members.append((state.apply_fn, state.variables))
        result = train.evaluate(state.apply_fn, state.variables, test, tta_shift=1)
        rows.append({**r, "rung": "+ TTA", "test_accuracy": result.accuracy,
                     "wall_seconds": r["wall_seconds"] + time.perf_counter() - start})
    start = time.perf_counter()
    combined = ensemble.evaluate(members, test, "mean", tta_shift=1)
    rows.append({"rung": f"ensemble of {len(members)}", "seed": -1, "test_accuracy": combined["accuracy"],
                 "epoch": None, "workdir": "",
                 "wall_seconds": sum(r["wall_seconds"] for r in ema_runs) + time.perf_counter() - start})
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per rung, in ladder order: runs (the ensemble is one), test accuracy mean, std and best (percent), mean wall
    seconds."""
    grouped = runs.groupby("rung", sort=False)
    table = pd.DataFrame({
        "runs": grouped.size(),
        "test accuracy % (mean)": grouped["test_accuracy"].mean() * 100,
        "std": grouped["test_accuracy"].std(ddof=1) * 100,
        "best": grouped["test_accuracy"].max() * 100,
        "wall s (mean)": grouped["wall_seconds"].mean(),
    })
    return table.round({"test accuracy % (mean)": 2, "std": 2, "best": 2, "wall s (mean)": 0})


def markdown(table: pd.DataFrame) -> str:
    """`summarise`'s table as Markdown; a blank where one run has no std."""
    return table.astype(object).where(table.notna(), None).to_markdown(missingval="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="epochs of every rung but the seed recipe (10); default 15")
    parser.add_argument("--tiny", action="store_true",
                        help="512 images, 1 epoch, 1,000 test images: checks the pipeline only")
    parser.add_argument("--runs", type=Path, help="run directories (default runs/ladder; with --tiny runs/ladder-tiny)")
    parser.add_argument("--out", type=Path, help="writes OUT.csv (every run) and OUT.md (the table); default "
                        "experiments/results/ladder, the committed table (with --tiny runs/ladder-tiny/ladder)")
    args = parser.parse_args()
    if args.tiny and args.epochs is not None:
        parser.error("--tiny trains every rung for 1 epoch: leave out --epochs")
    if args.seeds < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--seeds and --epochs must be at least 1")
    # A smoke run must neither overwrite the committed table nor leave its runs where the real ladder resumes.
    args.runs = args.runs or Path("runs/ladder-tiny" if args.tiny else "runs/ladder")
    args.out = args.out or (args.runs / "ladder" if args.tiny else Path("experiments/results/ladder"))
    rungs = training_rungs(args.tiny, args.epochs or 15)
    runs = run_ladder(rungs, args.seeds, args.tiny, args.runs)
    table = summarise(runs)
    device = jax.devices()[0]
    hardware = (f"{len(jax.devices())} x {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores "
                f"({platform.processor() or platform.machine()}), jax {jax.__version__}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".md").write_text(
        f"MNIST test accuracy per rung ({args.seeds} seeds; {rungs[0][1].epochs} epochs for the {rungs[0][0]}, "
        f"{rungs[1][1].epochs} for the other rungs{'; tiny' if args.tiny else ''}), "
        f"epoch chosen on validation. Hardware: {hardware}.\n\n{markdown(table)}\n")
    print(table.to_string())
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    cli.exit_process(cli.reporting_errors("ladder.py", main, RERUN))
