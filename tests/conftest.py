"""Shared fixtures: real MNIST from ../shared (this project's machines are offline) and tiny runs."""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

# Eight CPU devices, set before JAX starts, so that every training test (num_devices=0: all) runs data-parallel;
# subprocesses inherit it.
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), EIGHT_DEVICES])
# A persistent compilation cache of this session alone (not the CLI's ~/.cache one: tests must not depend on
# what earlier runs left there, nor add to it). Tests that train the same program again (resume, chaos,
# CLI subprocesses) then load it instead of compiling it again; subprocesses inherit the folder.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="digits-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist"

if SHARED_MNIST.is_dir():
    os.environ.setdefault("DIGITS_JAX_DATA_DIR", str(SHARED_MNIST))

# Tests compare float32 results with references at 1e-5; GPUs would otherwise use TF32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


def experiment(name: str) -> ModuleType:
    """experiments/{name}.py imported as a module (experiments/ holds scripts, not a package)."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def one_device(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a subprocess on one device: XLA_FLAGS without the suite's eight devices,
    whose compilation takes most of a short run's time."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(EIGHT_DEVICES, "").strip()
    return env


@pytest.fixture(autouse=True)
def absl_verbosity_put_back():
    """cli.main, which many tests run in this process, logs absl at errors only: without this, every later test that
    checks that Orbax logs no warning would pass whatever Orbax did."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    yield
    absl_logging.set_verbosity(verbosity)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def tiny_config(mnist_dir):
    from digits_jax import config

    return config.tiny().replace(data_dir=str(mnist_dir))


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    """The tiny preset's splits with the first 2,000 test images: evaluating all 10,000 after every epoch was
    most of the time of the tests that train the bn model. (The CLI tests evaluate all 10,000.)"""
    from digits_jax import data

    splits = data.load(tiny_config)
    return splits | {"test": {k: v[:2000] for k, v in splits["test"].items()}}
