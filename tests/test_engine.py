"""Engine life cycle: restore guarantees, seeding, state, buffers, regenerate drift."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, assert_params_equal, clone_params
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.config import ADAPT_MODES

pytestmark = pytest.mark.usefixtures("draw_on_workers")


def test_perturbed_context_restores_on_exception(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.5, seed=0))
    clean = clone_params(tiny_model)
    with pytest.raises(ValueError, match="boom"), engine.perturbed():
        assert not torch.equal(tiny_model.fc1.weight, clean["fc1.weight"])
        raise ValueError("boom")
    assert not engine.is_perturbed
    assert_params_equal(tiny_model, clean)


def test_restore_after_failed_backward(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.5, seed=0))
    clean = clone_params(tiny_model)
    x = torch.randn(4, 6)

    def explode(_grad):
        raise RuntimeError("backward failed")

    with pytest.raises(RuntimeError, match="backward failed"), engine.perturbed():
        out = tiny_model(x)["logits"]
        out.register_hook(explode)
        out.sum().backward()
    assert_params_equal(tiny_model, clean)


def test_double_perturb_is_refused(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(seed=0))
    engine.perturb()
    with pytest.raises(RuntimeError, match="twice"):
        engine.perturb()
    engine.restore()
    engine.restore()  # idempotent


@pytest.mark.parametrize("restore", ["copy", "swap"])
@pytest.mark.parametrize("adapt", ADAPT_MODES)
def test_failure_while_drawing_leaves_weights_clean(tiny_model, monkeypatch, adapt, restore):
    import hf_smoothout.noise as noise_module

    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.5, adapt=adapt, restore=restore, seed=0))
    clean = clone_params(tiny_model)
    storage = {n: p.data_ptr() for n, p in tiny_model.named_parameters()}
    calls = {"n": 0}
    real = noise_module.draw_

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(noise_module, "draw_", flaky)
    with pytest.raises(MemoryError):
        engine.perturb()
    assert not engine.is_perturbed
    assert_params_equal(tiny_model, clean)
    assert {n: p.data_ptr() for n, p in tiny_model.named_parameters()} == storage  # swap: back on the clean tensors


@pytest.mark.parametrize("adapt", ADAPT_MODES)
def test_regenerate_failure_while_drawing_is_undone(tiny_model, monkeypatch, adapt):
    from hf_smoothout.laws import get_noise_law

    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, adapt=adapt, restore="regenerate", seed=0))
    clean = clone_params(tiny_model)
    law = get_noise_law(adapt)
    real = law.apply_
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(law, "apply_", flaky)  # the registered law object the engine applies
    with pytest.raises(MemoryError):
        engine.perturb()
    assert calls["n"] == 3  # the fault fired
    for name, p in tiny_model.named_parameters():
        torch.testing.assert_close(p.detach(), clean[name], rtol=1e-6, atol=1e-7)


def test_fresh_noise_every_perturb_and_seeded_reproducibility():
    def noises(seed: int, n: int = 3) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(8, 8)
        clean = model.weight.detach().clone()
        engine = SmoothOut(model, SmoothOutConfig(strength=0.1, seed=seed))
        out = []
        for _ in range(n):
            with engine.perturbed():
                out.append(model.weight.detach() - clean)
        return out

    a, b, c = noises(7), noises(7), noises(8)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_ranks_draw_independent_noise_unless_told_otherwise():
    def first_noise(rank: int, independent: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(8, 8)
        clean = model.weight.detach().clone()
        engine = SmoothOut(model, SmoothOutConfig(seed=3, independent_ranks=independent), rank=rank, world_size=2)
        with engine.perturbed():
            return model.weight.detach() - clean

    assert not torch.equal(first_noise(0, True), first_noise(1, True))
    assert torch.equal(first_noise(0, False), first_noise(1, False))


def test_regenerate_refused_when_ranks_differ(tiny_model):
    with pytest.raises(ValueError, match="regenerate"):
        SmoothOut(tiny_model, SmoothOutConfig(restore="regenerate"), rank=0, world_size=2)
    SmoothOut(tiny_model, SmoothOutConfig(restore="regenerate", independent_ranks=False), rank=0, world_size=2)
    SmoothOut(tiny_model, SmoothOutConfig(restore="regenerate"), rank=0, world_size=1)


def test_state_dict_round_trip_reproduces_the_noise(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.2, seed=11))
    clean = tiny_model.fc1.weight.detach().clone()
    with engine.perturbed():
        pass
    state = engine.state_dict()
    with engine.perturbed():
        expected = tiny_model.fc1.weight.detach() - clean
    other = SmoothOut(tiny_model, SmoothOutConfig(strength=0.2, seed=999))
    other.load_state_dict(state)
    with other.perturbed():
        assert torch.equal(tiny_model.fc1.weight.detach() - clean, expected)
    engine.perturb()
    with pytest.raises(RuntimeError, match="perturbed"):
        engine.state_dict()
    engine.restore()


@pytest.mark.parametrize("restore", ["copy", "regenerate"])
def test_buffers_are_allocated_once(tiny_model, restore):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.1, restore=restore, seed=0))
    pointers = [t.data_ptr() for t in engine.buffers()]
    for step in range(5):
        with engine.perturbed(step):
            pass
    after = [t.data_ptr() for t in engine.buffers()]
    assert pointers == after


def test_buffers_follow_a_dtype_change():
    model = TinyClassifier()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, seed=0))
    model.to(torch.float64)
    clean = clone_params(model)
    with engine.perturbed():
        assert model.fc1.weight.dtype == torch.float64
    assert_params_equal(model, clean)


def test_memory_copy_is_one_parameter_copy_and_regenerate_is_small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(3000, 256), nn.Linear(256, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 256))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    copy = SmoothOut(model, SmoothOutConfig(restore="copy"))
    regen = SmoothOut(model, SmoothOutConfig(restore="regenerate"))
    rows = sum(p.shape[0] if p.ndim > 1 else p.numel() for p in model.parameters())
    row_bytes = 2 * rows * 4
    assert copy.buffer_bytes == param_bytes + row_bytes
    assert regen.buffer_bytes - row_bytes <= 0.02 * param_bytes


@pytest.mark.parametrize("adapt", ADAPT_MODES)
def test_regenerate_drift_is_rounding_only(adapt):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, restore="regenerate", seed=0))
    for step in range(20):
        with engine.perturbed(step):
            pass
    drift = (model.weight - clean["weight"]).abs().max().item()
    assert drift > 0 or adapt == "none"  # not bit-exact in general, as documented
    assert drift < 1e-5


def test_denoise_off_leaves_noise_in_weights(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.1, adapt="none", denoise=False, seed=0))
    clean = clone_params(tiny_model)
    with engine.perturbed():
        perturbed = clone_params(tiny_model)
    assert_params_equal(tiny_model, perturbed)
    assert not torch.equal(perturbed["fc1.weight"], clean["fc1.weight"])
    assert engine.buffer_bytes < sum(p.numel() * 4 for p in tiny_model.parameters()) + 1e6


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(2000, 256), nn.Linear(256, 1024), nn.Linear(1024, 512), nn.Conv1d(4, 8, 3))


@pytest.mark.parametrize("restore", ["copy", "swap", "regenerate"])
@pytest.mark.parametrize("adapt", ADAPT_MODES)
def test_noise_does_not_depend_on_thread_count(restore, adapt):
    """Large CPU models draw their noise streams on worker threads; one thread draws and adds tensor by tensor
    (`SmoothOut._draw_and_apply_inline`). The noise must be the same."""
    results = []
    for threads in (1, 2, 3):
        model = _big_model()
        clean = clone_params(model)
        engine = SmoothOut(
            model, SmoothOutConfig(strength=0.1, adapt=adapt, restore=restore, seed=4), num_threads=threads
        )
        info = engine.describe()
        cpu_streams = info["streams"]
        assert cpu_streams == 2  # 1.3M weights: one stream per 2**20 (a function of the model, not the threads)
        assert info["workers"] == (1 if threads == 1 else min(threads, cpu_streams))
        assert (info["kernel"] == "inline") == (threads == 1 and restore != "regenerate")
        with engine.perturbed(step=0):
            results.append(clone_params(model))
        if restore != "regenerate":
            assert_params_equal(model, clean)
        else:
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.detach(), clean[name], rtol=1e-6, atol=1e-6)
    for other in results[1:]:
        for name in results[0]:
            assert torch.equal(results[0][name], other[name]), name


@pytest.mark.parametrize("restore", ["copy", "regenerate"])
def test_failure_on_a_worker_thread_is_raised_and_undone(monkeypatch, restore):
    import hf_smoothout.noise as noise_module

    model = _big_model()
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.3, restore=restore, seed=0), num_threads=2)
    real = noise_module.draw_
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated on a worker")
        return real(*args, **kwargs)

    monkeypatch.setattr(noise_module, "draw_", flaky)
    with pytest.raises(MemoryError, match="worker"):
        engine.perturb()
    assert not engine.is_perturbed
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), clean[name], rtol=1e-6, atol=1e-6)
    if restore == "copy":
        assert_params_equal(model, clean)


def test_dtensor_shards_are_perturbed_in_place_with_local_or_split_rows(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        torch.manual_seed(0)
        model = nn.Linear(16, 8)
        model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))  # whole rows
        model.bias = nn.Parameter(distribute_tensor(model.bias.detach(), mesh, [Shard(0)]))
        engine = SmoothOut(model, SmoothOutConfig(strength=0.1, seed=0))
        clean = model.weight.to_local().clone()
        with engine.perturbed():
            noisy = model.weight.to_local()
            noise_norms = (noisy - clean).norm(dim=1)
            torch.testing.assert_close(noise_norms, 0.1 * clean.norm(dim=1), rtol=1e-4, atol=1e-6)
        assert torch.equal(model.weight.to_local(), clean)  # restored in the shard, bit-exactly

        split = nn.Linear(16, 8)
        split.weight = nn.Parameter(distribute_tensor(split.weight.detach(), mesh, [Shard(1)]))  # rows split
        engine = SmoothOut(split, SmoothOutConfig(strength=0.1, seed=0))  # row norms all-reduced over the mesh
        clean = split.weight.to_local().clone()
        with engine.perturbed():
            noise_norms = (split.weight.to_local() - clean).norm(dim=1)
            torch.testing.assert_close(noise_norms, 0.1 * clean.norm(dim=1), rtol=1e-4, atol=1e-6)
        assert torch.equal(split.weight.to_local(), clean)
        with pytest.raises(ValueError, match="sharded across its rows"):
            SmoothOut(split, SmoothOutConfig(restore="regenerate"))
        SmoothOut(split, SmoothOutConfig(restore="regenerate", adapt="none", strength=1e-3))  # element-wise: any
    finally:
        dist.destroy_process_group()
