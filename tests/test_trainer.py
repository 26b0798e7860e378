"""`SmoothOutTrainer` against plain `Trainer` and against hand-computed gradients."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TinyClassifier, assert_params_equal, clone_params, make_classification_data
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_smoothout import SmoothOutConfig, SmoothOutTrainer


def training_args(tmp_path, args_class: type = TrainingArguments, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return args_class(**values)


def model_with_seed(seed: int = 0, **kwargs) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier(**kwargs)


class Recorder:
    """Forward pre-hook that records the weights (and inputs) every training forward pass sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.model = model
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if module.training:
            self.weights.append(clone_params(module))
            self.inputs.append({k: v.detach().clone() for k, v in kwargs.items()})


class GradCapture(TrainerCallback):
    """Copies the accumulated gradients right before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.model = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def hand_gradient(model: torch.nn.Module, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
    params = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    loss = functional_call(model, params, (), inputs)["loss"]
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def test_zero_strength_is_bit_identical_to_plain_trainer(tmp_path):
    data = make_classification_data()
    plain_model = model_with_seed(dropout=0.1)
    Trainer(plain_model, training_args(tmp_path / "a", gradient_accumulation_steps=2), train_dataset=data).train()
    so_model = model_with_seed(dropout=0.1)
    trainer = SmoothOutTrainer(
        so_model,
        training_args(tmp_path / "b", gradient_accumulation_steps=2),
        train_dataset=data,
        smoothout_config=SmoothOutConfig(strength=0.0),
    )
    trainer.train()
    assert_params_equal(so_model, clone_params(plain_model))


def test_noise_does_not_disturb_the_global_rng(tmp_path):
    """Dropout masks and data order come from torch's global generator; noise has its own."""
    data = make_classification_data()
    draws = []
    for strength in (0.0, 0.1):
        model = model_with_seed(dropout=0.2)
        trainer = SmoothOutTrainer(
            model,
            training_args(tmp_path / str(strength), max_steps=3),
            train_dataset=data,
            smoothout_config=SmoothOutConfig(strength=strength),
        )
        trainer.train()
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(("samples", "accumulation"), [(1, 1), (3, 1), (2, 2)])
def test_gradient_equals_hand_gradient_at_perturbed_points(tmp_path, samples, accumulation):
    data = make_classification_data()
    model = model_with_seed()
    recorder = Recorder(model)
    capture = GradCapture()
    args = training_args(tmp_path, max_steps=2, gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
    trainer = SmoothOutTrainer(
        model,
        args,
        train_dataset=data,
        callbacks=[capture],
        smoothout_config=SmoothOutConfig(strength=0.2, samples=samples, seed=1),
    )
    trainer.train()
    passes = samples * accumulation
    assert len(recorder.weights) == 2 * passes and len(capture.grads) == 2
    reference = model_with_seed()
    for step in range(2):
        expected: dict[str, torch.Tensor] = {}
        for i in range(step * passes, (step + 1) * passes):
            g = hand_gradient(reference, recorder.weights[i], recorder.inputs[i])
            for n, v in g.items():
                expected[n] = expected.get(n, 0) + v / passes
        for n, v in expected.items():
            torch.testing.assert_close(capture.grads[step][n], v, rtol=1e-5, atol=1e-7, msg=n)
    # fresh noise for every pass, micro-batch and sample alike
    fc1 = [w["fc1.weight"] for w in recorder.weights]
    assert all(not torch.equal(fc1[i], fc1[j]) for i in range(len(fc1)) for j in range(i))
    # the untouched LayerNorm saw clean weights in every pass of a step
    for step in range(2):
        norms = [recorder.weights[i]["norm.weight"] for i in range(step * passes, (step + 1) * passes)]
        assert all(torch.equal(norms[0], n) for n in norms)


def test_loss_scaling_matches_plain_trainer_under_accumulation(tmp_path):
    """With noise too small to matter in fp32, the logged loss equals plain Trainer's, for K=1 and K=3."""
    data = make_classification_data()
    losses = {}
    for name, cls, cfg in [
        ("plain", Trainer, None),
        ("k1", SmoothOutTrainer, SmoothOutConfig(strength=1e-30, adapt="none")),
        ("k3", SmoothOutTrainer, SmoothOutConfig(strength=1e-30, adapt="none", samples=3)),
    ]:
        kwargs = {} if cfg is None else {"smoothout_config": cfg}
        trainer = cls(
            model_with_seed(),
            training_args(tmp_path / name, gradient_accumulation_steps=4),
            train_dataset=data,
            **kwargs,
        )
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses["plain"] == pytest.approx(losses["k1"], rel=1e-6)
    assert losses["plain"] == pytest.approx(losses["k3"], rel=1e-6)


class CleanWeightsChecker(TrainerCallback):
    """Snapshots weights after each optimizer step; evaluation must run on exactly those weights."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.eval_checks = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert not self.trainer_ref[0].smoothout.is_perturbed
        self.after_step[state.global_step] = clone_params(model)

    def eval_hook(self, module, args, kwargs):
        if not module.training:
            trainer = self.trainer_ref[0]
            assert not trainer.smoothout.is_perturbed
            assert_params_equal(module, self.after_step[trainer.state.global_step])
            self.eval_checks += 1


def test_every_training_step_leaves_clean_weights_and_eval_and_checkpoints_see_them(tmp_path):
    data = make_classification_data()
    model = model_with_seed()
    ref: list = []
    checker = CleanWeightsChecker(ref)
    model.register_forward_pre_hook(checker.eval_hook, with_kwargs=True)

    class Checked(SmoothOutTrainer):
        steps_checked = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            before = clone_params(model)
            loss = super().training_step(model, inputs, num_items_in_batch)
            assert_params_equal(model, before)
            Checked.steps_checked += 1
            return loss

    args = training_args(
        tmp_path,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=3,
        per_device_eval_batch_size=16,
    )
    trainer = Checked(
        model,
        args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[checker],
        smoothout_config=SmoothOutConfig(strength=0.5, seed=0),
    )
    ref.append(trainer)
    trainer.train()
    assert Checked.steps_checked == 12 and checker.eval_checks >= 3
    for step in (3, 6):
        saved = load_file(os.path.join(args.output_dir, f"checkpoint-{step}", "model.safetensors"))
        for name, tensor in saved.items():
            assert torch.equal(tensor, checker.after_step[step][name]), name


def test_weights_clean_when_forward_or_backward_raises(tmp_path):
    data = make_classification_data()
    model = model_with_seed()
    trainer = SmoothOutTrainer(
        model,
        training_args(tmp_path),
        train_dataset=data,
        smoothout_config=SmoothOutConfig(strength=0.5, samples=2, seed=0),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by train(); needed to call training_step directly
    batch = trainer.data_collator([data[i] for i in range(8)])
    clean = clone_params(model)

    model.fail_forward = True
    with pytest.raises(RuntimeError, match="forward failed"):
        trainer.training_step(model, batch)
    assert_params_equal(model, clean)
    model.fail_forward = False

    def explode(_grad):
        raise RuntimeError("backward failed")

    handle = model.fc2.weight.register_hook(explode)
    with pytest.raises(RuntimeError, match="backward failed"):
        trainer.training_step(model, batch)
    handle.remove()
    assert_params_equal(model, clean)
    assert not trainer.smoothout.is_perturbed


def test_strength_is_logged_with_the_schedule(tmp_path):
    data = make_classification_data()
    cfg = SmoothOutConfig(strength=0.1, schedule="anneal", seed=0)
    trainer = SmoothOutTrainer(model_with_seed(), training_args(tmp_path), train_dataset=data, smoothout_config=cfg)
    trainer.train()
    logged = [(h["step"], h["smoothout_strength"]) for h in trainer.state.log_history if "loss" in h]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    for step, value in logged:
        assert value == pytest.approx(0.1 * step ** (-0.55 / 2))  # last perturb was at optimizer step `step - 1`


def test_tanh_schedule_uses_max_steps(tmp_path):
    data = make_classification_data()
    cfg = SmoothOutConfig(strength=0.1, schedule="tanh", seed=0)
    trainer = SmoothOutTrainer(
        model_with_seed(), training_args(tmp_path, max_steps=10), train_dataset=data, smoothout_config=cfg
    )
    trainer.train()
    values = [h["smoothout_strength"] for h in trainer.state.log_history if "loss" in h]
    assert values == sorted(values) and values[4] == pytest.approx(
        0.1 * (torch.tanh(torch.tensor(10 * (4 / 10 - 0.5))).item() + 1) / 2
    )


def test_samples_refused_when_compute_loss_skips_super(tmp_path):
    class OwnLoss(SmoothOutTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs)["loss"]

    trainer = OwnLoss(
        model_with_seed(),
        training_args(tmp_path),
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(samples=2),
    )
    with pytest.raises(RuntimeError, match=r"super\(\)\.compute_loss"):
        trainer.train()


def test_regenerate_restore_trains_in_one_process(tmp_path):
    data = make_classification_data()
    model = model_with_seed()
    trainer = SmoothOutTrainer(
        model,
        training_args(tmp_path),
        train_dataset=data,
        smoothout_config=SmoothOutConfig(strength=0.05, restore="regenerate"),
    )
    trainer.train()
    assert trainer.smoothout.buffer_bytes < sum(p.numel() * 4 for p in model.parameters()) + 70_000
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ShiftingOptimizer(torch.optim.SGD):
    """Schedule-free-like: train()/eval() rewrite the weights (shift by +1 / -1)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.mode = "eval"

    @torch.no_grad()
    def _switch(self, mode: str, shift: float) -> None:
        if self.mode != mode:
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(shift)
        self.mode = mode

    def train(self):
        self._switch("train", 1.0)

    def eval(self):
        self._switch("eval", -1.0)


def test_optimizer_train_mode_switch_happens_before_perturbing(tmp_path):
    data = make_classification_data()
    model = model_with_seed()
    clean = clone_params(model)
    optimizer = ShiftingOptimizer(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = SmoothOutTrainer(
        model,
        training_args(tmp_path),
        train_dataset=data,
        optimizers=(optimizer, scheduler),
        smoothout_config=SmoothOutConfig(strength=0.3),
    )
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.training_step(model, batch)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), clean[name] + 1.0), name


def test_bf16_autocast_runs_and_warns_below_resolution(tmp_path):
    data = make_classification_data()
    model = model_with_seed()
    with pytest.warns(UserWarning, match="resolution"):  # at construction, before any work
        trainer = SmoothOutTrainer(
            model,
            training_args(tmp_path, bf16=True),
            train_dataset=data,
            smoothout_config=SmoothOutConfig(strength=1e-4),
        )
    trainer.train()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())

    import warnings

    trainer = SmoothOutTrainer(
        model_with_seed(),
        training_args(tmp_path / "b", bf16=True),
        train_dataset=data,
        smoothout_config=SmoothOutConfig(strength=0.05),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resolution.*")
        trainer.train()


def test_lomo_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="during the backward"):
        SmoothOutTrainer(
            model_with_seed(), training_args(tmp_path, optim="lomo"), train_dataset=make_classification_data()
        )


@pytest.mark.parametrize(
    ("environment", "refused"),
    [({}, True), ({"FSDP_VERSION": "1"}, True), ({"FSDP_VERSION": "2"}, False), (None, False)],
)
def test_fsdp1_is_refused_and_fsdp2_accepted(monkeypatch, environment, refused):
    """FSDP1 flattens parameters (rows split anywhere); FSDP2 shards each weight along its rows. The plugin is
    built from the environment as ``accelerate launch`` sets it (accelerate's default there is version 1)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_smoothout.compat import check_trainer_setup

    monkeypatch.delenv("FSDP_VERSION", raising=False)
    for key, value in (environment or {}).items():
        monkeypatch.setenv(key, value)
    plugin = None if environment is None else FullyShardedDataParallelPlugin()
    trainer = SimpleNamespace(
        args=SimpleNamespace(optim="adamw_torch"),
        is_fsdp_enabled=plugin is not None,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    )
    if refused:
        with pytest.raises(ValueError, match=r"FSDP1.*Use FSDP2"):
            check_trainer_setup(trainer)
    else:
        check_trainer_setup(trainer)


def test_plain_training_arguments_get_default_config_seeded_by_args(tmp_path):
    trainer = SmoothOutTrainer(
        model_with_seed(), training_args(tmp_path, seed=123), train_dataset=make_classification_data()
    )
    assert trainer.smoothout_config == SmoothOutConfig(seed=123)
