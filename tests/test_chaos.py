"""The fault-injection script's small version: kills (one during a save) and two kinds of damage."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, one_device


def test_killed_and_damaged_runs_resume_bitwise_equal(mnist_dir):
    command = [sys.executable, "experiments/chaos.py", "--kills", "2", "--epochs", "2",
               "--damage", "flipped bytes in an array file", "garbled record"]
    # One device (tests/test_parallel.py resumes sharded runs); the runs share the session's compilation cache.
    env = one_device()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "injected 2 kills: 2/2 runs ended bitwise equal; 2 kinds of damage: 2/2 recovered" in result.stdout
    assert "killed during the save of epoch" in result.stdout
