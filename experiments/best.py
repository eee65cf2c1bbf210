"""The best single-model recipe (`config.best()`), end to end: trains it (or finishes an interrupted run) and
reports the test accuracy of the epoch that the validation split picks, and the wall time.

    make best                      # = .venv/bin/python experiments/best.py [--workdir runs/best] [--seed 0]

The recipe: the "bn" CNN (2 x conv-BN-ReLU pairs with 32 and 64 channels, pooling, dropout 0.25, dense 256),
affine augmentation on the device (rotation, scale, shear, translation), one-cycle Adam 2e-3, label
smoothing 0.1, an EMA (0.999) of the weights for evaluation and test-time augmentation over 1-pixel shifts;
15 epochs of batch 128 on 55,000 images, the last 5,000 training images held out for choosing the
checkpoint. The test set is only reported.
"""

import argparse
import json
import time

from digits_jax import checkpoint, config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="run directory (default runs/best-seed{SEED})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args()
    run_config = config.best().replace(seed=args.seed).with_overrides(args.set)
    workdir = args.workdir or f"runs/best-seed{args.seed}"
    start = time.perf_counter()
    train.train_and_evaluate(run_config, workdir, resume=True)  # resume: an interrupted run is finished
    records = checkpoint.read_records(workdir)
    chosen = checkpoint.best_record(records)
    summary = {"workdir": workdir, "seed": args.seed, "chosen_epoch": chosen["epoch"],
               "validation_accuracy": chosen["validation_accuracy"], "test_accuracy": chosen["test_accuracy"],
               "final_test_accuracy": records[-1]["test_accuracy"], "wall_seconds": time.perf_counter() - start}
    print(f"best recipe, seed {args.seed}: test accuracy {100 * chosen['test_accuracy']:.2f}% at epoch "
          f"{chosen['epoch']} (chosen by validation {100 * chosen['validation_accuracy']:.2f}%), "
          f"{summary['wall_seconds']:.0f} s wall (this call)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
