"""The README's Python snippets, run in order in one fresh process, so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, one_device


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_snippets_run(tmp_path, mnist_dir):
    snippets = readme_snippets()
    assert len(snippets) == 6
    script = "\n".join(f"print('--- snippet {i}')\n{code}" for i, code in enumerate(snippets, 1))
    # Two devices, not the suite's eight: enough for the multi-device snippet, and with eight this process once
    # aborted in a training all-reduce that 7 of 8 device threads had joined (XLA:CPU's 40 s rendezvous timeout)
    # while another training run shared the two cores (train.evaluate now waits for each batch on a mesh).
    env = one_device()
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2".strip()
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, f"README snippet failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "--- snippet 6" in result.stdout and "devices 2 test accuracy" in result.stdout
    assert "restored epoch 3" in result.stdout


@pytest.mark.parametrize("value,on", [("1", True), ("yes", True), ("true", True), ("0", False), ("no", False),
                                      ("", None)])
@pytest.mark.parametrize("installed", ["cpu", "cuda12"])
def test_make_flags_read_0_and_no_as_off(tmp_path, value, on, installed):
    """`make train GPU=0` installed the CUDA wheels, and RESUME=0 resumed: any non-empty value was on. Without GPU,
    a .venv keeps its flavour (a plain `make eval` after `make train GPU=1` had put the CPU build back)."""
    (tmp_path / f".installed-{installed}").touch()

    def plan(*assignment: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "-n", "-B", f"VENV={tmp_path}", *assignment], cwd=REPO, capture_output=True,
                              text=True, check=check)

    setup = plan("setup", f"GPU={value}").stdout
    gpu = installed == "cuda12" if on is None else on
    assert ("'jax[cuda12]'" in setup) == gpu and ("pip uninstall" in setup) != gpu
    assert ("--resume" in plan("train", f"RESUME={value}").stdout) == bool(on)
    refused = plan("setup", "GPU=True", check=False)
    assert refused.returncode == 2 and "GPU=True: write GPU=1 or GPU=0" in refused.stderr
    assert plan("setup", "GPU=1 x", check=False).returncode == 2  # not read as its first word
    # From the environment (set for something else) such values are ignored, and stop no target.
    from_environment = subprocess.run(["make", "-n", "-B", f"VENV={tmp_path}", "setup", "train"], cwd=REPO, text=True,
                                      capture_output=True, check=True, env=os.environ | {"GPU": "0,1", "RESUME": "y"})
    assert "--resume" not in from_environment.stdout
    assert ("'jax[cuda12]'" in from_environment.stdout) == (installed == "cuda12")  # the .venv keeps its build
