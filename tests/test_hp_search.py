"""``hyperparameter_search`` (optuna): every trial trains with its own ``smoothout_*`` values, from a fresh
noise position."""

from __future__ import annotations

import pytest
import torch
from conftest import clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from transformers import TrainerCallback

from hf_smoothout import (
    STRENGTH_SEARCH_RANGES,
    SmoothOutConfig,
    SmoothOutTrainer,
    SmoothOutTrainingArguments,
    smoothout_hp_space,
)

optuna = pytest.importorskip("optuna")

GRID = [0.3, 0.0, 0.1]


class FirstForward(TrainerCallback):
    """Per ``train`` call: the weights of the first training forward pass, the clean weights before it, the
    engine's strength and its draw count at the end."""

    def __init__(self) -> None:
        self.trials: list[dict] = []
        self._hooked: set[int] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        entry = {"clean": clone_params(model), "seen": None}
        self.trials.append(entry)
        if id(model) not in self._hooked:
            self._hooked.add(id(model))

            def hook(module, inputs):
                current = self.trials[-1]
                if module.training and current["seen"] is None:
                    current["seen"] = clone_params(module)

            model.register_forward_pre_hook(hook)

    def on_train_end(self, args, state, control, **kwargs):
        self.trials[-1]["strength"] = self.trainer.smoothout.current_strength if self.trainer.smoothout else 0.0
        self.trials[-1]["draws"] = self.trainer.smoothout.state_dict()["draws"] if self.trainer.smoothout else 0


def relative_row_noise(seen: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> float:
    weight, noisy = clean["fc1.weight"], seen["fc1.weight"]
    return float(((noisy - weight).norm(dim=1) / weight.norm(dim=1)).mean())


def search_trainer(tmp_path, strength: float) -> SmoothOutTrainer:
    args = training_args(
        tmp_path, SmoothOutTrainingArguments, max_steps=3, logging_steps=500, smoothout_strength=strength
    )
    return SmoothOutTrainer(
        model_init=lambda trial=None: model_with_seed(),
        args=args,
        train_dataset=make_classification_data(),
        eval_dataset=make_classification_data(n=16, seed=1),
    )


@pytest.mark.parametrize("built_with", [0.01, 0.0])
def test_each_trial_trains_with_its_own_strength_from_a_fresh_noise_position(tmp_path, built_with):
    trainer = search_trainer(tmp_path, built_with)
    watch = FirstForward()
    watch.trainer = trainer
    trainer.add_callback(watch)
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"smoothout_strength": GRID[trial.number]},  # one trial per value, in order
        backend="optuna",
        n_trials=len(GRID),
        direction="minimize",
    )
    assert len(watch.trials) == len(GRID)
    measured = {}
    for trial in watch.trials:
        measured[trial["strength"]] = relative_row_noise(trial["seen"], trial["clean"])
        # 3 steps, 3 draws: no noise position carried over from an earlier trial (strength 0 draws nothing)
        assert trial["draws"] == (3 if trial["strength"] else 0)
    assert sorted(measured) == sorted(GRID)
    assert measured[0.0] == 0.0
    assert measured[0.3] == pytest.approx(0.3, rel=1e-4) and measured[0.1] == pytest.approx(0.1, rel=1e-4)
    assert best.objective == best.objective  # a finite objective came back
    # a trial's noise is that of a standalone run with the same settings (not a function of earlier trials)
    alone = SmoothOutTrainer(
        model_with_seed(),
        search_trainer(tmp_path / "alone", 0.3).args,
        train_dataset=make_classification_data(),
    )
    alone_watch = FirstForward()
    alone_watch.trainer = alone
    alone.add_callback(alone_watch)
    alone.train()
    trial = next(t for t in watch.trials if t["strength"] == 0.3)
    for name, tensor in alone_watch.trials[0]["seen"].items():
        assert torch.equal(tensor, trial["seen"][name]), name


def test_the_default_search_space_suggests_log_uniform_strengths_per_law():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for adapt, (low, high) in STRENGTH_SEARCH_RANGES.items():
        space = smoothout_hp_space(adapt)
        values = [space(study.ask()) for _ in range(20)]
        assert all(low <= v["smoothout_strength"] <= high and v["smoothout_adapt"] == adapt for v in values)
        SmoothOutConfig(strength=values[0]["smoothout_strength"], adapt=adapt)  # valid settings
    with pytest.raises(ValueError, match="0 < low < high"):
        smoothout_hp_space("none", low=0.0)
    with pytest.raises(ValueError, match="Unknown adapt"):
        smoothout_hp_space("gaussian")
