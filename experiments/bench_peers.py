"""Our benchmark beside the peer scripts in ../shared/peers, in one invocation, interleaved, as ratios.

    make bench-peers               # = .venv/bin/python experiments/bench_peers.py [--rounds 1]
    make bench-peers ARGS="--pairs 4"   # ours right before Keras, 4 times: the ratio and its spread

Each round runs: ours (experiments/bench.py), Keras (tf.keras model.fit), PyTorch, naive Flax (one
jitted step per batch fed from NumPy), and the fast PyTorch recipe (torch_fast.py --channels-last,
5 seeds). Keras and PyTorch run from their own virtual environments under ~/.venvs, made on first use;
the project itself never imports TensorFlow or PyTorch. Prints images/s per implementation and
ours/peer ratios, and writes runs/bench/peers.json.

`--pairs N` runs only ours (its compiled epoch and per-step path, no fast preset) and Keras, one right after
the other, N times: on a shared machine whose speed drifts by tens of percent within the hour, the two
figures closest in time, and the median and range of their ratios over the pairs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import check_out

from digits_jax import cli

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "peers"
VENVS = Path.home() / ".venvs"
REQUIREMENTS = {"peers-tf": ["tensorflow-cpu"], "peers-torch": ["torch==2.13.0", "numpy"]}
PEER_SCRIPTS = ("keras_seed.py", "torch_seed.py", "flax_seed.py", "torch_fast.py")
STEADY = re.compile(r"steady epoch \(mean of epochs [^)]*\): ([\d.]+) s, (\d+) img/s")


def python_for(venv: str) -> str:
    """The interpreter of a peer's virtual environment, created and filled on first use."""
    python, installed = VENVS / venv / "bin" / "python", VENVS / venv / ".installed"
    if not installed.exists():
        print(f"setting up {VENVS / venv} (first use) ...", flush=True)
        for command in ([sys.executable, "-m", "venv", str(VENVS / venv)],
                        [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS[venv]]):
            if subprocess.run(command).returncode != 0:
                raise ChildProcessError(f"setting up the peers' environment {VENVS / venv} failed: "
                                        f"`{' '.join(command)}` (its errors are above; pip needs PyPI once); rerun")
        installed.touch()
    return str(python)


def run(name: str, command: list[str], cwd: Path) -> str:
    print(f"--- {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ChildProcessError(f"{name} exited {result.returncode}:\n{result.stdout[-2000:]}\n"
                                f"{result.stderr[-2000:]}")
    print((result.stdout.strip().splitlines() or ["(no output)"])[-1], f"({time.perf_counter() - start:.0f} s)",
          flush=True)
    return result.stdout


def steady_images_per_second(stdout: str) -> float:
    match = STEADY.search(stdout)
    if match is None:
        raise ValueError(f"no 'steady epoch' line in the peer's output (changed script?):\n{stdout[-1000:]}")
    return float(match.group(2))


def ours(epochs: int, out: Path, *options: str) -> dict[str, Any]:
    """experiments/bench.py with `options`, run from the repository root; its JSON report."""
    ours_json = out.parent / "bench-in-peers.json"
    run("ours", [sys.executable, "experiments/bench.py", "--epochs", str(epochs), *options, "--out", str(ours_json)],
        REPO)
    return json.loads(ours_json.read_text())


def peer_images_per_second(name: str, python: str, script: str, epochs: int, peers: Path) -> float:
    """Steady images/s of the peer script `script` in `peers`, run by `python`."""
    return steady_images_per_second(run(name, [python, script, str(epochs)], peers))


def one_round(epochs: int, out: Path, peers: Path) -> dict[str, Any]:
    tf, torch = python_for("peers-tf"), python_for("peers-torch")
    results: dict[str, Any] = {"ours": ours(epochs, out)}
    for name, python, script in (("keras", tf, "keras_seed.py"), ("pytorch", torch, "torch_seed.py"),
                                 ("naive_flax", sys.executable, "flax_seed.py")):
        results[name] = {"images_per_second": peer_images_per_second(name, python, script, epochs, peers)}
    fast = run("torch_fast", [torch, "torch_fast.py", "--channels-last"], peers)
    seeds = re.findall(r"seed (\d+): test_acc ([\d.]+)%.*?train ([\d.]+) s.*?process ([\d.]+) s", fast)
    if not seeds:
        raise ValueError(f"no 'seed N: test_acc ...' lines in torch_fast's output (changed script?):\n{fast[-1000:]}")
    results["torch_fast"] = {"seeds": [{"seed": int(s), "test_accuracy": float(a) / 100, "train_seconds": float(t),
                                        "process_seconds": float(p)} for s, a, t, p in seeds]}
    return results


def one_pair(epochs: int, out: Path, peers: Path) -> dict[str, float]:
    """Ours (experiments/bench.py without the fast preset) right before Keras; images/s of both and the ratio."""
    mine = ours(epochs, out, "--fast-seeds", "0", "--scaling-devices", "")["seed_cnn"]["train_images_per_second"]
    keras = peer_images_per_second("keras", python_for("peers-tf"), "keras_seed.py", epochs, peers)
    return {"ours": mine, "keras": keras, "ratio": mine / keras}


def pairs_summary(pairs: list[dict[str, float]]) -> str:
    """One line per pair, then the median, mean and range of the ratios."""
    ratios = [p["ratio"] for p in pairs]
    lines = [f"pair {i + 1}: ours {p['ours']:,.0f}, keras {p['keras']:,.0f} images/s: {p['ratio']:.2f}x"
             for i, p in enumerate(pairs)]
    lines.append(f"ours/keras over {len(pairs)} pairs: median {statistics.median(ratios):.2f}x, mean "
                 f"{statistics.mean(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every peer (default 1)")
    parser.add_argument("--pairs", type=int, default=0, help="N > 0: only ours and Keras, alternately, N times")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "peers.json")
    parser.add_argument("--peers", type=Path, default=PEERS, help="folder of the peer scripts (default: %(default)s)")
    args = parser.parse_args()
    missing = [name for name in PEER_SCRIPTS if not (args.peers / name).is_file()]
    if missing:  # found before minutes of our benchmark and the peers' installs, not after
        raise FileNotFoundError(f"{args.peers}: no {', '.join(missing)} there; give --peers the folder of the peer "
                                "scripts (../shared/peers beside the repository)")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: every script's first epoch is warm-up and is not timed")
    if args.pairs < 0:
        parser.error("--pairs must be 0 (rounds of every peer) or more")
    if args.pairs and args.rounds is not None:
        parser.error("--rounds and --pairs: give one (--pairs N runs only ours and Keras, N times)")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.out = args.out.absolute()  # bench.py runs from the repository root
    check_out(parser, args.out)
    if args.pairs > 0:
        pairs = [one_pair(args.epochs, args.out, args.peers) for _ in range(args.pairs)]
        args.out.write_text(json.dumps(pairs, indent=2))
        print("\nimages/s, seed CNN at batch 128 (steady epochs), ours right before Keras:")
        print(pairs_summary(pairs))
        print(f"wrote {args.out}")
        return
    rounds = [one_round(args.epochs, args.out, args.peers) for _ in range(args.rounds or 1)]
    args.out.write_text(json.dumps(rounds, indent=2))
    print("\nimages/s, seed CNN at batch 128 (steady epochs), and ours/peer:")
    for i, r in enumerate(rounds):
        ours = r["ours"]["seed_cnn"]["train_images_per_second"]
        peers = {name: r[name]["images_per_second"] for name in ("keras", "pytorch", "naive_flax")}
        ratios = ", ".join(f"{name} {ips:,.0f} ({ours / ips:.2f}x)" for name, ips in peers.items())
        print(f"round {i + 1}: ours {ours:,.0f}; {ratios}")
        fast = r["ours"]["fast"]
        hits = [f for f in fast if f["from_process_start"] is not None]
        torch_fast = r["torch_fast"]["seeds"]
        print(f"  time to 99.0%: ours (fast preset) {len(hits)}/{len(fast)} seeds reached it"
              + (f", {min(f['from_process_start'] for f in hits):.1f}-{max(f['from_process_start'] for f in hits):.1f}"
                 " s from process start" if hits else "")
              + f"; torch_fast {sum(s['test_accuracy'] >= 0.99 for s in torch_fast)}/{len(torch_fast)} seeds, "
              f"seed 0 {torch_fast[0]['process_seconds']:.1f} s from process start, "
              f"{sum(s['train_seconds'] for s in torch_fast) / len(torch_fast):.1f} s training per seed")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.exit_process(cli.reporting_errors("bench_peers.py", main))
