"""The `digits-jax` command (also `python -m digits_jax`): parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TextIO

import numpy as np
from absl import logging as absl_logging

from digits_jax import checkpoint
from digits_jax import config as config_lib
from digits_jax.checkpoint import OptimizerStateAsSavedWarning, RunInUseError
from digits_jax.ensemble import METHODS
from digits_jax.train import NonFiniteError


def _train(args: argparse.Namespace) -> int:
    from digits_jax import train

    config = config_lib.get(args.config)
    if args.data_dir:
        config = config.replace(data_dir=args.data_dir)
    config = config.with_overrides(args.set)
    if args.workdir == "":  # an unset variable in a script (--workdir "$DIR"): not the default's runs/CONFIG
        raise ValueError("--workdir is empty: give a directory, or leave --workdir out for runs/CONFIG_NAME")
    name = Path(config.name.strip())
    if not args.workdir and (not name.parts or ".." in name.parts or name.is_absolute()):  # e.g. NAME unset in
        # --set name="$NAME": runs/ itself, or a folder outside it (runs/.. is the project's)
        raise ValueError(f"config.name = {config.name!r} makes no run directory under runs/ (the default "
                         "--workdir runs/NAME): give a name, or --workdir")
    workdir = args.workdir or f"runs/{config.name}"
    say_if_nothing_to_resume("digits-jax train", workdir, args.resume)
    train.train_and_evaluate(config, workdir, resume=args.resume)
    return 0


def say_if_nothing_to_resume(prog: str, workdir: str, resume: bool) -> None:
    """With `resume` and no checkpoint in `workdir`, says on stderr that a new run starts (a mistyped --workdir
    would otherwise retrain silently); a directory no run may use is refused first."""
    if resume and checkpoint.latest_epoch(workdir) is None:
        checkpoint.check_run_directory(Path(workdir))  # a refusal, if any, before saying that a run starts
        print(f"{prog}: nothing to resume in {workdir} (no checkpoint there): starting a new run", file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    from digits_jax import data, train

    if len(args.checkpoint) > 1:
        return _eval_ensemble(args)
    if args.method is not None:
        raise ValueError(f"--method {args.method} combines several --checkpoint; one was given")
    path = args.checkpoint[0]
    restored = checkpoint.restore(path, step=args.step)
    config = data.with_source(restored.config, args.data_dir, args.dataset)
    split = data.load(config, (args.split,))[args.split]
    _check_nonempty(split, path, args.split)
    restored.check_images(split["image"], args.split, config)
    result = train.evaluate(restored.state.apply_fn, restored.state.variables, split, config.eval_batch_size,
                            tta_shift=config.tta_shift)
    # The record's train accuracy is the running one over the epoch's augmented steps, not this model's on the split.
    recorded = restored.record.get(f"{args.split}_accuracy") if args.split != "train" else None
    if config.dataset != restored.config.dataset or (args.data_dir and restored.config.dataset != "mnist"):
        recorded = None  # other data than the run's (MNIST files are checked against the MNIST checksums)
    # A class without examples in the split (a small validation split) has no accuracy: null, as JSON has no NaN.
    per_class = [None if np.isnan(a) else a for a in result.per_class_accuracy.tolist()]
    report = {"checkpoint": str(path), "epoch": restored.epoch, "split": args.split,
              "count": result.count, "accuracy": result.accuracy, "loss": result.loss,
              "recorded_accuracy": recorded, "per_class_accuracy": per_class}
    if args.json:
        print(json.dumps(report | {"confusion": result.confusion.tolist()}, allow_nan=False))
        return 0
    match = "" if recorded is None else (" (matches the accuracy recorded at save time)" if recorded == result.accuracy
                                         else f" (recorded at save time: {100 * recorded:.2f}%)")
    print(f"{path}, epoch {restored.epoch}: {args.split} accuracy {100 * result.accuracy:.2f}% "
          f"on {result.count} images{match}, mean loss {result.loss:.4f}")
    print("per-class accuracy: " + "  ".join(f"{c}: " + ("no examples" if np.isnan(a) else f"{100 * a:.1f}%")
                                             for c, a in enumerate(result.per_class_accuracy)))
    print("confusion (rows true, columns predicted):")
    print(result.confusion)
    return 0


def _eval_ensemble(args: argparse.Namespace) -> int:
    from digits_jax import data, ensemble

    method = args.method or "mean"
    restored = [checkpoint.restore(path, step=args.step) for path in args.checkpoint]
    configs = [data.with_source(r.config, args.data_dir, args.dataset) for r in restored]
    loaded: dict[tuple[object, ...], dict[str, np.ndarray]] = {}  # each distinct data config read once
    splits = []
    for config in configs:
        key = data.load_key(config)
        if key not in loaded:
            loaded[key] = data.load(config, (args.split,))[args.split]
        splits.append(loaded[key])
    _check_nonempty(splits[0], args.checkpoint[0], args.split)
    for r, config, split in zip(restored, configs, splits, strict=True):
        r.check_images(split["image"], args.split, config)
    for path, split in zip(args.checkpoint[1:], splits[1:], strict=True):
        if not all(np.array_equal(split[k], splits[0][k]) for k in ("image", "label")):
            hint = "" if args.split == "test" else ", or evaluate --split test"
            raise ValueError(f"{path}: its {args.split} split differs from {args.checkpoint[0]}'s (the runs' data "
                             f"configs differ): ensemble runs that share the split{hint}")
    result = ensemble.evaluate([(r.state.apply_fn, r.state.variables) for r in restored], splits[0], method,
                               configs[0].eval_batch_size, [c.tta_shift for c in configs])
    report = {"checkpoints": [str(p) for p in args.checkpoint], "epochs": [r.epoch for r in restored],
              "split": args.split, "method": method, **result}
    if args.json:
        print(json.dumps(report, allow_nan=False))
        return 0
    print(f"ensemble of {len(restored)} checkpoints ({method}): {args.split} accuracy "
          f"{100 * result['accuracy']:.2f}% on {result['count']} images")
    for path, r, accuracy in zip(args.checkpoint, restored, result["member_accuracies"], strict=True):
        print(f"  {path}, epoch {r.epoch}: {100 * accuracy:.2f}%")
    return 0


def _check_nonempty(split: dict[str, np.ndarray], path: Path, name: str) -> None:
    if not len(split["label"]):
        raise ValueError(f"{path} has no {name} split here (validation_size=0: its run held none out, or --dataset "
                         "names other data, of which none is held out): evaluate --split test")


def _predict(args: argparse.Namespace) -> int:
    from digits_jax import predict

    predictor = predict.Predictor.from_checkpoint(args.checkpoint, step=args.step)
    results = predict.predict_files(predictor, args.files)
    failed = [r for r in results if r.error is not None]
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        width = max(len("file"), *(len(r.path) for r in results))
        print(f"{'file':{width}}  digit  probability")
        for r in results:
            digit, probability = ("-", "-") if r.probability is None else (str(r.digit), f"{100 * r.probability:.1f}%")
            print(f"{r.path:{width}}  {digit:>5}  {probability:>11}")
    for r in failed:
        print(f"digits-jax predict: error: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from digits_jax import report

    markdown = report.write_report(args.run_dir, args.out, data_dir=args.data_dir, dataset=args.dataset)
    print(f"wrote {markdown} with {', '.join(str(markdown.parent / name) for name in report.FIGURES)}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from digits_jax import runs

    table = runs.table(args.workdirs)
    measured = [c for c in table.columns if c.endswith("_%") or c in ("train_s", "img_per_s")]  # not learning_rate
    print(table.round({c: 2 for c in measured}).to_string() if len(table) else "no runs found")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from digits_jax import predict, serve

    serve.serve(predict.Predictor.from_checkpoint(args.checkpoint, step=args.step), args.host, args.port)
    return 0


def _step(text: str) -> int | str:
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not an epoch number, 'best' or 'latest'")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    print(f"digits-jax: warning: {message}", file=sys.stderr)


def _nonempty(text: str) -> str:
    if not text:  # an unset variable in a script (--data-dir "$DIR"): not the option's default
        raise argparse.ArgumentTypeError("empty: give a value, or leave the option out for its default")
    return text


DATASET_HELP = ("what --data-dir holds (default: the run's dataset); any name but mnist, e.g. custom, reads IDX "
                "files without the MNIST checksums")


def parser() -> argparse.ArgumentParser:
    """The argument parser of `digits-jax`."""
    p = argparse.ArgumentParser(prog="digits-jax", description="Train and evaluate digit classifiers with JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config, checkpointing every epoch, and report test accuracy")
    t.add_argument("--config", default="default", choices=sorted(config_lib.PRESETS), help="preset to start from")
    t.add_argument("--workdir", help="run directory (default: runs/CONFIG_NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run in --workdir from its newest checkpoint")
    t.add_argument("--data-dir", type=_nonempty,
                   help="directory of IDX files (default: $DIGITS_JAX_DATA_DIR for MNIST, else tfds)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set epochs=3 (repeatable)")
    t.set_defaults(run=_train)

    e = sub.add_parser("eval", help="restore a checkpoint (or several: their ensemble) and evaluate it")
    e.add_argument("--checkpoint", required=True, type=Path, action="append",
                   help="run directory or checkpoints/N directory; repeat it to evaluate an ensemble (its JSON "
                   "has checkpoints, epochs and member_accuracies instead of one run's loss and confusion)")
    e.add_argument("--method", choices=METHODS,
                   help="with several --checkpoint: average the members' probabilities, or vote (default: mean)")
    e.add_argument("--step", default="best", type=_step,
                   help="epoch to restore (of each checkpoint), 'best' (by validation; without it the newest) or "
                   "'latest'")
    e.add_argument("--split", default="test", choices=("test", "validation", "train"))
    e.add_argument("--data-dir", type=_nonempty, help="directory of IDX files (default: as the run was trained)")
    e.add_argument("--dataset", type=_nonempty, help=DATASET_HELP)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    e.set_defaults(run=_eval)

    pr = sub.add_parser("predict", help="read the digit in each image file (PNG, JPEG) with a checkpoint")
    pr.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoints/N directory")
    pr.add_argument("--step", default="best", type=_step, help="epoch to restore, 'best' (by validation) or 'latest'")
    pr.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    pr.add_argument("files", nargs="+", type=Path, metavar="FILE", help="image files, any size, colour or background")
    pr.set_defaults(run=_predict)

    rp = sub.add_parser("report", help="figures (learning curves, confusion, mistakes) and report.md for a run")
    rp.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory that `train` wrote")
    rp.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/report)")
    rp.add_argument("--data-dir", type=_nonempty, help="directory of IDX files (default: as the run was trained)")
    rp.add_argument("--dataset", type=_nonempty, help=DATASET_HELP)
    rp.set_defaults(run=_report)

    r = sub.add_parser("runs", help="print a table comparing run directories (a folder of runs, e.g. runs/, stands "
                       "for those inside)")
    r.add_argument("workdirs", nargs="+", type=Path)
    r.set_defaults(run=_runs)

    s = sub.add_parser("serve", help="a local web page to draw a digit on and see the prediction as you draw")
    s.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoints/N directory")
    s.add_argument("--step", default="best", type=_step, help="epoch to restore, 'best' (by validation) or 'latest'")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", default=8000, type=int, help="port to listen on; 0 picks a free one")
    s.set_defaults(run=_serve)
    return p


def _use_compilation_cache() -> None:
    """Keeps XLA's compiled programs on disk between runs (JAX's persistent compilation cache), so a rerun of
    a config skips its compilation (the fast preset: 9.7-11.7 s from process start with an empty cache, 5.7-7.9 s
    warm, on a 2-core CPU).
    JAX_COMPILATION_CACHE_DIR chooses the folder, and an empty value turns the cache off; the default is
    ~/.cache/digits_jax/xla. A program takes 0.1-0.5 MB there; the folder may be deleted at any time."""
    import jax

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        try:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "digits_jax" / "xla"
            cache.mkdir(parents=True, exist_ok=True)
        except (OSError, RuntimeError):  # no home directory, or one we cannot write: run without the cache
            return
        jax.config.update("jax_compilation_cache_dir", str(cache))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # All programs, small ones too: loading one from the cache is faster than compiling it.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports that as POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured output), or no poll (Windows)
        return False


# What to do after Ctrl-C stopped a training run.
RESUME_HINT = "; the checkpoints of finished epochs are kept: rerun with --resume to continue"


def reporting_errors(prog: str, run: Callable[[], int | None], interrupted: str = "") -> int:
    """Calls `run()` and returns its exit code (None: 0); bad input or state (ValueError, OSError, a run in use,
    NaN in training) is one line `PROG: error: MESSAGE` on stderr and exit code 1, not a traceback; Ctrl-C is one
    line `PROG: interrupted` with `interrupted` (what to do next) after it, and exit code 130; a reader of stdout
    that went away (`| head`) ends it quietly with exit code 141, as SIGPIPE would."""
    try:
        code = run() or 0
        sys.stdout.flush()  # here, not at exit: a pipe's buffered output meets a closed reader here
        return code
    except BrokenPipeError as error:
        if not _stdout_reader_gone():  # another pipe (a child process's): an error like any other
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 1
        with contextlib.suppress(OSError, ValueError):  # Python's own flush at exit would fail on it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError, RunInUseError, NonFiniteError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupted}", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """Ends the process with exit code `code`. After Ctrl-C (130) Python's teardown is skipped: interrupted during an
    XLA compilation, whose threads outlive the KeyboardInterrupt, it crashed with a segmentation fault (exit -11 in 6
    of 6 tries). Checkpoints are saved synchronously, so nothing is left half-written by that."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry() -> None:
    """The `digits-jax` command."""
    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parser().parse_args(argv)
    _use_compilation_cache()
    # Orbax and tensorflow-datasets log routine notes as absl warnings; users need only our lines.
    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.showwarning = _show_warning
    warnings.simplefilter("ignore", OptimizerStateAsSavedWarning)  # no command trains on a restored state
    checkpoint.quiet_closed_loop_callbacks()  # as restore() does: also for reads that fail elsewhere
    return reporting_errors(f"digits-jax {args.command}", lambda: args.run(args),
                            RESUME_HINT if args.command == "train" else "")


if __name__ == "__main__":
    sys.exit(main())
