"""A run directory: config.json, metrics.jsonl and Orbax checkpoints of the whole train state per epoch.

Layout of `workdir`:
  config.json      the run's Config
  metrics.jsonl    one JSON record per finished epoch (train/validation/test metrics, seconds)
  checkpoints/N/   Orbax checkpoint after epoch N: items 'state' (the TrainState pytree),
                   'config' and 'record' (that epoch's metrics and the image shape), so a checkpoint
                   directory alone is enough to restore and evaluate.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from digits_jax import models, optim
from digits_jax.config import Config

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
BEST_METRIC = "validation_accuracy"
LOCK = ".lock"


class RunInUseError(RuntimeError):
    """Another live process is writing the run directory."""


def _manager(directory: Path, keep: int = 1, read_only: bool = False) -> ocp.CheckpointManager:
    # Latest `keep` for resuming, plus the best by validation accuracy for evaluation.
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
    ])
    # Synchronous saves: the train state is donated to the next epoch, so it must be on disk first.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                           create=not read_only, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "config", "record"))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """Owns one run directory: saves after each epoch, restores for `--resume`."""

    def __init__(self, workdir: str | Path, config: Config, keep: int) -> None:
        self.path = Path(workdir).absolute()  # Orbax requires absolute paths.
        self.config = config
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK, "a+")  # noqa: SIM115 -- held until close() or process exit
        except OSError as e:
            raise OSError(f"cannot write to run directory {self.path}: {e.strerror}; choose another --workdir") from e
        try:
            # flock, not a pid file: the kernel drops it when the holder dies, so a crash never leaves it stuck.
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise RunInUseError(f"{self.path} is in use by {holder}; wait for it to finish or choose another "
                                "--workdir") from None
        self._lock.truncate(0)
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._lock.flush()
        self.manager = _manager(self.path / CHECKPOINTS, keep)
        self.records: list[dict[str, Any]] = []

    def restore_or_start(self, state: Any, resume: bool) -> Any:
        """Returns `state` restored from the newest checkpoint when resuming, else `state` unchanged."""
        latest = self.manager.latest_step()
        if latest is None:
            _write_atomic(self.path / "config.json", self.config.to_json())
            return state
        if not resume:
            raise FileExistsError(f"{self.path} already holds a run (checkpoint after epoch {latest}); "
                                  "pass --resume to continue it, or choose a new --workdir")
        saved = Config.from_dict(json.loads((self.path / "config.json").read_text()))
        changed = [f.name for f in dataclasses.fields(Config) if getattr(saved, f.name) != getattr(self.config, f.name)]
        if changed:
            raise ValueError(f"cannot resume {self.path}: config fields {changed} differ from the saved "
                             "config.json; resume with the same config or start a new --workdir")
        restored = self.manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))))
        self.records = [r for r in read_records(self.path) if r["epoch"] <= latest]
        _write_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in self.records))
        return restored.state

    def save(self, state: Any, record: dict[str, Any]) -> None:
        """Checkpoints `state` as step `record['epoch']`, then appends `record` to metrics.jsonl."""
        epoch = record["epoch"]
        best = {BEST_METRIC: record[BEST_METRIC]} if BEST_METRIC in record else None
        self.manager.save(epoch, metrics=best, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(dataclasses.asdict(self.config)),
            record=ocp.args.JsonSave(record)))
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self._lock.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """{'final': last epoch's record, 'best': the record of the epoch chosen by validation accuracy}."""
        return {"final": self.records[-1], "best": best_record(self.records), "workdir": str(self.path)}


def read_records(workdir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory, oldest first."""
    path = Path(workdir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record with the highest validation accuracy (latest on ties), or the last without validation."""
    scored = [r for r in records if BEST_METRIC in r]
    if not scored:
        return records[-1]
    return max(reversed(scored), key=lambda r: r[BEST_METRIC])


@dataclasses.dataclass
class Restored:
    """A checkpoint brought back: its train state, config, the epoch's record and that epoch."""

    state: Any
    config: Config
    record: dict[str, Any]
    epoch: int


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
            tx: optax.GradientTransformation | None = None) -> Restored:
    """Restores a checkpoint in any process, for evaluation or further training.

    Args:
      path: a run directory, its checkpoints/ directory, or one checkpoint directory (checkpoints/N).
      step: an epoch number, "latest", or "best" (highest validation accuracy); ignored when `path` names
        one checkpoint.
      model: the Flax module that was trained, when it is not a registered `config.model`.
      tx: the optax transformation that was used, when it was not the config's.
    Returns:
      Restored(state, config, record, epoch) with `state` a TrainState like the one that was saved.
    """
    from digits_jax.train import create_train_state  # train imports this module

    directory, chosen = _locate(Path(path).absolute())
    manager = _manager(directory, read_only=True)
    if chosen is None:
        chosen = _choose_step(manager, step, directory)
    meta = manager.restore(chosen, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                           record=ocp.args.JsonRestore()))
    config = Config.from_dict(meta.config)
    model = model if model is not None else models.create(config.model, config.num_classes)
    tx = tx if tx is not None else optim.optimizer(config, steps_per_epoch=1)
    abstract = jax.eval_shape(lambda: create_train_state(config, model, tuple(meta.record["image_shape"]), tx))
    state = manager.restore(chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    manager.close()
    return Restored(state=state, config=config, record=meta.record, epoch=chosen)


def _choose_step(manager: ocp.CheckpointManager, step: int | str, directory: Path) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    if step == "latest":
        return steps[-1]
    if step == "best":
        records = [manager.restore(s, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record for s in steps]
        return best_record(records)["epoch"]
    if int(step) not in steps:
        raise FileNotFoundError(f"{directory} has no checkpoint for epoch {step}; it has {steps}")
    return int(step)
