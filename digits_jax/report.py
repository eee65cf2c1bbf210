"""A run as pictures: learning curves, the test confusion matrix and the most confident mistakes, plus a
Markdown page that links them.

Figures are drawn on matplotlib `Figure` objects, which save PNGs through the Agg renderer without
pyplot: no display, no global backend state.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from matplotlib.figure import Figure

from digits_jax import checkpoint, data, ensemble, train

CURVES, CONFUSION, MISTAKES, MARKDOWN = "curves.png", "confusion.png", "mistakes.png", "report.md"
FIGURES = (CURVES, CONFUSION, MISTAKES)


def write_report(run_dir: str | Path, out: str | Path | None = None, *, data_dir: str | None = None,
                 dataset: str | None = None, mistakes: int = 24, model: nn.Module | None = None) -> Path:
    """Writes curves.png, confusion.png, mistakes.png and report.md for a run directory.

    Args:
      run_dir: a directory that `digits-jax train` wrote (metrics.jsonl and checkpoints/).
      out: where to write; default RUN_DIR/report.
      data_dir: IDX directory for the test split; default as the run was trained.
      dataset: what `data_dir` holds, default the run's dataset; any name but "mnist" skips the MNIST checksums.
      mistakes: how many misclassified test digits to show, the most confident first.
      model: the Flax module that was trained, when it is not a registered `config.model` (as `restore`).
    Returns:
      the path of report.md. The test figures use the best checkpoint by validation accuracy (without a
      validation split, the newest).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory; give one that `digits-jax train` wrote")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a directory to write the report into")
    records = checkpoint.read_records(run_dir)
    if not records:
        raise ValueError(f"{run_dir / checkpoint.METRICS}: no epoch records; give a run directory that "
                         "`digits-jax train` wrote and that finished at least one epoch")
    with warnings.catch_warnings():  # a report needs no optimizer state
        warnings.simplefilter("ignore", checkpoint.OptimizerStateAsSavedWarning)
        restored = checkpoint.restore(run_dir, step="best", model=model)
    config = data.with_source(restored.config, data_dir, dataset)
    test = data.load(config, ("test",))["test"]
    restored.check_images(test["image"], "test", config)
    state = restored.state
    result = train.evaluate(state.apply_fn, state.variables, test, config.eval_batch_size, tta_shift=config.tta_shift)
    # With the run's test-time shifts, as `result`: the mistakes shown are the ones its accuracy counts.
    probabilities = ensemble.probabilities(state.apply_fn, state.variables, test["image"], config.eval_batch_size,
                                           config.tta_shift)

    out.mkdir(parents=True, exist_ok=True)
    plot_curves(records, restored.epoch).savefig(out / CURVES, dpi=100)
    title = f"test set, epoch {restored.epoch}: {100 * result.accuracy:.2f}% of {result.count:,} right"
    plot_confusion(result.confusion, title).savefig(out / CONFUSION, dpi=100)
    figure, wrong = plot_mistakes(test["image"], test["label"], probabilities, mistakes)
    figure.savefig(out / MISTAKES, dpi=100)
    model_name = restored.record.get("custom_model") or config.model  # a module given from Python: its class
    markdown = _markdown(run_dir, config.name, model_name, records, restored.epoch, result, wrong)
    (out / MARKDOWN).write_text(markdown)
    return out / MARKDOWN


def plot_curves(records: list[dict[str, Any]], chosen_epoch: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train vs validation (where the run has one), from metrics.jsonl records, with
    `chosen_epoch` (the checkpoint a report evaluates: best on validation, else the newest) marked."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    for split in ("train", "validation"):
        if not any(f"{split}_loss" in r for r in records):
            continue
        nan = float("nan")  # a record without the value (edited, or from an older version): a gap in the line
        loss_ax.plot(epochs, [r.get(f"{split}_loss", nan) for r in records], marker="o", label=split)
        accuracy_ax.plot(epochs, [100 * r.get(f"{split}_accuracy", nan) for r in records], marker="o", label=split)
    for ax, label in ((loss_ax, "mean cross-entropy loss"), (accuracy_ax, "accuracy (%)")):
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="gray", linestyle=":", label=f"chosen epoch ({chosen_epoch})")
        ax.set(xlabel="epoch", ylabel=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_yscale("log")  # late epochs shave off fractions of what the first one did
    figure.suptitle("learning curves")
    return figure


def plot_confusion(confusion: np.ndarray, title: str) -> Figure:
    """(C, C) counts (rows true, columns predicted) as a grid with each count written in its cell."""
    confusion = np.asarray(confusion)
    figure = Figure(figsize=(7, 6), layout="constrained")
    ax = figure.subplots()
    # Log colours: the diagonal's thousands would otherwise wash out the off-diagonal handfuls.
    shade = np.log1p(confusion)
    ax.imshow(shade, cmap="Blues")
    for (true, predicted), count in np.ndenumerate(confusion):
        dark = shade[true, predicted] > 0.6 * shade.max()
        ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    classes = range(len(confusion))
    ax.set(xticks=classes, yticks=classes, xlabel="predicted", ylabel="true", title=title)
    return figure


def plot_mistakes(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                  limit: int) -> tuple[Figure, int]:
    """The `limit` wrong predictions with the highest confidence, each titled true/predicted/confidence.

    Args:
      images: uint8 (N, 28, 28, 1); labels: int (N,); probabilities: float (N, C).
    Returns:
      (the figure, how many of the N were wrong).
    """
    if limit < 0:
        raise ValueError(f"mistakes to show: {limit}; give 0 or more")
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    columns = 8
    rows = max(1, -(-len(shown) // columns))
    figure = Figure(figsize=(columns * 1.3, rows * 1.6 + 0.5), layout="constrained")
    figure.suptitle(f"most confident mistakes ({len(wrong)} of {len(labels):,} test images wrong)")
    if not len(shown):
        figure.text(0.5, 0.5, "none shown" if len(wrong) else "no misclassified test images", ha="center",
                    va="center")
    for i, index in enumerate(shown):
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.imshow(images[index, ..., 0], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {labels[index]}, said {predicted[index]}\n{100 * confidence[index]:.1f}% sure", fontsize=8)
        ax.axis("off")
    return figure, len(wrong)


def _markdown(run_dir: Path, name: str, model: str, records: list[dict[str, Any]], epoch: int,
              result: train.EvalResult, wrong: int) -> str:
    per_class = result.per_class_accuracy
    present = np.flatnonzero(result.confusion.sum(axis=1))  # a class without test images has no accuracy (NaN)
    hardest = present[np.argsort(per_class[present], kind="stable")][:3]
    off_diagonal = result.confusion - np.diag(np.diag(result.confusion))
    true, predicted = np.unravel_index(off_diagonal.argmax(), off_diagonal.shape)
    confusions = (f"The most frequent confusion is a true {true} read as {predicted} ({off_diagonal[true, predicted]} "
                  "times). " if off_diagonal.any() else "")
    # As restore(step="best") chose it: by validation accuracy where the run has a validation split.
    validated = any(checkpoint.BEST_METRIC in r for r in records)
    best = checkpoint.best_record(records)["epoch"]
    if validated and best != epoch:  # restore() skipped it (and warned), or it was deleted
        chosen = (f"The checkpoint with the best validation accuracy, epoch {best}, is damaged or was not kept; the "
                  "report uses the next best,")
    elif validated:
        chosen = "The checkpoint with the best validation accuracy is"
    else:
        chosen = "Without a validation split, the report uses the newest checkpoint,"
    return "\n".join([
        f"# Run report: {run_dir}",
        "",
        f"Config `{name}`, model `{model}`: {records[-1]['epoch']} epochs trained. {chosen} epoch {epoch}; "
        f"on the test set it reaches **{100 * result.accuracy:.2f}%** "
        f"({result.count:,} images, {wrong} wrong), mean loss {result.loss:.4f}.",
        "",
        "## Learning curves",
        "",
        f"![loss and accuracy per epoch, train vs validation]({CURVES})",
        "",
        "## Test confusion matrix",
        "",
        f"Rows are the true digits, columns the predicted ones. {confusions}The hardest digits: "
        + ", ".join(f"{c} ({100 * per_class[c]:.1f}%)" for c in hardest) + ".",
        "",
        f"![test confusion matrix]({CONFUSION})",
        "",
        "## Most confident mistakes",
        "",
        "Misclassified test digits, the ones the model was surest of first, with the true and predicted digit "
        "and the predicted digit's probability.",
        "",
        f"![most confident mistakes]({MISTAKES})",
        "",
    ])
