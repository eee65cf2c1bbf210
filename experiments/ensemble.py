"""The best ensemble: the best single-model recipe trained with several seeds, probabilities averaged.

    make ensemble                  # = .venv/bin/python experiments/ensemble.py [--members 5] [--method mean]

Members are `config.best()` with seeds 0..N-1 in runs/best-seed{i} (the run of `make best` is member 0;
runs already finished are reused, interrupted ones finished). Each member contributes its checkpoint picked
by validation accuracy; the ensemble is scored on the validation split and then once on the test set.
"""

import argparse
import json
import time

from digits_jax import checkpoint, config, data, ensemble, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--method", default="mean", choices=ensemble.METHODS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args()
    start = time.perf_counter()
    workdirs = [f"runs/best-seed{seed}" for seed in range(args.members)]
    for seed, workdir in enumerate(workdirs):
        train.train_and_evaluate(config.best().replace(seed=seed).with_overrides(args.set), workdir, resume=True)
    restored = [checkpoint.restore(w) for w in workdirs]
    members = [(r.state.apply_fn, r.state.variables) for r in restored]
    run_config = restored[0].config
    splits = data.load(run_config)
    result = {split: ensemble.evaluate(members, splits[split], args.method, run_config.eval_batch_size,
                                       run_config.tta_shift) for split in ("validation", "test")}
    test = result["test"]
    print(f"ensemble of {args.members} ({args.method}): test accuracy {100 * test['accuracy']:.2f}% "
          f"(validation {100 * result['validation']['accuracy']:.2f}%); members "
          + ", ".join(f"{100 * a:.2f}%" for a in test["member_accuracies"])
          + f"; {time.perf_counter() - start:.0f} s wall")
    print(json.dumps({"members": workdirs, "epochs": [r.epoch for r in restored], **result}))


if __name__ == "__main__":
    main()
