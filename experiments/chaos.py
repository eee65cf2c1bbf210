"""Fault injection: kill training with SIGKILL at random moments and damage checkpoints; every run must
still end bitwise equal to an uninterrupted one.

    make chaos                     # = .venv/bin/python experiments/chaos.py [--kills 20] [--seed 0]

1. Trains a short run (the `tiny` preset with 2,048 images, --epochs 6) once without interruption.
2. For each kill: starts the same run in a fresh directory, SIGKILLs it at a random moment (every third
   kill waits for the save of a random epoch to be in flight and kills during it), then `--resume`s until it
   finishes, and compares the SHA-256 of the final train state with the uninterrupted run's.
3. For each kind of damage (leftover temporary directory, truncated array file, flipped bytes, garbled
   record, missing state): damages the newest checkpoint of a finished copy, checks that `eval` warns
   and falls back to the newest intact checkpoint, and that `--resume` retrains to the same final state.
Prints how many faults were injected and how many runs ended bitwise equal; exits 1 if any did not.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from digits_jax import checkpoint, cli

RUN = ["--config", "tiny", "--set", "train_limit=2048", "--set", "batch_size=128"]


def train(workdir: Path, epochs: int, resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "digits_jax", "train", "--workdir", str(workdir), *RUN,
               "--set", f"epochs={epochs}"]
    return subprocess.Popen(command + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(workdir: Path, epochs: int) -> str:
    """Resumes until the run completes; returns the final state's SHA-256."""
    for _ in range(3):
        process = train(workdir, epochs, resume=True)
        _, stderr = process.communicate()
        if process.returncode == 0:
            return checkpoint.restore(workdir, step="latest").record["state_sha256"]
        print(f"  resume exited {process.returncode}: {stderr.strip()[-300:]}")
    raise ChildProcessError(f"{workdir} did not finish after 3 resumes (their errors are above); it is kept for a "
                            "look")


def _saved_epochs(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def kill_at_random(workdir: Path, epochs: int, seconds: float, _: random.Random) -> str:
    process = train(workdir, epochs)
    time.sleep(seconds)
    process.kill()
    process.wait()
    return f"killed at {seconds:.2f} s, with checkpoints {_saved_epochs(workdir)}"


def kill_during_save(workdir: Path, epochs: int, _: float, rng: random.Random) -> str:
    process = train(workdir, epochs)
    target = rng.randint(1, epochs)
    start = time.perf_counter()
    while process.poll() is None:
        saving = list((workdir / "checkpoints").glob(f"{target}.*tmp*")) if (workdir / "checkpoints").exists() else []
        if saving:
            process.kill()
            process.wait()
            return f"killed during the save of epoch {target} ({saving[0].name}) at {time.perf_counter() - start:.2f} s"
        time.sleep(0.001)
    return f"the run finished before the save of epoch {target} was caught"


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE: dict[str, Callable[[Path], object]] = {
    "leftover temporary directory": lambda ckpt: (ckpt.parent / "7.orbax-checkpoint-tmp-1").mkdir(),
    "truncated array file": lambda ckpt: _truncate(_largest_file(ckpt / "state")),
    "flipped bytes in an array file": lambda ckpt: _flip(_largest_file(ckpt / "state")),
    "garbled record": lambda ckpt: (ckpt / "record" / "metadata").write_text("{not json"),
    "missing state": lambda ckpt: shutil.rmtree(ckpt / "state"),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_and_recover(finished: Path, kind: str, workdir: Path) -> tuple[bool, str]:
    """Damages the newest checkpoint of a copy of `finished`; True if eval and resume both recover."""
    shutil.copytree(finished, workdir)
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    DAMAGE[kind](workdir / "checkpoints" / str(newest))
    command = [sys.executable, "-m", "digits_jax", "eval", "--checkpoint", str(workdir), "--step", "latest", "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return False, f"eval failed: {result.stderr.strip()[-300:]}"
    epoch = json.loads(result.stdout)["epoch"]
    warned = "skipping damaged checkpoint" in result.stderr
    expected_epoch = newest if kind == "leftover temporary directory" else newest - 1
    if epoch != expected_epoch or warned != (kind != "leftover temporary directory"):
        return False, f"eval used epoch {epoch} (expected {expected_epoch}), warned={warned}"
    return True, f"eval fell back to epoch {epoch}" + (" with a warning" if warned else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--damage", nargs="*", default=list(DAMAGE), choices=list(DAMAGE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the short run")
    args = parser.parse_args()
    if args.epochs < 2:  # damage falls back to the checkpoint before the newest
        parser.error("--epochs must be at least 2: a damaged newest checkpoint needs an older one to fall back to")
    if args.kills < 0:
        parser.error("--kills must be 0 or more")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="digits-jax-chaos-"))
    start = time.perf_counter()
    reference = finish(root / "reference", args.epochs)  # no checkpoint yet: --resume starts it fresh
    duration = time.perf_counter() - start
    print(f"uninterrupted run: {duration:.1f} s, final state sha256 {reference[:16]}", flush=True)

    equal = 0
    for k in range(args.kills):
        workdir = root / f"kill-{k}"
        inject = kill_during_save if k % 3 == 1 else kill_at_random
        what = inject(workdir, args.epochs, rng.uniform(0.5, duration), rng)
        same = finish(workdir, args.epochs) == reference
        equal += same
        print(f"kill {k + 1}/{args.kills}: {what}; resumed: {'bitwise equal' if same else 'DIFFERENT'}", flush=True)

    recovered = 0
    for kind in args.damage:
        workdir = root / f"damage-{kind.replace(' ', '-')}"
        ok, what = damage_and_recover(root / "reference", kind, workdir)
        same = ok and finish(workdir, args.epochs) == reference
        recovered += same
        print(f"damage '{kind}': {what}; resumed: {'bitwise equal' if same else 'FAILED'}", flush=True)

    print(f"injected {args.kills} kills: {equal}/{args.kills} runs ended bitwise equal; "
          f"{len(args.damage)} kinds of damage: {recovered}/{len(args.damage)} recovered to the same state "
          f"({time.perf_counter() - start:.0f} s)")
    shutil.rmtree(root)
    return 0 if equal == args.kills and recovered == len(args.damage) else 1


if __name__ == "__main__":
    cli.exit_process(cli.reporting_errors("chaos.py", main))
