"""Shared fixtures: real MNIST from ../shared (this project's machines are offline) and tiny runs."""

from __future__ import annotations

import os
from pathlib import Path

# Eight CPU devices, set before JAX starts, so that every training test (num_devices=0: all) runs data-parallel;
# subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
# No persistent compilation cache (which the CLI would turn on, in-process too): tests must not depend on
# what earlier runs left in ~/.cache, nor add to it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist"

if SHARED_MNIST.is_dir():
    os.environ.setdefault("DIGITS_JAX_DATA_DIR", str(SHARED_MNIST))

# Tests compare float32 results with references at 1e-5; GPUs would otherwise use TF32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


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
    from digits_jax import data

    return data.load(tiny_config)
