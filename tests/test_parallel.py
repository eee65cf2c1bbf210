"""Data parallelism on 8 CPU devices (conftest forces them): same numbers as one device, portable checkpoints,
and a two-process jax.distributed run on localhost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from digits_jax import checkpoint, data, parallel, train
from tests.conftest import REPO, one_device


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config, tiny_data):
    """The tiny config trained on 1 device, on 8, and on 8 with sharded parameters."""
    done = {}
    for name, changes in {"one": {"num_devices": 1}, "eight": {"num_devices": 8},
                          "sharded": {"num_devices": 8, "shard_params": True}}.items():
        workdir = tmp_path_factory.mktemp(name)
        done[name] = workdir, train.train_and_evaluate(tiny_config.replace(**changes), workdir, datasets=tiny_data)
    return done


def test_eight_devices_follow_the_one_device_trajectory(runs):
    assert len(jax.devices()) == 8
    (one_dir, one), (eight_dir, eight) = runs["one"], runs["eight"]
    assert len(eight.params["dense1"]["kernel"].sharding.device_set) == 8
    one_records, eight_records = checkpoint.read_records(one_dir), checkpoint.read_records(eight_dir)
    for a, b in zip(one_records, eight_records, strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(a["validation_loss"], b["validation_loss"], rtol=1e-5)
        assert a["test_accuracy"] == b["test_accuracy"]
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharded_parameters_are_split_and_give_the_same_numbers(runs):
    (_, eight), (sharded_dir, sharded) = runs["eight"], runs["sharded"]
    kernel = sharded.params["dense1"]["kernel"]  # (1600, 128): split along its first dimension
    assert kernel.sharding.spec[0] == parallel.DATA_AXIS
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 8, kernel.shape[1])
    assert sharded.opt_state[0].mu["dense1"]["kernel"].sharding.is_equivalent_to(kernel.sharding, kernel.ndim)
    assert sharded.params["dense1"]["bias"].sharding.is_fully_replicated  # small: not worth splitting
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Saved sharded, restored whole on one device: the same kernel (accuracy: the test below).
    restored = checkpoint.restore(sharded_dir, step="latest")
    np.testing.assert_array_equal(restored.state.params["dense1"]["kernel"], kernel)


@pytest.mark.parametrize(("saved_on", "restored_on"), [("eight", None), ("one", 8)])
def test_checkpoints_restore_on_another_device_count(runs, tiny_data, saved_on, restored_on):
    workdir, _ = runs[saved_on]
    mesh = parallel.make_mesh(restored_on) if restored_on else None
    restored = checkpoint.restore(workdir, step="latest", mesh=mesh)
    expected_devices = restored_on or 1
    assert len(restored.state.params["dense1"]["kernel"].sharding.device_set) == expected_devices
    result = train.evaluate(restored.state.apply_fn, restored.state.variables, tiny_data["test"], 300, mesh)
    assert result.count == len(tiny_data["test"]["label"])
    assert result.accuracy == restored.record["test_accuracy"]


def test_a_run_saved_on_eight_devices_resumes_on_one(tmp_path, tiny_config, tiny_data, runs):
    workdir = tmp_path / "run"
    shutil.copytree(runs["eight"][0], workdir)
    shutil.rmtree(workdir / checkpoint.CHECKPOINTS / str(tiny_config.epochs))  # as if killed in the last epoch
    state = train.train_and_evaluate(tiny_config.replace(num_devices=1), workdir, resume=True, datasets=tiny_data)
    assert len(state.params["dense1"]["kernel"].sharding.device_set) == 1
    assert checkpoint.read_records(workdir)[-1]["test_accuracy"] == checkpoint.read_records(runs["one"][0])[-1][
        "test_accuracy"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(runs["one"][1].params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_per_step_train_step_with_a_sharded_batch_matches_one_device(tiny_config, tiny_data):
    from tests.test_train import fresh_state

    state = fresh_state(tiny_config, tiny_data)
    batch = {k: v[:64] for k, v in tiny_data["train"].items()}
    mesh = parallel.make_mesh(8)
    sharded_state = parallel.put(state, parallel.replicated(mesh))
    sharded_batch = parallel.put(batch, parallel.batch_sharding(mesh))
    single, single_sums = train.train_step(state, batch)
    split, split_sums = train.train_step(sharded_state, sharded_batch)
    assert len(split.params["dense1"]["kernel"].sharding.device_set) == 8
    np.testing.assert_allclose(single_sums["loss"], split_sums["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(split.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_indivisible_batches_get_a_clear_error(tmp_path, tiny_config, tiny_data):
    with pytest.raises(ValueError, match=r"batch_size = 60 does not split evenly over 8 devices.*multiple of 8"):
        train.train_and_evaluate(tiny_config.replace(batch_size=60), tmp_path / "run", datasets=tiny_data)
    with pytest.raises(ValueError, match=r"num_devices = 16, but only 8 cpu devices"):
        parallel.make_mesh(16)
    for wrong in (-1, 2.5, True):  # -1 made a mesh of 7 devices (devices[:-1])
        with pytest.raises(ValueError, match=rf"num_devices = {wrong}: give a whole number >= 0 \(0 uses all"):
            parallel.make_mesh(wrong)
    assert parallel.make_mesh(np.int64(2)).size == 2


def test_eval_batches_that_do_not_divide_are_padded_not_dropped(runs, tiny_data):
    _, state = runs["eight"]
    mesh = parallel.make_mesh(8)
    whole = train.evaluate(state.apply_fn, state.variables, tiny_data["test"], 1000, mesh)
    odd = train.evaluate(state.apply_fn, state.variables, tiny_data["test"], 333, mesh)  # 336 per step
    assert odd.count == whole.count == len(tiny_data["test"]["label"])
    assert odd.accuracy == whole.accuracy
    np.testing.assert_array_equal(odd.confusion, whole.confusion)


WORKER = """
import sys
from digits_jax import checkpoint, config, train
state = train.train_and_evaluate(config.tiny().replace(data_dir=sys.argv[2]), sys.argv[1])
print("digest", checkpoint.state_digest(state))
"""


def test_two_processes_on_localhost_train_as_one_job(tmp_path, mnist_dir, tiny_config, tiny_data, runs):
    """jax.distributed over two local processes with 2 CPU devices each (4 global devices, gloo collectives)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    env = os.environ | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(workdir), str(mnist_dir)], cwd=REPO,
                              env=env | {"JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:  # a hung worker would otherwise outlive the suite, holding memory and a core
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    digests = [out.split("digest ")[-1].strip() for out, _ in outputs]
    assert digests[0] == digests[1]  # both processes hold the same replicated state
    assert "epoch=1" in outputs[0][0] and "epoch=" not in outputs[1][0]  # only process 0 logs
    # The checkpoint the two processes wrote restores in this one process, with the accuracy it recorded,
    # and matches the 1-device run of the same config.
    restored = checkpoint.restore(workdir, step="latest")
    test = data.load(restored.config)["test"]  # all 10,000 images, as the workers evaluated (tiny_data has fewer)
    one = runs["one"][1]
    assert train.evaluate(restored.state.apply_fn, restored.state.variables, test).accuracy == \
        restored.record["test_accuracy"] == train.evaluate(one.apply_fn, one.variables, test).accuracy
    for a, b in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_put_never_aliases_its_input_so_donating_the_result_is_safe(tiny_config, tiny_data):
    from tests.test_train import fresh_state

    state = fresh_state(tiny_config, tiny_data)
    mesh = parallel.make_mesh(2)  # device_put would reuse the input's buffer for the shard on device 0
    placed = parallel.put(state, parallel.replicated(mesh))
    train.train_epoch(placed, parallel.put(tiny_data["train"], parallel.replicated(mesh)), 64, mesh)
    assert placed.step.is_deleted() and not state.step.is_deleted() and int(state.step) == 0


@pytest.mark.parametrize("environment,joins", [
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, True),  # a task of `srun -n 4`
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1", "SLURM_NODELIST": "n1"}, False),  # a shell of `salloc -n 4`
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:3491"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
])
def test_initialize_joins_a_job_only_where_jax_can_find_its_coordinator(monkeypatch, environment, joins):
    """`make train` in a `salloc -n 4` shell failed in jax.distributed with 'coordinator_address should be defined'."""
    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(kwargs))
    parallel.initialize()
    assert calls == ([{}] if joins else [])


def test_open_mpi_without_a_coordinator_uri_and_a_partial_mesh_of_a_job_are_refused(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # Open MPI 5 sets no OMPI_MCA_orte_hnp_uri
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="JAX cannot find their coordinator .* set JAX_COORDINATOR_ADDRESS"):
        parallel.initialize()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"config.num_devices = 1 in a job of 2 processes: .*leave it 0"):
        parallel.make_mesh(1)
    assert parallel.make_mesh(0).size == len(jax.devices())


def test_a_run_with_its_own_tx_evaluates_without_it_on_one_device_and_its_damage_is_found(tmp_path, tiny_config,
                                                                                          tiny_data):
    """Restored without its tx, its state was read onto the devices that saved it ('Topology mismatch' in a process
    with fewer: the intact run called damaged), and without a SHA-256 check (flipped bytes restored silently)."""
    workdir = tmp_path / "sgd"
    train.train_and_evaluate(tiny_config.replace(num_devices=8), workdir, tx=optax.sgd(0.05, momentum=0.9),
                             datasets=tiny_data)
    recorded = checkpoint.read_records(workdir)[-1]["test_accuracy"]
    script = ("import warnings, digits_jax\nwarnings.simplefilter('ignore')\nr = digits_jax.restore(WORKDIR)\n"
              "test = {k: v[:2000] for k, v in digits_jax.load(r.config, ('test',))['test'].items()}\n"
              "print(r.epoch, digits_jax.evaluate(r.state.apply_fn, r.state.variables, test).accuracy)")
    one = subprocess.run([sys.executable, "-c", script.replace("WORKDIR", repr(str(workdir)))], cwd=REPO,
                         env=one_device(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert one.stdout.split() == ["2", str(recorded)]
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    # Every array file's middle, so that the parameters are hit too (a file may hold only optimizer state).
    for path in (damaged / "checkpoints" / "2" / "state").glob("ocdbt.process_*/d/*"):
        flipped = bytearray(path.read_bytes())
        for i in range(len(flipped) // 10, len(flipped) * 9 // 10):
            flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning) as caught:  # the skipped checkpoint and the tx it was not given
        assert checkpoint.restore(damaged, step="latest").epoch == 1
    assert any(isinstance(w.message, checkpoint.CheckpointSkippedWarning) and "checkpoints/2" in str(w.message)
               for w in caught)
