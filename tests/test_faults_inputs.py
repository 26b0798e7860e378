"""Faults in what users pass: config immutability and type strictness, implausible strengths, non-finite noise
and losses, early checks at construction, mixed precision on CPU."""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.engine import NonFiniteNoiseError

pytestmark = pytest.mark.usefixtures("draw_on_workers")
ROOT = Path(__file__).resolve().parents[1]
MAIN_THREAD = threading.main_thread().ident


# ---------------------------------------------------------------------------------------------- 3-4. config
def test_config_is_immutable_and_replace_revalidates():
    cfg = SmoothOutConfig(exclude=["classifier"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.exclude = ["fc1"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strength = -0.05
    with pytest.raises(AttributeError):
        cfg.exclude.append("fc1")  # a tuple
    with pytest.raises(ValueError, match="strength"):
        dataclasses.replace(cfg, strength=-0.05)
    with pytest.raises(ValueError, match="strength"):
        dataclasses.replace(cfg, strength=float("nan"))
    with pytest.raises(ValueError, match="samples"):
        dataclasses.replace(cfg, samples=0)
    assert not dataclasses.replace(cfg, exclude=["fc1"]).selects_name("fc1.weight")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"denoise": "no"}, "denoise"),
        ({"denoise": 0}, "denoise"),
        ({"skip_norm_layers": "false"}, "skip_norm_layers"),
        ({"skip_bias": 1}, "skip_bias"),
        ({"independent_ranks": None}, "independent_ranks"),
        ({"anneal_index": "0.5"}, "anneal_index"),
        ({"tanh_scale": "10"}, "tanh_scale"),
        ({"include": [1]}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"adapt": ["filter"]}, "adapt"),
    ],
)
def test_python_config_is_as_strict_as_the_cli(kwargs, field):
    with pytest.raises(ValueError, match=rf"SmoothOutConfig\.{field}"):
        SmoothOutConfig(**kwargs)


def test_largest_seed_is_accepted_and_distinct_from_zero(tiny_model):
    top = SmoothOut(tiny_model, SmoothOutConfig(seed=2**64 - 1))
    zero = SmoothOut(nn.Linear(6, 8), SmoothOutConfig(seed=0))
    assert top.base_seed != zero.base_seed


# ---------------------------------------------------------------------------------------------- 5. strength bounds
@pytest.mark.parametrize(("adapt", "strength"), [("filter", 1e30), ("weight", 3.0), ("none", 10.0)])
def test_implausible_strength_warns(tiny_model, adapt, strength):
    with pytest.warns(UserWarning, match="larger than the weights"):
        SmoothOut(tiny_model, SmoothOutConfig(strength=strength, adapt=adapt))


def test_plausible_strength_does_not_warn(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmoothOut(tiny_model, SmoothOutConfig(strength=0.05))
        SmoothOut(tiny_model, SmoothOutConfig(strength=1e-3, adapt="none"))


def test_overflowing_noise_is_refused_and_undone(tiny_model):
    with pytest.warns(UserWarning):
        engine = SmoothOut(tiny_model, SmoothOutConfig(strength=1e38, adapt="weight", seed=0))
    with torch.no_grad():
        tiny_model.fc1.weight.mul_(100.0)  # |w| * a overflows float32
    clean = clone_params(tiny_model)
    with pytest.raises(NonFiniteNoiseError, match="non-finite"):
        engine.perturb()
    assert not engine.is_perturbed
    assert_params_equal(tiny_model, clean)


class NoNormClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def test_non_finite_loss_at_noisy_weights_stops_training_with_clean_weights(tmp_path):
    torch.manual_seed(0)
    model = NoNormClassifier()
    clean = clone_params(model)
    with pytest.warns(UserWarning, match="larger than the weights"):
        trainer = SmoothOutTrainer(
            model,
            training_args(tmp_path, max_steps=4),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=1e30, adapt="none", seed=0),
        )
    with pytest.raises(NonFiniteNoiseError, match="clean loss"):
        trainer.train()
    assert_params_equal(model, clean)  # refused at the first step, before any update


# ---------------------------------------------------------------------------------------------- 7. early checks
@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (SmoothOutConfig(include=["decoder"]), "selects no trainable parameter"),
        (SmoothOutConfig(include=["fc1"]), "only match frozen parameters"),
    ],
)
def test_empty_selection_fails_at_construction(tmp_path, cfg, message):
    model = model_with_seed()
    model.fc1.requires_grad_(False)
    with pytest.raises(ValueError, match=message):
        SmoothOutTrainer(model, training_args(tmp_path), train_dataset=make_classification_data(), smoothout_config=cfg)


def test_regenerate_with_independent_ranks_fails_at_construction(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    args = training_args(tmp_path)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="regenerate"):
        SmoothOutTrainer(
            model_with_seed(),
            args,
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(restore="regenerate"),
        )


# ---------------------------------------------------------------------------------------------- 9. fp16 on CPU
def test_fp16_on_cpu_does_not_warn_about_fp16_resolution(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SmoothOutTrainer(
            model_with_seed(),
            training_args(tmp_path, fp16=True, max_steps=1),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=1e-5, seed=0),
        )
        trainer.train()
    assert not [w for w in caught if "resolution" in str(w.message)]


def test_bf16_on_cpu_still_warns_about_resolution_at_construction(tmp_path):
    with pytest.warns(UserWarning, match="resolution"):
        SmoothOutTrainer(
            model_with_seed(),
            training_args(tmp_path, bf16=True, max_steps=1),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=1e-5, seed=0),
        )
