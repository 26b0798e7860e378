"""The SmoothOut settings as ``smoothout_<field>`` dataclass fields, one per `SmoothOutConfig` field.

`SmoothOutArguments` is a mixin: combine it with any ``TrainingArguments`` subclass (TRL's ``SFTConfig``,
``DPOConfig``, ``GRPOConfig``, transformers' ``Seq2SeqTrainingArguments``) the way TRL composes its configs, and
every ``--smoothout_*`` flag exists for ``HfArgumentParser`` and ``TrlParser``. `SmoothOutTrainingArguments` is
that mixin on plain ``TrainingArguments``.

Example:
    >>> from transformers import HfArgumentParser
    >>> (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--smoothout_strength", "0.02", "--smoothout_adapt", "none"])
    >>> args.to_smoothout_config().adapt
    'none'

    With TRL (the mixin first, so its fields come last and every field keeps a default):

    >>> from dataclasses import dataclass
    >>> from trl import SFTConfig                                       # doctest: +SKIP
    >>> @dataclass                                                       # doctest: +SKIP
    ... class SmoothOutSFTConfig(SmoothOutArguments, SFTConfig):
    ...     pass
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from .config import SmoothOutConfig
from .laws import list_noise_laws

PREFIX = "smoothout_"


@dataclass
class SmoothOutArguments:
    """The ``smoothout_*`` fields, validated at construction; mix into any ``TrainingArguments`` subclass.

    ``smoothout_seed`` defaults to the run's ``seed``.
    """

    smoothout_strength: float = field(
        default=0.01,
        metadata={
            "help": "Noise strength `a`. adapt=filter: each row's noise has L2 norm a*||w_row||; adapt=none: "
            "U(-a, a); adapt=weight: a*w*U(-1, 1). 0 disables SmoothOut (plain training)."
        },
    )
    smoothout_adapt: str = field(
        default="filter",
        metadata={
            "help": "Noise scaling (a law registered in hf_smoothout.laws): filter (AdaSmoothOut, per output "
            "row/filter), filter_std (per row, a*||w_row||/sqrt(n)*u: Flat-LoRA's law with gaussian), none (plain "
            "box), weight.",
            "choices": list_noise_laws(),
        },
    )
    smoothout_distribution: Literal["uniform", "gaussian"] = field(
        default="uniform", metadata={"help": "Noise distribution."}
    )
    smoothout_schedule: Literal["constant", "anneal", "tanh", "cosine"] = field(
        default="constant",
        metadata={
            "help": "Strength schedule over optimizer steps: constant, anneal (decays), tanh (ramps up), cosine "
            "(ramps up from 0: (1 - cos(pi*t/T)) / 2)."
        },
    )
    smoothout_anneal_index: float = field(
        default=0.55, metadata={"help": "Exponent of the anneal schedule: coef = (1 + t) ** (-anneal_index / 2)."}
    )
    smoothout_tanh_scale: float = field(
        default=10.0, metadata={"help": "Steepness of the tanh schedule: coef = (tanh(s * (t/T - 0.5)) + 1) / 2."}
    )
    smoothout_samples: int = field(
        default=1, metadata={"help": "Noisy copies per micro-batch (K); their gradients are averaged."}
    )
    smoothout_denoise: bool = field(
        default=True,
        metadata={"help": "Remove the noise after backward (the method). False leaves it in (ablation only)."},
    )
    smoothout_restore: Literal["auto", "copy", "regenerate", "swap"] = field(
        default="auto",
        metadata={
            "help": "auto: swap where proven harmless (CPU parameters owning their storage alone), else copy; "
            "both exact and bit-identical. copy: bit-exact restore from a preallocated backup (+1x parameter "
            "memory). swap: the parameters point at a noisy buffer during forward/backward and back at their "
            "untouched tensors after (exact, 2 copy passes cheaper; not for FSDP2, DeepSpeed or CUDA graphs). "
            "regenerate: no backup, noise redrawn and removed (not bit-exact; refused when ranks draw different "
            "noise)."
        },
    )
    smoothout_skip_norm_layers: bool = field(
        default=True, metadata={"help": "Leave normalization-layer parameters (BatchNorm, LayerNorm, RMSNorm) clean."}
    )
    smoothout_skip_bias: bool = field(default=False, metadata={"help": "Leave parameters named *bias clean."})
    smoothout_include: list[str] | None = field(
        default=None, metadata={"help": "Only perturb parameters whose name matches one of these regexes."}
    )
    smoothout_exclude: list[str] | None = field(
        default=None, metadata={"help": "Never perturb parameters whose name matches one of these regexes."}
    )
    smoothout_seed: int | None = field(
        default=None, metadata={"help": "Seed of the noise generator (default: the run's --seed)."}
    )
    smoothout_independent_ranks: bool = field(
        default=True,
        metadata={"help": "Each distributed rank draws different noise (seed offset by rank)."},
    )

    smoothout_noise_every: Literal["micro_batch", "step"] = field(
        default="micro_batch",
        metadata={
            "help": "micro_batch: fresh noise for every micro-batch of an accumulation window (the paper). step: one "
            "draw held over the window, removed before clipping and the optimizer step (cheaper with large "
            "gradient accumulation)."
        },
    )
    smoothout_space: Literal["trainable", "lora_merged"] = field(
        default="trainable",
        metadata={
            "help": "trainable: noise on the selected trainable parameters (with PEFT LoRA: the adapters). "
            "lora_merged: noise on every LoRA layer's merged weight W + s*B*A, gradients to the adapters only, "
            "base weights never written (Flat-LoRA style)."
        },
    )
    smoothout_prefetch: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={
            "help": "CPU, copy or swap restore: draw the next micro-batch's random numbers on a background thread "
            "during this one's forward/backward (same noise, +1x selected-parameter memory). auto: for at most 16.8M "
            "selected weights on CPU when torch leaves a core free."
        },
    )
    smoothout_kernel: Literal["auto", "inline", "threads", "chunked", "triton"] = field(
        default="auto",
        metadata={
            "help": "auto: the engine's choice (same numbers whatever it picks). triton: the fused counter-based "
            "GPU kernel (its own random numbers, the same law; opt-in; needs the [gpu] extra)."
        },
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.to_smoothout_config()  # validate early, with the config's own messages

    def to_smoothout_config(self) -> SmoothOutConfig:
        """The `SmoothOutConfig` these arguments describe (``seed`` falls back to the run's ``seed``)."""
        values = {name: getattr(self, PREFIX + name) for name in SmoothOutConfig.field_names()}
        if values["seed"] is None:
            values["seed"] = getattr(self, "seed", None)
        return SmoothOutConfig(**values)


@dataclass
class SmoothOutTrainingArguments(SmoothOutArguments, TrainingArguments):
    """`TrainingArguments` plus the SmoothOut settings (validated at construction).

    Example:
        >>> SmoothOutTrainingArguments("out", smoothout_strength=0.05).to_smoothout_config().strength
        0.05
    """
