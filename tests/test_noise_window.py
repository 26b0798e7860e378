"""The noise window: only the loss's forward and backward passes ever see noise.

Everything else the Trainer runs (evaluation, checkpoints, callbacks, ``load_best_model_at_end``) sees the clean
weights, also when the micro-batch loop ends before a ``noise_every="step"`` window's last micro-batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyClassifier, clone_params, make_classification_data
from safetensors.torch import load_file
from test_trainer import model_with_seed, training_args
from torch import nn
from transformers import TrainerCallback

import hf_smoothout.restore.copy as copy_restore
from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.noise import NonFiniteNoiseError

ACCUMULATION = 2
STRENGTH = 0.2


class IterableExamples(torch.utils.data.IterableDataset):
    """An epoch of ``n`` examples with no length: with batch 4 and accumulation 2, ``n=20`` ends an epoch after
    the first micro-batch of a window (5 micro-batches)."""

    def __init__(self, n: int = 20) -> None:
        self.items = list(make_classification_data(n=n))

    def __iter__(self):
        return iter(self.items)


class NoiseWatch(TrainerCallback):
    """Records, at every callback event and every evaluation forward pass, whether the weights held noise, and
    the weights at each save."""

    def __init__(self, trainer: SmoothOutTrainer) -> None:
        self.trainer = trainer
        self.noisy_events: list[str] = []
        self.events: list[str] = []
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.eval_forwards = 0
        trainer.model.register_forward_pre_hook(self._forward)

    def _noisy(self) -> bool:
        engine = self.trainer.smoothout
        return engine is not None and engine.is_noisy

    def _forward(self, module, args):
        if not module.training:
            self.eval_forwards += 1
            if self._noisy():
                self.noisy_events.append("evaluation forward")

    def _event(self, name: str) -> None:
        self.events.append(name)
        if self._noisy():
            self.noisy_events.append(name)

    def on_substep_end(self, args, state, control, **kwargs):
        self._event("on_substep_end")

    def on_step_end(self, args, state, control, **kwargs):
        self._event("on_step_end")

    def on_epoch_end(self, args, state, control, **kwargs):
        self._event("on_epoch_end")

    def on_evaluate(self, args, state, control, **kwargs):
        self._event("on_evaluate")

    def on_save(self, args, state, control, model=None, **kwargs):
        self._event("on_save")
        self.saved[state.global_step] = clone_params(model)

    def on_train_end(self, args, state, control, **kwargs):
        self._event("on_train_end")


class StopMidWindow(TrainerCallback):
    """Sets ``should_training_stop`` after the first micro-batch of window ``at_step`` (a budget, early stopping)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            control.should_training_stop = True


def window_trainer(tmp_path, restore: str, train_dataset=None, **overrides) -> tuple[SmoothOutTrainer, NoiseWatch]:
    values = dict(
        gradient_accumulation_steps=ACCUMULATION,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=2,
    )
    values.update(overrides)
    trainer = SmoothOutTrainer(
        model_with_seed(),
        training_args(tmp_path, **values),
        train_dataset=train_dataset if train_dataset is not None else make_classification_data(),
        eval_dataset=make_classification_data(n=16, seed=1),
        smoothout_config=SmoothOutConfig(strength=STRENGTH, seed=3, noise_every="step", restore=restore),
    )
    watch = NoiseWatch(trainer)
    trainer.add_callback(watch)
    return trainer, watch


def assert_checkpoints_hold_what_was_saved(tmp_path, watch: NoiseWatch) -> None:
    assert watch.saved, "no checkpoint was written"
    for step, weights in watch.saved.items():
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert (folder / "trainer_state.json").is_file(), f"{folder} is half-written"
        stored = load_file(str(folder / "model.safetensors"))
        for name, tensor in weights.items():
            assert torch.equal(stored[name], tensor), f"checkpoint-{step} {name}"


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_an_iterable_epoch_ending_mid_window_leaves_evaluation_and_checkpoints_clean(tmp_path, restore):
    trainer, watch = window_trainer(tmp_path, restore, train_dataset=IterableExamples(20))
    trainer.train()
    assert watch.eval_forwards > 0 and "on_epoch_end" in watch.events
    assert watch.noisy_events == []
    assert_checkpoints_hold_what_was_saved(tmp_path, watch)
    assert not trainer.smoothout.is_perturbed
    # every checkpoint resumes (the noise state of a window left mid-way is consistent)
    resumed, _ = window_trainer(tmp_path, restore, train_dataset=IterableExamples(20))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 6


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_a_callback_stopping_training_mid_window_saves_a_clean_complete_checkpoint(tmp_path, restore):
    trainer, watch = window_trainer(tmp_path, restore, save_strategy="epoch", eval_strategy="epoch")
    trainer.add_callback(StopMidWindow(at_step=3))
    clean_after_step_3: list[dict[str, torch.Tensor]] = []

    class AtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                clean_after_step_3.append(clone_params(model))

    trainer.add_callback(AtStepEnd())
    trainer.train()
    assert trainer.state.global_step == 3 and watch.noisy_events == []
    assert list(watch.saved) == [3]
    for name, tensor in clean_after_step_3[0].items():  # what was saved is the clean post-step model
        assert torch.equal(watch.saved[3][name], tensor), name
    assert_checkpoints_hold_what_was_saved(tmp_path, watch)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), clean_after_step_3[0][name]), name
    resumed, _ = window_trainer(tmp_path, restore, save_strategy="epoch", eval_strategy="epoch")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_load_best_model_at_end_after_a_stop_mid_window_keeps_the_best_checkpoint(tmp_path, restore):
    trainer, watch = window_trainer(
        tmp_path, restore, save_steps=1, load_best_model_at_end=True, metric_for_best_model="loss"
    )
    trainer.add_callback(StopMidWindow(at_step=4))
    trainer.train()
    assert watch.noisy_events == []
    best = trainer.state.best_model_checkpoint
    stored = load_file(str(tmp_path / "out" / best.split("/")[-1] / "model.safetensors"))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), stored[name]), name
    assert_checkpoints_hold_what_was_saved(tmp_path, watch)


@pytest.mark.parametrize("noise_every", ["micro_batch", "step"])
def test_callbacks_and_evaluation_never_see_noise(tmp_path, noise_every):
    trainer, watch = window_trainer(tmp_path, "copy")
    trainer.smoothout_config = SmoothOutConfig(strength=STRENGTH, seed=3, noise_every=noise_every)
    trainer.smoothout = None
    trainer.train()
    assert {"on_substep_end", "on_step_end", "on_evaluate", "on_save"} <= set(watch.events)
    assert watch.noisy_events == [] and watch.eval_forwards > 0


class PoisonedWhenNoisy(TinyClassifier):
    """The loss is non-finite at the noisy weights of every other training micro-batch (the first of each
    window), finite at the clean weights: noise far too strong for some batches."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: SmoothOut | None = None
        self.training_calls = 0
        self.poisoned = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training and labels is not None and self.engine is not None and self.engine.is_noisy:
            self.training_calls += 1
            if self.training_calls % ACCUMULATION == 1:
                self.poisoned += 1
                out["loss"] = out["loss"] * float("inf")
        return out


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_a_non_finite_loss_in_a_middle_micro_batch_of_a_step_window_is_refused_with_clean_weights(tmp_path, restore):
    torch.manual_seed(0)
    model = PoisonedWhenNoisy()
    initial = clone_params(model)
    trainer = SmoothOutTrainer(
        model,
        training_args(tmp_path, gradient_accumulation_steps=ACCUMULATION, per_device_train_batch_size=4),
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(strength=STRENGTH, seed=3, noise_every="step", restore=restore),
    )
    model.engine = trainer.smoothout_engine()
    with pytest.raises(NonFiniteNoiseError, match="the noise is far too strong"):
        trainer.train()
    assert model.poisoned == 1  # the fault fired, in the window's first (middle) micro-batch
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p.detach(), initial[name]), name
    assert not trainer.smoothout.is_perturbed


def test_the_window_state_counts_a_suspended_window_as_drawn():
    engine = SmoothOut(model_with_seed(), SmoothOutConfig(strength=0.1, seed=0))
    engine.perturb()
    with pytest.raises(RuntimeError, match="perturbed"):
        engine.state_dict()
    engine.suspend()
    assert engine.state_dict()["draws"] == 1
    engine.restore()
    assert engine.state_dict()["draws"] == 1
    assert json.dumps(engine.state_dict())  # plain values


# ---------------------------------------------------------------------------- the window's own failure paths
def test_a_failure_allocating_the_held_buffers_at_suspend_leaves_clean_weights(monkeypatch):
    model = model_with_seed()
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, seed=0, restore="copy"))
    engine.perturb()

    calls = {"n": 0}

    def out_of_memory(slot):
        calls["n"] += 1
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(copy_restore, "_held_buffer", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        engine.suspend()
    assert calls["n"] == 1 and not engine.is_perturbed
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), clean[name]), name


def test_a_failed_perturb_raises_its_own_error_not_a_write_in_the_window():
    layer = nn.Linear(4, 4, bias=False)
    engine = SmoothOut(layer, SmoothOutConfig(strength=0.5, seed=0, schedule="cosine"))
    with engine.perturbed(10, 100):
        pass
    with torch.no_grad():
        layer.weight[0, 0] = 3.0e38  # finite, but noise of strength 0.5 overflows it
    with pytest.raises(NonFiniteNoiseError):
        engine.perturb(100, 100)
    assert not engine.is_perturbed


def test_a_failed_redraw_at_resume_still_counts_the_window_s_draw():
    layer = nn.Linear(4, 4)
    engine = SmoothOut(layer, SmoothOutConfig(strength=0.1, seed=0, restore="copy"))
    engine.perturb()
    engine.suspend()
    layer.weight = nn.Parameter(layer.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced"):
        engine.resume()
    assert not engine.is_perturbed and engine.state_dict()["draws"] == 1


peft = pytest.importorskip("peft")


def lora_model(targets=("0", "2")) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=list(targets)))


def test_a_merged_space_engine_without_per_parameter_noise_suspends_and_resumes():
    model = lora_model()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))
    assert engine.parameter_names == [] and engine.restore_mode == "copy"
    x = torch.randn(3, 8)
    engine.perturb()
    noisy = model(x)
    engine.suspend()
    clean = model(x)
    engine.resume()
    assert torch.equal(model(x), noisy) and not torch.equal(noisy, clean)
    engine.restore()


def test_resume_that_cannot_rearm_the_merged_space_leaves_clean_weights():
    model = lora_model()
    head = model.base_model.model[4]
    head.weight.requires_grad_(True)  # a trained non-adapter weight (like modules_to_save): per-parameter noise
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, space="lora_merged", seed=0))
    clean = head.weight.detach().clone()
    engine.perturb()
    engine.suspend()
    model.base_model.model[0].base_layer.weight.requires_grad_(True)  # arming now refuses
    with pytest.raises(RuntimeError, match="unfrozen"):
        engine.resume()
    engine.restore()
    assert torch.equal(head.weight, clean)


@pytest.mark.parametrize("selection", [{"exclude": [r"model\.0\."]}, {"include": [r"model\.4\."]}])
def test_merged_space_layers_left_out_by_include_or_exclude_do_not_break_the_adapter_check(selection):
    model = lora_model(("0", "2", "4"))
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0, **selection))
    with engine.perturbed():
        model(torch.randn(3, 8)).sum().backward()
    assert 0 < len(engine.merged_layer_names) < 3


def test_merged_space_with_one_draw_per_step_trains_through_the_trainer(tmp_path):
    from datasets import Dataset

    model = lora_model()
    data = [{"x": torch.randn(8).tolist(), "labels": i % 2} for i in range(16)]

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, labels):
            logits = self.inner(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    wrapped = Wrapper(model)
    trainer = SmoothOutTrainer(
        wrapped,
        training_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=3),
        train_dataset=Dataset.from_list(data).with_format("torch"),
        smoothout_config=SmoothOutConfig(strength=0.05, space="lora_merged", noise_every="step", seed=0),
    )
    base = model.base_model.model[0].base_layer.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 3 and not trainer.smoothout.is_perturbed
    assert torch.equal(model.base_model.model[0].base_layer.weight, base)
