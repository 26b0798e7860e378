"""Offline demo: plain `Trainer` vs `SmoothOutTrainer` on scikit-learn's handwritten digits.

Trains the same small MLP with the same seeds and settings twice per seed -- once with
``smoothout_strength 0`` (plain training, bit-identical to `Trainer`) and once with SmoothOut --
and prints test accuracy (mean +- std over seeds) for both. Needs no network: the 1,797 8x8
digit images ship inside scikit-learn.

Usage:
    python recipes/digits_demo.py                      # defaults below, about a minute on 2 CPU cores
    python recipes/digits_demo.py --seeds 0 1 2 3 4 --smoothout_strength 0.05 --smoothout_adapt none
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, HfArgumentParser

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments


@dataclass
class DemoArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds; one run per seed and arm."})
    hidden: int = field(default=256, metadata={"help": "Width of the MLP's two hidden layers."})
    test_fraction: float = field(default=0.25, metadata={"help": "Share of the digits held out for testing."})


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with BatchNorm (whose parameters SmoothOut skips by default)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def load_digits_split(test_fraction: float, seed: int = 1234):
    """Stratified train/test split of scikit-learn's digits, pixels scaled to [0, 1]."""
    from datasets import ClassLabel, Dataset
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = Dataset.from_dict(
        {"pixel_values": (digits.data / 16.0).astype(np.float32), "labels": digits.target.astype(np.int64)}
    ).cast_column("labels", ClassLabel(num_classes=10))
    split = data.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="labels")
    return split["train"].with_format("torch"), split["test"].with_format("torch")


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def run(demo: DemoArguments, args: SmoothOutTrainingArguments, seed: int, train, test) -> dict[str, float]:
    run_args = dataclasses.replace(args, seed=seed, output_dir=f"{args.output_dir}/seed{seed}")
    torch.manual_seed(seed)
    model = DigitsMLP(demo.hidden)
    trainer = SmoothOutTrainer(model, run_args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    trainer.train()
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    train_metrics = trainer.evaluate(train, metric_key_prefix="train")
    return {"test": test_metrics["test_accuracy"], "train": train_metrics["train_accuracy"]}


def summarize(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):6.2f} +- {100 * std:4.2f}"


def main() -> None:
    parser = HfArgumentParser((DemoArguments, SmoothOutTrainingArguments))
    demo, args = parser.parse_args_into_dataclasses(
        args=None,
        look_for_args_file=False,
    )
    train, test = load_digits_split(demo.test_fraction)
    arms = {
        "baseline (strength 0)": 0.0,
        f"SmoothOut ({args.smoothout_adapt}, a={args.smoothout_strength})": args.smoothout_strength,
    }
    results: dict[str, list[dict[str, float]]] = {}
    for name, strength in arms.items():
        arm_args = dataclasses.replace(
            args,
            smoothout_strength=strength,
            output_dir=f"{args.output_dir}/{'baseline' if strength == 0 else 'smoothout'}",
        )
        results[name] = [run(demo, arm_args, seed, train, test) for seed in demo.seeds]
    print(
        f"\nDigits MLP, {len(train)} train / {len(test)} test, batch {args.per_device_train_batch_size}, "
        f"{args.num_train_epochs:g} epochs, seeds {demo.seeds}"
    )
    print(f"{'arm':<40} {'test acc %':>16} {'train acc %':>16}")
    for name, runs in results.items():
        print(f"{name:<40} {summarize([r['test'] for r in runs]):>16} {summarize([r['train'] for r in runs]):>16}")


if __name__ == "__main__":
    import sys

    defaults = {
        "--output_dir": "outputs/digits_demo",
        "--num_train_epochs": "30",
        "--per_device_train_batch_size": "256",
        "--learning_rate": "0.003",
        "--use_cpu": "true",
        "--report_to": "none",
        "--save_strategy": "no",
        "--eval_strategy": "no",
        "--logging_strategy": "epoch",
        "--disable_tqdm": "true",
        "--smoothout_strength": "0.02",
    }
    for flag, value in defaults.items():
        if flag not in sys.argv:
            sys.argv += [flag, value]
    main()
