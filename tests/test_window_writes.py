"""Writes to the weights inside the noise window are refused, never silently undone; aliases the restore must see.

The restore puts back the clean weights; an update made during the forward or backward pass (an optimizer step
in a post-accumulate-grad hook, ``nn.Embedding(max_norm=...)``) would be lost with it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer

RESTORES = ["copy", "swap", "regenerate"]


def optimizer_in_backward(model: nn.Module) -> list[int]:
    """PyTorch's documented pattern: one optimizer per parameter, stepped in a post-accumulate-grad hook."""
    steps: list[int] = []
    optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def hook(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad()
        steps.append(1)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return steps


@pytest.mark.parametrize("restore", RESTORES)
def test_an_optimizer_step_inside_backward_is_refused_by_the_engine(restore):
    model = model_with_seed()
    steps = optimizer_in_backward(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0, restore=restore))
    clean = clone_params(model)
    batch = make_classification_data(n=8)[0]
    with pytest.raises(RuntimeError, match="written while the noise was in the weights"), engine.perturbed():
        model(batch["x"][None], batch["labels"][None])["loss"].backward()
    assert steps  # the fault fired
    assert not engine.is_perturbed
    for name, p in model.named_parameters():  # back at the values before the noise, not noisy
        if name not in engine.parameter_names:
            continue  # not perturbed (the norm layer): its in-backward update stands
        if restore == "regenerate":  # subtracts the redrawn noise: the update stays, the noise goes
            assert torch.isfinite(p).all() and not torch.equal(p.detach(), clean[name]), name
        else:
            assert torch.equal(p.detach(), clean[name]), name


def test_an_optimizer_step_inside_backward_stops_the_trainer(tmp_path):
    model = model_with_seed()
    steps = optimizer_in_backward(model)
    trainer = SmoothOutTrainer(
        model, training_args(tmp_path), train_dataset=make_classification_data(), smoothout_config=SmoothOutConfig()
    )
    with pytest.raises(RuntimeError, match="optimizer step inside backward"):
        trainer.train()
    assert steps and not trainer.smoothout.is_perturbed


def test_a_gradient_only_hook_is_not_refused():
    model = model_with_seed()
    seen: list[float] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda param: seen.append(float(param.grad.norm())))
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0))
    batch = make_classification_data(n=8)[0]
    with engine.perturbed():
        model(batch["x"][None], batch["labels"][None])["loss"].backward()
    assert seen


class WithEmbedding(nn.Module):
    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, max_norm=max_norm)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids)).sum()


def test_an_embedding_with_max_norm_is_refused_up_front_unless_excluded():
    torch.manual_seed(0)
    model = WithEmbedding(max_norm=0.5)
    with pytest.raises(ValueError, match=r"nn.Embedding\(max_norm=0.5\)"):
        SmoothOut(model, SmoothOutConfig(strength=0.05))
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, exclude=["embed"]))
    assert engine.parameter_names == ["head.weight", "head.bias"]
    SmoothOut(WithEmbedding(max_norm=None), SmoothOutConfig(strength=0.05))  # no max_norm: fine


def test_a_write_the_constructor_cannot_see_is_refused_at_restore():
    """max_norm set after the engine was built: the version counters still catch the in-place renorm."""
    torch.manual_seed(0)
    model = WithEmbedding(max_norm=None)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.5, seed=0, restore="copy"))
    model.embed.max_norm = 0.1
    with pytest.raises(RuntimeError, match=r"embed\.weight"), engine.perturbed():
        model(torch.tensor([1, 2, 3])).backward()


class AliasedWeight(nn.Module):
    """Keeps a plain-attribute alias of a weight (not a parameter or buffer) and computes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.w_t = self.lin.weight.data.t()
        self.out = nn.Linear(6, 3)

    def forward(self, x, labels=None):
        logits = self.out(torch.relu(x @ self.w_t + self.lin.bias))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_auto_copies_when_a_module_attribute_aliases_a_weight_and_trains_like_copy(tmp_path):
    finals = {}
    for restore in ("auto", "copy"):
        torch.manual_seed(0)
        model = AliasedWeight()
        trainer = SmoothOutTrainer(
            model,
            training_args(tmp_path / restore, max_steps=4),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=0.2, seed=0, restore=restore),
        )
        assert trainer.smoothout.restore_mode == "copy"
        trainer.train()
        finals[restore] = clone_params(model)
    for name, tensor in finals["copy"].items():
        assert torch.equal(finals["auto"][name], tensor), name


peft = pytest.importorskip("peft")


def lora_model():
    torch.manual_seed(0)
    return peft.get_peft_model(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), peft.LoraConfig(r=2, target_modules=["0", "2"])
    )


def test_merge_and_unload_leaves_no_wrapper_and_the_old_engine_cannot_perturb_the_merged_model():
    model = lora_model()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.3, space="lora_merged", seed=0))
    with engine.perturbed():
        pass
    merged = model.merge_and_unload()
    x = torch.randn(4, 8)
    before = merged(x)
    with pytest.raises(RuntimeError, match="no longer in the model"):
        engine.perturb()
    assert not engine.is_perturbed
    assert all("forward" not in layer.__dict__ for layer in merged.modules())  # no wrapper left behind
    assert torch.equal(merged(x), before)


def test_a_base_weight_unfrozen_after_the_engine_was_built_is_refused_at_arming():
    model = lora_model()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, space="lora_merged", seed=0))
    model.base_model.model[0].base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="unfrozen after the engine was built"):
        engine.perturb()
    assert not engine.is_perturbed
