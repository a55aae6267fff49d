"""The digits classifier behind FD-digits (ddim_fast.metrics): `ddim-fast eval-digits` judges a digits
model's DDIM samples, `ddim-fast train-digits-classifier` trains and saves the classifier. Both print
their report as JSON."""

from __future__ import annotations

import json

from ..metrics import evaluate_digits_model, save_digits_classifier, train_digits_classifier


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
    def run(args) -> int:
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
    def run(args) -> int:
        model, report = train_digits_classifier(args.resolution, epochs=args.epochs, seed=args.seed)
        save_digits_classifier(model, args.out, report)
        print(json.dumps(report, indent=2))
        return 0
