"""Where a training step's time goes: per-op times of a compiled training epoch, from a JAX profiler trace.

    make profile    # = .venv/bin/python experiments/profile_step.py [--config seed] [--steps 100] [--top 25]

Compiles `train.train_epoch` for the preset's model and batch size over the first `steps` batches of the
training split, runs it once to warm up, traces two more runs with `jax.profiler`, and prints each XLA op
that ran: its time per step (largest first), its output shape and the JAX operation it came from (read from
the compiled HLO). Times are wall times, and XLA:CPU runs independent ops at once: a plain `dot` handed to
its Eigen threads shows little more than its dispatch (the seed CNN's 472 MFLOP weight gradient of conv2:
0.1 ms) while the op beside it (that convolution's input gradient) carries the time of both. The trace stays
under --out for TensorBoard's profile plugin, XProf or Perfetto (its .trace.json.gz).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path

import jax
import pandas as pd

from digits_jax import config as config_lib
from digits_jax import data, models, optim, train

RUNS = 2
# `%name = f32[12800,288]{1,0} fusion(...), ..., metadata={op_name="jit(train_epoch)/while/body/..."`
HLO_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", re.MULTILINE)
# The jit, loop and call levels above the model: "jit(train_epoch)/while/body/jit(train_step)/".
WRAPPERS = re.compile(r"^(?:(?:jit\([^)]*\)|while/body|closed_call)/)*")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (output shape, the JAX operation it came from) for each instruction of optimized HLO
    text that carries an op_name; the operation is shown from the model's call down (the jit and loop levels cut)."""
    return {name: (shape, WRAPPERS.sub("", source)) for name, shape, source in HLO_OP.findall(hlo_text)}


def op_table(events: list[dict], ops: dict[str, tuple[str, str]], steps: int) -> pd.DataFrame:
    """The complete ('X') trace events named after an HLO instruction in `ops`, summed per instruction:
    columns op, ms_per_step (total duration / `steps`), calls, shape, source; largest first."""
    # Trace durations are in microseconds.
    timed = pd.DataFrame([(e["name"], e["dur"] / 1e3) for e in events if e.get("ph") == "X" and e.get("name") in ops],
                         columns=["op", "ms"])
    table = timed.groupby("op")["ms"].agg(ms_per_step="sum", calls="count").reset_index()
    table["ms_per_step"] /= steps
    table["shape"] = [ops[name][0] for name in table["op"]]
    table["source"] = [ops[name][1] for name in table["op"]]
    return table.sort_values("ms_per_step", ascending=False, ignore_index=True)


def trace_events(trace_dir: Path) -> list[dict]:
    """The events of the newest .trace.json.gz that `jax.profiler` wrote under `trace_dir`."""
    traces = sorted(trace_dir.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no .trace.json.gz under {trace_dir}/plugins/profile: this jax did not write "
                                "a trace-viewer file; open the .xplane.pb there with TensorBoard or XProf instead")
    with gzip.open(traces[-1]) as f:
        return json.load(f)["traceEvents"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="seed", choices=sorted(config_lib.PRESETS))
    parser.add_argument("--data-dir", help="MNIST as IDX files (default: the config's source)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per traced run")
    parser.add_argument("--top", type=int, default=25, help="ops to print")
    parser.add_argument("--out", type=Path, default=Path("runs/profile"))
    args = parser.parse_args()
    config = config_lib.get(args.config)
    if args.data_dir:
        config = config.replace(data_dir=args.data_dir)
    train_split = data.load(config)["train"]
    images = args.steps * config.batch_size
    if len(train_split["label"]) < images:
        raise SystemExit(f"--steps {args.steps} needs {images} training images at batch {config.batch_size}; "
                         f"the {args.config} config has {len(train_split['label'])}: pass a smaller --steps")
    device_data = jax.device_put({k: v[:images] for k, v in train_split.items()})
    model = models.create(config.model, config.num_classes)
    state = train.create_train_state(config, model, train_split["image"].shape[1:], optim.optimizer(config, args.steps))
    compiled = train.train_epoch.lower(state, device_data, config.batch_size).compile()
    state, sums = compiled(state, device_data)  # warm-up: first-touch of buffers, thread pools
    jax.block_until_ready(sums)
    args.out.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(args.out)):
        start = time.perf_counter()
        for _ in range(RUNS):
            state, sums = compiled(state, device_data)
            jax.block_until_ready(sums)
        step_ms = (time.perf_counter() - start) / (RUNS * args.steps) * 1e3
    hlo = compiled.as_text()
    if hlo is None:
        raise SystemExit(f"the {jax.default_backend()} backend gives no HLO text to name the traced ops by")
    table = op_table(trace_events(args.out), hlo_ops(hlo), RUNS * args.steps)
    print(f"{args.config} config ({config.model} model), batch {config.batch_size}, {jax.default_backend()}: "
          f"{step_ms:.2f} ms per step while traced; all its ops sum to {table['ms_per_step'].sum():.2f} ms")
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(table.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"trace under {args.out}")


if __name__ == "__main__":
    main()
