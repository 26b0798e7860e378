"""LoRA fine-tuning in the recipes: ``--lora_r 8`` wraps the model with PEFT before training.

With LoRA, SmoothOut has two spaces (``--smoothout_space``): ``trainable`` perturbs the adapters, and
``lora_merged`` perturbs every LoRA layer's effective weight ``W + s*B*A`` (Flat-LoRA style) without ever
writing the frozen base weights.

Example:
    >>> from transformers import HfArgumentParser
    >>> (lora,) = HfArgumentParser(LoraArguments).parse_args_into_dataclasses(["--lora_r", "8"])
    >>> lora.enabled, lora.target_modules()
    (True, 'all-linear')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import RecipeError


@dataclass
class LoraArguments:
    """PEFT LoRA settings; ``--lora_r 0`` (the default) fine-tunes every weight."""

    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank r; 0 fine-tunes every weight (no PEFT). Needs `pip install peft`."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names (or regex suffixes) that get adapters; all-linear: every Linear layer except the "
            "output head (the head is trained in full)."
        },
    )

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0

    def target_modules(self) -> str | list[str]:
        """What ``LoraConfig.target_modules`` takes: the ``"all-linear"`` shortcut as a string, else the list."""
        return "all-linear" if self.lora_target_modules == ["all-linear"] else list(self.lora_target_modules)

    def check(self) -> None:
        if self.lora_r < 0:
            raise RecipeError(f"--lora_r must be >= 0 (0: no LoRA), got {self.lora_r}.")
        if self.enabled and self.lora_alpha <= 0:
            raise RecipeError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RecipeError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def describe(self) -> dict[str, Any] | None:
        """The settings for logs and model cards (``None`` without LoRA)."""
        if not self.enabled:
            return None
        return {
            "r": self.lora_r,
            "alpha": self.lora_alpha,
            "dropout": self.lora_dropout,
            "targets": self.target_modules(),
        }


def apply_lora(model: Any, lora: LoraArguments, task_type: str) -> Any:
    """``model`` wrapped by ``peft.get_peft_model`` (the classification head stays fully trainable)."""
    if not lora.enabled:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise RecipeError("--lora_r needs PEFT: pip install peft (or pip install 'hf-smoothout[lora]').") from err
    config = LoraConfig(
        task_type=task_type,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules(),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise RecipeError(f"LoRA could not wrap the model ({err}); check --lora_target_modules.") from err
