"""The best ensemble: the best single-model recipe trained with several seeds and models, probabilities averaged.

    make ensemble                  # = .venv/bin/python experiments/ensemble.py [--models bn] [--seeds 3]

Members are `config.best()` with each model of --models and seeds 0..N-1, in the directories of
`make best` (runs/best-{model}-seed{i}): runs already finished are reused, interrupted ones finished, both
without looking at the test set. Each member contributes its checkpoint picked by validation accuracy; the
ensemble is scored on the validation split and then once on the test set (`--validation-only`: not the test set,
to compare ensembles). With `--set validation_size=0` the
members train on all 60,000 training images (runs/best-{model}-full-seed{i}) and contribute their last epoch.
Members of one recipe agree too often for averaging them to help much. `--models bn strided` adds the no-pooling
CNN (about 1.5x the time per epoch); on validation, bn + strided (15 epochs, seed 0 each) scored 99.72%, no more than
strided alone. The best ensemble so far, 99.73% (an H200; experiments/results/accuracy.md):
`--models bn strided --seeds 10 --set epochs=60 --method vote`.
"""

import argparse
import json
import time
from pathlib import Path

from best import RERUN, run_dir, train_blind

from digits_jax import cli, config, data, ensemble, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["bn"], choices=sorted(models.MODELS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of each model")
    parser.add_argument("--method", default="mean", choices=ensemble.METHODS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--validation-only", action="store_true",
                        help="score the validation split only: to compare --models, --seeds or --method without "
                        "looking at the test set")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if len(set(args.models)) < len(args.models):  # the same runs twice would weigh double in the mean and the vote
        parser.error(f"--models {' '.join(args.models)}: name each model once")
    # Each member's seed and model come from --seeds and --models; set here, every member would be the same run.
    fixed = [a for a in args.set if a.partition("=")[0] in ("seed", "model")]
    if fixed:
        parser.error(f"--set {fixed[0]}: members take their seeds from --seeds and models from --models")
    start = time.perf_counter()
    configs = [config.best().replace(model=model, seed=seed).with_overrides(args.set)
               for model in args.models for seed in range(args.seeds)]
    if args.validation_only and configs[0].validation_size == 0:  # before hours of training, not after
        parser.error("--validation-only: these members hold out no validation split (validation_size=0)")
    workdirs = [run_dir(c) for c in configs]
    splits = data.load(configs[0])  # the data fields are the recipe's, the same for every member
    restored = [train_blind(c, w, splits) for c, w in zip(configs, workdirs, strict=True)]
    run_config = restored[0].config
    scored = [split for split in ("validation", "test") if len(splits[split]["label"])]  # validation_size=0: none
    if args.validation_only:
        scored = ["validation"]
    # Each member with its own run's test-time shifts, which ensemble.evaluate reads from a Restored.
    result = {split: ensemble.evaluate(restored, splits[split], args.method, run_config.eval_batch_size)
              for split in scored}
    shown = result[scored[-1]]  # the test split's, unless left out
    if scored[-1] != "test":
        others = "test set not scored"
    elif "validation" in result:
        others = f"validation {100 * result['validation']['accuracy']:.2f}%"
    else:
        others = "no validation split"
    print(f"ensemble of {len(restored)} ({args.method}): {scored[-1]} accuracy {100 * shown['accuracy']:.2f}% "
          f"({others}); members "
          + ", ".join(f"{Path(w).name} {100 * a:.2f}%" for w, a in zip(workdirs, shown["member_accuracies"],
                                                                          strict=True))
          + f"; {time.perf_counter() - start:.0f} s wall")
    print(json.dumps({"members": workdirs, "epochs": [r.epoch for r in restored], **result}))


if __name__ == "__main__":
    cli.exit_process(cli.reporting_errors("ensemble.py", main, RERUN))
