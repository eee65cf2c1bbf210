"""A run directory: config.json, metrics.jsonl and Orbax checkpoints of the whole train state per epoch.

Layout of `workdir`:
  config.json      the run's Config
  metrics.jsonl    one JSON record per finished epoch (train/validation/test metrics, seconds)
  checkpoints/N/   Orbax checkpoint after epoch N: items 'state' (the TrainState pytree),
                   'config' and 'record' (that epoch's metrics and the image shape), so a checkpoint
                   directory alone is enough to restore and evaluate.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact. Each record also carries the SHA-256 of the saved
state: a checkpoint whose files were damaged later is detected on restore and skipped, with a warning, for
the next candidate (the newest intact one on resume and for step "latest", the next best by validation for
"best").
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import numbers
import os
import re
import shutil
import socket
import sys
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from digits_jax import models, optim, parallel
from digits_jax.config import Config

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
BEST_METRIC = "validation_accuracy"
LOCK = ".lock"


class RunInUseError(RuntimeError):
    """Another live process is writing the run directory."""


class ModelNeededError(ValueError):
    """The run was trained with another model than the one given: a Flax module from Python (`restore` needs it
    as `model=`), or config.model's where this call gives a module."""


class _UnusableConfigError(ValueError):
    """A checkpoint's config this version cannot build (e.g. one with a newer field): not damage."""


class CheckpointSkippedWarning(UserWarning):
    """A checkpoint could not be read back intact and an older one was used."""


class OptimizerStateAsSavedWarning(UserWarning):
    """Restored without the tx it was trained with, a state evaluates but cannot train on: what only evaluates
    (Predictor, eval, report) ignores it."""


def module_name(model: nn.Module) -> str:
    """The "module.Class" name of a Flax module: what a run's record keeps as `custom_model` (a module from Python)."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def state_digest(state: Any) -> str:
    """SHA-256 of every leaf's bytes in tree order: what a restore must give back bit for bit."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(parallel.to_host(state)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _manager(directory: Path, keep: int = 1, read_only: bool = False,
             track_best: bool = False) -> ocp.CheckpointManager:
    # Latest `keep` for resuming, plus the best by validation accuracy for evaluation.
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    # Orbax writes each step's metrics to disk only when `best_fn` is set: without them on disk, a resumed process
    # saw no metrics for the older steps, and its first save deleted the best one. (Set without a validation
    # split, Orbax would warn at every save that no metrics came.)
    best = {"best_fn": _best_metric, "best_mode": "max"} if track_best else {}
    # Synchronous saves: the train state is donated to the next epoch, so it must be on disk first.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, **best, enable_async_checkpointing=False,
                                           create=not read_only, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1,
                                           cleanup_tmp_directories=not read_only)
    # Orbax logs a warning whenever a manager is read-only, i.e. on every restore; nothing is wrong then.
    with _absl_without("Given directory is read only=%s"):
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "config", "record"))


def _best_metric(metrics: dict[str, float]) -> float:
    return metrics[BEST_METRIC]


@contextlib.contextmanager
def _absl_without(message: str) -> Iterator[None]:
    """Drops, while inside, the absl log records whose format string is `message`: notes Orbax logs as warnings."""
    def other(record: logging.LogRecord) -> bool:
        return record.msg != message

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(other)
    try:
        yield
    finally:
        absl_logger.removeFilter(other)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """Owns one run directory: saves after each epoch, restores for `--resume`.

    In a multi-process job every process must create it (Orbax saves collectively); only process 0 takes
    the lock and writes config.json and metrics.jsonl, so the directory must be on a shared filesystem.
    """

    def __init__(self, workdir: str | Path, config: Config, keep: int, track_best: bool | None = None) -> None:
        self.path = Path(workdir).absolute()  # Orbax requires absolute paths.
        self.config = config
        self.primary = jax.process_index() == 0
        self.records: list[dict[str, Any]] = []
        check_run_directory(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = _take_lock(self.path) if self.primary else None
        except OSError as e:
            raise OSError(f"cannot write to run directory {self.path}: {e.strerror}; choose another --workdir") from e
        # track_best: whether records carry a validation accuracy (None: whether the config holds images out).
        self.track_best = config.validation_size > 0 if track_best is None else track_best
        self.manager = _manager(self.path / CHECKPOINTS, keep, track_best=self.track_best)

    def restore_or_start(self, state: Any, resume: bool, data_sha256: str | None = None,
                         custom_model: str | None = None, custom_tx: bool = False) -> Any:
        """Returns `state` restored from the newest intact checkpoint when resuming, else `state` unchanged.

        The restored arrays get the shardings of `state`'s. `data_sha256` (see `data.fingerprint`), when
        given, must match the one the checkpoint was trained on; `custom_model` (the class of a module given
        from Python, None for config.model) must be the one it was trained with; a run trained with an optimizer
        given from Python needs `custom_tx` (the same one: optax transformations cannot be compared).
        """
        latest = self.manager.latest_step()
        if latest is None:
            # Checkpoints deleted to save space, or a run killed before its first one was complete: its records stay.
            records = read_records(self.path)
            if records and not resume:
                raise FileExistsError(f"{self.path} holds the records of a run ({len(records)} epochs in {METRICS}) "
                                      "but no checkpoint; pass --resume (from Python: resume=True) to train it "
                                      "again from the start, replacing them, or choose a new --workdir")
            if records:  # replaced only by the same run trained again (scripts resume whatever is there)
                self._check_saved_config()
            if self.primary:
                _write_atomic(self.path / "config.json", self.config.to_json())
                _write_atomic(self.path / METRICS, "")  # records of a run killed before its first checkpoint
            return state
        if not resume:
            raise FileExistsError(f"{self.path} already holds a run (checkpoint after epoch {latest}); "
                                  "pass --resume (from Python: resume=True) to continue it, or choose a new "
                                  "--workdir")
        self._check_saved_config()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)

        def name(model: str | None) -> str:
            return f"the module {model} given from Python" if model else f"config.model {self.config.model!r}"

        def abstract_state(meta: Any) -> Any:  # checked before the state is read: other data or another tree
            trained = meta.record.get("custom_model")  # would fail there first, as a shape or structure mismatch
            if trained != custom_model:
                raise ModelNeededError(f"cannot resume {self.path}: it was trained with {name(trained)}, this call "
                                       f"gives {name(custom_model)}; resume with the same model")
            trained_on = meta.record.get("data_sha256")
            if data_sha256 is not None and trained_on is not None and trained_on != data_sha256:
                raise ValueError(f"cannot resume {self.path}: the data differ from what it was trained on "
                                 f"(SHA-256 {data_sha256[:12]}... now, {trained_on[:12]}... then); give the "
                                 "same --data-dir or $DIGITS_JAX_DATA_DIR as the run had, or start a new --workdir")
            if meta.record.get("custom_tx") and not custom_tx:  # config's optimizer would go on silently
                raise ValueError(f"cannot resume {self.path}: it was trained with an optimizer given from Python "
                                 "(tx=), this call gives none; resume from Python with the same tx")
            return abstract

        steps = sorted(self.manager.all_steps(), reverse=True)
        epoch, state, meta = _restore_intact(self.manager, steps, abstract_state, self.path / CHECKPOINTS)
        # The checkpoint's own record replaces a lost or stale line for its epoch; the older checkpoints kept give
        # back theirs where metrics.jsonl lost them (the best one's, above all: summaries choose by the records).
        by_epoch = {r["epoch"]: r for r in read_records(self.path) if r["epoch"] < epoch}
        for older in sorted(step for step in steps if step < epoch and step not in by_epoch):
            with contextlib.suppress(Exception):  # a damaged older checkpoint: its record stays lost
                by_epoch[older] = self.manager.restore(older, args=ocp.args.Composite(
                    record=ocp.args.JsonRestore())).record
        self.records = [_without_digest(by_epoch[e]) for e in sorted(by_epoch)] + [_without_digest(meta.record)]
        if self.primary:
            for damaged in steps[:steps.index(epoch)]:  # set aside, so that its epoch can be saved again
                aside = self.path / f"damaged-checkpoint-{damaged}-{time.time():.0f}"
                shutil.move(self.path / CHECKPOINTS / str(damaged), aside)
            _write_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in self.records))
        self.manager.reload()
        return state

    def _check_saved_config(self) -> None:
        try:
            saved = Config.from_dict(json.loads((self.path / "config.json").read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{self.path / 'config.json'}: {error}; fix the file, or start a new --workdir (each "
                             "checkpoint holds its own copy of the config: digits_jax.restore(path).config)") from None
        changed = saved.changed_fields(self.config)
        if changed:
            raise ValueError(f"cannot resume {self.path}: config fields {changed} differ from the saved "
                             "config.json; resume with the same config or start a new --workdir")

    def save(self, state: Any, record: dict[str, Any]) -> None:
        """Appends `record` to metrics.jsonl, then checkpoints `state` as step `record['epoch']`.

        `record` needs 'epoch' (>= 1, the epochs done), 'step' (optimizer steps done) and 'image_shape' ([H, W, C]),
        which `restore` rebuilds the state from; 'validation_accuracy' makes the epoch a candidate for "best" (only
        with track_best, without which Orbax would not keep the best checkpoint past the latest `keep`).
        In this order a crash anywhere leaves no checkpoint without its record; a record without its
        checkpoint is dropped on resume, when that epoch is trained again.
        """
        record = _plain_record(self.path, record)
        epoch, step, shape = (record.get(key) for key in ("epoch", "step", "image_shape"))
        if not (type(epoch) is int and epoch >= 1 and type(step) is int and step >= epoch and isinstance(shape, list)
                and len(shape) == 3):
            raise ValueError(f"{self.path}: a record to save needs 'epoch' (an int >= 1), 'step' (an int >= epoch) and "
                             f"'image_shape' ([H, W, C]); got epoch={epoch!r}, step={step!r}, image_shape={shape!r}. "
                             "train_epoch counts state.epoch; train_step alone does not")
        if BEST_METRIC in record and not self.track_best:
            raise ValueError(f"{self.path}: the record has {BEST_METRIC!r} but this RunDir was made with "
                             "track_best=False, so the best checkpoint would not be kept: make it with track_best=True")
        if self.primary:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.records.append(record)
        best = {BEST_METRIC: record[BEST_METRIC]} if BEST_METRIC in record else None
        # A record without a validation accuracy (a loop of one's own) is simply no candidate for "best".
        with _absl_without("Requested `tracked_metric`; did not provide metrics."):
            self.manager.save(record["epoch"], metrics=best, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(dataclasses.asdict(self.config)),
                record=ocp.args.JsonSave(record | {"state_sha256": state_digest(state)} | (
                    {"variables_sha256": _variables_digest(state)} if isinstance(state, _HasVariables) else {}))))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._lock is not None:
            self._lock.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """{'final': last epoch's record, 'best': the record of the epoch chosen by validation accuracy}."""
        return {"final": self.records[-1], "best": best_record(self.records), "workdir": str(self.path)}


def _plain_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """`record` with NumPy and JAX values (a loss from train_epoch's metrics, an np.float32) as the Python numbers and
    lists JSON holds; ValueError naming a key whose value JSON cannot hold."""
    def plain(value: Any) -> Any:
        if isinstance(value, (np.ndarray, np.generic, jax.Array)):
            return np.asarray(value).tolist()
        raise TypeError(f"type {type(value).__name__}")

    converted = {}
    for key, value in record.items():
        try:
            converted[key] = json.loads(json.dumps(value, default=plain))
        except TypeError as error:  # nothing was written yet
            raise ValueError(f"{path}: record[{key!r}] cannot be written to metrics.jsonl ({error}): give numbers, "
                             "strings, and lists or dicts of them") from None
    return converted


def check_run_directory(path: Path) -> None:
    """Raises FileExistsError if `path` holds a config.json that no run wrote and no run: a mistyped --workdir
    (".", a project folder) would have it overwritten. Other files there are left alone and are no obstacle."""
    config_path = path / "config.json"
    if not config_path.is_file() or (path / CHECKPOINTS).exists() or (path / METRICS).exists():
        return
    try:
        Config.from_dict(json.loads(config_path.read_text()))  # left by a run whose other files were deleted
    except (OSError, ValueError, TypeError):
        raise FileExistsError(f"{config_path} is not a digits_jax run's config and {path} holds no run: a run writes "
                              f"config.json, {METRICS} and {CHECKPOINTS}/ into its directory; choose a new or empty "
                              "--workdir") from None


def _take_lock(path: Path) -> TextIO:
    """The open lock file of run directory `path`, locked; RunInUseError when a live process holds it."""
    lock = open(path / LOCK, "a+")  # noqa: SIM115 -- held until RunDir.close() or process exit
    try:
        # flock, not a pid file: the kernel drops it when the holder dies, so a crash never leaves it stuck.
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunInUseError(f"{path} is in use by {holder}; wait for it to finish or choose another "
                            "--workdir") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    return lock


def _without_digest(record: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's record as metrics.jsonl keeps it: without the state's SHA-256s."""
    return {k: v for k, v in record.items() if k not in ("state_sha256", "variables_sha256")}


@typing.runtime_checkable
class _HasVariables(typing.Protocol):
    """What evaluation reads of a train state (a RunDir may save any pytree)."""
    params: Any
    model_state: Any
    ema_params: Any


def _variables_digest(state: Any) -> str:
    """SHA-256 of what evaluation reads (parameters, other collections, their average): checkable where the
    optimizer state's structure is unknown (a tx given from Python, restored without it)."""
    return state_digest((state.params, state.model_state, state.ema_params))


def read_records(workdir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory, oldest first; a last line cut short by a crash is ignored."""
    path = Path(workdir) / METRICS
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for number, line in lines[:-1]:
        try:
            records.append(_record(line))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error}); the file was edited or damaged: "
                             "delete that line (each checkpoint also holds its epoch's record)") from None
    with contextlib.suppress(ValueError):
        records += [_record(line) for _, line in lines[-1:]]
    return records


def _record(line: str) -> dict[str, Any]:
    """One line of metrics.jsonl as a record; ValueError if it is not a JSON object with an integer 'epoch'."""
    record = json.loads(line)  # a JSONDecodeError is a ValueError
    if not (isinstance(record, dict) and type(record.get("epoch")) is int):
        raise ValueError("not an object with an integer 'epoch'")
    return record


def best_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record with the highest validation accuracy (latest on ties), or the last without validation."""
    scored = [r for r in records if BEST_METRIC in r]
    if not scored:
        return records[-1]
    return max(reversed(scored), key=lambda r: r[BEST_METRIC])


def _epochs_saved(workdir: str | Path) -> list[int]:
    """The epochs of the complete checkpoints in run directory `workdir`, oldest first."""
    if not (Path(workdir) / CHECKPOINTS).is_dir():
        return []
    manager = _manager(Path(workdir).absolute() / CHECKPOINTS, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def latest_epoch(workdir: str | Path) -> int | None:
    """The epoch of the newest complete checkpoint in run directory `workdir`; None when it has none."""
    return max(_epochs_saved(workdir), default=None)


def is_finished(workdir: str | Path, epochs: int) -> bool:
    """Whether the run in `workdir` has trained its `epochs`: the last epoch's checkpoint is saved, or the records
    reach `epochs` and the checkpoint that `restore` picks (best by validation) is kept, as when the others
    were deleted to save space (resuming would retrain from the newest one kept)."""
    saved = _epochs_saved(workdir)
    if not saved or saved[-1] >= epochs:
        return bool(saved)
    records = read_records(workdir)
    if not records:
        return False
    return records[-1]["epoch"] >= epochs and best_record(records)["epoch"] in saved


@dataclasses.dataclass
class Restored:
    """A checkpoint brought back: its train state, config, the epoch's record and that epoch."""

    state: Any
    config: Config
    record: dict[str, Any]
    epoch: int

    def check_images(self, images: np.ndarray, split: str, data_config: Config) -> None:
        """Raises ValueError naming the split and its data unless (N, H, W, C) `images`, `split` of the data that
        `data_config` reads, are the size this model trained on."""
        trained = tuple(self.record["image_shape"])
        if tuple(images.shape[1:]) != trained:
            source = f"the {split} split of {data_config.data_dir or data_config.dataset}"
            raise ValueError(f"{source}: images of {tuple(images.shape[1:])} (height, width, channels), but this model "
                             f"was trained on {trained}; give data of that size (--data-dir)")


def _locate(path: Path) -> tuple[Path, int | None]:
    """(checkpoints directory, step or None) for a run dir, a checkpoints dir or one step's dir."""
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise FileNotFoundError(f"no checkpoint found at {path}: pass a run directory (with {CHECKPOINTS}/), "
                            f"its {CHECKPOINTS}/ directory, or one checkpoint like {CHECKPOINTS}/3")


def restore(path: str | Path, *, step: int | str = "best", model: nn.Module | None = None,
            tx: optax.GradientTransformation | None = None, mesh: jax.sharding.Mesh | None = None) -> Restored:
    """Restores a checkpoint in any process, for evaluation or further training.

    Args:
      path: a run directory, its checkpoints/ directory, or one checkpoint directory (checkpoints/N).
      step: an epoch number, "latest", or "best" (highest validation accuracy); when `path` names one
        checkpoint, an epoch number must be that checkpoint's.
      model: the Flax module that was trained, when it is not a registered `config.model`.
      tx: the optax transformation that was used, when it was not the config's (restored without it, such a
        run's state holds its optimizer state as saved, nested dicts: it evaluates, and a warning says to pass
        tx= to train it on).
      mesh: a `parallel.make_mesh` mesh to restore onto, replicated on its devices (however many devices
        saved it); default: this process's first device.
    Returns:
      Restored(state, config, record, epoch) with `state` a TrainState like the one that was saved.
    Like every checkpoint read here, it installs (once) `quiet_closed_loop_callbacks`' hook, which drops the "Event
    loop is closed" errors a failed read leaves behind and passes every other unraisable error on.
    """
    from digits_jax.train import create_train_state  # train imports this module

    if step not in ("best", "latest"):
        # Whole numbers only: int() would read 21.9 as epoch 21 and True as epoch 1.
        text = str(step)
        if isinstance(step, bool) or not (isinstance(step, numbers.Integral) or text.isascii() and text.isdigit()):
            raise ValueError(f"step {step!r}: give an epoch number, 'best' or 'latest'")
        step = int(step)
    directory, chosen = _locate(Path(path).absolute())
    if chosen is not None and isinstance(step, int) and step != chosen:
        raise ValueError(f"{path} is the checkpoint of epoch {chosen}, not {step}: drop --step, or pass the run "
                         f"directory with --step {step}")
    manager = _manager(directory, read_only=True)

    def abstract_state(meta: Any) -> Any:
        custom = meta.record.get("custom_model")
        if custom and model is None:
            raise ModelNeededError(f"{directory} was trained with a model given from Python ({custom}), not the "
                                   f"registered model {meta.config['model']!r} of its config: give that module from "
                                   "Python: digits_jax.restore(path, model=...), Predictor.from_checkpoint(path, "
                                   "model=...) or report.write_report(path, model=...)")
        given = model and module_name(model)
        if custom and given != custom:  # the same parameter tree would restore silently into another network
            warnings.warn(f"{directory} was trained with {custom}; restoring it into {given} (renamed, or another "
                          "module?)", stacklevel=4)
        try:
            config = Config.from_dict(meta.config)
        except ValueError as error:
            raise _UnusableConfigError(str(error)) from error
        net = model if model is not None else models.create(config.model, config.num_classes)
        # The schedule is sized by the steps per epoch the run had, so that training on continues it.
        steps_per_epoch = meta.record["step"] // meta.record["epoch"]
        optimizer = tx if tx is not None else optim.optimizer(config, steps_per_epoch)
        shapes = jax.eval_shape(lambda: create_train_state(config, net, tuple(meta.record["image_shape"]), optimizer))
        sharding = parallel.replicated(mesh) if mesh is not None else _first_device()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)
        if tx is None and meta.record.get("custom_tx"):  # its optimizer state has a structure only that tx knows
            warnings.warn(f"{directory} was trained with an optimizer given from Python (tx=); restored without it, "
                          "its state evaluates, but pass tx= to train it on", OptimizerStateAsSavedWarning,
                          stacklevel=4)
            return _AsSaved(abstract)
        if tx is None:  # a loop of one's own (RunDir.save) records no custom_tx, but may have had its own tx
            return _AsSaved(abstract, f"{directory}: its optimizer state is not that of the config's optimizer "
                                      f"({config.optimizer!r}, schedule {config.schedule!r}): trained with a tx of its "
                                      "own? Restored without it, its state evaluates, but pass tx= to train it on")
        return abstract

    try:
        candidates = [chosen] if chosen is not None else _candidates(manager, step, directory)
        epoch, state, meta = _restore_intact(manager, candidates, abstract_state, directory)
    finally:
        manager.close()
    return Restored(state=state, config=Config.from_dict(meta.config), record=meta.record, epoch=epoch)


def _first_device() -> jax.sharding.Sharding:
    """This process's first device: a GPU checkpoint restores on a CPU and back."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


@dataclasses.dataclass(frozen=True)
class _AsSaved:
    """The train state to restore, but for its optimizer state, whose structure only an unknown tx has: read as
    saved (nested dicts) where it differs from `abstract`'s, with `warning` issued then (if any)."""
    abstract: Any
    warning: str | None = None


def _with_saved_opt_state(abstract: Any, saved: dict[str, Any], sharding: jax.sharding.Sharding) -> Any:
    """`abstract`'s TrainState filled from `saved` (a state read as saved), its opt_state kept as read and put on
    `sharding`."""
    def place(a: jax.ShapeDtypeStruct, value: Any) -> jax.Array:
        if np.shape(value) != a.shape:
            raise ValueError(f"Requested shape: {a.shape} is not compatible with the stored shape: {np.shape(value)}")
        return jax.device_put(np.asarray(value, a.dtype), a.sharding)

    try:
        fields = {name: jax.tree.map(place, getattr(abstract, name), saved[name])
                  for name in ("step", "epoch", "rng", "params", "model_state", "ema_params")}
    except (KeyError, TypeError, ValueError) as error:  # named as Orbax names it, so that it is not taken for damage
        if "Requested shape" in str(error):  # place()'s: arrays of other shapes, also not damage
            raise
        raise ValueError(f"tree structures do not match ({error})") from error
    return abstract.replace(opt_state=jax.device_put(saved["opt_state"], sharding), **fields)


def _read_state(manager: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Any, bool]:
    """The train state of checkpoint `step`, and whether its optimizer state was read as saved (see `_AsSaved`)."""
    target = abstract.abstract if isinstance(abstract, _AsSaved) else abstract
    mismatch = _other_shape(Path(str(manager.directory)) / str(step) / "state", target)
    if mismatch:  # said before reading: a read refused for its shapes leaves TensorStore callbacks printing tracebacks
        raise ValueError(f"Requested shape: {mismatch[1]} is not compatible with the stored shape: {mismatch[0]}")
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state, False
    except Exception as error:
        if not isinstance(abstract, _AsSaved) or "tree structures do not match" not in str(error):
            raise
    # Placed where the target's arrays go: the devices that saved it may not all be here.
    sharding = jax.tree.leaves(target)[0].sharding
    saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        fallback_sharding=sharding))).state
    state = _with_saved_opt_state(target, saved, sharding)
    if abstract.warning:  # now that the optimizer state is known to be all that differed
        warnings.warn(abstract.warning, OptimizerStateAsSavedWarning, stacklevel=4)
    return state, True


def _other_shape(directory: Path, target: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(stored, asked for) shapes of the first array that the state saved in `directory` and `target` both have at the
    same path but with other shapes; None if there is none, or if the metadata cannot be read (the read says why)."""
    def names(path: Any) -> tuple[str, ...]:  # attribute, key or index alike: the saved tree has dicts for dataclasses
        return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)

    try:
        stored = ocp.StandardCheckpointHandler().metadata(directory)
    except Exception:  # noqa: BLE001 -- damaged or missing: the read that follows reports it
        return None
    shapes = {names(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]
              if hasattr(leaf, "shape")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        saved = shapes.get(names(path))
        if saved is not None and saved != tuple(leaf.shape):
            return saved, tuple(leaf.shape)
    return None


def _restore_intact(manager: ocp.CheckpointManager, steps: Sequence[int], abstract_state: Callable[[Any], Any],
                    directory: Path) -> tuple[int, Any, Any]:
    """(step, state, meta with .config and .record) of the first of `steps` that reads back intact."""
    quiet_closed_loop_callbacks()  # before any read: a failed one's callbacks come during and after it
    for step in steps:
        where = directory / str(step)
        try:
            meta = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                                 record=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001 -- whatever broke the read, this checkpoint is not usable
            _warn_skipped(where, error)
            continue
        try:  # abstract_state's errors are not damage: they are raised
            abstract = abstract_state(meta)
        except _UnusableConfigError as error:  # e.g. a newer field
            raise ValueError(f"{where} was saved with a config this digits_jax cannot use: {error}. Restore it "
                             "with the digits_jax version that trained it") from error
        try:
            state, as_saved = _read_state(manager, step, abstract)
            # An optimizer state read as saved may order its leaves otherwise than the state's SHA-256 did (fields
            # not in alphabetical order): the evaluated variables have their own SHA-256.
            key = "variables_sha256" if as_saved else "state_sha256"
            digest = _variables_digest if as_saved else state_digest
            saved_digest = meta.record.get(key)  # absent in checkpoints saved before it existed: not checked
            if saved_digest is not None and digest(state) != saved_digest:
                raise ValueError("its state does not match the SHA-256 saved with it")
            return step, state, meta
        except Exception as error:  # noqa: BLE001 -- as above
            if "tree structures do not match" in str(error):
                # Not damage: the state was built differently; older checkpoints would fail the same way.
                raise ValueError(f"{where} holds a train state of another structure than the one built to restore "
                                 "it: pass the model= and tx= it was trained with (or the same config: e.g. "
                                 "ema_decay changes the state), or it was saved by an older digits_jax") from error
            shapes = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))",
                               str(error))
            if shapes:  # not damage either: a model of another width, or images of another size
                raise ValueError(f"{where} holds arrays of other shapes than the train state built to restore it "
                                 f"(an array of shape {shapes[2]} in the checkpoint, {shapes[1]} asked for): give "
                                 "the model it was trained with (its widths and num_classes) and images of the size "
                                 "it was trained on") from error
            _warn_skipped(where, error)
    others = sorted(set(manager.all_steps()) - set(steps))
    if others:  # an epoch asked for by number is damaged, others are there
        raise FileNotFoundError(f"the checkpoint of epoch {steps[0]} in {directory} is damaged; epochs {others} are "
                                "there: give the run directory with --step one of them, 'latest' or 'best' (from "
                                "Python: step=)")
    raise FileNotFoundError(f"no intact checkpoint in {directory} (tried epochs {list(steps)}): move that directory "
                            "aside and train again in a new --workdir (from Python: if they are intact, check that "
                            "model= and tx= match the ones that were trained)")


def quiet_closed_loop_callbacks() -> None:
    """Installs (once per process) an unraisable hook that drops the "Event loop is closed" errors of TensorStore
    callbacks: after a failed checkpoint read they reach Orbax's closed event loop later, at random, each printing a
    traceback (up to ~1,000 lines) after the one line that said what happened. Anything else goes to the hook that
    was there. Restoring a checkpoint installs it; so does the command line."""
    hook = sys.unraisablehook
    if not (isinstance(hook, functools.partial) and hook.func is _drop_closed_loop_callbacks):
        sys.unraisablehook = functools.partial(_drop_closed_loop_callbacks, hook)


def _drop_closed_loop_callbacks(previous: Callable[[Any], Any], unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)


def _warn_skipped(where: Path, error: Exception) -> None:
    # TensorStore's messages end in a dump of the store's whole spec.
    first_line = (str(error).splitlines() or [""])[0]
    reason = first_line.split(" See full TensorStore details")[0][:300] or type(error).__name__
    warnings.warn(f"skipping damaged checkpoint {where}: {reason}", CheckpointSkippedWarning, stacklevel=4)


def _candidates(manager: ocp.CheckpointManager, step: int | str, directory: Path) -> list[int]:
    """Steps to try, best first: `step` alone, newest first for "latest", by validation accuracy for "best"."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    if step == "latest":
        return steps
    if step == "best":
        return sorted(steps, key=lambda s: _validation_accuracy(manager, s), reverse=True)
    if int(step) not in steps:
        raise FileNotFoundError(f"{directory} has no checkpoint for epoch {step}; it has {sorted(steps)}")
    return [int(step)]


def _validation_accuracy(manager: ocp.CheckpointManager, step: int) -> float:
    """A step's validation accuracy for ranking; -1 when it has none or its record cannot be read."""
    try:
        record = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record
    except Exception:  # noqa: BLE001 -- an unreadable record ranks last; _restore_intact reports it
        return -1.0
    return float(record.get(BEST_METRIC, -1.0))
