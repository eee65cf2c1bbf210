"""What training prints on a terminal."""

from __future__ import annotations

import io
import re

from digits_jax import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_time_left_counts_whole_epochs_and_the_summary_joins_what_there_is(tiny_config):
    """The estimate counted only the compiled training (about a fifth of a best-recipe epoch, whose evaluation has
    test-time shifts): ~1 s left where 17 s were. Without a test or validation split the summary read "; ;"."""
    out = Terminal()
    log = progress.Progress(epochs=5, stream=out)
    log.start(tiny_config, epoch=1, steps_per_epoch=8, train_size=512)  # resumed after epoch 1
    log.epoch({"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.9, "train_seconds": 2.0, "images_per_second": 256.0,
               "seconds_from_first_step": 20.0})  # two epochs in this call, 10 s each with everything
    assert re.search(r"~20s left$", out.getvalue().splitlines()[-1])  # epochs 4 and 5
    log.finish({"final": {"epoch": 5}, "best": {"epoch": 5}, "workdir": "runs/x"})
    assert re.fullmatch(r"done in \d+\.\ds: checkpoints in runs/x", out.getvalue().splitlines()[-1])
    log.finish({"final": {"epoch": 5, "test_accuracy": 0.5}, "best": {"epoch": 4, "validation_accuracy": 0.6},
                "workdir": "runs/x"})
    assert out.getvalue().splitlines()[-1].endswith(
        ": test accuracy 50.00% after epoch 5; best by validation: epoch 4 (validation 60.00%, test nan%); "
        "checkpoints in runs/x")
