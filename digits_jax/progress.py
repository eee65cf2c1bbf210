"""Progress of a run on stdout: readable lines on a terminal, `key=value` lines when piped or logged."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import jax

from digits_jax.config import Config


class Progress:
    """Prints one line when a run starts, one per epoch and a summary; only JAX process 0 prints."""

    def __init__(self, epochs: int, stream: TextIO | None = None) -> None:
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.quiet = jax.process_index() != 0
        self.started = time.perf_counter()
        self.start_epoch = 0

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def start(self, config: Config, epoch: int, steps_per_epoch: int, train_size: int, devices: int = 1,
              model: str | None = None) -> None:
        """`model`: the name to show when it is not config.model's (a module given from Python)."""
        model = model or config.model
        self.start_epoch = epoch
        device = jax.devices()[0]
        hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
        where = f"{devices} x {device.device_kind} ({device.platform}){hosts}"
        if self.tty:
            resumed = f", resuming after epoch {epoch}" if epoch else ""
            self._print(f"digits-jax: config '{config.name}', model {model}, {train_size} training images, "
                        f"{steps_per_epoch} steps/epoch on {where}{resumed}; compiling...")
        else:
            self._print(f"start config={config.name} model={model} train_images={train_size} "
                        f"steps_per_epoch={steps_per_epoch} devices={where!r} start_epoch={epoch}")

    def compiled(self, seconds: float) -> None:
        self._print(f"compiled the epoch in {seconds:.1f}s" if self.tty else f"compiled seconds={seconds:.3g}")

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.tty:
            # The same in every epoch of a run (or of one call): metrics.jsonl keeps them.
            hidden = ("image_shape", "data_sha256", "started", "custom_model", "custom_tx")
            shown = {k: v for k, v in record.items() if k not in hidden}
            self._print("epoch " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
            return
        parts = [f"epoch {record['epoch']:>3}/{self.epochs}", f"loss {record['train_loss']:.4f}",
                 f"acc {100 * record['train_accuracy']:.2f}%"]
        parts += [f"{short} {100 * record[f'{split}_accuracy']:.2f}%"
                  for split, short in (("validation", "val"), ("test", "test")) if f"{split}_accuracy" in record]
        elapsed = time.perf_counter() - self.started
        # Whole epochs of this call, evaluation and checkpoint included (training alone was a fifth of it with TTA).
        per_epoch = record["seconds_from_first_step"] / (record["epoch"] - self.start_epoch)
        remaining = (self.epochs - record["epoch"]) * per_epoch
        parts += [f"{record['images_per_second']:,.0f} img/s", f"{elapsed:.0f}s elapsed, ~{remaining:.0f}s left"]
        self._print(" | ".join(parts))

    def finish(self, summary: dict[str, Any]) -> None:
        final, best = summary["final"], summary["best"]
        parts = [f"test accuracy {100 * final['test_accuracy']:.2f}% after epoch {final['epoch']}"
                 ] if "test_accuracy" in final else []
        if "validation_accuracy" in best:
            test = 100 * best.get("test_accuracy", float("nan"))
            parts.append(f"best by validation: epoch {best['epoch']} (validation "
                         f"{100 * best['validation_accuracy']:.2f}%, test {test:.2f}%)")
        parts.append(f"checkpoints in {summary['workdir']}")
        seconds = time.perf_counter() - self.started
        if self.tty:
            self._print(f"done in {seconds:.1f}s: " + "; ".join(parts))
        else:
            self._print(f"done seconds={seconds:.1f} final_epoch={final['epoch']} "
                        f"final_test_accuracy={_fmt(final.get('test_accuracy'))} best_epoch={best['epoch']} "
                        f"best_test_accuracy={_fmt(best.get('test_accuracy'))} workdir={summary['workdir']}")


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
