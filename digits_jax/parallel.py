"""Data parallelism with jax.sharding: joining a multi-process job, the device mesh, and where arrays live.

One mesh axis, "data": every global batch is split along it, while parameters and optimizer state are
replicated (or, with `shard_params`, split along their largest divisible dimension). The compiled train
and eval steps are the single-device ones: XLA's SPMD partitioner inserts the gradient all-reduce.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MIN_SHARDED_SIZE = 4096  # smaller arrays save less memory by splitting than the extra collective costs


def initialize() -> None:
    """Joins the multi-process job described by the environment; a no-op for a single process.

    SLURM (srun) and Open MPI (mpirun) jobs with more than one task are detected by JAX itself; elsewhere
    set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every
    process. Must run before anything else touches JAX's devices.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not: set all three on every "
                             "process (see README, 'Several devices and hosts'), or unset it for one process")
        jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    # Only inside `srun`, where JAX finds the coordinator from the step's variables: a shell of `salloc -n 4`
    # (SLURM_NTASKS 4, no step) runs one process, as does `make train` typed there.
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        jax.distributed.initialize()
    elif int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        if "OMPI_MCA_orte_hnp_uri" not in os.environ:  # JAX finds the coordinator from it; Open MPI 5 sets none
            raise ValueError("this is one of several Open MPI processes, but JAX cannot find their coordinator "
                             "without OMPI_MCA_orte_hnp_uri (which Open MPI 5 no longer sets): set "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process")
        jax.distributed.initialize()


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `num_devices` global devices (0: all of them), axis name "data".

    Raises ValueError when more devices are asked for than there are, or `num_devices` is not a whole number >= 0.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral) or num_devices < 0:
        raise ValueError(f"num_devices = {num_devices!r}: give a whole number >= 0 (0 uses all devices)")
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"config.num_devices = {num_devices}, but only {len(devices)} {devices[0].platform} "
                         "devices are visible: lower it (0 uses all)")
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        # The first devices may all be process 0's, and a process without any fails in JAX with no word of why.
        raise ValueError(f"config.num_devices = {num_devices} in a job of {jax.process_count()} processes: each "
                         f"takes part with all its devices; leave it 0 (all {len(devices)})")
    return Mesh(np.array(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def check_divisible(mesh: Mesh, batch_size: int, what: str = "config.batch_size") -> None:
    """Raises ValueError unless `batch_size` splits evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise ValueError(f"{what} = {batch_size} does not split evenly over {mesh.size} devices: make it a "
                         f"multiple of {mesh.size} (e.g. {batch_size + mesh.size - batch_size % mesh.size}) "
                         "or set num_devices to a divisor of it")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis, other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: Any, mesh: Mesh, shard_params: bool = False) -> Any:
    """Shardings for every leaf of `state` (a pytree of arrays): replicated, or with `shard_params` each
    array split over the data axis along its largest dimension that the device count divides (ZeRO-3 style).
    Arrays under `MIN_SHARDED_SIZE` elements (scalars, keys, biases) and indivisible ones stay replicated."""
    def place(leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        if shard_params and np.prod(shape) >= MIN_SHARDED_SIZE:
            divisible = [d for d in np.argsort(shape)[::-1] if shape[d] % mesh.size == 0 and shape[d] >= mesh.size]
            if divisible:
                spec: list[str | None] = [None] * len(shape)
                spec[divisible[0]] = DATA_AXIS
                return NamedSharding(mesh, PartitionSpec(*spec))
        return replicated(mesh)

    return jax.tree.map(place, state)


def put(tree: Any, shardings: Any) -> Any:
    """Places host (NumPy) or device arrays with `shardings` (one sharding, or a matching pytree of them).

    Each process supplies only the pieces its own devices hold, so this works across hosts when every
    process passes the same global values. The result never aliases the input: donating it is safe.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        # Device arrays go through a host copy: device_put may hand back the input's own buffer as one shard of
        # the result (even with may_alias=False), so donating the result would delete the caller's array; and a
        # copy on the device compiles a program per shape (start-up time).
        host = np.array(value) if isinstance(value, jax.Array) else np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """NumPy copies of every leaf, gathering pieces held by other processes when an array spans hosts."""
    from jax.experimental import multihost_utils

    def one(leaf: Any) -> np.ndarray:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    return jax.tree.map(one, tree)
