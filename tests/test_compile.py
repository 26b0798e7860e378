"""A `torch.compile`d model sees the in-place perturbed weights, without recompiling per step."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, assert_params_equal, clone_params

from hf_smoothout import SmoothOut, SmoothOutConfig


@pytest.mark.slow
@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_compiled_model_sees_perturbed_weights_without_recompiles(restore):
    """Swap points the parameters at other storage; dynamo treats parameters as graph inputs, so the compiled
    forward still reads the noisy values (CUDA-graph capture, which bakes in addresses, is another matter)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyClassifier()
    compiled = torch.compile(model, backend="aot_eager")
    engine = SmoothOut(model, SmoothOutConfig(strength=0.3, seed=0, restore=restore))
    x = torch.randn(5, 6)
    clean = clone_params(model)
    clean_out = compiled(x)["logits"].detach()
    from torch._dynamo.utils import counters

    frames_before = counters["stats"]["unique_graphs"]
    for step in range(3):
        with engine.perturbed(step):
            noisy_out = compiled(x)["logits"].detach()
            eager_out = model(x)["logits"].detach()
        torch.testing.assert_close(noisy_out, eager_out)
        assert not torch.allclose(noisy_out, clean_out)
    assert counters["stats"]["unique_graphs"] == frames_before  # no recompiles after the first call
    assert_params_equal(model, clean)
    torch.testing.assert_close(compiled(x)["logits"].detach(), clean_out)
