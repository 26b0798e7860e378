"""Study: LoRA fine-tuning of MiniLM-L6 -- plain LoRA vs SmoothOut on the adapters vs in the merged weight space.

Every run is one invocation of ``recipes/glue.py`` with LoRA (``--lora_r``, all linear layers of the full
pretrained MiniLM-L6; the classification head trained in full) on an offline stand-in: the Rotten Tomatoes
sentences (``sst2``; seeded stratified 80/20 split, the 20 % is the test set) and the SNLI subset (``mnli``;
its test file). Arms, identical but for the noise:

* ``lora`` -- plain LoRA;
* ``lora_adapters`` -- AdaSmoothOut (``adapt filter``, uniform, constant) on the trainable parameters: the
  adapters ``A``, ``B`` and the head (``--smoothout_space trainable``);
* ``lora_merged`` -- the same law on every LoRA layer's merged weight ``W + s*B*A``, scaled against its
  merged rows; the head per parameter (``--smoothout_space lora_merged``).

Stages (finished runs are skipped, so the study resumes where it stopped):

1. ``sweep`` -- one seed (``--sweep_seed``) per strength, trained on 90 % of the training examples and scored
   on the other 10 % (``--holdout_fraction``): each arm's strength is chosen there, never on the test set.
2. ``final`` -- every seed at the chosen strengths (plain LoRA too) on the whole training sample.
3. ``cost`` -- short runs of every arm (``--cost_steps``), interleaved round-robin (``--cost_rounds``): the
   time per step as a ratio to plain LoRA. Only meaningful on an otherwise idle machine.
4. ``report`` -- ``report.md``: test accuracy mean ± std over seeds, the paired difference to plain LoRA
   with its 95 % interval, and the cost column.

Usage (about 2.5 hours on 2 idle CPU cores with the defaults; ``cost`` about 8 minutes):
    python study/lora_text.py --output_dir study_outputs/lora --stage sweep
    python study/lora_text.py --output_dir study_outputs/lora --stage final
    python study/lora_text.py --output_dir study_outputs/lora --stage cost      # idle machine
    python study/lora_text.py --output_dir study_outputs/lora --stage report
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from study_kit.report import paired_differences
from study_kit.runner import optional_flags, recipe_results, run_recipe
from study_kit.stats import mean_std, paired_interval
from study_kit.sweep import best_value, check_sweep_split
from transformers import HfArgumentParser

from hf_smoothout.modelcard import markdown_table

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "glue.py"
ARMS = {"lora": None, "lora_adapters": "trainable", "lora_merged": "lora_merged"}
TASK_LABELS = {"sst2": "Rotten Tomatoes (SST-2 stand-in)", "mnli": "SNLI subset (MNLI stand-in)"}


@dataclass
class LoraStudyArguments:
    output_dir: str = field(default="study_outputs/lora", metadata={"help": "Where runs and the report go."})
    stage: Literal["sweep", "final", "cost", "report", "all"] = field(
        default="all", metadata={"help": "Stage to run; all = sweep, final, report (cost needs an idle machine)."}
    )
    tasks: list[str] = field(default_factory=lambda: ["sst2", "mnli"], metadata={"help": "Offline tasks."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the final runs."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the strength sweep (not one of --seeds)."})
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of the training sample held out to choose the strengths."}
    )
    strengths_adapters: list[float] = field(
        default_factory=lambda: [0.03, 0.1, 0.3], metadata={"help": "AdaSmoothOut strengths on the adapters."}
    )
    strengths_merged: list[float] = field(
        default_factory=lambda: [0.01, 0.03, 0.1], metadata={"help": "AdaSmoothOut strengths in the merged space."}
    )
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    batch_size: int = field(default=32, metadata={"help": "Batch size (no accumulation)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (LoRA-typical)."})
    warmup: float = field(default=0.1, metadata={"help": "Linear warm-up, as a share of the optimizer steps."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    max_seq_length: int = field(default=96, metadata={"help": "Token limit per example (pairs for SNLI)."})
    max_train_samples: int | None = field(default=4000, metadata={"help": "Training examples (seeded subset)."})
    max_eval_samples: int | None = field(default=2000, metadata={"help": "Test examples (seeded subset)."})
    cost_steps: int = field(default=40, metadata={"help": "Optimizer steps of every cost run."})
    cost_rounds: int = field(default=3, metadata={"help": "Interleaved rounds of the cost stage."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Keep the first N layers (tests)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Another model folder (tests)."})

    def check(self) -> None:
        """Fail before any run for settings that cannot work."""
        check_sweep_split(self)
        unknown = [t for t in self.tasks if t not in TASK_LABELS]
        if unknown:
            raise ValueError(f"--tasks: {unknown} have no offline stand-in; choose from {sorted(TASK_LABELS)}.")
        if any(a <= 0 for a in [*self.strengths_adapters, *self.strengths_merged]):
            raise ValueError("Swept strengths must be positive (plain LoRA is always run).")


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    phase: Literal["sweep", "final", "cost"]
    task: str
    arm: str
    strength: float
    seed: int
    round: int = 0

    @property
    def name(self) -> str:
        if self.phase == "sweep":
            return f"{self.arm}-a{self.strength:g}"
        if self.phase == "cost":
            return f"{self.arm}-r{self.round}"
        return f"{self.arm}-s{self.seed}"

    def folder(self, study: LoraStudyArguments) -> Path:
        return Path(study.output_dir) / self.phase / self.task / self.name


def recipe_command(study: LoraStudyArguments, run: Run) -> list[str]:
    """The ``recipes/glue.py`` command line of ``run``."""
    cmd = [sys.executable, str(RECIPE), "--task_name", run.task, "--source", "offline"]
    cmd += ["--output_dir", str(run.folder(study)), "--seed", str(run.seed)]
    cmd += ["--per_device_train_batch_size", str(study.batch_size), "--learning_rate", str(study.learning_rate)]
    cmd += ["--warmup_steps", str(study.warmup), "--max_seq_length", str(study.max_seq_length)]
    cmd += ["--lora_r", str(study.lora_r), "--lora_alpha", str(study.lora_alpha)]
    cmd += ["--per_device_eval_batch_size", "128", "--eval_strategy", "no", "--save_strategy", "no"]
    cmd += ["--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "true"]
    cmd += ["--smoothout_strength", str(run.strength)]
    if ARMS[run.arm] is not None:
        cmd += ["--smoothout_space", ARMS[run.arm], "--smoothout_adapt", "filter"]
    if run.phase == "cost":
        cmd += ["--max_steps", str(study.cost_steps), "--max_eval_samples", "64"]
    else:
        cmd += ["--num_train_epochs", str(study.epochs)]
        if study.max_eval_samples is not None:
            cmd += ["--max_eval_samples", str(study.max_eval_samples)]
    if run.phase == "sweep":
        cmd += ["--holdout_fraction", str(study.holdout_fraction)]
    cmd += optional_flags(
        [
            ("--max_train_samples", study.max_train_samples),
            ("--num_hidden_layers", study.num_hidden_layers),
            ("--model_name_or_path", study.model_name_or_path),
        ]
    )
    return cmd


def results(study: LoraStudyArguments, run: Run) -> dict[str, Any] | None:
    return recipe_results(run.folder(study))


def train(study: LoraStudyArguments, runs: list[Run]) -> None:
    """Run the recipe for every run that has no results yet."""
    for run in runs:
        if results(study, run) is None:
            measure = {"sweep": "holdout_accuracy", "final": "eval_accuracy", "cost": "train_runtime"}[run.phase]
            run_recipe(recipe_command(study, run), run.folder(study), f"{run.phase} {run.task} {run.name}", measure)


def grid(study: LoraStudyArguments, arm: str) -> list[float]:
    return {"lora_adapters": study.strengths_adapters, "lora_merged": study.strengths_merged}[arm]


def sweep_runs(study: LoraStudyArguments) -> list[Run]:
    return [
        Run("sweep", task, arm, a, study.sweep_seed)
        for task in study.tasks
        for arm in ARMS
        if ARMS[arm] is not None
        for a in grid(study, arm)
    ]


def chosen_strengths(study: LoraStudyArguments, task: str) -> dict[str, float]:
    """Per arm, the swept strength with the best holdout accuracy (ties: the smaller strength)."""
    chosen = {"lora": 0.0}
    for arm in ARMS:
        done = [(run.strength, results(study, run)) for run in sweep_runs(study) if (run.task, run.arm) == (task, arm)]
        best = best_value(((a, res["holdout_accuracy"]) for a, res in done if res is not None), prefer="smaller")
        if best is not None:
            chosen[arm] = best
    return chosen


def final_runs(study: LoraStudyArguments) -> list[Run]:
    runs = []
    for task in study.tasks:
        chosen = chosen_strengths(study, task)
        missing = [arm for arm in ARMS if arm not in chosen]
        if missing:
            raise RuntimeError(f"No finished sweep runs for {missing} on {task}: run --stage sweep first.")
        runs += [Run("final", task, arm, chosen[arm], seed) for seed in study.seeds for arm in ARMS]
    return runs


def cost_runs(study: LoraStudyArguments) -> list[Run]:
    """Round-robin short runs on the first task, at the chosen strengths where the sweep has finished."""
    task = study.tasks[0]
    chosen = chosen_strengths(study, task)
    strength = {arm: chosen.get(arm, grid(study, arm)[len(grid(study, arm)) // 2]) for arm in ARMS if ARMS[arm]}
    strength["lora"] = 0.0
    return [
        Run("cost", task, arm, strength[arm], study.sweep_seed, round=r)
        for r in range(study.cost_rounds)
        for arm in ARMS
    ]


# ---------------------------------------------------------------------------- report
def step_times(study: LoraStudyArguments) -> dict[str, float]:
    """Median seconds per optimizer step of every arm in the cost stage."""
    times: dict[str, list[float]] = {}
    for run in cost_runs(study):
        done = results(study, run)
        if done is not None:
            times.setdefault(run.arm, []).append(done["train_runtime"] / study.cost_steps)
    return {arm: statistics.median(values) for arm, values in times.items()}


def task_table(study: LoraStudyArguments, task: str, times: dict[str, float]) -> list[str]:
    chosen = chosen_strengths(study, task)
    accuracy = {
        arm: {
            seed: results(study, Run("final", task, arm, chosen.get(arm, 0.0), seed))
            for seed in study.seeds
            if arm in chosen
        }
        for arm in ARMS
    }
    rows = []
    for arm in ARMS:
        done = {seed: r["eval_accuracy"] for seed, r in accuracy[arm].items() if r is not None}
        if not done:
            continue
        base = {seed: r["eval_accuracy"] for seed, r in accuracy["lora"].items() if r is not None}
        pairs = paired_differences(done, base, done)
        diff = "-"
        if arm != "lora" and pairs:
            mean, low, high = paired_interval(pairs)
            diff = f"{100 * mean:+.2f}" + (f" [{100 * low:+.2f}, {100 * high:+.2f}]" if low is not None else "")
        ratio = f"{times[arm] / times['lora']:.2f}x" if arm in times and "lora" in times else "-"
        strength = "-" if arm == "lora" else f"{chosen[arm]:g}"
        rows.append([arm, strength, f"{mean_std(list(done.values()), scale=100)} (n={len(done)})", diff, ratio])
    header = ["arm", "strength", "test accuracy %", "vs LoRA, paired (95 % CI)", "time/step vs LoRA"]
    return [f"### {TASK_LABELS[task]}", "", markdown_table(header, rows).strip(), ""]


def sweep_table(study: LoraStudyArguments) -> list[str]:
    rows = []
    for run in sweep_runs(study):
        done = results(study, run)
        if done is not None:
            rows.append([run.task, run.arm, f"{run.strength:g}", f"{100 * done['holdout_accuracy']:.2f}"])
    return [
        "### Strength sweep (holdout accuracy, one seed)",
        "",
        markdown_table(["task", "arm", "strength", "holdout accuracy %"], rows).strip(),
        "",
    ]


def report(study: LoraStudyArguments) -> str:
    times = step_times(study)
    lines = ["# LoRA study: plain LoRA vs SmoothOut on the adapters vs in the merged weight space", ""]
    lines += [
        f"MiniLM-L6 (pretrained, offline), LoRA r={study.lora_r} alpha={study.lora_alpha:g} on every linear layer, "
        f"head trained in full; AdamW lr {study.learning_rate:g}, batch {study.batch_size}, {study.epochs:g} epochs, "
        f"warm-up {study.warmup:g}; {study.max_train_samples} training examples, {study.max_eval_samples} test "
        f"examples; seeds {study.seeds}. Noise: AdaSmoothOut (filter, uniform, constant schedule), one draw per "
        "micro-batch. Strengths chosen on a holdout carved from the training sample (sweep seed "
        f"{study.sweep_seed}).",
        "",
    ]
    for task in study.tasks:
        lines += task_table(study, task, times)
    lines += sweep_table(study)
    if times:
        lines += [
            f"Time per step: median of {study.cost_rounds} interleaved {study.cost_steps}-step runs per arm on "
            f"{study.tasks[0]} (`--stage cost`, run on an otherwise idle machine).",
            "",
        ]
    lines += ["Settings:", "", "```json", json.dumps(asdict(study), indent=2), "```", ""]
    text = "\n".join(lines)
    Path(study.output_dir, "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run ``--stage``.

    Example:
        >>> main(["--output_dir", "/tmp/lora_study", "--stage", "report"])  # doctest: +SKIP
    """
    (study,) = HfArgumentParser(LoraStudyArguments).parse_args_into_dataclasses(args=argv)
    study.check()
    if study.stage in ("sweep", "all"):
        train(study, sweep_runs(study))
    if study.stage in ("final", "all"):
        train(study, final_runs(study))
    if study.stage == "cost":
        train(study, cost_runs(study))
    if study.stage in ("report", "all", "cost"):
        print(report(study))


if __name__ == "__main__":
    main()
