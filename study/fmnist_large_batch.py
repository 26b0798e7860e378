"""Study: does SmoothOut close the large-batch generalization gap? Fashion-MNIST, trained from scratch.

A Keskar-style fully connected net (5 hidden layers x 512 with batch norm) is trained with a
small and a large batch for the same number of epochs (large-batch LR from the authors' rule,
``lr * (B / b0) ** 0.5``), for three methods: baseline (``strength 0``), SmoothOut
(``adapt none``) and AdaSmoothOut (``adapt filter``).

Stages (each resumable: finished runs are read back from ``runs.jsonl`` and skipped):

1. ``sweep``  -- per batch size and method, a strength grid with one seed, scored on a validation
   split carved (stratified, seeded) from the training set. The test set is never looked at.
2. ``final``  -- every (batch size, method) with its best strength, for every seed: test and train
   accuracy, the train/test gap, Keskar epsilon-sharpness and the top Hessian eigenvalue of the
   final weights (on a fixed subset of the training data).
3. ``report`` -- tables (mean +- std over seeds) and 1-D interpolation plots (small- vs large-batch
   baseline; baseline vs SmoothOut and vs AdaSmoothOut at the large batch), written to
   ``<output_dir>/report.md`` and ``<output_dir>/plots/``; the best run of every cell (highest test
   accuracy among its seeds) goes to ``<output_dir>/best/<cell>/`` with its weights and a model card
   that carries the final table, its own row in bold.

Usage (about 90 minutes on 2 CPU cores with the defaults):
    python study/fmnist_large_batch.py --output_dir study_outputs/fmnist --stage all
Tiny settings (for tests):
    python study/fmnist_large_batch.py --output_dir /tmp/s --max_train_samples 600 --max_test_samples 200 \
        --epochs 1 --small_batch 32 --large_batch 128 --seeds 0 1 --strengths_none 0.01 --strengths_filter 0.05
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from study_kit import fmnist_common, ledger
from study_kit.fmnist_common import (
    INTERPOLATION_ALPHAS,
    KeskarMLP,
    MLPStudyOptions,
    TensorExamples,
    accuracy,
    interpolation_lines,
    load_keskar,
    measure_sharpness,
    read_idx_split,
    save_weights,
    stratified_split,
)
from study_kit.ledger import read_runs
from study_kit.report import large_batch_header, paired_differences
from study_kit.schedule import scale_learning_rate
from study_kit.stats import mean_std
from study_kit.sweep import best_value
from study_kit.training import study_training_arguments
from torch import nn
from transformers import HfArgumentParser

from hf_smoothout import SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.modelcard import markdown_table, write_model_card, write_run_info, write_study_rows

__all__ = [  # re-exported from fmnist_common: this study's public names are unchanged
    "INTERPOLATION_ALPHAS",
    "KeskarMLP",
    "TensorExamples",
    "accuracy",
    "read_idx_split",
    "read_runs",
    "stratified_split",
]

METHODS = {"baseline": "none", "smoothout": "none", "adasmoothout": "filter"}


@dataclass
class StudyArguments(MLPStudyOptions):
    output_dir: str = field(default="study_outputs/fmnist", metadata={"help": "Where runs, models and the report go."})
    stage: Literal["sweep", "final", "report", "all"] = field(default="all", metadata={"help": "Stage(s) to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the final runs."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the strength sweep (not one of the final seeds)."})
    epochs: float = field(default=10.0, metadata={"help": "Epochs, the same for every batch size."})
    small_batch: int = field(default=128, metadata={"help": "Small batch size (also the LR reference batch b0)."})
    large_batch: int = field(default=4096, metadata={"help": "Large batch size."})
    base_lr: float = field(default=0.05, metadata={"help": "SGD learning rate at the small batch."})
    lr_rule: Literal["sqrt", "linear", "none"] = field(default="sqrt", metadata={"help": "Large-batch LR rule."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping (the authors' script: 5)."})
    strengths_none: list[float] = field(
        default_factory=lambda: [0.00025, 0.001, 0.004, 0.016],
        metadata={"help": "Sweep grid for SmoothOut (adapt none)."},
    )
    strengths_filter: list[float] = field(
        default_factory=lambda: [0.01, 0.04, 0.16, 0.64],
        metadata={"help": "Sweep grid for AdaSmoothOut (adapt filter)."},
    )


def load_data(study: StudyArguments) -> dict[str, TensorExamples]:
    """Fashion-MNIST train / validation (carved from train) / test, pixels in [0, 1], normalized."""
    return fmnist_common.load_data(
        study.fashion_mnist_dir, study.validation_size, study.max_train_samples, study.max_test_samples
    )


def batch_lr(study: StudyArguments, batch: int) -> float:
    """The LR at ``batch``: ``--base_lr`` at the small batch, scaled by ``--lr_rule``."""
    return scale_learning_rate(study.base_lr, batch, study.small_batch, study.lr_rule)


def run_key(phase: str, batch: int, method: str, strength: float, seed: int) -> str:
    """``<phase>-b<batch>-<method>-a<strength>-s<seed>``."""
    return ledger.run_key(phase, batch, method, strength, seed, tag="a")


def train_one(
    study: StudyArguments,
    data: dict[str, TensorExamples],
    phase: str,
    batch: int,
    method: str,
    strength: float,
    seed: int,
) -> dict[str, Any]:
    """Train one model; returns its record."""
    out = Path(study.output_dir)
    key = run_key(phase, batch, method, strength, seed)
    args = study_training_arguments(
        output_dir=str(out / "trainer" / key),
        seed=seed,
        num_train_epochs=study.epochs,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=2048,
        learning_rate=batch_lr(study, batch),
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=study.max_grad_norm,
        use_cpu=True,
        smoothout_strength=strength,
        smoothout_adapt=METHODS[method],
    )
    torch.manual_seed(seed)
    model = KeskarMLP(study.hidden, study.depth)
    trainer = SmoothOutTrainer(
        model,
        args,
        train_dataset=data["train"],
        compute_metrics=accuracy,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": args.learning_rate, "momentum": study.momentum}),
    )
    result = trainer.train()
    record: dict[str, Any] = {
        "key": key,
        "phase": phase,
        "batch": batch,
        "method": method,
        "strength": strength,
        "seed": seed,
        "lr": trainer.optimizer.param_groups[0]["initial_lr"],
        "epochs": study.epochs,
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics["train_runtime"],
        "train_loss": result.metrics["train_loss"],
    }
    if phase == "sweep":
        record["validation_accuracy"] = trainer.evaluate(data["validation"], metric_key_prefix="val")["val_accuracy"]
    else:
        record["test_accuracy"] = trainer.evaluate(data["test"], metric_key_prefix="test")["test_accuracy"]
        train_eval = data["train"].subset(10000, seed=3)
        record["train_accuracy"] = trainer.evaluate(train_eval, metric_key_prefix="train")["train_accuracy"]
        record["gap"] = record["train_accuracy"] - record["test_accuracy"]
        record.update(measure_sharpness(model, data["train"], study))
        save_weights(model, out / "models" / f"{key}.safetensors")
    return record


def best_strengths(study: StudyArguments, runs: dict[str, dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Per (batch, method), the sweep strength with the highest validation accuracy (ties: the larger)."""
    best: dict[tuple[int, str], float] = {}
    for batch in (study.small_batch, study.large_batch):
        for method, grid in (("smoothout", study.strengths_none), ("adasmoothout", study.strengths_filter)):
            keys = {a: run_key("sweep", batch, method, a, study.sweep_seed) for a in grid}
            chosen = best_value((a, runs[key]["validation_accuracy"]) for a, key in keys.items() if key in runs)
            if chosen is not None:
                best[(batch, method)] = chosen
    return best


def planned_runs(study: StudyArguments, stage: str, runs: dict[str, dict[str, Any]]) -> Iterable[tuple]:
    batches = (study.small_batch, study.large_batch)
    if stage == "sweep":
        for batch in batches:
            for method, grid in (("smoothout", study.strengths_none), ("adasmoothout", study.strengths_filter)):
                for strength in grid:
                    yield "sweep", batch, method, strength, study.sweep_seed
    elif stage == "final":
        best = best_strengths(study, runs)
        for seed in study.seeds:
            for batch in batches:
                yield "final", batch, "baseline", 0.0, seed
                for method in ("smoothout", "adasmoothout"):
                    if (batch, method) not in best:
                        raise ValueError(f"No sweep result for batch {batch}, {method}: run --stage sweep first.")
                    yield "final", batch, method, best[(batch, method)], seed


def run_stage(study: StudyArguments, stage: str, data: dict[str, TensorExamples]) -> None:
    path = Path(study.output_dir) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = read_runs(path)
    for phase, batch, method, strength, seed in list(planned_runs(study, stage, runs)):
        key = run_key(phase, batch, method, strength, seed)
        train = partial(train_one, study, data, phase, batch, method, strength, seed)
        record, trained = ledger.run_once(path, runs, key, train)
        if trained:
            print(json.dumps(record), flush=True)


def load_model(study: StudyArguments, key: str) -> nn.Module:
    return load_keskar(Path(study.output_dir) / "models" / f"{key}.safetensors", study.hidden, study.depth)


def report(study: StudyArguments, data: dict[str, TensorExamples]) -> str:
    out = Path(study.output_dir)
    runs = read_runs(out / "runs.jsonl")
    best = best_strengths(study, runs)
    final = [  # only the chosen strengths: a widened grid can leave final runs of an earlier choice behind
        r
        for r in runs.values()
        if r["phase"] == "final" and (r["method"] == "baseline" or best.get((r["batch"], r["method"])) == r["strength"])
    ]
    lines = [
        f"Fashion-MNIST, KeskarMLP {study.depth}x{study.hidden} (batch norm), {study.epochs:g} epochs, SGD momentum "
        f"{study.momentum}, base LR {study.base_lr} at batch {study.small_batch}, {study.lr_rule} rule, clip "
        f"{study.max_grad_norm}; train {len(data['train'])} / validation {len(data['validation'])} / test "
        f"{len(data['test'])}; seeds {study.seeds} (sweep seed {study.sweep_seed}).",
        "",
        f"Strength sweep (validation accuracy %, seed {study.sweep_seed}):",
        "",
        "| batch | method | strength | validation acc % |",
        "|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in runs.values() if r["phase"] == "sweep"), key=lambda r: (r["batch"], r["method"], r["strength"])
    ):
        mark = " (chosen)" if best.get((r["batch"], r["method"])) == r["strength"] else ""
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['strength']:g}{mark} | {100 * r['validation_accuracy']:.2f} |"
        )
    by_cell: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in final:
        by_cell.setdefault((r["batch"], r["method"]), []).append(r)
    header, rows = final_table(by_cell)
    lines += ["", "Final runs (mean ± std over seeds):", ""]
    lines += markdown_table(header, rows).splitlines()
    lines += [
        "",
        "Large-batch gap (small-batch minus large-batch test accuracy, paired by seed, mean ± std):",
        "",
        "| method | gap (points) |",
        "|---|---|",
    ]
    for method in METHODS:
        small = {r["seed"]: r["test_accuracy"] for r in by_cell.get((study.small_batch, method), [])}
        large = {r["seed"]: r["test_accuracy"] for r in by_cell.get((study.large_batch, method), [])}
        lines.append(f"| {method} | {mean_std(paired_differences(small, large, sorted(small)), 100)} |")
    lines += interpolation_plots(study, data, runs, best)
    lines += export_best_runs(study, data, by_cell, header, rows)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def final_table(by_cell: dict[tuple[int, str], list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per (batch, method) cell, sorted) of the final-runs table."""
    header = large_batch_header("eps-sharpness")
    rows = [
        [
            str(batch),
            method,
            f"{cell[0]['strength']:g}",
            mean_std([r["test_accuracy"] for r in cell], 100),
            mean_std([r["train_accuracy"] for r in cell], 100),
            mean_std([r["gap"] for r in cell], 100),
            mean_std([r["epsilon_sharpness"] for r in cell], 1, 3),
            mean_std([r["hessian_top"] for r in cell], 1, 1),
            f"{statistics.mean(r['train_runtime_s'] for r in cell):.0f}",
        ]
        for (batch, method), cell in sorted(by_cell.items())
    ]
    return header, rows


def export_best_runs(
    study: StudyArguments,
    data: dict[str, TensorExamples],
    by_cell: dict[tuple[int, str], list[dict[str, Any]]],
    header: list[str],
    rows: list[list[str]],
) -> list[str]:
    """Per cell, its best run (highest test accuracy among the seeds) as a folder with weights and a model card.

    The card carries the study's final table with the run's own row in bold.
    """
    out = Path(study.output_dir)
    lines = ["", "Best run of each cell (highest test accuracy among its seeds), with a model card:", ""]
    for index, ((batch, method), cell) in enumerate(sorted(by_cell.items())):
        best = max(cell, key=lambda r: r["test_accuracy"])
        folder = out / "best" / f"b{batch}-{method}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "models" / f"{best['key']}.safetensors", folder / "model.safetensors")
        (folder / "keskar_mlp.json").write_text(json.dumps({"hidden": study.hidden, "depth": study.depth}) + "\n")
        results = {
            "test_accuracy": best["test_accuracy"],
            "train_accuracy": best["train_accuracy"],
            "train_test_gap": best["gap"],
            "epsilon_sharpness": best["epsilon_sharpness"],
            "hessian_top_eigenvalue": best["hessian_top"],
            "train_loss": best["train_loss"],
            "train_runtime": best["train_runtime_s"],
        }
        (folder / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_run_info(folder, run_info(study, data, best))
        write_study_rows(
            folder,
            title="Fashion-MNIST large-batch study",
            description=(
                f"KeskarMLP {study.depth}x{study.hidden} trained from scratch, {study.epochs:g} epochs, small batch "
                f"{study.small_batch} vs large batch {study.large_batch}, seeds {study.seeds}; strengths chosen on a "
                f"validation split carved from the training set. This model is the best of the {len(cell)} seeds of "
                f"its row by test accuracy (seed {best['seed']}); the row gives the mean ± std over all of them. "
                "Regenerate with `python study/fmnist_large_batch.py`."
            ),
            header=header,
            rows=rows,
            highlight=index,
        )
        write_model_card(folder)
        lines.append(f"- batch {batch}, {method}: seed {best['seed']} -> `{folder.relative_to(out)}/README.md`")
    return lines


def run_info(study: StudyArguments, data: dict[str, TensorExamples], record: dict[str, Any]) -> dict[str, Any]:
    """``smoothout_run.json`` of an exported run: what was trained, on what, how."""
    model = KeskarMLP(study.hidden, study.depth)
    return {
        "model_name": f"keskar-mlp-fashion-mnist-b{record['batch']}-{record['method']}",
        "model_type": f"KeskarMLP {study.depth}x{study.hidden}",
        "model_notes": "Linear-BatchNorm-ReLU blocks, defined in study/fmnist_large_batch.py",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {
            "name": "Fashion-MNIST",
            "hub_id": "zalando-datasets/fashion_mnist",
            "num_train": len(data["train"]),
            "train_split": f"train minus {len(data['validation'])} validation examples",
            "num_eval": len(data["test"]),
            "eval_splits": ["test"],
            "eval_prefixes": {"test": "test"},
        },
        "task": {"type": "image-classification", "name": "Image Classification"},
        "library_name": "pytorch",
        "smoothout": SmoothOutConfig(strength=record["strength"], adapt=METHODS[record["method"]]).to_dict(),
        "primary_metric": "test_accuracy",
        "training": {
            "per_device_train_batch_size": record["batch"],
            "gradient_accumulation_steps": 1,
            "world_size": 1,
            "effective_batch_size": record["batch"],
            "learning_rate": record["lr"],
            "lr_scaling": study.lr_rule,
            "base_learning_rate": study.base_lr,
            "reference_batch_size": study.small_batch,
            "optimizer": f"SGD, momentum {study.momentum}",
            "lr_scheduler_type": "linear",
            "max_grad_norm": study.max_grad_norm,
            "num_train_epochs": record["epochs"],
            "global_step": record["steps"],
            "seed": record["seed"],
        },
        "command": ["python", "study/fmnist_large_batch.py", "--output_dir", str(study.output_dir)],
    }


def interpolation_plots(
    study: StudyArguments,
    data: dict[str, TensorExamples],
    runs: dict[str, dict[str, Any]],
    best: dict[tuple[int, str], float],
) -> list[str]:
    """1-D interpolations (seed = first final seed): small vs large baseline; baseline vs SmoothOut at large batch."""
    seed = study.seeds[0]
    small = run_key("final", study.small_batch, "baseline", 0.0, seed)
    large = run_key("final", study.large_batch, "baseline", 0.0, seed)
    pairs = [("small_vs_large_baseline", small, large)]
    for method in ("smoothout", "adasmoothout"):
        if (study.large_batch, method) in best:
            key = run_key("final", study.large_batch, method, best[(study.large_batch, method)], seed)
            pairs.append((f"large_baseline_vs_{method}", large, key))
    lines = [
        "",
        "1-D interpolation plots (alpha in [0, 1], 0 = first model, 1 = second; weights and batch-norm statistics "
        "interpolated; loss and accuracy on 2,000 training and 2,000 test examples):",
        "",
    ]
    pairs = [(name, a, b) for name, a, b in pairs if a in runs and b in runs]
    return lines + interpolation_lines(Path(study.output_dir), pairs, data, study.hidden, study.depth, seed=seed)


def main(argv: list[str] | None = None) -> None:
    (study,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses(args=argv)
    if study.small_batch <= 0 or study.large_batch <= study.small_batch:
        raise ValueError("Need 0 < small_batch < large_batch.")
    Path(study.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(study.output_dir) / "study_arguments.json").write_text(json.dumps(asdict(study), indent=2))
    data = load_data(study)
    if study.stage in ("sweep", "all"):
        run_stage(study, "sweep", data)
    if study.stage in ("final", "all"):
        run_stage(study, "final", data)
    if study.stage in ("report", "all"):
        print(report(study, data))


if __name__ == "__main__":
    main()
