"""``restore="auto"`` (the default): swap where proven harmless, copy everywhere else, decided again on re-binding."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.restore import resolve_restore, swap_blocker


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def flatten_into_one_buffer(model: nn.Module) -> torch.Tensor:
    """What DeepSpeed ZeRO-1/2 does to a model: every parameter becomes a view into one flat buffer."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


class Marked(torch.Tensor):
    """A tensor subclass (as quantized or otherwise special weights are)."""


def test_default_is_auto_and_swaps_plain_cpu_parameters():
    model = stack()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0))
    assert engine.config.restore == "auto" and engine.restore_mode == "swap"
    tensors = {n: p.data for n, p in model.named_parameters()}
    clean = clone_params(model)
    with engine.perturbed():
        assert all(p.data_ptr() != tensors[n].data_ptr() for n, p in model.named_parameters())
        assert all(torch.equal(tensors[n], clean[n]) for n in clean)  # the clean tensors are never written
    assert all(p.data_ptr() == tensors[n].data_ptr() for n, p in model.named_parameters())
    assert_params_equal(model, clean)


def shared_storage() -> list[torch.Tensor]:
    weight = nn.Parameter(torch.zeros(4, 4))
    return [weight, nn.Parameter(weight.data)]  # two Parameter objects, one storage


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        (lambda: [nn.Parameter(torch.zeros(10)[2:8])], "view into a larger buffer"),
        (lambda: [nn.Parameter(torch.zeros(6, 4).t())], "not contiguous"),
        (lambda: [nn.Parameter(torch.zeros(3, 3).as_subclass(Marked))], "Marked, not a plain tensor"),
        (lambda: [nn.Parameter(torch.zeros(3, 3, device="meta"))], "on meta, not the CPU"),
        (shared_storage, "share storage"),
    ],
    ids=["view", "transposed", "subclass", "meta", "shared"],
)
def test_auto_copies_whatever_swapping_could_cut(params, reason):
    tensors = params()
    assert reason in swap_blocker(tensors, sharded=False)
    assert resolve_restore(SmoothOutConfig(), tensors, sharded=False) == "copy"


def test_sharded_parameters_and_explicit_choices():
    plain = [nn.Parameter(torch.zeros(3, 3))]
    assert resolve_restore(SmoothOutConfig(), plain, sharded=True) == "copy"
    assert resolve_restore(SmoothOutConfig(denoise=False), plain, sharded=False) == "copy"
    for mode in ("copy", "swap", "regenerate"):
        assert resolve_restore(SmoothOutConfig(restore=mode), plain, sharded=False) == mode


def test_rebinding_into_a_flat_buffer_switches_to_copy_and_stays_exact():
    """Built on plain parameters (swap), then flattened as DeepSpeed does inside ``train``: the next perturb re-binds,
    decides again (copy), puts the noise into the flat buffer the model now reads, and restores it bit-exactly."""
    model = stack()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0))
    assert engine.restore_mode == "swap"
    flat = flatten_into_one_buffer(model)
    clean_flat = flat.clone()
    with engine.perturbed():
        assert engine.restore_mode == "copy"
        assert not torch.equal(flat, clean_flat)  # the noise is in the buffer the parameters view
        assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in model.parameters())
    assert torch.equal(flat, clean_flat)
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in model.parameters())


def test_auto_trains_bit_identically_to_copy(tmp_path):
    data = make_classification_data()
    final, modes = {}, {}
    for restore in ("copy", "auto"):
        model = model_with_seed(dropout=0.1)
        cfg = SmoothOutConfig(strength=0.2, restore=restore, seed=5)
        args = training_args(tmp_path / restore, max_steps=6, gradient_accumulation_steps=2)
        trainer = SmoothOutTrainer(model, args, train_dataset=data, smoothout_config=cfg)
        trainer.train()
        final[restore], modes[restore] = clone_params(model), trainer.smoothout.restore_mode
    assert modes == {"copy": "copy", "auto": "swap"}
    assert all(torch.equal(final["copy"][n], final["auto"][n]) for n in final["copy"])


@pytest.mark.parametrize(("saved", "current"), [("copy", "auto"), ("auto", "swap"), ("swap", "copy")])
def test_resuming_across_exact_restores_does_not_warn(saved, current):
    """A checkpoint written before ``auto`` became the default (``restore: copy``) resumes without a false alarm."""
    old = SmoothOut(stack(), SmoothOutConfig(seed=1, restore=saved, prefetch="never"))
    state = old.state_dict()
    new = SmoothOut(stack(), SmoothOutConfig(seed=1, restore=current, prefetch="always"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert new.load_state_dict(state) == []


def test_resuming_from_copy_into_regenerate_still_warns():
    state = SmoothOut(stack(), SmoothOutConfig(seed=1, restore="copy")).state_dict()
    with pytest.warns(UserWarning, match="restore: 'copy' -> 'regenerate'"):
        SmoothOut(stack(), SmoothOutConfig(seed=1, restore="regenerate")).load_state_dict(state)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    model.accepts_loss_kwargs = False
    return model


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_at_the_swapped_in_noisy_weights(tmp_path, use_reentrant):
    """Checkpointed layers run their forward again inside the backward pass; with swap the parameters still point
    at the noisy buffers there, so training equals the copy restore's (whose noise sits in the parameters)."""
    from conftest import ListDataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (32, 12), generator=g)
    data = ListDataset([{"input_ids": ids[i], "labels": ids[i, 0] % 2} for i in range(32)])
    final, modes, layer_calls = {}, {}, {}
    for restore in ("copy", "auto", "copy_no_checkpointing"):
        model = tiny_bert()
        if restore != "copy_no_checkpointing":
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        calls: list[int] = []
        attention = model.bert.encoder.layer[0].attention  # inside the checkpointed layer: runs again when recomputed
        attention.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        cfg = SmoothOutConfig(strength=0.2, restore=restore.split("_")[0], seed=5)
        args = training_args(tmp_path / restore, max_steps=3, gradient_accumulation_steps=2, learning_rate=0.01)
        trainer = SmoothOutTrainer(model, args, train_dataset=data, smoothout_config=cfg)
        trainer.train()
        final[restore], layer_calls[restore] = clone_params(model), calls
        modes[restore] = trainer.smoothout.restore_mode
    assert modes["auto"] == "swap"
    # 6 micro-batches: the checkpointed layers ran again in every backward pass
    assert {k: len(v) for k, v in layer_calls.items()} == {"copy": 12, "auto": 12, "copy_no_checkpointing": 6}
    assert all(torch.equal(final["copy"][n], final["auto"][n]) for n in final["copy"])
    for name, value in final["copy_no_checkpointing"].items():  # and checkpointing changed nothing either
        torch.testing.assert_close(final["auto"][name], value, rtol=1e-5, atol=1e-6)


def aliased_pair() -> nn.Module:
    """Two Linear layers whose weights are distinct Parameter objects over one storage (a tied checkpoint loaded
    with ``assign=True``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False))
    model[2].weight = nn.Parameter(model[0].weight.data)
    return model


@pytest.mark.parametrize("restore", ["auto", "copy", "swap"])
def test_parameters_over_the_same_memory_are_tied_weights(restore):
    model = aliased_pair()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0, restore=restore))
    assert engine.parameter_names == ["0.weight"]  # drawn once, like a tied weight
    assert engine.restore_mode == ("copy" if restore == "auto" else restore)  # auto: copy, the alias sees the noise
    clean = model[0].weight.detach().clone()
    with engine.perturbed():
        tau = model[0].weight.detach() - clean
        torch.testing.assert_close(tau.norm(dim=1), 0.05 * clean.norm(dim=1), rtol=1e-4, atol=0)
        if restore != "swap":
            assert torch.equal(model[2].weight, model[0].weight)  # one memory, one noise
    assert torch.equal(model[0].weight, clean) and torch.equal(model[2].weight, clean)


def test_parameters_overlapping_in_part_are_refused():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    flat = torch.zeros(24)
    model[0].weight = nn.Parameter(flat[:16].view(4, 4))
    model[1].weight = nn.Parameter(flat[8:24].view(4, 4))
    with pytest.raises(ValueError, match="overlap in memory"):
        SmoothOut(model, SmoothOutConfig(strength=0.05))
    model[1].weight = nn.Parameter(torch.cat([flat, torch.zeros(8)])[16:32].view(4, 4))  # disjoint: fine
    assert len(SmoothOut(model, SmoothOutConfig(strength=0.05)).parameter_names) == 2


def test_an_unselected_alias_makes_auto_copy():
    """A frozen parameter (or buffer) over a selected weight's memory: swapping would leave it clean, the copy
    restore's noise reaches it, so auto copies (and trains like copy)."""
    model = stack()
    model.frozen = nn.Parameter(model[0].weight.data, requires_grad=False)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0))
    assert engine.restore_mode == "copy"
    assert "another tensor of the model" in swap_blocker(
        [p for p in model.parameters() if p.requires_grad], sharded=False, others=[model.frozen]
    )


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_converting_the_model_while_perturbed_is_an_error(restore):
    """``model.double()`` between perturb and restore made new weights out of the noisy ones: restore says so."""
    model = stack()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0, restore=restore))
    engine.perturb()
    model.double()
    with pytest.raises(RuntimeError, match=r"storage of '0\.weight' was replaced while the weights were perturbed"):
        engine.restore()
    assert not engine.is_perturbed  # the engine itself is usable again (it re-binds at the next perturb)
    with engine.perturbed():
        pass


@pytest.mark.parametrize("restore", ["copy", "swap", "regenerate"])
def test_a_weight_copied_to_new_storage_while_perturbed_is_restored_there(restore):
    """What FSDP2 does at its first forward when it re-pads a shard (measured in the ``--fsdp_size 2`` recipe run):
    it moves the weight, noise and all, to new storage. The noisy values are an exact copy, so the clean ones are
    written there too; before, the old storage was restored and the live weight kept its noise."""
    model = stack()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0, restore=restore))
    clean = clone_params(model)
    engine.perturb()
    moved = model[0].weight.data.clone()
    model[0].weight.data = moved
    engine.restore()
    assert model[0].weight.data_ptr() == moved.data_ptr()  # the new storage is kept
    if restore == "regenerate":
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), clean[name], rtol=1e-6, atol=1e-7)
    else:
        assert_params_equal(model, clean)
    with engine.perturbed():  # re-binds to the new storage
        assert not torch.equal(model[0].weight, clean["0.weight"])
    assert model[0].weight.data_ptr() == moved.data_ptr()
    if restore != "regenerate":
        assert_params_equal(model, clean)
