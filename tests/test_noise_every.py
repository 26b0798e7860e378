"""``noise_every="step"``: one draw held over a gradient-accumulation window, removed before the optimizer step."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import Recorder, model_with_seed, training_args
from transformers import TrainerCallback

from hf_smoothout import SmoothOutConfig, SmoothOutTrainer, SmoothOutTrainingArguments

ACCUMULATION = 4


class CleanAtStepChecker(TrainerCallback):
    """Records the clean weights at each window's start and what the optimizer, eval and saves see."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref
        self.window_start: list[dict[str, torch.Tensor]] = []
        self.at_optimizer_step: list[dict[str, torch.Tensor]] = []
        self.perturbed_at_step: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.window_start.append(clone_params(model))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.at_optimizer_step.append(clone_params(model))
        self.perturbed_at_step.append(self.trainer_ref[0].smoothout.is_perturbed)


def step_trainer(tmp_path, model, **overrides) -> SmoothOutTrainer:
    values = dict(max_steps=3, gradient_accumulation_steps=ACCUMULATION, per_device_train_batch_size=4)
    values.update(overrides)
    return SmoothOutTrainer(
        model,
        training_args(tmp_path, **values),
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(strength=0.2, seed=3, noise_every="step"),
    )


def test_one_draw_per_window_and_clean_weights_at_the_optimizer_step(tmp_path):
    model = model_with_seed()
    recorder = Recorder(model)
    trainer = step_trainer(tmp_path, model)
    checker = CleanAtStepChecker([trainer])
    trainer.add_callback(checker)
    trainer.train()
    seen = recorder.weights
    assert len(seen) == 3 * ACCUMULATION
    for window in range(3):
        first = seen[window * ACCUMULATION]
        for later in seen[window * ACCUMULATION + 1 : (window + 1) * ACCUMULATION]:
            assert all(torch.equal(first[k], later[k]) for k in first)  # the same noise over the window
        assert not torch.equal(first["fc1.weight"], checker.window_start[window]["fc1.weight"])  # noisy
        for name, clean in checker.window_start[window].items():  # the optimizer steps on the clean weights
            assert torch.equal(checker.at_optimizer_step[window][name], clean), name
    assert checker.perturbed_at_step == [False, False, False]
    assert trainer.smoothout.state_dict()["draws"] == 3  # one draw per optimizer step
    assert not torch.equal(seen[0]["fc1.weight"], seen[ACCUMULATION]["fc1.weight"])  # a fresh draw next window


def test_gradient_is_the_window_average_at_one_noisy_point(tmp_path):
    model = model_with_seed()
    recorder = Recorder(model)
    grads: list[dict[str, torch.Tensor]] = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    trainer = step_trainer(tmp_path, model, max_steps=1, max_grad_norm=0.0)
    trainer.add_callback(Grab())
    trainer.train()
    noisy = recorder.weights[0]
    reference = model_with_seed()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(noisy[name])
    for inputs in recorder.inputs:
        (reference(**inputs)["loss"] / ACCUMULATION).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[0][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_error_mid_window_leaves_clean_weights(tmp_path):
    model = model_with_seed()
    trainer = step_trainer(tmp_path, model)
    calls = {"n": 0}

    def fail_on_second_micro_batch(module, args):
        calls["n"] += 1
        if calls["n"] == 2:  # second micro-batch of the first window: the weights are noisy now
            raise RuntimeError("forward failed on purpose")

    model.register_forward_pre_hook(fail_on_second_micro_batch)
    clean = clone_params(model)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.train()
    assert not trainer.smoothout.is_perturbed
    assert_params_equal(model, clean)


def test_error_between_micro_batches_leaves_clean_weights(tmp_path, monkeypatch):
    model = model_with_seed()
    trainer = step_trainer(tmp_path, model)
    clean = clone_params(model)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # outside training_step, while the window's noise is in the weights

    monkeypatch.setattr(trainer, "floating_point_ops", fail)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.smoothout.is_perturbed is False
    assert_params_equal(model, clean)


def test_resume_is_bit_exact_with_one_draw_per_step(tmp_path):
    cfg = SmoothOutConfig(strength=0.2, seed=5, noise_every="step")
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=ACCUMULATION)
    data = make_classification_data()
    full_model = model_with_seed(dropout=0.1)
    SmoothOutTrainer(
        full_model, training_args(tmp_path / "full", **common), train_dataset=data, smoothout_config=cfg
    ).train()
    resumed_model = model_with_seed(dropout=0.1)
    resumed = SmoothOutTrainer(
        resumed_model, training_args(tmp_path / "resumed", **common), train_dataset=data, smoothout_config=cfg
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert_params_equal(resumed_model, clone_params(full_model))


def test_without_accumulation_it_equals_micro_batch_noise(tmp_path):
    data = make_classification_data()
    models = []
    for every in ("micro_batch", "step"):
        model = model_with_seed()
        SmoothOutTrainer(
            model,
            training_args(tmp_path / every, max_steps=4),
            train_dataset=data,
            smoothout_config=SmoothOutConfig(strength=0.2, seed=1, noise_every=every),
        ).train()
        models.append(model)
    assert_params_equal(models[1], clone_params(models[0]))


def test_flag_and_config_validation():
    args = SmoothOutTrainingArguments("out", smoothout_noise_every="step")
    assert args.to_smoothout_config().noise_every == "step"
    with pytest.raises(ValueError, match="noise_every"):
        SmoothOutConfig(noise_every="window")
    with pytest.raises(ValueError, match="noise_every='micro_batch'"):
        SmoothOutConfig(noise_every="step", samples=2)
