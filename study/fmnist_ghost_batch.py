"""Study: the Fashion-MNIST large-batch study under the SmoothOut authors' own protocol (ghost chunks).

``study/fmnist_large_batch.py`` feeds a large batch B as one micro-batch: one noise draw per step and batch
norm over B. The authors' script instead builds B from B/128 *ghost chunks*: every chunk draws its own
SmoothOut noise and normalizes over its own 128 examples (ghost batch norm), and the chunk gradients are
averaged. Here that is the Trainer's gradient accumulation: ``per_device_train_batch_size=ghost_batch_size``
and ``gradient_accumulation_steps=B/ghost_batch_size`` (``--ghost_batch_size``, default 128).

Model and data: KeskarMLP 784 -> 5 x (Linear 512, BatchNorm, ReLU) -> 10 (Keskar's F1 net) on Fashion-MNIST
(not MNIST): train 55,000 / validation 5,000 (stratified, carved from train) / test = official ``t10k``.

Hyperparameters (defaults = the F1/MNIST set-up of the authors' ``main_gbn.py``): SGD, LR 0.1 at batch 128,
momentum 0.9, weight decay 1e-4 (every parameter), LR x0.1 at 0.2/0.4/0.6 of the epochs (epochs 10/20/30 of
50; ``--lr_milestones`` scale with ``--epochs``), 50 epochs, gradient clipping at norm 5 after accumulation,
large-batch LR ``lr * (B / ghost) ** 0.5``. The authors rebuild the optimizer every epoch, so the momentum
restarts from zero each epoch: :class:`MomentumResetCallback` clears the SGD state at every epoch start
(``--reset_momentum_each_epoch``, default True), which is the same as a rebuilt SGD (the LR comes from the
scheduler). Optimizer and scheduler reach the Trainer through ``optimizers=(optimizer, scheduler)``.
Noise: the authors exclude BatchNorm parameters; our ``smoothout_skip_norm_layers=True`` (the default) skips
every normalization layer, and this MLP has BatchNorm only, so the two agree.

Arms (``B`` = ``--large_batch`` 4096, ``b`` = ``--small_batch`` 128):

* ``naive`` -- one 4096 micro-batch, strength 0 (BN over 4096; the old study's large-batch baseline).
* ``ghost`` -- ghost-BN baseline: 32 chunks of 128, strength 0. Every other 4096 arm is compared to it.
* ``smoothout`` (``adapt none``), ``adasmoothout`` (``adapt filter``): fresh noise per chunk.
* ``sam`` -- per-chunk SAM (m-sharpness with m = 128), see :class:`ChunkSAMTrainer`; ``rho`` tuned.
  ``pytorch_optimizer.SAM`` does not compose with the Trainer's accumulation: its ``step`` needs a closure
  that recomputes the loss at the perturbed weights for the *same* batch, but the Trainer calls ``step()``
  without one after 32 chunks, and its ``first_step`` would perturb along the accumulated 4096 gradient
  (replaying 32 chunks per step). So the study carries a minimal per-chunk SAM step.
* ablations at the chosen AdaSmoothOut strength: ``ada_nodenoise`` (``smoothout_denoise=False``),
  ``ada_gaussian`` (Gaussian noise), ``ada_draw_step`` (one draw per optimizer step, shared by the 32 chunks:
  ``smoothout_noise_every="step"``, the cheap mode; ghost BN kept).
* at ``b = 128``: ``small_baseline``, ``small_smoothout``, ``small_adasmoothout``.

Stages (``--stage``; every run is appended to ``<output_dir>/runs.jsonl`` and skipped when already there, so a
killed study restarts where it stopped; a half-written last line is ignored and cut off):

1. ``sweep`` -- strength / rho sweeps at 4096 for SmoothOut, AdaSmoothOut and SAM on log grids, one seed
   (``--sweep_seed``), scored by validation accuracy after the last epoch (per-epoch validation curve kept).
   A best point on a grid edge adds one more point beyond it (same log step), at most ``--max_extensions``
   (2) per sweep, until the best is interior.
2. ``core`` -- final cells for ``--seeds`` (0 1 2): ``small_baseline``, ``naive``, ``ghost``, ``smoothout``,
   ``adasmoothout``, ``sam``; test accuracy after every epoch, train accuracy, gap, top Hessian eigenvalue,
   epsilon-sharpness in the full space and in a random ``--subspace_dim``-D subspace.
3. ``ablation`` -- the AdaSmoothOut ablations for every seed.
4. ``small`` -- SmoothOut / AdaSmoothOut sweeps at 128 (smaller grids), then their final cells.
5. ``report`` -- ``<output_dir>/report.md`` and ``plots/`` (test accuracy vs epoch, interpolations).
``all`` runs 1-5 in order. ``plan`` prints the runs still to do with a time estimate from the measured
per-epoch times of finished runs. ``cost`` (not part of ``all``) benchmarks the per-epoch wall time of every
arm, interleaved round-robin (``--cost_rounds`` rounds of one epoch each), into ``<output_dir>/cost.json``;
it is only meaningful on an otherwise idle machine.

Estimated time (timing pilot, one epoch per arm on the full data, 2-core machine, ``--torch_threads 1``:
naive 4.9 s/epoch, ghost 5.5, AdaSmoothOut 7.5, SAM 11.4; about 80 s of sharpness per final model): about
6.6 hours for ``all`` at 50 epochs (sweep 1.9 h, core 2.3 h, ablation 0.8 h, small 1.6 h; up to 1.3 h more if
sweeps extend their grids), about 5.4 hours at ``--epochs 40``; ``cost`` about 5 minutes. ``--stage plan``
re-estimates from the runs finished so far. With two threads on cores that something else also uses, the
small per-chunk kernels can slow down many times over: pass ``--torch_threads 1`` on a shared machine.
On two cores, two stage processes can share the ledger, split by seed so they never pick the same run
(seeds are not part of a run's settings): ``--stage sweep``, then ``core``/``ablation`` with ``--seeds 0 1``,
beside ``--stage small``, then ``core``/``ablation`` with ``--seeds 2`` (the sweeps finish long before).

Usage:
    python study/fmnist_ghost_batch.py --output_dir study_outputs/fmnist_ghost --torch_threads 1 --stage all
    python study/fmnist_ghost_batch.py --output_dir study_outputs/fmnist_ghost --stage cost    # idle machine
    python study/fmnist_ghost_batch.py --output_dir study_outputs/fmnist_ghost --stage report
Tiny settings (tests):
    python study/fmnist_ghost_batch.py --output_dir /tmp/g --hidden 16 --depth 2 --max_train_samples 400 \\
        --max_test_samples 100 --epochs 2 --small_batch 16 --ghost_batch_size 16 --large_batch 64 --seeds 0 1
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from recipe_kit.protocol import MomentumResetCallback  # the recipes' --reset_momentum_each_epoch
from study_kit.chunk_sam import ChunkSAMTrainer
from study_kit.cost import COST_NOTE, Plan, benchmark, cost_column_note, epoch_seconds_estimate, read_cost
from study_kit.fmnist_common import (
    KeskarMLP,
    MLPStudyOptions,
    TensorExamples,
    evaluate_accuracy,
    interpolation_lines,
    load_data,
    load_keskar,
    measure_sharpness,
    save_weights,
)
from study_kit.ledger import checkout_commit, read_runs, run_key, run_once
from study_kit.ledger import run_settings as settings_of
from study_kit.report import (
    PAIRED_HEADER,
    by_seed,
    cell_summary,
    gap_share_row,
    paired_interval_row,
    plot_mean_curves,
    section,
    table_lines,
    value_label,
)
from study_kit.schedule import (
    lr_rule_formula,
    milestone_steps,
    scale_learning_rate,
    step_scheduler,
    update_steps_per_epoch,
)
from study_kit.subspace_box import subspace_box_comparison, subspace_box_note
from study_kit.sweep import SweepState, point_label, run_sweep, sweep_state
from study_kit.training import EpochRecorder, study_training_arguments
from torch import nn
from transformers import HfArgumentParser, TrainerCallback

from hf_smoothout import SmoothOutTrainer

# Rough seconds per epoch on 2 CPU cores with the full 55,000 training examples (timing pilot on a shared
# machine); used by --stage plan only until runs of the same arm have finished.
PILOT_EPOCH_SECONDS = {
    "naive": 5.2,
    "ghost": 5.8,
    "chunk_noise": 7.8,
    "sam": 11.7,
    "small": 6.8,
    "small_noise": 9.0,
}
PILOT_MEASURE_SECONDS = 80.0  # sharpness of one final model (full space 20 s + 100-D subspace 50 s + Hessian 10 s)
FIRST_ENGINE = "ea41c57"  # the engine of the runs recorded before engine_commit was


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class GhostStudyArguments(MLPStudyOptions):
    output_dir: str = field(default="study_outputs/fmnist_ghost", metadata={"help": "Runs, models and report."})
    stage: Literal["sweep", "core", "ablation", "small", "report", "plan", "cost", "all"] = field(
        default="all", metadata={"help": "Stage to run; all = sweep, core, ablation, small, report."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the final cells."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the sweeps (not one of --seeds)."})
    epochs: float = field(default=50.0, metadata={"help": "Epochs of every run (authors: 50)."})
    small_batch: int = field(default=128, metadata={"help": "Small batch size."})
    large_batch: int = field(default=4096, metadata={"help": "Large batch size B."})
    ghost_batch_size: int = field(
        default=128, metadata={"help": "Ghost chunk (micro-batch) size; also the LR reference batch b0."}
    )
    base_lr: float = field(default=0.1, metadata={"help": "SGD LR at the reference batch (authors: 0.1)."})
    lr_rule: Literal["sqrt", "linear", "none"] = field(
        default="sqrt", metadata={"help": "Large-batch LR: lr * (B / ghost) ** 0.5 (sqrt), or linear, or none."}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay (every parameter)."})
    lr_milestones: list[float] = field(
        default_factory=lambda: [0.2, 0.4, 0.6],
        metadata={"help": "LR decay points as fractions of the epochs (0.2 0.4 0.6 = epochs 10/20/30 of 50)."},
    )
    lr_decay: float = field(default=0.1, metadata={"help": "LR factor at every milestone."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping after accumulation."})
    reset_momentum_each_epoch: bool = field(
        default=True, metadata={"help": "Clear the SGD momentum at every epoch start (the authors rebuild SGD)."}
    )
    strengths_none: list[float] = field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], metadata={"help": "SmoothOut grid at B."}
    )
    strengths_filter: list[float] = field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata={"help": "AdaSmoothOut grid at B."}
    )
    sam_rhos: list[float] = field(
        default_factory=lambda: [0.005, 0.015, 0.05, 0.15, 0.5], metadata={"help": "SAM rho grid at B."}
    )
    small_strengths_none: list[float] = field(
        default_factory=lambda: [3e-4, 1e-3, 3e-3], metadata={"help": "SmoothOut grid at the small batch."}
    )
    small_strengths_filter: list[float] = field(
        default_factory=lambda: [0.03, 0.1, 0.3], metadata={"help": "AdaSmoothOut grid at the small batch."}
    )
    max_extensions: int = field(
        default=2, metadata={"help": "Grid points added per sweep when the best is at an edge."}
    )
    eval_batch_size: int = field(default=2048, metadata={"help": "Batch size of the accuracy evaluations."})
    subspace_dim: int = field(default=100, metadata={"help": "M of the random-subspace epsilon-sharpness."})
    final_arms: list[str] | None = field(
        default=None,
        metadata={"help": "Final runs of a stage only for these arms (default: all arms of the stage)."},
    )
    cost_rounds: int = field(default=3, metadata={"help": "Round-robin rounds of the cost benchmark."})
    cost_epochs: float = field(default=1.0, metadata={"help": "Epochs per arm and round in the cost benchmark."})
    cost_arms: list[str] | None = field(
        default=None, metadata={"help": "Arms the cost stage benchmarks (default: all; ghost is always added)."}
    )
    use_cpu: bool = field(default=True, metadata={"help": "Train on the CPU even when an accelerator is present."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "torch.set_num_threads (default: torch's choice); 1 is steadier on a shared 2-core machine."},
    )


# Settings a finished run depends on: a run is only reused when they are unchanged.
TRAINING_SETTINGS = ("epochs", "small_batch", "large_batch", "ghost_batch_size", "base_lr", "lr_rule", "momentum")
TRAINING_SETTINGS += ("weight_decay", "lr_milestones", "lr_decay", "max_grad_norm", "reset_momentum_each_epoch")
TRAINING_SETTINGS += ("validation_size", "max_train_samples", "hidden", "depth", "use_cpu")
FINAL_SETTINGS = ("max_test_samples", "sharpness_samples", "sharpness_epsilon", "sharpness_iterations")
FINAL_SETTINGS += ("sharpness_repeats", "subspace_dim", "hessian_iterations")


def run_settings(study: GhostStudyArguments, phase: str) -> dict[str, Any]:
    """The settings a run of ``phase`` depends on (stored with it, compared on resume)."""
    return settings_of(study, TRAINING_SETTINGS + (FINAL_SETTINGS if phase == "final" else ()))


# ---------------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One training recipe.

    ``scale``: ``large`` (``--large_batch``) or ``small``; ``tuned``: what its sweep tunes (``strength``,
    ``rho``) or None; ``follows``: an ablation takes the chosen strength of that arm.
    """

    name: str
    label: str
    scale: Literal["small", "large"] = "large"
    tuned: Literal["strength", "rho"] | None = None
    adapt: Literal["none", "filter"] = "none"
    distribution: Literal["uniform", "gaussian"] = "uniform"
    denoise: bool = True
    sam: bool = False
    naive: bool = False
    noise_every: Literal["micro_batch", "step"] = "micro_batch"
    follows: str | None = None
    grid: str | None = None

    @property
    def noisy(self) -> bool:
        return self.tuned == "strength" or self.follows is not None


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("naive", "naive large batch (one micro-batch, BN over B)", naive=True),
        Arm("ghost", "ghost-BN baseline"),
        Arm("smoothout", "SmoothOut", tuned="strength", adapt="none", grid="strengths_none"),
        Arm("adasmoothout", "AdaSmoothOut", tuned="strength", adapt="filter", grid="strengths_filter"),
        Arm("sam", "SAM (per chunk)", tuned="rho", sam=True, grid="sam_rhos"),
        Arm("ada_nodenoise", "AdaSmoothOut, no de-noising", adapt="filter", denoise=False, follows="adasmoothout"),
        Arm("ada_gaussian", "AdaSmoothOut, Gaussian", adapt="filter", distribution="gaussian", follows="adasmoothout"),
        Arm("so_gaussian", "SmoothOut, Gaussian", adapt="none", distribution="gaussian", follows="smoothout"),
        Arm(
            "ada_draw_step",
            "AdaSmoothOut, one draw per step",
            adapt="filter",
            noise_every="step",
            follows="adasmoothout",
        ),
        Arm("small_baseline", "small-batch baseline", scale="small"),
        Arm("small_smoothout", "SmoothOut", scale="small", tuned="strength", adapt="none", grid="small_strengths_none"),
        Arm(
            "small_adasmoothout",
            "AdaSmoothOut",
            "small",
            tuned="strength",
            adapt="filter",
            grid="small_strengths_filter",
        ),
    )
}
SWEEP_ARMS = {"sweep": ("smoothout", "adasmoothout", "sam"), "small": ("small_smoothout", "small_adasmoothout")}
FINAL_ARMS = {
    "core": ("small_baseline", "naive", "ghost", "smoothout", "adasmoothout", "sam"),
    "ablation": ("ada_nodenoise", "ada_gaussian", "ada_draw_step", "so_gaussian"),
    "small": ("small_smoothout", "small_adasmoothout"),
}
TRAINING_STAGES = ("sweep", "core", "ablation", "small")
INTERPOLATIONS = (  # (plot, first model's arm, second model's arm)
    ("small_vs_ghost_baseline", "small_baseline", "ghost"),
    ("small_vs_naive_baseline", "small_baseline", "naive"),
    ("ghost_baseline_vs_adasmoothout", "ghost", "adasmoothout"),
)


def arm_batch(study: GhostStudyArguments, arm: Arm) -> int:
    return study.large_batch if arm.scale == "large" else study.small_batch


def micro_and_accumulation(study: GhostStudyArguments, arm: Arm) -> tuple[int, int]:
    """``(per_device_train_batch_size, gradient_accumulation_steps)`` of an arm.

    Example:
        >>> study = GhostStudyArguments()
        >>> micro_and_accumulation(study, ARMS["ghost"]), micro_and_accumulation(study, ARMS["naive"])
        ((128, 32), (4096, 1))
    """
    batch = arm_batch(study, arm)
    if arm.naive or batch <= study.ghost_batch_size:
        return batch, 1
    if batch % study.ghost_batch_size:
        raise ValueError(f"Batch {batch} is not a multiple of --ghost_batch_size {study.ghost_batch_size}.")
    return study.ghost_batch_size, batch // study.ghost_batch_size


def arm_schedule(study: GhostStudyArguments, arm: Arm, train_examples: int) -> dict[str, Any]:
    """An arm's LR (``--base_lr`` at the ghost batch, scaled to the arm's batch by ``--lr_rule``), optimizer steps
    per epoch and the steps of the LR drops (``--lr_milestones`` of all the steps).

    Example:
        >>> schedule = arm_schedule(GhostStudyArguments(), ARMS["ghost"], 55000)
        >>> round(schedule["lr"], 6), schedule["steps_per_epoch"], schedule["milestone_steps"]
        (0.565685, 14, [140, 280, 420])
    """
    steps_per_epoch = update_steps_per_epoch(train_examples, *micro_and_accumulation(study, arm))
    return {
        "lr": scale_learning_rate(study.base_lr, arm_batch(study, arm), study.ghost_batch_size, study.lr_rule),
        "steps_per_epoch": steps_per_epoch,
        "milestone_steps": milestone_steps(study.lr_milestones, study.epochs * steps_per_epoch),
    }


# ---------------------------------------------------------------------------------------------------- training
def build_trainer(
    study: GhostStudyArguments,
    data: dict[str, TensorExamples],
    arm: Arm,
    value: float,
    seed: int,
    *,
    epochs: float,
    eval_data: TensorExamples | None,
    output_dir: Path,
) -> tuple[SmoothOutTrainer, nn.Module, EpochRecorder, MomentumResetCallback | None, dict[str, Any]]:
    """The Trainer of one run (not yet trained), its model, callbacks and schedule (:func:`arm_schedule`)."""
    micro, accumulation = micro_and_accumulation(study, arm)
    info = arm_schedule(study, arm, len(data["train"]))
    args = study_training_arguments(
        output_dir=str(output_dir),
        seed=seed,
        num_train_epochs=epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=study.eval_batch_size,
        learning_rate=info["lr"],
        weight_decay=study.weight_decay,
        max_grad_norm=study.max_grad_norm,
        use_cpu=study.use_cpu,
        smoothout_strength=value if arm.noisy else 0.0,
        smoothout_adapt=arm.adapt,
        smoothout_distribution=arm.distribution,
        smoothout_denoise=arm.denoise,
        smoothout_noise_every=arm.noise_every,
    )
    torch.manual_seed(seed)
    model = KeskarMLP(study.hidden, study.depth)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=info["lr"], momentum=study.momentum, weight_decay=study.weight_decay
    )
    scheduler = step_scheduler(optimizer, info["milestone_steps"], study.lr_decay)
    recorder = EpochRecorder(model, eval_data, study.eval_batch_size)
    reset = MomentumResetCallback() if study.reset_momentum_each_epoch else None
    callbacks: list[TrainerCallback] = [c for c in (reset, recorder) if c is not None]
    kwargs: dict[str, Any] = {"sam_rho": value} if arm.sam else {}
    trainer_cls = ChunkSAMTrainer if arm.sam else SmoothOutTrainer
    trainer = trainer_cls(
        model, args, train_dataset=data["train"], optimizers=(optimizer, scheduler), callbacks=callbacks, **kwargs
    )
    return trainer, model, recorder, reset, info


def train_one(
    study: GhostStudyArguments,
    data: dict[str, TensorExamples],
    arm: Arm,
    phase: Literal["sweep", "final", "cost"],
    value: float,
    seed: int,
) -> dict[str, Any]:
    """Train one run; returns its record.

    ``sweep``: validation accuracy per epoch (selection); ``final``: test accuracy per epoch (the plot only),
    then test / train / validation accuracy and sharpness, weights saved to ``models/<key>.safetensors``;
    ``cost``: ``--cost_epochs`` epochs, no evaluation (benchmark).
    """
    out = Path(study.output_dir)
    batch = arm_batch(study, arm)
    key = run_key(phase, batch, arm.name, value, seed)
    epochs = study.cost_epochs if phase == "cost" else study.epochs
    eval_data = {"sweep": data["validation"], "final": data["test"], "cost": None}[phase]
    trainer, model, recorder, reset, info = build_trainer(
        study, data, arm, value, seed, epochs=epochs, eval_data=eval_data, output_dir=out / "trainer" / key
    )
    result = trainer.train()
    expected_steps = math.ceil(epochs * info["steps_per_epoch"])
    if trainer.state.global_step != expected_steps:
        raise RuntimeError(f"{key}: {trainer.state.global_step} optimizer steps, expected {expected_steps}.")
    record: dict[str, Any] = {
        "key": key,
        "phase": phase,
        "arm": arm.name,
        "batch": batch,
        "value": value,
        "strength": value if arm.noisy else 0.0,
        "rho": value if arm.sam else None,
        "seed": seed,
        "micro_batch": trainer.args.per_device_train_batch_size,
        "accumulation": trainer.args.gradient_accumulation_steps,
        "lr": info["lr"],
        "lr_per_epoch": recorder.lrs,
        "milestone_steps": info["milestone_steps"],
        "steps_per_epoch": info["steps_per_epoch"],
        "steps": trainer.state.global_step,
        "epochs": epochs,
        "momentum_resets": reset.resets if reset is not None else 0,
        "noise": trainer.smoothout_config.to_dict(),
        "engine_commit": checkout_commit(Path(__file__).parent),  # which engine drew the noise
        "epoch_seconds": recorder.seconds,
        "train_runtime_s": result.metrics["train_runtime"],
        "train_loss": result.metrics["train_loss"],
        "settings": run_settings(study, phase),
    }
    if phase == "sweep":
        record["validation_curve"] = recorder.accuracies
        record["validation_accuracy"] = recorder.accuracies[-1]
    elif phase == "final":
        record["test_curve"] = recorder.accuracies
        record["test_accuracy"] = evaluate_accuracy(model, data["test"], study.eval_batch_size)
        record["validation_accuracy"] = evaluate_accuracy(model, data["validation"], study.eval_batch_size)
        train_eval = data["train"].subset(10000, seed=3)
        record["train_accuracy"] = evaluate_accuracy(model, train_eval, study.eval_batch_size)
        record["gap"] = record["train_accuracy"] - record["test_accuracy"]
        start = time.perf_counter()
        record.update(measure_sharpness(model, data["train"], study, study.subspace_dim))
        record["measure_seconds"] = time.perf_counter() - start
        save_weights(model, out / "models" / f"{key}.safetensors")
    return record


# ---------------------------------------------------------------------------------------------------- stages
def arm_sweep(study: GhostStudyArguments, arm: Arm, runs: dict[str, dict[str, Any]]) -> SweepState:
    """Where the sweep of a tuned arm stands: its grid (``arm.grid`` plus extensions), runs to do, the choice."""

    def score(value: float) -> float | None:
        record = runs.get(run_key("sweep", arm_batch(study, arm), arm.name, value, study.sweep_seed))
        return None if record is None else record["validation_accuracy"]

    return sweep_state(arm.name, getattr(study, arm.grid), score, study.max_extensions)


def chosen_value(study: GhostStudyArguments, arm: Arm, runs: dict[str, dict[str, Any]]) -> float | None:
    """The value an arm's final runs use: 0 for baselines, the sweep's choice, or the followed arm's."""
    if arm.follows is not None:
        return chosen_value(study, ARMS[arm.follows], runs)
    if arm.tuned is None:
        return 0.0
    return arm_sweep(study, arm, runs).chosen


def execute(
    study: GhostStudyArguments,
    data: dict[str, TensorExamples],
    arm: Arm,
    phase: Literal["sweep", "final"],
    value: float,
    seed: int,
    runs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """One run unless ``runs`` has it (made with the same settings); appended to ``runs.jsonl`` and ``runs``."""
    key = run_key(phase, arm_batch(study, arm), arm.name, value, seed)
    ledger = Path(study.output_dir) / "runs.jsonl"
    settings = run_settings(study, phase)
    record, trained = run_once(ledger, runs, key, partial(train_one, study, data, arm, phase, value, seed), settings)
    if trained:
        shown = {k: record.get(k) for k in ("key", "validation_accuracy", "test_accuracy", "train_runtime_s")}
        print(json.dumps({k: v for k, v in shown.items() if v is not None}), flush=True)
    return record


def final_jobs(study: GhostStudyArguments, stage: str, runs: dict[str, dict[str, Any]]) -> Iterator[tuple]:
    """(arm, value or None, seed) of a stage's final runs, seed by seed (so the cells stay paired)."""
    unknown = sorted(set(study.final_arms or ()) - set(ARMS))
    if unknown:
        raise ValueError(f"--final_arms: unknown arm(s) {unknown}; the arms are {sorted(ARMS)}.")
    for seed in study.seeds:
        for name in FINAL_ARMS[stage]:
            if study.final_arms is not None and name not in study.final_arms:
                continue
            yield ARMS[name], chosen_value(study, ARMS[name], runs), seed


def run_stage(study: GhostStudyArguments, stage: str, data: dict[str, TensorExamples]) -> None:
    """Run what a training stage still lacks (sweeps with their extensions first, then final runs)."""
    runs = read_runs(Path(study.output_dir) / "runs.jsonl")
    for arm in (ARMS[name] for name in SWEEP_ARMS.get(stage, ())):
        run_sweep(
            partial(arm_sweep, study, arm, runs),
            partial(execute, study, data, arm, "sweep", seed=study.sweep_seed, runs=runs),
        )
    if stage not in FINAL_ARMS:
        return
    for arm, value, seed in list(final_jobs(study, stage, runs)):
        if value is None:
            source = arm.follows or arm.name
            raise ValueError(f"No finished sweep for {source!r}: run its sweep stage first.")
        execute(study, data, arm, "final", value, seed, runs)


# ---------------------------------------------------------------------------------------------------- plan
def cost_class(arm: Arm) -> str:
    """Arms of about the same cost per epoch (the plan's fallback when an arm has no finished run)."""
    if arm.scale == "small":
        return "small_noise" if arm.noisy else "small"
    if arm.sam:
        return "sam"
    if arm.naive:
        return "naive"
    return "chunk_noise" if arm.noisy else "ghost"


def epoch_estimate(
    arm: Arm, runs: dict[str, dict[str, Any]], cost: dict[str, Any] | None, train_size: int
) -> tuple[float, str]:
    """Seconds per training epoch of ``arm`` and their source (runs, runs of its cost class, cost.json, pilot)."""
    pilot = PILOT_EPOCH_SECONDS[cost_class(arm)] * train_size / 55000
    similar = cost_class(arm)
    return epoch_seconds_estimate(runs, arm.name, lambda n: n in ARMS and cost_class(ARMS[n]) == similar, cost, pilot)


def plan(study: GhostStudyArguments, data: dict[str, TensorExamples]) -> str:
    """The runs still to do, stage by stage, with an estimated time; trains nothing."""
    runs = read_runs(Path(study.output_dir) / "runs.jsonl")
    cost = read_cost(Path(study.output_dir) / "cost.json")
    train_size = len(data["train"])
    measured = [r["measure_seconds"] for r in runs.values() if "measure_seconds" in r]
    measure_s = statistics.median(measured) if measured else PILOT_MEASURE_SECONDS * study.sharpness_samples / 2000
    todo = Plan()
    for stage in TRAINING_STAGES:
        for name in SWEEP_ARMS.get(stage, ()):
            arm = ARMS[name]
            per_epoch, source = epoch_estimate(arm, runs, cost, train_size)
            state = arm_sweep(study, arm, runs)
            for value in state.todo:
                key = run_key("sweep", arm_batch(study, arm), name, value, study.sweep_seed)
                todo.add(stage, key, per_epoch * study.epochs, source)
            if state.chosen is None:
                todo.possible_extra += (study.max_extensions - len(state.extensions)) * per_epoch * study.epochs
        for arm, value, seed in final_jobs(study, stage, runs) if stage in FINAL_ARMS else ():
            if value is not None and run_key("final", arm_batch(study, arm), arm.name, value, seed) in runs:
                continue
            per_epoch, source = epoch_estimate(arm, runs, cost, train_size)
            shown = "?" if value is None else f"{value:g}"
            key = f"final-b{arm_batch(study, arm)}-{arm.name}-v{shown}-s{seed}"
            todo.add(stage, key, per_epoch * study.epochs + measure_s, source)
    return todo.text(study.output_dir, len(runs), measure_s)


# ---------------------------------------------------------------------------------------------------- cost
def cost_value(study: GhostStudyArguments, arm: Arm, runs: dict[str, dict[str, Any]]) -> float:
    """The value a benchmark arm trains with: the chosen one, else the middle of its grid."""
    value = chosen_value(study, arm, runs)
    if value is not None:
        return value
    grid = sorted(getattr(study, (ARMS[arm.follows] if arm.follows else arm).grid))
    return grid[len(grid) // 2]


def cost_stage(study: GhostStudyArguments, data: dict[str, TensorExamples]) -> dict[str, Any]:
    """Per-epoch wall time of every arm, interleaved round-robin; written to ``<output_dir>/cost.json``."""
    print(COST_NOTE, flush=True)
    runs = read_runs(Path(study.output_dir) / "runs.jsonl")
    names = list(study.cost_arms) if study.cost_arms else list(ARMS)
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise ValueError(f"Unknown --cost_arms {unknown}; arms: {', '.join(ARMS)}.")
    if "ghost" not in names:
        names.insert(0, "ghost")
    values = {name: cost_value(study, ARMS[name], runs) for name in names}

    def epoch_seconds(name: str, round_index: int) -> float:
        return statistics.mean(train_one(study, data, ARMS[name], "cost", values[name], round_index)["epoch_seconds"])

    def describe(name: str) -> dict[str, Any]:
        arm = ARMS[name]
        micro, accumulation = micro_and_accumulation(study, arm)
        batch = arm_batch(study, arm)
        return {
            "label": arm.label,
            "batch": batch,
            "micro_batch": micro,
            "accumulation": accumulation,
            "value": values[name],
        }

    facts = {"epochs_per_arm_and_round": study.cost_epochs, "train_examples": len(data["train"])}
    facts["torch_threads"] = torch.get_num_threads()
    return benchmark(
        Path(study.output_dir) / "cost.json", names, study.cost_rounds, epoch_seconds, describe, "ghost", facts
    )


# ---------------------------------------------------------------------------------------------------- report
def final_cells(study: GhostStudyArguments, runs: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Final runs at each arm's chosen value, by arm (seeds in ``--seeds`` order)."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for name, arm in ARMS.items():
        value = chosen_value(study, arm, runs)
        if value is None:
            continue
        cell = [runs.get(run_key("final", arm_batch(study, arm), name, value, seed)) for seed in study.seeds]
        cell = [r for r in cell if r is not None]
        if cell:
            cells[name] = cell
    return cells


def protocol_text(study: GhostStudyArguments, data: dict[str, TensorExamples]) -> list[str]:
    micro, accumulation = micro_and_accumulation(study, ARMS["ghost"])
    milestones = [f"{f * study.epochs:g}" for f in study.lr_milestones]
    rule = lr_rule_formula(study.lr_rule, f"B / {study.ghost_batch_size}")
    large_lr = arm_schedule(study, ARMS["ghost"], len(data["train"]))["lr"]
    return [
        f"Protocol: Fashion-MNIST, train {len(data['train'])} / validation {len(data['validation'])} (stratified, "
        f"carved from train) / test {len(data['test'])} (official t10k); KeskarMLP {study.depth}x{study.hidden} "
        f"with BatchNorm; {study.epochs:g} epochs; SGD LR {study.base_lr:g} at batch {study.ghost_batch_size}, "
        f"momentum {study.momentum:g}, weight decay {study.weight_decay:g} (all parameters), LR x{study.lr_decay:g} "
        f"at epochs {', '.join(milestones)} (fractions {study.lr_milestones} of the epochs), clipping at "
        f"{study.max_grad_norm:g}, {study.lr_rule} LR rule ({rule}) = {large_lr:.4g} "
        f"at B = {study.large_batch}; every B arm but `naive` is {accumulation} ghost chunks of {micro} "
        "(gradient accumulation: fresh noise and own BN statistics per chunk); momentum reset every epoch: "
        f"{study.reset_momentum_each_epoch}; noise skips the BatchNorm parameters (smoothout_skip_norm_layers, "
        f"as the authors); sweeps on validation with seed {study.sweep_seed} (at most {study.max_extensions} "
        f"grid extensions); final seeds {study.seeds}, paired by seed.",
        "",
        "Differences from the authors' `main_gbn.py` (F1/MNIST set-up): Fashion-MNIST instead of MNIST; the data "
        "order is the Trainer's seeded random sampler; the last partial micro-batch of an epoch is kept (that "
        "step averages fewer chunks); the test split is the official t10k and the strengths are chosen on "
        f"{len(data['validation'])} validation images carved from train, never on test; the momentum reset "
        "clears the SGD state (the authors rebuild the optimizer); the naive arm, SAM and the ablations are "
        "ours; the random-subspace epsilon-sharpness box differs (see below).",
    ]


def sweep_rows(study: GhostStudyArguments, runs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per finished sweep point (chosen and extension points marked), and a row for a choice at an edge."""
    rows = []
    for name in (*SWEEP_ARMS["sweep"], *SWEEP_ARMS["small"]):
        arm, batch = ARMS[name], str(arm_batch(study, ARMS[name]))
        state = arm_sweep(study, arm, runs)
        for value in state.grid:
            record = runs.get(run_key("sweep", arm_batch(study, arm), name, value, study.sweep_seed))
            if record is not None:
                scores = [f"{100 * record['validation_accuracy']:.2f}", f"{100 * max(record['validation_curve']):.2f}"]
                rows.append([batch, name, arm.tuned or "", point_label(state, value), *scores])
        if state.chosen is not None and state.at_edge:
            rows.append([batch, name, arm.tuned or "", "still at an edge (limit)", "", ""])
    return rows


FINAL_MEASURES = (  # (record key, scale, digits) of the final table's mean ± std columns
    ("test_accuracy", 100, 2),
    ("train_accuracy", 100, 2),
    ("gap", 100, 2),
    ("hessian_top", 1, 1),
    ("epsilon_sharpness", 1, 3),
    ("epsilon_subspace", 1, 3),
)


def final_rows(cells: dict[str, list[dict[str, Any]]], cost: dict[str, Any] | None) -> list[list[str]]:
    """One row per final cell: its set-up, the measures (mean ± std over seeds) and its cost."""
    rows = []
    for name, cell in cells.items():
        arm, first = ARMS[name], cell[0]
        ratio = (cost or {}).get("arms", {}).get(name, {}).get("ratio_to_ghost")
        wall = statistics.median(r["train_runtime_s"] / r["epochs"] for r in cell)
        setup = [f"{name} ({arm.label})", str(first["batch"]), f"{first['micro_batch']} x {first['accumulation']}"]
        setup += [value_label(first["value"], arm.tuned, arm.follows), str(len(cell))]
        measures = [cell_summary(cell, measure, scale, digits) for measure, scale, digits in FINAL_MEASURES]
        rows.append([*setup, *measures, "-" if ratio is None else f"{ratio:.2f}", f"{wall:.3g}"])
    return rows


def report(study: GhostStudyArguments, data: dict[str, TensorExamples]) -> str:
    """Write ``report.md`` and the plots; returns the report text."""
    out = Path(study.output_dir)
    runs = read_runs(out / "runs.jsonl")
    cost = read_cost(out / "cost.json")
    lines = ["# Fashion-MNIST large batch under the authors' protocol (ghost chunks)", ""]
    lines += protocol_text(study, data)
    title = f"Sweeps (validation accuracy after the last epoch, seed {study.sweep_seed})"
    header = ["batch", "arm", "tunes", "value", "val acc % (last epoch)", "best-epoch val acc %"]
    lines += section(title, header, sweep_rows(study, runs), "(no sweep runs yet)")
    cells = final_cells(study, runs)
    header = ["arm", "batch", "micro x accum", "value", "seeds", "test acc %", "train acc %", "train-test gap %"]
    header += ["Hessian top eig", "eps-sharpness (full)", f"eps-sharpness ({study.subspace_dim}-D subspace)"]
    header += ["cost x ghost (cost.json)", "training wall s/epoch (shared machine, not a cost)"]
    lines += section("Final cells (mean ± std over seeds)", header, final_rows(cells, cost), "(no final runs yet)")
    lines.append(cost_column_note(cost, "ghost", "ghost baseline"))
    lines += paired_sections(study, cells)
    batches = {"large": study.large_batch, "small": study.small_batch}
    panels = {scale: f"batch {batch}: test accuracy (mean ± std over seeds)" for scale, batch in batches.items()}
    curves = [(ARMS[name].scale, name, [r.get("test_curve") for r in cell]) for name, cell in cells.items()]
    plot = plot_mean_curves(out / "plots" / "test_accuracy_curves.png", panels, curves)
    if plot is not None:
        lines += ["", "## Test accuracy per epoch", "", f"![test accuracy per epoch]({plot.relative_to(out)})"]
        lines += ["", "(Plot only: every choice in this study is made on validation accuracy.)"]
    lines += interpolation_section(study, data, cells)
    lines += sharpness_notes(study, cells)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def paired_sections(study: GhostStudyArguments, cells: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The large-batch gap and the paired differences to the ghost-BN baseline, with 95 % t-intervals."""
    accuracy = {name: by_seed(cell) for name, cell in cells.items()}

    def rows(pairs: list[tuple[str, str]], sign: int = 1) -> list[list[str]]:
        found = [paired_interval_row(a, accuracy.get(a, {}), accuracy.get(b, {}), study.seeds, sign) for a, b in pairs]
        return [row for row in found if row is not None]

    large = [name for name, arm in ARMS.items() if arm.scale == "large"]
    batch = study.large_batch
    lines = section(
        f"Large-batch gap: small-batch baseline minus each batch-{batch} arm (test accuracy, paired by seed)",
        PAIRED_HEADER,
        rows([(name, "small_baseline") for name in large], sign=-1),
    )
    lines += section(
        f"Paired difference to the ghost-BN baseline at batch {batch} (arm minus ghost, test accuracy points, 95 % "
        "t-interval over seeds, scipy.stats.t)",
        PAIRED_HEADER,
        rows([(name, "ghost") for name in large if name != "ghost"]),
    )
    lines += section(
        "Gaussian minus uniform noise (same law and strength, paired by seed; test accuracy points)",
        PAIRED_HEADER,
        rows([("ada_gaussian", "adasmoothout"), ("so_gaussian", "smoothout")]),
    )
    ghost, small = accuracy.get("ghost", {}), accuracy.get("small_baseline", {})
    shares = [
        gap_share_row(n, accuracy.get(n, {}), ghost, small, study.seeds) for n in large if n not in ("ghost", "naive")
    ]
    lines += section(
        "Share of the large-batch gap recovered ((arm - ghost) / (small baseline - ghost), per seed)",
        ["arm", "seeds", "of the mean gap", "per seed"],
        [row for row in shares if row is not None],
    )
    engines: dict[str, set[int]] = {}
    for record in (r for cell in cells.values() for r in cell):
        engines.setdefault(record.get("engine_commit") or FIRST_ENGINE, set()).add(record["seed"])
    lines += [
        "",
        f"Engines (noise law identical; CPU uniform draws on 2^24 levels in {FIRST_ENGINE}, other realizations later): "
        + "; ".join(f"{engine}: seeds {sorted(seeds)}" for engine, seeds in sorted(engines.items()))
        + f" (runs without a recorded engine_commit are from {FIRST_ENGINE}).",
    ]
    lines += ["", f"Small batch {study.small_batch}: arm minus small-batch baseline (same form):", ""]
    small_rows = rows([("small_smoothout", "small_baseline"), ("small_adasmoothout", "small_baseline")])
    return lines + table_lines(PAIRED_HEADER, small_rows, "(no pairs yet)")


def interpolation_section(
    study: GhostStudyArguments, data: dict[str, TensorExamples], cells: dict[str, list[dict[str, Any]]]
) -> list[str]:
    seed = study.seeds[0]
    lines = [
        "",
        f"## 1-D interpolations (seed {seed}; alpha in [0, 1], 0 = first model; weights and BN statistics "
        "interpolated; 2,000 training and 2,000 test examples)",
        "",
    ]
    pairs = []
    for name, *arms in INTERPOLATIONS:
        keys = [next((r["key"] for r in cells.get(arm, []) if r["seed"] == seed), None) for arm in arms]
        if None not in keys:
            pairs.append((name, *keys))
    out = Path(study.output_dir)
    return lines + interpolation_lines(out, pairs, data, study.hidden, study.depth, seed=seed, second_split="test")


def sharpness_notes(study: GhostStudyArguments, cells: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "",
        "## Sharpness measures",
        "",
        f"On {study.sharpness_samples} fixed training examples, eval mode: top Hessian eigenvalue "
        f"({study.hessian_iterations} power iterations); Keskar epsilon-sharpness, eps {study.sharpness_epsilon:g}, "
        f"{study.sharpness_iterations} L-BFGS-B iterations, {study.sharpness_repeats} random starts, in the full "
        f"parameter space and in a random {study.subspace_dim}-D subspace (`hf_smoothout.analysis`).",
    ]
    reference = cells.get("ghost") or next(iter(cells.values()), None)
    if not reference:
        return lines
    models = Path(study.output_dir) / "models"
    record = next((r for r in reference if (models / f"{r['key']}.safetensors").is_file()), None)
    if record is None:
        return [*lines, "", "(No final model of the reference cell in this output folder: box comparison skipped.)"]
    model = load_keskar(models / f"{record['key']}.safetensors", study.hidden, study.depth)
    box = subspace_box_comparison(model, study.subspace_dim, study.sharpness_epsilon)
    return [*lines, "", subspace_box_note(record["key"], box)]


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run ``--stage``.

    Example:
        >>> main(["--output_dir", "/tmp/ghost", "--stage", "plan"])  # doctest: +SKIP
    """
    (study,) = HfArgumentParser(GhostStudyArguments).parse_args_into_dataclasses(args=argv)
    if not 0 < study.small_batch < study.large_batch:
        raise ValueError("Need 0 < small_batch < large_batch.")
    if study.large_batch % study.ghost_batch_size:
        raise ValueError("--large_batch must be a multiple of --ghost_batch_size.")
    if not study.seeds:
        raise ValueError("--seeds needs at least one seed.")
    if study.torch_threads is not None:
        torch.set_num_threads(study.torch_threads)
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(study.fashion_mnist_dir, study.validation_size, study.max_train_samples, study.max_test_samples)
    if study.stage == "plan":
        print(plan(study, data))
        return
    (out / "study_arguments.json").write_text(json.dumps(asdict(study), indent=2))
    if study.stage == "cost":
        cost_stage(study, data)
        return
    for stage in TRAINING_STAGES:
        if study.stage in (stage, "all"):
            run_stage(study, stage, data)
    if study.stage in ("report", "all"):
        print(report(study, data))


if __name__ == "__main__":
    main()
