"""`digits-jax report` writes its figures and a Markdown page that links them, for a tiny run."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from digits_jax import checkpoint, cli, report, train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
    workdir = tmp_path_factory.mktemp("report") / "tiny"
    # All 10,000 test images, as the report evaluates; with test-time shifts, which the mistakes must use too.
    train.train_and_evaluate(tiny_config.replace(tta_shift=1), workdir)
    return workdir


def test_report_writes_its_figures_into_the_run_directory_and_links_them(tiny_run, capsys):
    assert cli.main(["report", str(tiny_run)]) == 0
    out = tiny_run / "report"
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "curves.png", "mistakes.png", "report.md"]
    text = (out / "report.md").read_text()
    for name in ("curves.png", "confusion.png", "mistakes.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 300, name
            assert np.asarray(image.convert("L")).std() > 10, f"{name} is blank"
        assert f"]({name})" in text
    best = checkpoint.best_record(checkpoint.read_records(tiny_run))
    assert f"The checkpoint with the best validation accuracy is epoch {best['epoch']};" in text
    assert f"**{100 * best['test_accuracy']:.2f}%**" in text  # re-evaluated: the accuracy recorded at save time
    wrong = re.search(r"\(10,000 images, (\d+) wrong\)", text)
    assert wrong and int(wrong[1]) == round(10_000 * (1 - best["test_accuracy"]))


def test_report_of_a_run_without_validation_names_the_newest_checkpoint(tmp_path, tiny_config):
    train.train_and_evaluate(tiny_config.replace(validation_size=0, epochs=1), tmp_path)
    text = report.write_report(tmp_path).read_text()
    assert "Without a validation split, the report uses the newest checkpoint, epoch 1;" in text
    assert "best validation accuracy" not in text


def test_the_page_names_a_damaged_best_checkpoint_and_only_digits_that_were_tested(tmp_path):
    """It said "the best validation accuracy is epoch 2" where epoch 3 was best but damaged, listed a digit without
    test images as a hardest one ("0 (nan%)"), and plot_curves failed on a record without validation_loss."""
    confusion = np.zeros((10, 10), np.int64)
    confusion[1, 1], confusion[7, 7], confusion[7, 1] = 50, 40, 10  # only 1s and 7s
    result = train.EvalResult(accuracy=0.9, loss=0.3, count=100, confusion=confusion)
    records = [{"epoch": 1, "validation_accuracy": 0.5, "validation_loss": 1.0, "train_loss": 1.0,
                "train_accuracy": 0.5},
               {"epoch": 2, "validation_accuracy": 0.8, "train_loss": 0.5, "train_accuracy": 0.8},
               {"epoch": 3, "validation_accuracy": 0.9, "validation_loss": 0.4, "train_loss": 0.4,
                "train_accuracy": 0.9}]
    text = report._markdown(tmp_path, "tiny", "my.MLP", records, 2, result, 10)
    assert ("The checkpoint with the best validation accuracy, epoch 3, is damaged or was not kept; the report uses "
            "the next best, epoch 2;") in text
    assert "The hardest digits: 7 (80.0%), 1 (100.0%)." in text and "model `my.MLP`" in text
    assert "The checkpoint with the best validation accuracy is epoch 3;" in report._markdown(
        tmp_path, "tiny", "seed", records, 3, result, 10)
    figure = report.plot_curves(records, 2)
    assert [line.get_label() for line in figure.axes[0].lines][:2] == ["train", "validation"]
    # A first record without validation values hid the validation line altogether.
    figure = report.plot_curves([{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5}, *records[1:]], 2)
    assert [line.get_label() for line in figure.axes[0].lines][:2] == ["train", "validation"]


def test_mistakes_are_the_most_confident_wrong_predictions():
    images = np.zeros((4, 28, 28, 1), np.uint8)
    labels = np.array([0, 1, 2, 3])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.99, 0.01]])
    figure, wrong = report.plot_mistakes(images, labels, np.pad(probabilities, ((0, 0), (0, 2))), limit=2)
    assert wrong == 3  # rows 1, 2, 3 (row 0 is right)
    assert [ax.get_title() for ax in figure.axes] == ["true 3, said 0\n99.0% sure", "true 1, said 0\n80.0% sure"]
    # None asked for: the figure does not say there are none; fewer than none is an error (it showed all but 1).
    figure, wrong = report.plot_mistakes(images, labels, np.pad(probabilities, ((0, 0), (0, 2))), limit=0)
    assert wrong == 3 and [t.get_text() for t in figure.texts][-1] == "none shown"
    with pytest.raises(ValueError, match="mistakes to show: -1; give 0 or more"):
        report.plot_mistakes(images, labels, probabilities, limit=-1)


def test_report_of_a_directory_without_a_run_says_so(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}: no epoch records" in capsys.readouterr().err
