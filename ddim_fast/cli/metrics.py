"""The digits classifier behind FD-digits (ddim_fast.metrics): `ddim-fast eval-digits` judges a digits
model's DDIM samples, `ddim-fast train-digits-classifier` trains and saves the classifier. Both print
their report as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from .. import images
from ..files import check_creatable
from ..metrics import evaluate_digits_model, save_digits_classifier, train_digits_classifier
from . import checks


class EvalDigits:
    """`ddim-fast eval-digits [MODEL]`: the classifier's view of the samples, and FD-digits."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", nargs="?", default="digits", help="a model folder or bundled name (default: digits)")
        p.add_argument("--n", type=int, default=200, help="samples (seeded: sample i is keyed by (seed, i))")
        p.add_argument("--steps", type=int, default=20, help="DDIM steps (eta = 0, uniform spacing)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--grid", default=None, help="also write the first 100 samples as a PNG grid here")

    @staticmethod
    def check(args) -> None:
        """The arguments before the model loads: counts, the seed, the grid's path, and the steps against
        the model's T (its config.json)."""
        checks.at_least(args.n, 1, "--n")
        checks.steps(args.steps)
        checks.seed(args.seed)
        if args.grid is not None:
            if images.output_kind(args.grid) != "grid":
                raise ValueError(f"--grid writes an image ({', '.join(images.GRID_FORMATS)}), not {args.grid}")
            check_creatable(args.grid)
        checks.check_with_model(args, checks.ModelFacts.of_config(args.model), steps=args.steps)

    @staticmethod
    def run(args) -> int:
        EvalDigits.check(args)
        report = evaluate_digits_model(args.model, n=args.n, steps=args.steps, seed=args.seed, grid=args.grid)
        print(json.dumps(report, indent=2))
        return 0


class TrainDigitsClassifier:
    """`ddim-fast train-digits-classifier OUT`: config.json and model.safetensors in OUT."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("out", help="folder to write config.json and model.safetensors into")
        p.add_argument("--resolution", type=int, default=16)
        p.add_argument("--epochs", type=int, default=40)
        p.add_argument("--seed", type=int, default=0)

    @staticmethod
    def check(args) -> None:
        checks.at_least(args.resolution, 4, "--resolution")
        checks.at_least(args.epochs, 1, "--epochs")
        checks.seed(args.seed)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a folder; choose another output folder")
        if not out.exists():
            check_creatable(out)

    @staticmethod
    def run(args) -> int:
        TrainDigitsClassifier.check(args)
        model, report = train_digits_classifier(args.resolution, epochs=args.epochs, seed=args.seed)
        save_digits_classifier(model, args.out, report)
        print(json.dumps(report, indent=2))
        return 0
