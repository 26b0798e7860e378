"""``--model_type bn_mlp``: the authors' fully connected classifier with batch norm, as a transformers model.

``input -> num_hidden_layers x (Linear(hidden_size), BatchNorm1d, ReLU) -> Linear(num_labels)`` on the
flattened image: with the defaults (5 x 512 on 28 x 28 grayscale) the network of the SmoothOut paper's
MNIST/Fashion-MNIST experiments (``models/mnist_f1.py`` in ``wenwei202/smoothout``) and of the studies
(1,462,794 parameters). PyTorch's default initialization, as the authors use. Importing this module
registers it with ``AutoConfig`` and ``AutoModelForImageClassification``.

Example:
    >>> from transformers import AutoConfig, AutoModelForImageClassification
    >>> config = AutoConfig.for_model("bn_mlp", num_labels=10)
    >>> sum(p.numel() for p in AutoModelForImageClassification.from_config(config).parameters())
    1462794
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class BatchNormMLPConfig(PretrainedConfig):
    """Width, depth and input shape of `BatchNormMLPForImageClassification`."""

    model_type = "bn_mlp"

    def __init__(
        self,
        hidden_size: int = 512,
        num_hidden_layers: int = 5,
        num_channels: int = 1,
        image_size: int = 28,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_channels = num_channels
        self.image_size = image_size
        super().__init__(**kwargs)


class BatchNormMLPForImageClassification(PreTrainedModel):
    """Flattened pixels through ``num_hidden_layers`` x (Linear, BatchNorm1d, ReLU), then a linear classifier."""

    config_class = BatchNormMLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"

    def __init__(self, config: BatchNormMLPConfig) -> None:
        super().__init__(config)
        width = config.num_channels * config.image_size * config.image_size
        layers: list[nn.Module] = []
        for _ in range(config.num_hidden_layers):
            layers += [nn.Linear(width, config.hidden_size), nn.BatchNorm1d(config.hidden_size), nn.ReLU()]
            width = config.hidden_size
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
            module.reset_parameters()  # PyTorch's defaults, as in the authors' script

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        logits = self.classifier(self.body(pixel_values.flatten(1)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register("bn_mlp", BatchNormMLPConfig, exist_ok=True)
AutoModelForImageClassification.register(BatchNormMLPConfig, BatchNormMLPForImageClassification, exist_ok=True)
