"""Study: MiniLM fine-tuning with a large effective batch -- baseline vs SmoothOut vs AdaSmoothOut.

Every training run is one invocation of ``recipes/glue.py`` on its offline default (Rotten Tomatoes
sentences, the SST-2 stand-in, seeded stratified 80/20 split whose 20 % serves as the test set;
pretrained MiniLM-L6 cut to its first layers). Stages:

1. ``sweep``: one seed (``--sweep_seed``) per SmoothOut strength, trained on 90 % of the training
   split and scored on the other 10 % (``--holdout_fraction``): the strength of each method is chosen
   there, never on the test set.
2. ``final``: every seed at the chosen strengths on the whole training split, large effective batch
   (``per_device x accumulation``, the authors' sqrt LR rule); plus a small-batch baseline
   (``per_device``, no accumulation) for the large-batch gap.
3. ``measure``: ``hf-smoothout sharpness`` (Keskar epsilon-sharpness in a random 10-D subspace and
   the top Hessian eigenvalue, on training examples) of every final model, and
   ``hf-smoothout landscape`` interpolations (seed of the first final run): small- vs large-batch
   baseline, and large-batch baseline vs each SmoothOut method.
4. ``report``: ``report.md`` with mean +- std over seeds, and the model cards of the best run of each
   cell (highest test accuracy among its seeds) rewritten with the study's table.

Finished runs and measures are skipped, so the script resumes where it stopped.

Usage (about 80 minutes on 2 CPU cores with the defaults):
    python study/text_large_batch.py --output_dir study_outputs/text
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from study_kit.report import large_batch_header, paired_differences, table_lines
from study_kit.runner import execute, optional_flags, recipe_results, run_recipe
from study_kit.stats import mean_std
from study_kit.sweep import best_value, check_sweep_split
from transformers import HfArgumentParser

from hf_smoothout.modelcard import write_model_card, write_study_rows

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "glue.py"
METHODS = {"baseline": None, "smoothout": "none", "adasmoothout": "filter"}
# Full-space epsilon-sharpness is left out: L-BFGS-B over the ~14M bounded weights (mostly the embedding)
# takes minutes per model on 2 cores; Keskar's random-subspace variant measures the same box in M dimensions.
SHARPNESS_MEASURES = ("epsilon_subspace", "hessian_top")


@dataclass
class TextStudyArguments:
    output_dir: str = field(default="study_outputs/text", metadata={"help": "Where runs and the report go."})
    stage: Literal["sweep", "final", "measure", "report", "all"] = field(
        default="all", metadata={"help": "Stage to run (all: every stage in order)."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the final runs."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the strength sweep (not one of --seeds)."})
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of the training split held out to choose the strength."}
    )
    strengths_none: list[float] = field(
        default_factory=lambda: [0.001, 0.005, 0.02], metadata={"help": "SmoothOut (adapt none) strengths swept."}
    )
    strengths_filter: list[float] = field(
        default_factory=lambda: [0.01, 0.05, 0.2], metadata={"help": "AdaSmoothOut (adapt filter) strengths swept."}
    )
    epochs: float = field(default=1.0, metadata={"help": "Training epochs (same for every batch size)."})
    per_device_batch: int = field(
        default=32, metadata={"help": "Micro-batch size: the small batch and the LR reference batch."}
    )
    accumulation: int = field(default=8, metadata={"help": "Gradient accumulation: large batch = per_device x it."})
    learning_rate: float = field(default=3e-4, metadata={"help": "LR at the reference batch (sqrt-scaled up)."})
    warmup: float = field(default=0.1, metadata={"help": "Linear warm-up, as a share of the optimizer steps."})
    small_batch_baseline: bool = field(
        default=True, metadata={"help": "Also train the baseline at the small batch (for the large-batch gap)."}
    )
    train_eval_samples: int = field(default=2000, metadata={"help": "Training examples scored for the gap."})
    sharpness_batch_size: int = field(default=64, metadata={"help": "Batch size of the sharpness measures."})
    sharpness_batches: int = field(default=4, metadata={"help": "Training batches in every sharpness loss."})
    sharpness_iterations: int = field(default=10, metadata={"help": "L-BFGS-B iterations of epsilon-sharpness."})
    sharpness_repeats: int = field(default=3, metadata={"help": "Random subspaces of epsilon-sharpness."})
    interpolation_points: int = field(default=11, metadata={"help": "Points of each interpolation curve."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Keep the first N layers of MiniLM."})
    max_seq_length: int = field(default=64, metadata={"help": "Token limit per sentence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples (tests)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation examples (tests)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Another model folder (tests)."})

    def check(self) -> None:
        """Fail before any run for settings that cannot work."""
        check_sweep_split(self)
        if self.per_device_batch < 1 or self.accumulation < 2:
            raise ValueError("Need --per_device_batch >= 1 and --accumulation >= 2 (large batch > small batch).")
        if any(a <= 0 for a in [*self.strengths_none, *self.strengths_filter]):
            raise ValueError("Swept strengths must be positive (the baseline is always run).")


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    phase: str  # sweep or final
    method: str
    strength: float
    seed: int
    batch: int

    @property
    def name(self) -> str:
        if self.phase == "sweep":
            return f"{self.method}-a{self.strength:g}"
        return f"{self.method}-b{self.batch}-s{self.seed}"

    def folder(self, study: TextStudyArguments) -> Path:
        return Path(study.output_dir) / self.phase / self.name


def large_batch(study: TextStudyArguments) -> int:
    return study.per_device_batch * study.accumulation


def recipe_command(study: TextStudyArguments, run: Run) -> list[str]:
    """The ``recipes/glue.py`` command line of ``run``."""
    accumulation = run.batch // study.per_device_batch
    cmd = [
        sys.executable,
        str(RECIPE),
        "--task_name",
        "sst2",
        "--source",
        "offline",
        "--output_dir",
        str(run.folder(study)),
        "--seed",
        str(run.seed),
        "--num_train_epochs",
        str(study.epochs),
        "--per_device_train_batch_size",
        str(study.per_device_batch),
        "--gradient_accumulation_steps",
        str(accumulation),
        "--learning_rate",
        str(study.learning_rate),
        "--lr_scaling",
        "sqrt",
        "--warmup_steps",
        str(study.warmup),
        "--reference_batch_size",
        str(study.per_device_batch),
        "--num_hidden_layers",
        str(study.num_hidden_layers),
        "--max_seq_length",
        str(study.max_seq_length),
        "--per_device_eval_batch_size",
        "128",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        "10",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--smoothout_strength",
        str(run.strength),
    ]
    if METHODS[run.method] is not None:
        cmd += ["--smoothout_adapt", METHODS[run.method]]
    if run.phase == "sweep":
        cmd += ["--holdout_fraction", str(study.holdout_fraction)]
    else:
        cmd += ["--train_eval_samples", str(study.train_eval_samples), "--save_processed_data", "true"]
    cmd += optional_flags(
        [
            ("--max_train_samples", study.max_train_samples),
            ("--max_eval_samples", study.max_eval_samples),
            ("--model_name_or_path", study.model_name_or_path),
        ]
    )
    return cmd


def results(study: TextStudyArguments, run: Run) -> dict[str, Any] | None:
    return recipe_results(run.folder(study))


def train(study: TextStudyArguments, runs: list[Run]) -> None:
    """Run the recipe for every run that has no results yet."""
    for run in runs:
        if results(study, run) is None:
            measure = "holdout_accuracy" if run.phase == "sweep" else "eval_accuracy"
            run_recipe(recipe_command(study, run), run.folder(study), f"{run.phase} {run.name}", measure)


def sweep_runs(study: TextStudyArguments) -> list[Run]:
    batch = large_batch(study)
    runs = [Run("sweep", "baseline", 0.0, study.sweep_seed, batch)]
    runs += [Run("sweep", "smoothout", a, study.sweep_seed, batch) for a in study.strengths_none]
    runs += [Run("sweep", "adasmoothout", a, study.sweep_seed, batch) for a in study.strengths_filter]
    return runs


def chosen_strengths(study: TextStudyArguments) -> dict[str, float]:
    """Per method, the swept strength with the best holdout accuracy (ties: the smaller strength)."""
    chosen = {"baseline": 0.0}
    for method in ("smoothout", "adasmoothout"):
        done = [(run.strength, results(study, run)) for run in sweep_runs(study) if run.method == method]
        best = best_value(((a, res["holdout_accuracy"]) for a, res in done if res is not None), prefer="smaller")
        if best is not None:
            chosen[method] = best
    return chosen


def final_runs(study: TextStudyArguments) -> list[Run]:
    chosen = chosen_strengths(study)
    missing = [m for m in METHODS if m not in chosen]
    if missing:
        raise RuntimeError(f"No finished sweep runs for {missing}: run --stage sweep first.")
    runs = []
    for seed in study.seeds:
        if study.small_batch_baseline:
            runs.append(Run("final", "baseline", 0.0, seed, study.per_device_batch))
        runs += [Run("final", method, chosen[method], seed, large_batch(study)) for method in METHODS]
    return runs


# ---------------------------------------------------------------------------- measures
def cli_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "hf_smoothout.cli", *arguments]


def sharpness_file(study: TextStudyArguments, run: Run) -> Path:
    return run.folder(study) / "analysis" / "sharpness.json"


def measure(study: TextStudyArguments) -> None:
    """Sharpness of every final model, then the interpolation landscapes; finished ones are skipped."""
    for run in final_runs(study):
        folder = run.folder(study)
        if results(study, run) is None or sharpness_file(study, run).is_file():
            continue
        command = cli_command(
            "sharpness",
            "--model",
            str(folder),
            "--dataset",
            str(folder / "data" / "train"),
            "--measures",
            *SHARPNESS_MEASURES,
            "--batch-size",
            str(study.sharpness_batch_size),
            "--max-batches",
            str(study.sharpness_batches),
            "--shuffle",
            "--iterations",
            str(study.sharpness_iterations),
            "--repeats",
            str(study.sharpness_repeats),
            "--no-progress",
        )
        execute(command, folder / "analysis" / "sharpness.log", f"sharpness of {run.name}")
        print(f"sharpness {run.name}: done", flush=True)
    for name, run_a, run_b in interpolation_pairs(study):
        out = Path(study.output_dir) / "landscapes" / name
        if (out / "landscape_interpolation.json").is_file():
            continue
        command = cli_command(
            "landscape",
            "--model-a",
            str(run_a.folder(study)),
            "--model-b",
            str(run_b.folder(study)),
            "--dataset",
            str(run_a.folder(study) / "data" / "train"),
            "--eval-dataset",
            str(run_a.folder(study) / "data" / "eval"),
            "--points",
            str(study.interpolation_points),
            "--batch-size",
            "128",
            "--max-batches",
            str(study.sharpness_batches),
            "--shuffle",
            "--output-dir",
            str(out),
            "--no-progress",
        )
        execute(command, out / "landscape.log", f"landscape {name}")
        print(f"landscape {name}: done", flush=True)


def interpolation_pairs(study: TextStudyArguments) -> list[tuple[str, Run, Run]]:
    """(name, theta_A, theta_B) for the plots, all with the first final seed."""
    by_key = {(r.method, r.batch, r.seed): r for r in final_runs(study)}
    seed, small, large = study.seeds[0], study.per_device_batch, large_batch(study)
    pairs = []
    if study.small_batch_baseline:
        pairs.append(("small_vs_large_baseline", by_key[("baseline", small, seed)], by_key[("baseline", large, seed)]))
    for method in ("smoothout", "adasmoothout"):
        pairs.append((f"large_baseline_vs_{method}", by_key[("baseline", large, seed)], by_key[(method, large, seed)]))
    return [(name, a, b) for name, a, b in pairs if results(study, a) and results(study, b)]


# ---------------------------------------------------------------------------- report
def sharpness_values(study: TextStudyArguments, run: Run) -> dict[str, float]:
    path = sharpness_file(study, run)
    if not path.is_file():
        return {}
    measures = json.loads(path.read_text())["measures"]
    return {name: measures[name]["value"] for name in SHARPNESS_MEASURES if name in measures}


def measure_cell(measured: list[dict[str, float]], name: str, digits: int) -> str:
    """Mean +- std of one sharpness measure over a cell's runs; "-" until every run has it."""
    values = [m[name] for m in measured if name in m]
    return mean_std(values, 1.0, digits) if values and len(values) == len(measured) else "-"


def final_rows(study: TextStudyArguments) -> tuple[list[str], list[tuple[str, list[Run], list[str]]]]:
    """Header and, per cell, (cell label, its finished runs, its cells) of the final-runs table."""
    header = large_batch_header("eps-sharpness (10-D)")
    cells: dict[tuple[int, str], list[Run]] = {}
    for run in final_runs(study):
        if results(study, run) is not None:
            cells.setdefault((run.batch, run.method), []).append(run)
    rows = []
    for (batch, method), runs in cells.items():
        res = [results(study, r) for r in runs]
        test = [r["eval_accuracy"] for r in res]
        train_acc = [r["trainset_accuracy"] for r in res]
        sharp = [sharpness_values(study, r) for r in runs]
        rows.append(
            (
                f"{batch}/{method}",
                runs,
                [
                    str(batch),
                    method,
                    f"{runs[0].strength:g}",
                    mean_std(test, scale=100),
                    mean_std(train_acc, scale=100),
                    mean_std([a - b for a, b in zip(train_acc, test, strict=True)], scale=100),
                    measure_cell(sharp, "epsilon_subspace", 4),
                    measure_cell(sharp, "hessian_top", 2),
                    f"{statistics.mean(r['train_runtime'] for r in res):.0f}",
                ],
            )
        )
    return header, rows


def describe(study: TextStudyArguments) -> str:
    return (
        f"MiniLM-L6 (first {study.num_hidden_layers} layers), Rotten Tomatoes sentences (test = the recipe's "
        f"20 % validation split), {study.epochs:g} epoch(s), AdamW, LR {study.learning_rate:g} at batch "
        f"{study.per_device_batch} ({study.warmup:.0%} warm-up, linear decay), sqrt rule for larger batches; "
        f"large batch {large_batch(study)} = "
        f"{study.per_device_batch} x {study.accumulation} accumulation; max length {study.max_seq_length}; "
        f"seeds {study.seeds}; strengths chosen on a {study.holdout_fraction:.0%} holdout of the training split "
        f"(seed {study.sweep_seed})."
    )


def report(study: TextStudyArguments) -> str:
    root = Path(study.output_dir)
    chosen = chosen_strengths(study)
    lines = [describe(study), "", f"Strength sweep (holdout accuracy %, seed {study.sweep_seed}):", ""]
    sweep = []
    for run in sweep_runs(study):
        res = results(study, run)
        if res is not None:
            mark = " (chosen)" if run.method != "baseline" and chosen.get(run.method) == run.strength else ""
            sweep.append([run.method, f"{run.strength:g}{mark}", f"{100 * res['holdout_accuracy']:.2f}"])
    lines += table_lines(["method", "strength", "holdout acc %"], sweep)
    header, rows = final_rows(study)
    lines += ["", "Final runs (mean ± std over seeds; sharpness on training batches):", ""]
    lines += table_lines(header, [cells for _, _, cells in rows])
    lines += gap_lines(study)
    plots = sorted((root / "landscapes").glob("*/landscape_interpolation.png"))
    if plots:
        lines += ["", f"1-D interpolation plots (seed {study.seeds[0]}; alpha 0 = first model, 1 = second):", ""]
        lines += [f"- `{p.parent.name}`: `{p.relative_to(root)}`" for p in plots]
    text = "\n".join(lines) + "\n"
    (root / "report.md").write_text(text)
    annotate_best_runs(study, header, rows)
    return text


def gap_lines(study: TextStudyArguments) -> list[str]:
    """Small-batch baseline minus each large-batch method, paired by seed."""
    if not study.small_batch_baseline:
        return []

    def accuracy(method: str, strength: float, batch: int) -> dict[int, float]:
        found = {seed: results(study, Run("final", method, strength, seed, batch)) for seed in study.seeds}
        return {seed: res["eval_accuracy"] for seed, res in found.items() if res}

    small = accuracy("baseline", 0.0, study.per_device_batch)
    chosen = chosen_strengths(study)
    rows = []
    for method in METHODS:
        large = accuracy(method, chosen[method], large_batch(study))
        rows.append([method, mean_std(paired_differences(small, large, study.seeds), scale=100)])
    return [
        "",
        "Large-batch gap (small-batch baseline minus large-batch test accuracy, paired by seed, points):",
        "",
        *table_lines(["large-batch method", "gap"], rows),
    ]


def annotate_best_runs(study: TextStudyArguments, header: list[str], rows: list[tuple[str, list[Run], list[str]]]):
    """Rewrite the model card of each cell's best run (highest test accuracy) with the study's table."""
    all_rows = [cells for _, _, cells in rows]
    for index, (label, runs, _) in enumerate(rows):
        best = max(runs, key=lambda r: results(study, r)["eval_accuracy"])
        folder = best.folder(study)
        write_study_rows(
            folder,
            title="MiniLM large-batch study",
            description=(
                describe(study) + f" This model is the best of the {len(runs)} seed(s) of its row ({label}) by "
                "test accuracy; the row gives the mean ± std over all of them. Regenerate with "
                "`python study/text_large_batch.py`."
            ),
            header=header,
            rows=all_rows,
            highlight=index,
        )
        write_model_card(folder)


def main(argv: list[str] | None = None) -> None:
    (study,) = HfArgumentParser(TextStudyArguments).parse_args_into_dataclasses(args=argv)
    study.check()
    root = Path(study.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study_arguments.json").write_text(json.dumps(asdict(study), indent=2))
    stages = ("sweep", "final", "measure", "report") if study.stage == "all" else (study.stage,)
    if "sweep" in stages:
        train(study, sweep_runs(study))
    if "final" in stages:
        train(study, final_runs(study))
    if "measure" in stages:
        measure(study)
    if "report" in stages:
        print(report(study))


if __name__ == "__main__":
    main()
