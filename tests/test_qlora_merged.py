"""``space="lora_merged"`` on quantized bases (QLoRA): bitsandbytes 4-bit (nf4, fp4) and 8-bit, on CPU.

The base's quantized state must stay bit-identical (it is only ever dequantized), and the adapters' gradients must
equal the hand gradient at ``dequant(W) + tau`` (the same noisy weight the armed forward reports).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
peft = pytest.importorskip("peft")

from hf_smoothout import SmoothOut, SmoothOutConfig  # noqa: E402


def quantized(kind: str, linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, quant_type=kind, compute_dtype=torch.float32
            )
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu")  # bitsandbytes quantizes on the move


def qlora_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        quantized(kind, nn.Linear(32, 24)), nn.ReLU(), quantized(kind, nn.Linear(24, 16)), nn.Linear(16, 3)
    )
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    with torch.no_grad():  # a trained-looking adapter: the merged weight differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            state[f"{name}.weight"] = weight.data.clone()
            state[f"{name}.absmax"] = weight.quant_state.absmax.clone()
        elif type(weight).__name__ == "Int8Params":
            state[f"{name}.weight"] = weight.data.clone()
            state[f"{name}.SCB"] = weight.SCB.clone()
    return state


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_a_quantized_base_stays_bit_identical_and_adapters_get_the_gradient_at_dequant_w_plus_tau(kind):
    model = qlora_model(kind)
    before = quantized_state(model)
    assert before, "the model has no bitsandbytes weights"
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))
    assert engine.merged_layer_names == ["base_model.model.0", "base_model.model.2"]
    x, target = torch.randn(6, 32), torch.randint(0, 3, (6,))
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    got = {n: p.grad.clone() for n, p in adapters.items()}

    # By hand: every LoRA layer computes x (W + tau)^T + s B A x, with W + tau what the armed forward reported.
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in adapters.items()}
    inner = model.base_model.model

    def lora_linear(h: torch.Tensor, index: str) -> torch.Tensor:
        layer = inner[int(index)]
        a, b = (
            leaves[f"base_model.model.{index}.lora_A.default.weight"],
            leaves[f"base_model.model.{index}.lora_B.default.weight"],
        )
        bias = layer.base_layer.bias
        out = nn.functional.linear(h, noisy[f"base_model.model.{index}"], bias)
        return out + layer.scaling["default"] * (h @ a.t() @ b.t())

    h = lora_linear(torch.relu(lora_linear(x, "0")), "2")  # Linear4bit -> ReLU -> Linear4bit -> Linear
    reference = nn.functional.cross_entropy(inner[3](h), target)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name in adapters:
        torch.testing.assert_close(got[name], leaves[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    # The noise is scaled against the merged weight: every row of tau has norm a * ||(dequant(W) + s B A)_row||.
    from peft.utils.integrations import dequantize_bnb_weight

    layer = inner[0]
    dense = dequantize_bnb_weight(layer.base_layer.weight, state=getattr(layer.base_layer, "state", None))
    merged = dense + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    tau = noisy["base_model.model.0"] - dense
    torch.testing.assert_close(tau.norm(dim=1), 0.05 * merged.detach().norm(dim=1), rtol=1e-4, atol=1e-7)

    after = quantized_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_steps_never_touch_the_quantized_base():
    model = qlora_model("nf4")
    before = quantized_state(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(3):
        with engine.perturbed(step):
            nn.functional.cross_entropy(model(torch.randn(6, 32)), torch.randint(0, 3, (6,))).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = quantized_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if p.requires_grad)
