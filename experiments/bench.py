"""Speed of digits_jax on the current backend: the seed CNN at batch 128, and the fast preset's time to 99%.

    make bench                     # = .venv/bin/python experiments/bench.py [--epochs 3] [--fast-seeds 5]

Prints, and writes as JSON (default runs/bench/bench.json):
- compile seconds of the on-device epoch, steady training images/s and GFLOP/s (epochs 2.. of the
  compiled epoch), the per-step path's images/s (`train_step` called once per batch from Python), and
  the test accuracy of both paths after one epoch from the same initial state in the same data order;
- evaluation images/s and the process's peak RSS;
- data-parallel scaling: images/s of the seed CNN's compiled epoch (first 12,800 training images) on a
  mesh of 1, 2, 4, 8 devices. On CPU these are fake devices (XLA_FLAGS=--xla_force_host_platform_device_count)
  sharing the same cores, so they show the partitioning overhead, not a speed-up;
- for each seed of the `fast` preset, run as `python -m digits_jax train --config fast` in a fresh
  process: wall seconds to >= 99.0% test accuracy from process start and from the first step. One run of
  seed 0 with an empty compilation cache comes first and is reported apart; the seeds then find their
  programs in the cache, as any rerun does.
Measured on a 2-core AMD EPYC CPU: see the README's speed table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digits_jax import cli, data, models, optim, parallel, train
from digits_jax import config as config_lib

# The seed CNN's nominal training cost, 15.79 M, as ../shared/peers counts it. Ours computes 16% less (it skips the
# rows and columns its pools drop: see models.CNN), so its GFLOP/s are nominal FLOPs per second, as the peers' are.
TRAIN_FLOP_PER_IMAGE = 3 * 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 1600 * 128 + 128 * 10)


def seed_cnn(epochs: int) -> dict[str, Any]:
    """Compiled-epoch and per-step throughput of the seed CNN at batch 128, plus eval speed."""
    config = config_lib.seed()
    splits = data.load(config)
    steps = len(splits["train"]["label"]) // config.batch_size
    images = steps * config.batch_size
    model = models.create(config.model, config.num_classes)
    fresh = train.create_train_state(config, model, splits["train"]["image"].shape[1:], optim.optimizer(config, steps))
    device = jax.device_put(splits)
    start = time.perf_counter()
    epoch_fn = train.train_epoch.lower(fresh, device["train"], config.batch_size).compile()
    result: dict[str, Any] = {"compile_seconds": time.perf_counter() - start, "batch_size": config.batch_size}

    state = jax.tree.map(jnp.copy, fresh)  # the compiled epoch donates its input
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        state, sums = epoch_fn(state, device["train"])
        jax.block_until_ready(sums)
        seconds.append(time.perf_counter() - start)
        if epoch == 0:
            result["epoch_path_test_accuracy_1_epoch"] = _test_accuracy(state, device["test"])
    steady = float(np.mean(seconds[1:])) if epochs > 1 else seconds[0]
    result |= {"train_images_per_second": images / steady, "train_gflops": images / steady * TRAIN_FLOP_PER_IMAGE / 1e9,
               "epoch_seconds": seconds}

    result |= _per_step_epoch(fresh, splits["train"], config.batch_size, device["test"])
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        train.evaluate(state.apply_fn, state.variables, device["test"], config.eval_batch_size)
    result["eval_images_per_second"] = repeats * len(splits["test"]["label"]) / (time.perf_counter() - start)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _test_accuracy(state: train.TrainState, test: dict[str, jax.Array]) -> float:
    return train.evaluate(state.apply_fn, state.variables, test).accuracy


def _per_step_epoch(state: train.TrainState, split: dict[str, np.ndarray], batch_size: int,
                    test: dict[str, jax.Array]) -> dict[str, float]:
    """One epoch of `train_step` calls fed from NumPy, in the compiled epoch's data order."""
    order = np.asarray(train.epoch_order(state.rng, 0, len(split["label"]), batch_size))
    state, _ = train.train_step(state, {k: v[order[0]] for k, v in split.items()})  # compile
    start = time.perf_counter()
    for indices in order[1:]:
        state, sums = train.train_step(state, {k: v[indices] for k, v in split.items()})
    jax.block_until_ready(sums)
    seconds = time.perf_counter() - start
    return {"per_step_images_per_second": (len(order) - 1) * batch_size / seconds,
            "per_step_test_accuracy_1_epoch": _test_accuracy(state, test)}


def scaling(device_counts: list[int]) -> list[dict[str, float]]:
    """Compiled-epoch images/s of the seed CNN over 12,800 images on meshes of `device_counts` devices."""
    config = config_lib.seed().replace(train_limit=12_800, validation_size=0)
    split = data.load(config)["train"]
    steps = len(split["label"]) // config.batch_size
    model = models.create(config.model, config.num_classes)
    fresh = train.create_train_state(config, model, split["image"].shape[1:], optim.optimizer(config, steps))
    results = []
    for count in device_counts:
        mesh = parallel.make_mesh(count)
        state = parallel.put(fresh, parallel.replicated(mesh))
        device_split = parallel.put(split, parallel.replicated(mesh))
        epoch_fn = train.train_epoch.lower(state, device_split, config.batch_size, mesh).compile()
        state, sums = epoch_fn(state, device_split)  # warm-up
        start = time.perf_counter()
        state, sums = epoch_fn(state, device_split)
        jax.block_until_ready(sums)
        seconds = time.perf_counter() - start
        results.append({"devices": count, "images_per_second": steps * config.batch_size / seconds})
    return results


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child JAX process, with `overrides`. On a GPU this process keeps the 75% of
    its memory that JAX preallocated while the child runs; the child preallocates a share that fits beside it
    (asking for 75% too, it printed a page of out-of-memory errors per run on an H200 before settling for less)."""
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"} | dict(os.environ) | overrides


def scaling_in_subprocess(device_counts: list[int]) -> list[dict[str, float]]:
    """`scaling` in a fresh process; on CPU with as many fake devices as the largest count."""
    env = child_env()
    if jax.default_backend() == "cpu":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={max(device_counts)}"
    counts = ",".join(map(str, device_counts))
    command = [sys.executable, __file__, "--scaling-worker", counts]
    process = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if process.returncode != 0:
        raise ChildProcessError(f"{' '.join(command)} exited {process.returncode} (its errors are above)")
    return json.loads(process.stdout.splitlines()[-1])


def fast_to_99(seed: int, compilation_cache: str) -> dict[str, Any]:
    """Runs the fast preset in a fresh process with JAX's compilation cache in `compilation_cache`; seconds to
    >= 99.0% test accuracy (None if never reached)."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "digits_jax", "train", "--config", "fast", "--workdir", workdir,
                   "--set", f"seed={seed}"]
        env = child_env(JAX_COMPILATION_CACHE_DIR=compilation_cache)
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        result: dict[str, Any] = {"seed": seed, "from_process_start": None, "from_first_step": None}
        assert process.stdout is not None
        for line in process.stdout:
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            if line.startswith("epoch ") and result["from_process_start"] is None:
                result["test_accuracy"] = float(fields["test_accuracy"])
                if float(fields["test_accuracy"]) >= 0.99:
                    result["from_process_start"] = time.perf_counter() - start
                    result["from_first_step"] = float(fields["seconds_from_first_step"])
        if process.wait() != 0:
            raise ChildProcessError(f"{' '.join(command)} exited {process.returncode} (its errors are above)")
        result["process_seconds"] = time.perf_counter() - start
    return result


def _device_counts(text: str) -> list[int]:
    """--scaling-devices, checked before minutes of timing: each count must divide the seed CNN's batch."""
    batch = config_lib.seed().batch_size  # what `scaling` splits over the devices
    counts = [part.strip() for part in text.split(",")] if text.strip() else []
    if not all(part.isdigit() and int(part) > 0 and batch % int(part) == 0 for part in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: give device counts that divide the batch of {batch}, e.g. "
                                         "1,2,4,8 ('' skips)")
    return [int(part) for part in counts]


def check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Refuses an --out that could not be written, before minutes of timing whose results would be lost."""
    if out.is_dir():
        parser.error(f"--out {out} is a directory: give a file name in it, e.g. {out / 'bench.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out}: cannot make its folder ({error.strerror})")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        parser.error(f"--out {out}: not writable" if out.exists() else
                     f"--out {out}: its folder {out.parent} is not writable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="compiled epochs to time; the first is warm-up")
    parser.add_argument("--fast-seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench.json"))
    parser.add_argument("--scaling-devices", default="1,2,4,8", type=_device_counts,
                        help="device counts to time, e.g. 1,2,4,8; '' skips")
    parser.add_argument("--scaling-worker", help=argparse.SUPPRESS)  # internal: run `scaling` and print JSON
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first is warm-up and is not timed")
    if args.fast_seeds < 0:
        parser.error("--fast-seeds must be 0 (no fast preset runs) or more")
    if args.scaling_worker:
        print(json.dumps(scaling([int(n) for n in args.scaling_worker.split(",")])))
        return
    check_out(parser, args.out)
    device = jax.devices()[0]
    report: dict = {"backend": jax.default_backend(), "device": device.device_kind, "jax": jax.__version__,
                    "cpu_count": os.cpu_count()}
    report["seed_cnn"] = seed_cnn(args.epochs)
    s = report["seed_cnn"]
    print(f"seed CNN, batch 128, {report['backend']} ({report['device']}): compile {s['compile_seconds']:.2f} s, "
          f"train {s['train_images_per_second']:,.0f} img/s ({s['train_gflops']:.1f} nominal GFLOP/s), "
          f"per-step path {s['per_step_images_per_second']:,.0f} img/s, eval {s['eval_images_per_second']:,.0f} img/s, "
          f"peak RSS {s['peak_rss_mb']:,.0f} MB", flush=True)
    print(f"test accuracy after 1 epoch, same init and order: compiled epoch "
          f"{100 * s['epoch_path_test_accuracy_1_epoch']:.2f}%, per-step path "
          f"{100 * s['per_step_test_accuracy_1_epoch']:.2f}%", flush=True)
    counts = [n for n in args.scaling_devices if jax.default_backend() == "cpu" or n <= len(jax.devices())]
    if counts:  # none on a GPU machine with fewer devices than every count asked for
        report["scaling"] = scaling_in_subprocess(counts)
        fake = " (fake CPU devices sharing the cores)" if jax.default_backend() == "cpu" else ""
        print("data-parallel scaling" + fake + ": " + ", ".join(
            f"{r['devices']} devices {r['images_per_second']:,.0f} img/s" for r in report["scaling"]), flush=True)
    report["fast"] = []
    with tempfile.TemporaryDirectory() as cache:
        # The first run fills an empty compilation cache (a first run on a machine); the seeds then reuse it,
        # as every later run of the preset does.
        for i, seed in enumerate(([0] if args.fast_seeds else []) + list(range(args.fast_seeds))):
            cold = i == 0
            run = fast_to_99(seed, cache)
            if cold:
                report["fast_cold"] = run
            else:
                report["fast"].append(run)
            reached = (f"99.0% in {run['from_process_start']:.1f} s from process start, {run['from_first_step']:.2f} "
                       "s from the first step" if run["from_process_start"] else "did not reach 99.0%")
            print(f"fast preset, seed {seed}{' (empty compilation cache)' if cold else ''}: test accuracy "
                  f"{100 * run['test_accuracy']:.2f}%, {reached} (process {run['process_seconds']:.1f} s)", flush=True)
    if report["fast"]:
        hits = sum(r["from_process_start"] is not None for r in report["fast"])
        print(f"fast preset: {hits}/{len(report['fast'])} seeds reached 99.0%")
    report["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.exit_process(cli.reporting_errors("bench.py", main))
