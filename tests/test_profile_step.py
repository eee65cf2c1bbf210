"""experiments/profile_step.py: the per-op table against a hand-made trace, and the script on the tiny config."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, experiment, one_device

profile_step = experiment("profile_step")
hlo_ops, op_table = profile_step.hlo_ops, profile_step.op_table

HLO = "\n".join([
    "ENTRY %main {",
    '  %ynn_fusion.3 = f32[12800,288]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(train_epoch)/'
    'while/body/jit(train_step)/transpose(jvp(CNN))/conv2/dot_general" stack_frame_id=98}',
    '  ROOT %dot.8 = f32[9,32]{1,0} dot(%c, %d), lhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp(CNN)/'
    'jit(relu)/max"}',
    "  %constant.1 = f32[] constant(0)",
    "}"])


def test_hlo_ops_reads_shape_and_source_below_the_jit_and_loop_levels():
    assert hlo_ops(HLO) == {"ynn_fusion.3": ("f32[12800,288]{1,0}", "transpose(jvp(CNN))/conv2/dot_general"),
                            "dot.8": ("f32[9,32]{1,0}", "jvp(CNN)/jit(relu)/max")}


def test_op_table_sums_each_op_per_step_and_ignores_other_events():
    events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 6000.0}, {"ph": "X", "name": "ynn_fusion.3", "dur": 5000.0},
              {"ph": "X", "name": "dot.8", "dur": 500.0}, {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},
              {"ph": "M", "name": "dot.8", "dur": 1e6}]
    table = op_table(events, hlo_ops(HLO), steps=2)
    assert table["op"].tolist() == ["ynn_fusion.3", "dot.8"]
    assert table["ms_per_step"].tolist() == pytest.approx([5.5, 0.25])
    assert table["calls"].tolist() == [2, 1]
    assert table["source"][0] == "transpose(jvp(CNN))/conv2/dot_general"


def test_profile_script_times_the_tiny_configs_ops(tmp_path, mnist_dir):
    command = [sys.executable, "experiments/profile_step.py", "--config", "tiny", "--data-dir", str(mnist_dir),
               "--steps", "4", "--top", "5", "--out", str(tmp_path / "trace")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=one_device())
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = result.stdout.splitlines()[:7]
    assert re.match(r"tiny config \(seed model\), batch 64, \w+: [\d.]+ ms per step", header), header
    assert "dot_general" in result.stdout  # the convolutions' and dense layers' matmuls were timed
    assert len(rows) == 6  # the column names and 5 ops
    assert list((tmp_path / "trace").glob("plugins/profile/*/*.trace.json.gz"))
