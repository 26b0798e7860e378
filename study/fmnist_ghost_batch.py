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
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from recipe_kit.protocol import MomentumResetCallback  # the recipes' --reset_momentum_each_epoch
from safetensors.torch import save_file
from study_kit.fmnist_common import (
    KeskarMLP,
    MLPStudyOptions,
    TensorExamples,
    append_run,
    evaluate_accuracy,
    interpolate_models,
    load_data,
    load_keskar,
    measure_sharpness_of,
    read_runs,
    sharpness_batches,
)
from study_kit.stats import mean_std, paired_interval
from torch import nn
from transformers import HfArgumentParser, TrainerCallback

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.analysis import ParameterVector, RandomSubspace
from hf_smoothout.modelcard import markdown_table

SAM_EPS = 1e-12
"""Added to the gradient norm in the SAM perturbation ``rho * g / (||g|| + eps)``."""
"""The library field the ``ada_draw_step`` ablation needs (value ``"step"``); absent so far."""
COST_NOTE = (
    "Cost measurements are only valid when nothing else runs on the machine (other processes share the cores "
    "and inflate some arms more than others)."
)
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
TRAINING_SETTINGS = (
    "epochs",
    "small_batch",
    "large_batch",
    "ghost_batch_size",
    "base_lr",
    "lr_rule",
    "momentum",
    "weight_decay",
    "lr_milestones",
    "lr_decay",
    "max_grad_norm",
    "reset_momentum_each_epoch",
    "validation_size",
    "max_train_samples",
    "hidden",
    "depth",
    "use_cpu",
)
FINAL_SETTINGS = (
    "max_test_samples",
    "sharpness_samples",
    "sharpness_epsilon",
    "sharpness_iterations",
    "sharpness_repeats",
    "subspace_dim",
    "hessian_iterations",
)


def run_settings(study: GhostStudyArguments, phase: str) -> dict[str, Any]:
    """The settings a run of ``phase`` depends on (stored with it, compared on resume)."""
    names = TRAINING_SETTINGS + (FINAL_SETTINGS if phase == "final" else ())
    return {name: getattr(study, name) for name in names}


# ---------------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One training recipe.

    ``scale``: ``large`` (``--large_batch``) or ``small``; ``tuned``: what its sweep tunes (``strength``,
    ``rho``) or None; ``follows``: an ablation takes the chosen strength of that arm.
    """

    name: str
    scale: Literal["small", "large"]
    label: str
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
        Arm("naive", "large", "naive large batch (one micro-batch, BN over B)", naive=True),
        Arm("ghost", "large", "ghost-BN baseline"),
        Arm("smoothout", "large", "SmoothOut", tuned="strength", adapt="none", grid="strengths_none"),
        Arm("adasmoothout", "large", "AdaSmoothOut", tuned="strength", adapt="filter", grid="strengths_filter"),
        Arm("sam", "large", "SAM (per chunk)", tuned="rho", sam=True, grid="sam_rhos"),
        Arm(
            "ada_nodenoise",
            "large",
            "AdaSmoothOut, no de-noising",
            adapt="filter",
            denoise=False,
            follows="adasmoothout",
        ),
        Arm(
            "ada_gaussian",
            "large",
            "AdaSmoothOut, Gaussian",
            adapt="filter",
            distribution="gaussian",
            follows="adasmoothout",
        ),
        Arm(
            "so_gaussian",
            "large",
            "SmoothOut, Gaussian",
            adapt="none",
            distribution="gaussian",
            follows="smoothout",
        ),
        Arm(
            "ada_draw_step",
            "large",
            "AdaSmoothOut, one draw per step",
            adapt="filter",
            noise_every="step",
            follows="adasmoothout",
        ),
        Arm("small_baseline", "small", "small-batch baseline"),
        Arm("small_smoothout", "small", "SmoothOut", tuned="strength", adapt="none", grid="small_strengths_none"),
        Arm(
            "small_adasmoothout",
            "small",
            "AdaSmoothOut",
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


def scaled_lr(study: GhostStudyArguments, batch: int) -> float:
    """The LR at ``batch``: ``base_lr * (batch / ghost) ** 0.5`` under the sqrt rule.

    Example:
        >>> round(scaled_lr(GhostStudyArguments(), 4096), 6)  # 0.1 * sqrt(32)
        0.565685
    """
    ratio = batch / study.ghost_batch_size
    return study.base_lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[study.lr_rule]


def update_steps_per_epoch(examples: int, micro: int, accumulation: int) -> int:
    """Optimizer steps per epoch as the Trainer counts them (last micro-batch and last step may be partial).

    Example:
        >>> update_steps_per_epoch(55000, 128, 32), update_steps_per_epoch(55000, 4096, 1)
        (14, 14)
    """
    micro_batches = math.ceil(examples / micro)
    return max(math.ceil(micro_batches / accumulation), 1)


def milestone_steps(study: GhostStudyArguments, steps_per_epoch: int) -> list[int]:
    """Optimizer steps after which the LR drops: ``round(fraction * epochs * steps_per_epoch)``.

    Example:
        >>> milestone_steps(GhostStudyArguments(), 14)  # epochs 10/20/30 of 50
        [140, 280, 420]
    """
    return [round(f * study.epochs * steps_per_epoch) for f in study.lr_milestones]


def step_scheduler(
    optimizer: torch.optim.Optimizer, milestones: list[int], decay: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    """LR x ``decay`` at each milestone (counted in optimizer steps; the Trainer steps it once per update).

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = step_scheduler(opt, [2, 3], 0.1)
        >>> lrs = []
        >>> for _ in range(4):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 6)); opt.step(); sched.step()
        >>> lrs
        [1.0, 1.0, 0.1, 0.01]
    """
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=decay)


def run_key(phase: str, batch: int, arm: str, value: float, seed: int) -> str:
    """``<phase>-b<batch>-<arm>-v<value>-s<seed>``; ``value`` is the tuned strength or rho (0 for baselines)."""
    return f"{phase}-b{batch}-{arm}-v{value:g}-s{seed}"


# ---------------------------------------------------------------------------------------------------- training
class EpochRecorder(TrainerCallback):
    """Per epoch: the LR at its start, its training wall time (evaluation excluded) and, optionally, the
    accuracy of the model on ``eval_data`` at its end (eval mode)."""

    def __init__(self, model: nn.Module, eval_data: TensorExamples | None, batch_size: int) -> None:
        self.model, self.eval_data, self.batch_size = model, eval_data, batch_size
        self.lrs: list[float] = []
        self.seconds: list[float] = []
        self.accuracies: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        self._start = time.perf_counter()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        if self.eval_data is not None:
            self.accuracies.append(evaluate_accuracy(self.model, self.eval_data, self.batch_size))


class ChunkSAMTrainer(SmoothOutTrainer):
    """SAM with one ascent step per micro-batch (ghost chunk): m-sharpness SAM with ``m`` = the chunk size.

    For every chunk: ``g = grad L_chunk(w)`` by ``torch.autograd.grad`` at the clean weights (``.grad`` is not
    touched), ``e = rho * g / (||g|| + 1e-12)`` with the global L2 norm over all trainable parameters, then
    ``w + e``, and the Trainer's own forward + backward there, which adds ``grad L_chunk(w + e) / accumulation``
    into ``.grad``; in ``finally`` the weights are copied back bit-exactly from a copy saved before ``+ e``.
    The Trainer then averages, clips and steps as for every other arm: the step uses the mean over chunks of
    the SAM gradients. Cost: two forward + backward passes per chunk.

    Batch norm: both passes run in train mode, normalizing with their own batch statistics, but only the first
    (clean-weight) pass updates the running statistics: every buffer is saved before the perturbed pass and
    copied back after it (``num_batches_tracked`` too), so the running statistics evolve as in plain SGD.
    The returned (logged) loss is the clean loss, scaled for accumulation as the Trainer scales it.
    Runs SAM alone: the SmoothOut strength must be 0.

    Example:
        >>> args = SmoothOutTrainingArguments("out", smoothout_strength=0.0)  # doctest: +SKIP
        >>> trainer = ChunkSAMTrainer(model, args, train_dataset=ds, sam_rho=0.05)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, sam_rho: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.smoothout_config.enabled:
            raise ValueError("ChunkSAMTrainer runs SAM alone: set smoothout_strength=0.")
        if not (isinstance(sam_rho, (int, float)) and math.isfinite(sam_rho) and sam_rho > 0):
            raise ValueError(f"sam_rho must be a positive finite number, got {sam_rho!r}.")
        self.sam_rho = float(sam_rho)

    def sam_perturbation(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The clean chunk loss and ``e`` per trainable parameter (zeros where the loss does not reach)."""
        params = [p for p in model.parameters() if p.requires_grad]
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = self.sam_rho / (norm + SAM_EPS)
            return loss.detach(), [g * scale for g in grads]

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        model.train()
        loss, perturbation = self.sam_perturbation(model, inputs)  # updates the BN running statistics
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            saved_params = [p.detach().clone() for p in params]
            saved_buffers = [b.detach().clone() for b in model.buffers()]
        try:
            with torch.no_grad():
                for p, e in zip(params, perturbation, strict=True):
                    p.add_(e)
            super().training_step(model, inputs, num_items_in_batch)  # forward + backward at w + e
        finally:
            with torch.no_grad():
                for p, saved in zip(params, saved_params, strict=True):
                    p.copy_(saved)
                for b, saved in zip(model.buffers(), saved_buffers, strict=True):
                    b.copy_(saved)
        return loss / getattr(self, "current_gradient_accumulation_steps", 1)


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
    """The Trainer of one run (not yet trained), its model, callbacks and schedule facts.

    Example:
        >>> trainer, model, recorder, reset, info = build_trainer(study, data, ARMS["ghost"], 0.0, 0,  # doctest: +SKIP
        ...     epochs=1, eval_data=None, output_dir=Path("/tmp/run"))
        >>> trainer.args.gradient_accumulation_steps  # doctest: +SKIP
        32
    """
    micro, accumulation = micro_and_accumulation(study, arm)
    lr = scaled_lr(study, arm_batch(study, arm))
    strength = value if arm.noisy else 0.0
    args = SmoothOutTrainingArguments(
        output_dir=str(output_dir),
        seed=seed,
        num_train_epochs=epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=study.eval_batch_size,
        learning_rate=lr,
        weight_decay=study.weight_decay,
        max_grad_norm=study.max_grad_norm,
        use_cpu=study.use_cpu,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="epoch",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        smoothout_strength=strength,
        smoothout_adapt=arm.adapt,
        smoothout_distribution=arm.distribution,
        smoothout_denoise=arm.denoise,
        smoothout_noise_every=arm.noise_every,
    )
    torch.manual_seed(seed)
    model = KeskarMLP(study.hidden, study.depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=study.momentum, weight_decay=study.weight_decay)
    steps_per_epoch = update_steps_per_epoch(len(data["train"]), micro, accumulation)
    milestones = milestone_steps(study, steps_per_epoch)
    scheduler = step_scheduler(optimizer, milestones, study.lr_decay)
    recorder = EpochRecorder(model, eval_data, study.eval_batch_size)
    reset = MomentumResetCallback() if study.reset_momentum_each_epoch else None
    callbacks: list[TrainerCallback] = [c for c in (reset, recorder) if c is not None]
    kwargs: dict[str, Any] = {"sam_rho": value} if arm.sam else {}
    trainer_cls = ChunkSAMTrainer if arm.sam else SmoothOutTrainer
    trainer = trainer_cls(
        model,
        args,
        train_dataset=data["train"],
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
        **kwargs,
    )
    info = {"lr": lr, "steps_per_epoch": steps_per_epoch, "milestone_steps": milestones}
    return trainer, model, recorder, reset, info


def engine_commit() -> str | None:
    """The git commit of the checkout that runs this study (which engine drew the noise), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def train_one(
    study: GhostStudyArguments,
    data: dict[str, TensorExamples],
    arm: Arm,
    phase: Literal["sweep", "final", "cost"],
    value: float,
    seed: int,
) -> tuple[dict[str, Any], nn.Module]:
    """Train one run; returns its record and the trained model.

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
        "engine_commit": engine_commit(),
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
        record.update(
            measure_sharpness_of(
                model,
                sharpness_batches(data["train"], study.sharpness_samples),
                epsilon=study.sharpness_epsilon,
                iterations=study.sharpness_iterations,
                repeats=study.sharpness_repeats,
                hessian_iterations=study.hessian_iterations,
                subspace_dim=study.subspace_dim,
            )
        )
        record["measure_seconds"] = time.perf_counter() - start
        (out / "models").mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "models" / f"{key}.safetensors"))
    return record, model


# ---------------------------------------------------------------------------------------------------- sweeps
def extension_point(grid: list[float], low: bool) -> float:
    """The next grid point beyond an edge, one log step (that of the two edge points) further, 3 digits.

    Example:
        >>> extension_point([1e-4, 3e-4, 1e-3], low=True), extension_point([0.1, 0.3, 1.0], low=False)
        (3.33e-05, 3.33)
    """
    inner, edge = (grid[1], grid[0]) if low else (grid[-2], grid[-1])
    return float(f"{edge * edge / inner:.3g}")


@dataclass
class SweepState:
    """Where one sweep stands: its grid so far (base + extensions), points still to run, the choice."""

    arm: str
    grid: list[float]
    extensions: list[float]
    todo: list[float]
    chosen: float | None
    at_edge: bool = False


def sweep_score(study: GhostStudyArguments, arm: Arm, value: float, runs: dict[str, dict[str, Any]]) -> float | None:
    record = runs.get(run_key("sweep", arm_batch(study, arm), arm.name, value, study.sweep_seed))
    return None if record is None else record["validation_accuracy"]


def sweep_state(study: GhostStudyArguments, arm: Arm, runs: dict[str, dict[str, Any]]) -> SweepState:
    """Replay a sweep from its finished runs: extend while the best (highest validation accuracy; ties go to
    the larger value) sits on an edge, up to ``--max_extensions`` points."""
    grid = sorted(set(getattr(study, arm.grid)))
    extensions: list[float] = []
    while True:
        todo = [v for v in grid if sweep_score(study, arm, v, runs) is None]
        if todo:
            return SweepState(arm.name, grid, extensions, todo, None)
        best = max(grid, key=lambda v: (sweep_score(study, arm, v, runs), v))
        index = grid.index(best)
        at_edge = len(grid) >= 2 and index in (0, len(grid) - 1)
        if not at_edge or len(extensions) >= study.max_extensions:
            return SweepState(arm.name, grid, extensions, [], best, at_edge)
        point = extension_point(grid, low=index == 0)
        extensions.append(point)
        grid = sorted([*grid, point])


def chosen_value(study: GhostStudyArguments, arm: Arm, runs: dict[str, dict[str, Any]]) -> float | None:
    """The value an arm's final runs use: 0 for baselines, the sweep's choice, or the followed arm's."""
    if arm.follows is not None:
        return chosen_value(study, ARMS[arm.follows], runs)
    if arm.tuned is None:
        return 0.0
    return sweep_state(study, arm, runs).chosen


# ---------------------------------------------------------------------------------------------------- stages
def check_reusable(study: GhostStudyArguments, record: dict[str, Any]) -> None:
    expected = run_settings(study, record["phase"])
    if record.get("settings") != expected:
        changed = sorted(k for k in expected if (record.get("settings") or {}).get(k) != expected[k])
        raise ValueError(
            f"Run {record['key']} in runs.jsonl was made with other settings ({', '.join(changed)}); use another "
            "--output_dir or the same settings."
        )


def execute(
    study: GhostStudyArguments,
    data: dict[str, TensorExamples],
    arm: Arm,
    phase: Literal["sweep", "final"],
    value: float,
    seed: int,
    runs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """One run unless ``runs`` has it; appended to ``runs.jsonl`` and ``runs``."""
    key = run_key(phase, arm_batch(study, arm), arm.name, value, seed)
    if key in runs:
        check_reusable(study, runs[key])
        return runs[key]
    record, _ = train_one(study, data, arm, phase, value, seed)
    append_run(Path(study.output_dir) / "runs.jsonl", record)
    runs[key] = record
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
    for name in SWEEP_ARMS.get(stage, ()):
        arm = ARMS[name]
        while True:
            state = sweep_state(study, arm, runs)
            if not state.todo:
                edge = " (still at the grid edge: extension limit reached)" if state.at_edge else ""
                print(f"Sweep {name}: chosen {state.chosen:g}{edge}; extensions {state.extensions}", flush=True)
                break
            for value in state.todo:
                execute(study, data, arm, "sweep", value, study.sweep_seed, runs)
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


def epoch_seconds_estimate(
    study: GhostStudyArguments, arm: Arm, runs: dict[str, dict[str, Any]], train_size: int
) -> tuple[float, str]:
    """Seconds per training epoch (evaluations included) of ``arm``, and where the number comes from."""
    own = [r["train_runtime_s"] / r["epochs"] for r in runs.values() if r["arm"] == arm.name and r["epochs"]]
    if own:
        return statistics.median(own), f"measured ({len(own)} runs)"
    same = [
        r["train_runtime_s"] / r["epochs"]
        for r in runs.values()
        if r["arm"] in ARMS and cost_class(ARMS[r["arm"]]) == cost_class(arm) and r["epochs"]
    ]
    if same:
        return statistics.median(same), f"measured on similar arms ({len(same)} runs)"
    cost_path = Path(study.output_dir) / "cost.json"
    if cost_path.is_file():
        cost = json.loads(cost_path.read_text())["arms"].get(arm.name)
        if cost is not None:
            return cost["median_s"], "cost.json"
    return PILOT_EPOCH_SECONDS[cost_class(arm)] * train_size / 55000, "pilot default"


def plan(study: GhostStudyArguments, data: dict[str, TensorExamples]) -> str:
    """The runs still to do, stage by stage, with an estimated time; trains nothing."""
    runs = read_runs(Path(study.output_dir) / "runs.jsonl")
    train_size = len(data["train"])
    measured = [r["measure_seconds"] for r in runs.values() if "measure_seconds" in r]
    measure_s = statistics.median(measured) if measured else PILOT_MEASURE_SECONDS * study.sharpness_samples / 2000
    rows: list[list[str]] = []
    totals: dict[str, float] = {}
    possible_extra = 0.0
    for stage in TRAINING_STAGES:
        for name in SWEEP_ARMS.get(stage, ()):
            arm = ARMS[name]
            per_epoch, source = epoch_seconds_estimate(study, arm, runs, train_size)
            state = sweep_state(study, arm, runs)
            for value in state.todo:
                seconds = per_epoch * study.epochs
                totals[stage] = totals.get(stage, 0.0) + seconds
                key = run_key("sweep", arm_batch(study, arm), name, value, study.sweep_seed)
                rows.append([stage, key, f"{seconds:.0f}", source])
            if state.chosen is None:
                possible_extra += (study.max_extensions - len(state.extensions)) * per_epoch * study.epochs
        if stage not in FINAL_ARMS:
            continue
        for arm, value, seed in final_jobs(study, stage, runs):
            if value is not None and run_key("final", arm_batch(study, arm), arm.name, value, seed) in runs:
                continue
            per_epoch, source = epoch_seconds_estimate(study, arm, runs, train_size)
            seconds = per_epoch * study.epochs + measure_s
            totals[stage] = totals.get(stage, 0.0) + seconds
            shown = "?" if value is None else f"{value:g}"
            rows.append(
                [stage, f"final-b{arm_batch(study, arm)}-{arm.name}-v{shown}-s{seed}", f"{seconds:.0f}", source]
            )
    total = sum(totals.values())
    table = markdown_table(["stage", "run", "est. s", "per-epoch time from"], rows).strip()
    lines = [
        f"Plan for {study.output_dir}: {len(rows)} runs to do ({len(runs)} finished); v? = value chosen by a "
        "sweep that has not finished.",
        "",
        table if rows else "Nothing left to run.",
        "",
        *(f"- {stage}: {seconds / 3600:.2f} h" for stage, seconds in totals.items()),
        f"- total: {total / 3600:.2f} h, plus up to {possible_extra / 3600:.2f} h if unfinished sweeps extend "
        f"their grids; final runs include {measure_s:.0f} s of sharpness measurement each.",
    ]
    return "\n".join(lines)


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
    arms = [ARMS[name] for name in names]
    values = {arm.name: cost_value(study, arm, runs) for arm in arms}
    seconds: dict[str, list[float]] = {arm.name: [] for arm in arms}
    load_before = os.getloadavg()
    for round_index in range(study.cost_rounds):
        for arm in arms:
            record, _ = train_one(study, data, arm, "cost", values[arm.name], seed=round_index)
            seconds[arm.name].append(statistics.mean(record["epoch_seconds"]))
            print(f"cost round {round_index + 1}/{study.cost_rounds} {arm.name}: {seconds[arm.name][-1]:.2f} s/epoch")
    reference = statistics.median(seconds["ghost"])
    result = {
        "note": COST_NOTE,
        "reference_arm": "ghost",
        "rounds": study.cost_rounds,
        "epochs_per_arm_and_round": study.cost_epochs,
        "train_examples": len(data["train"]),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "arms": {
            arm.name: {
                "label": arm.label,
                "batch": arm_batch(study, arm),
                "micro_batch": micro_and_accumulation(study, arm)[0],
                "accumulation": micro_and_accumulation(study, arm)[1],
                "value": values[arm.name],
                "per_epoch_s": seconds[arm.name],
                "median_s": statistics.median(seconds[arm.name]),
                "ratio_to_ghost": statistics.median(seconds[arm.name]) / reference,
            }
            for arm in arms
        },
    }
    path = Path(study.output_dir) / "cost.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    for name, entry in result["arms"].items():
        print(f"{name:20s} {entry['median_s']:8.2f} s/epoch  x{entry['ratio_to_ghost']:.2f} of ghost")
    print(COST_NOTE, flush=True)
    return result


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
    ratio = f"B / {study.ghost_batch_size}"
    rule = {"sqrt": f"lr * ({ratio}) ** 0.5", "linear": f"lr * {ratio}", "none": "lr"}[study.lr_rule]
    return [
        f"Protocol: Fashion-MNIST, train {len(data['train'])} / validation {len(data['validation'])} (stratified, "
        f"carved from train) / test {len(data['test'])} (official t10k); KeskarMLP {study.depth}x{study.hidden} "
        f"with BatchNorm; {study.epochs:g} epochs; SGD LR {study.base_lr:g} at batch {study.ghost_batch_size}, "
        f"momentum {study.momentum:g}, weight decay {study.weight_decay:g} (all parameters), LR x{study.lr_decay:g} "
        f"at epochs {', '.join(milestones)} (fractions {study.lr_milestones} of the epochs), clipping at "
        f"{study.max_grad_norm:g}, {study.lr_rule} LR rule ({rule}) = {scaled_lr(study, study.large_batch):.4g} "
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


def value_label(arm: Arm, value: float) -> str:
    """``0.1 (strength)``, ``0.05 (rho)``, ``0.1 (of adasmoothout)`` or ``0``."""
    if arm.tuned:
        return f"{value:g} ({arm.tuned})"
    return f"{value:g} (of {arm.follows})" if arm.follows else f"{value:g}"


def table_value(records: list[dict[str, Any]], name: str, scale: float = 1.0, digits: int = 2) -> str:
    values = [r[name] for r in records if r.get(name) is not None]
    return mean_std(values, scale, digits)


def curves_plot(study: GhostStudyArguments, cells: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Test accuracy vs epoch per arm (mean line, mean ± std band over seeds): one panel per batch size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not cells:
        return None
    figure = Figure(figsize=(12, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    panels = {"large": figure.add_subplot(1, 2, 1), "small": figure.add_subplot(1, 2, 2)}
    for index, (name, cell) in enumerate(cells.items()):
        arm = ARMS[name]
        curves = [r["test_curve"] for r in cell if r.get("test_curve")]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        epochs = list(range(1, length + 1))
        means = [100 * statistics.mean(c[i] for c in curves) for i in range(length)]
        stds = [100 * (statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0) for i in range(length)]
        axis = panels[arm.scale]
        color = f"C{index % 10}"
        axis.plot(epochs, means, color=color, label=f"{name} (n={len(curves)})")
        axis.fill_between(
            epochs,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            color=color,
            alpha=0.2,
        )
    for scale, axis in panels.items():
        batch = study.large_batch if scale == "large" else study.small_batch
        axis.set_title(f"batch {batch}: test accuracy (mean ± std over seeds)", fontsize="medium")
        axis.set_xlabel("epoch")
        axis.set_ylabel("test accuracy %")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small", loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def subspace_box_comparison(model: nn.Module, dim: int, epsilon: float, seed: int = 0) -> dict[str, float]:
    """How our random-subspace box compares with the authors' (random directions normalized to unit length).

    Ours: ``x = x0 + A y``, ``A`` with standard normal entries, ``|y_j| <= eps (|(A^+ x0)_j| + 1)``. With the
    columns of ``A`` (the directions) normalized, ``Â = A D^-1``, the same box rule in our coordinates is
    ``|y_j| <= eps (|(A^+ x0)_j| + 1 / d_j)``, ``d_j = ||A_j|| ≈ sqrt(n)``. Returns the median and range over
    ``j`` of the half-width ratio ours / theirs (first subspace, ``seed``).
    """
    vector = ParameterVector(model)
    subspace = RandomSubspace(vector.numel, dim, seed)
    coordinates = subspace.pinv_apply(vector.get()).abs()
    squares = torch.zeros(dim, dtype=torch.float64)
    for block in subspace.blocks():
        squares += block.pow(2).sum(0)
    norms = squares.sqrt()
    ratio = (coordinates + 1.0) / (coordinates + 1.0 / norms)
    return {
        "num_parameters": float(vector.numel),
        "sqrt_n": math.sqrt(vector.numel),
        "median_column_norm": float(norms.median()),
        "median_abs_pinv_x0": float(coordinates.median()),
        "median_ratio": float(ratio.median()),
        "min_ratio": float(ratio.min()),
        "max_ratio": float(ratio.max()),
        "epsilon": epsilon,
    }


def report(study: GhostStudyArguments, data: dict[str, TensorExamples]) -> str:
    """Write ``report.md`` and the plots; returns the report text."""
    out = Path(study.output_dir)
    runs = read_runs(out / "runs.jsonl")
    cost_path = out / "cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else None
    lines = ["# Fashion-MNIST large batch under the authors' protocol (ghost chunks)", ""]
    lines += protocol_text(study, data)

    lines += ["", f"## Sweeps (validation accuracy after the last epoch, seed {study.sweep_seed})", ""]
    rows = []
    for name in (*SWEEP_ARMS["sweep"], *SWEEP_ARMS["small"]):
        arm = ARMS[name]
        state = sweep_state(study, arm, runs)
        for value in state.grid:
            record = runs.get(run_key("sweep", arm_batch(study, arm), name, value, study.sweep_seed))
            if record is None:
                continue
            marks = [m for m, on in (("chosen", value == state.chosen), ("extension", value in state.extensions)) if on]
            rows.append(
                [
                    str(arm_batch(study, arm)),
                    name,
                    arm.tuned or "",
                    f"{value:g}" + (f" ({', '.join(marks)})" if marks else ""),
                    f"{100 * record['validation_accuracy']:.2f}",
                    f"{100 * max(record['validation_curve']):.2f}",
                ]
            )
        if state.chosen is not None and state.at_edge:
            rows.append([str(arm_batch(study, arm)), name, arm.tuned or "", "still at an edge (limit)", "", ""])
    header = ["batch", "arm", "tunes", "value", "val acc % (last epoch)", "best-epoch val acc %"]
    lines += markdown_table(header, rows).splitlines() if rows else ["(no sweep runs yet)"]

    cells = final_cells(study, runs)
    lines += ["", "## Final cells (mean ± std over seeds)", ""]
    header = [
        "arm",
        "batch",
        "micro x accum",
        "value",
        "seeds",
        "test acc %",
        "train acc %",
        "train-test gap %",
        "Hessian top eig",
        "eps-sharpness (full)",
        f"eps-sharpness ({study.subspace_dim}-D subspace)",
        "cost x ghost (cost.json)",
        "training wall s/epoch (shared machine, not a cost)",
    ]
    rows = []
    for name, cell in cells.items():
        arm = ARMS[name]
        ratio = (cost or {}).get("arms", {}).get(name, {}).get("ratio_to_ghost")
        wall = statistics.median(r["train_runtime_s"] / r["epochs"] for r in cell)
        rows.append(
            [
                f"{name} ({arm.label})",
                str(cell[0]["batch"]),
                f"{cell[0]['micro_batch']} x {cell[0]['accumulation']}",
                value_label(arm, cell[0]["value"]),
                str(len(cell)),
                table_value(cell, "test_accuracy", 100),
                table_value(cell, "train_accuracy", 100),
                table_value(cell, "gap", 100),
                table_value(cell, "hessian_top", 1, 1),
                table_value(cell, "epsilon_sharpness", 1, 3),
                table_value(cell, "epsilon_subspace", 1, 3),
                "-" if ratio is None else f"{ratio:.2f}",
                f"{wall:.3g}",
            ]
        )
    lines += markdown_table(header, rows).splitlines() if rows else ["(no final runs yet)"]
    if cost is None:
        lines += ["- cost column: no cost.json yet (run `--stage cost` on an otherwise idle machine)."]
    else:
        lines += [
            f"- cost column: median per-epoch wall time over {cost['rounds']} interleaved rounds relative to the ghost "
            f"baseline in the same benchmark ({cost['arms']['ghost']['median_s']:.2f} s/epoch); load average before/"
            f"after {[round(x, 2) for x in cost['loadavg_before']]} / {[round(x, 2) for x in cost['loadavg_after']]}. "
            f"{COST_NOTE}"
        ]

    lines += paired_sections(study, cells)
    plot = curves_plot(study, cells, out / "plots" / "test_accuracy_curves.png")
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

    def by_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r["test_accuracy"] for r in cells.get(name, [])}

    def interval_row(name: str, reference: str, sign: int) -> list[str] | None:
        ours, ref = by_seed(name), by_seed(reference)
        seeds = [s for s in study.seeds if s in ours and s in ref]
        if not seeds:
            return None
        diffs = [round(100 * sign * (ours[s] - ref[s]), 10) + 0.0 for s in seeds]  # + 0.0: no "-0.00"
        mean, low, high = paired_interval(diffs)
        interval = "n/a (one pair)" if low is None else f"[{low:+.2f}, {high:+.2f}]"
        per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(seeds, diffs, strict=True))
        return [name, str(len(seeds)), f"{mean:+.2f}", interval, per_seed]

    header = ["arm", "pairs", "mean (points)", "95 % t-interval", "per seed"]
    lines = [
        "",
        f"## Large-batch gap: small-batch baseline minus each batch-{study.large_batch} arm (test accuracy, paired "
        "by seed)",
        "",
    ]
    rows = [
        row
        for name, arm in ARMS.items()
        if arm.scale == "large" and (row := interval_row(name, "small_baseline", -1)) is not None
    ]
    lines += markdown_table(header, rows).splitlines() if rows else ["(no pairs yet)"]
    lines += [
        "",
        f"## Paired difference to the ghost-BN baseline at batch {study.large_batch} (arm minus ghost, test "
        "accuracy points, 95 % t-interval over seeds, scipy.stats.t)",
        "",
    ]
    rows = [
        row
        for name, arm in ARMS.items()
        if arm.scale == "large" and name != "ghost" and (row := interval_row(name, "ghost", 1)) is not None
    ]
    lines += markdown_table(header, rows).splitlines() if rows else ["(no pairs yet)"]
    lines += [
        "",
        "## Gaussian minus uniform noise (same law and strength, paired by seed; test accuracy points)",
        "",
    ]
    rows = [
        row
        for gaussian, uniform in (("ada_gaussian", "adasmoothout"), ("so_gaussian", "smoothout"))
        if (row := interval_row(gaussian, uniform, 1)) is not None
    ]
    lines += markdown_table(header, rows).splitlines() if rows else ["(no pairs yet)"]
    lines += ["", "## Share of the large-batch gap recovered ((arm - ghost) / (small baseline - ghost), per seed)", ""]
    rows = []
    ghost, small = by_seed("ghost"), by_seed("small_baseline")
    for name, arm in ARMS.items():
        ours = by_seed(name)
        seeds = [sd for sd in study.seeds if sd in ours and sd in ghost and sd in small and small[sd] != ghost[sd]]
        if arm.scale != "large" or name in ("ghost", "naive") or not seeds:
            continue
        shares = [(ours[sd] - ghost[sd]) / (small[sd] - ghost[sd]) for sd in seeds]
        overall = statistics.mean(ours[sd] - ghost[sd] for sd in seeds) / statistics.mean(
            small[sd] - ghost[sd] for sd in seeds
        )
        rows.append([name, str(len(seeds)), f"{100 * overall:.0f} %", ", ".join(f"{100 * x:.0f} %" for x in shares)])
    header_share = ["arm", "seeds", "of the mean gap", "per seed"]
    lines += markdown_table(header_share, rows).splitlines() if rows else ["(no pairs yet)"]
    engines = sorted({(r["seed"], r.get("engine_commit") or "ea41c57") for cell in cells.values() for r in cell})
    by_engine: dict[str, list[int]] = {}
    for seed, engine in engines:
        by_engine.setdefault(engine, [])
        if seed not in by_engine[engine]:
            by_engine[engine].append(seed)
    lines += [
        "",
        "Engines (noise law identical; CPU uniform draws on 2^24 levels in ea41c57, other realizations later): "
        + "; ".join(f"{engine}: seeds {sorted(seeds)}" for engine, seeds in sorted(by_engine.items()))
        + " (runs without a recorded engine_commit are from ea41c57).",
    ]
    lines += ["", f"Small batch {study.small_batch}: arm minus small-batch baseline (same form):", ""]
    rows = [
        row
        for name in ("small_smoothout", "small_adasmoothout")
        if (row := interval_row(name, "small_baseline", 1)) is not None
    ]
    lines += markdown_table(header, rows).splitlines() if rows else ["(no pairs yet)"]
    return lines


def interpolation_section(
    study: GhostStudyArguments, data: dict[str, TensorExamples], cells: dict[str, list[dict[str, Any]]]
) -> list[str]:
    seed = study.seeds[0]
    pairs = [
        ("small_vs_ghost_baseline", "small_baseline", "ghost"),
        ("small_vs_naive_baseline", "small_baseline", "naive"),
        ("ghost_baseline_vs_adasmoothout", "ghost", "adasmoothout"),
    ]
    lines = [
        "",
        f"## 1-D interpolations (seed {seed}; alpha in [0, 1], 0 = first model; weights and BN statistics "
        "interpolated; 2,000 training and 2,000 test examples)",
        "",
    ]
    out = Path(study.output_dir)
    for name, first, second in pairs:
        keys = [next((r["key"] for r in cells.get(arm, []) if r["seed"] == seed), None) for arm in (first, second)]
        if None in keys:
            continue
        files = [out / "models" / f"{key}.safetensors" for key in keys]
        if not all(f.is_file() for f in files):
            lines.append(f"- `{name}`: the models of seed {seed} are not in this output folder (kept: `plots/{name}/`)")
            continue
        models = [load_keskar(f, study.hidden, study.depth) for f in files]
        paths = interpolate_models(*models, data, out / "plots" / name, second_split="test")
        lines.append(f"- `{name}`: {keys[0]} -> {keys[1]}: `{paths['png'].relative_to(out)}`")
    return lines


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
    lines += [
        "",
        "Subspace box vs the authors': `RandomSubspace` draws `A` (n x M) with standard normal entries, so each "
        f"random direction has length ~sqrt(n) = {box['sqrt_n']:.0f} (measured median {box['median_column_norm']:.0f})"
        "; the authors normalize each random direction to unit length (the rows of their M x n matrix). The box "
        "rule `|y| <= eps (|A^+ x0| + 1)` is not invariant to that scale: in our coordinates theirs is "
        "`|y_j| <= eps (|(A^+ x0)_j| + 1/d_j)`. The public API has no option for normalized directions, so the "
        f"difference is recorded, not removed: on `{record['key']}` (|A^+ x0| median "
        f"{box['median_abs_pinv_x0']:.3g}) our half-widths are {box['median_ratio']:.3g} times theirs (median over "
        f"the M coordinates; range {box['min_ratio']:.3g} to {box['max_ratio']:.3g}). Subspace values here are "
        "therefore not comparable in scale to the paper's; comparisons between our arms are.",
    ]
    return lines


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
