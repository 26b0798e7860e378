"""Contract of the placements: every registered placement, given plain tensors, lays them out and draws them as
the local placement does, and only the local placement claims a plain model.

Multi-process behaviour (FSDP2 shards, DeepSpeed's flat groups) is tested with 2 processes in
``tests/test_fsdp.py`` and ``tests/test_deepspeed.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_smoothout import SmoothOutConfig
from hf_smoothout.placement import PLACEMENTS, detect_placement, get_placement
from hf_smoothout.plan import Stream
from hf_smoothout.seeding import DrawKey
from hf_smoothout.selection import select_parameters


def selected():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    return net, select_parameters(net, SmoothOutConfig())


def test_only_the_local_placement_claims_a_plain_model():
    net, sel = selected()
    assert [name for name, cls in PLACEMENTS.items() if cls.applies(net, sel)] == ["local"]
    assert detect_placement(net, sel).name == "local"


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_a_placement_lays_plain_tensors_out_in_place(name):
    _, sel = selected()
    placement = get_placement(name)
    for index, s in enumerate(sel):
        slot = placement.slot(s, index, row_scaled=True)
        assert slot.name == s.name and slot.param is s.param and slot.row_axis == s.row_axis
        assert slot.data.data_ptr() == s.param.data_ptr() and slot.data.shape == s.param.shape
        assert placement.live(s.param).data_ptr() == s.param.data_ptr()
        assert slot.reduce_groups == () and slot.span is None


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_a_placement_draws_plain_tensors_from_the_stream_generator(name):
    _, sel = selected()
    placement, reference = get_placement(name), get_placement("local")
    key = DrawKey(base_seed=5, rank=0, draw=2, distribution="gaussian")
    out = []
    for p in (placement, reference):
        slot = p.slot(sel[0], 0, row_scaled=False)
        stream = Stream(slot.data.device, slot.data.dtype, torch.Generator(), 0, [slot])
        stream.generator = key.generator(0, stream.device, stream.dtype, stream.generator)
        buffer = torch.empty_like(slot.data)
        p.draw_(slot, buffer, stream, key)
        out.append(buffer)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_a_placement_in_one_process_agrees_with_itself(name):
    placement = get_placement(name)
    assert placement.agree(True, torch.device("cpu")) is True
    assert placement.agree(False, torch.device("cpu")) is False
    assert placement.noise_rank(0, independent_ranks=False) == 0


def test_an_unknown_placement_names_the_registered_ones():
    with pytest.raises(ValueError, match="registered: fsdp2, zero3, deepspeed, local"):
        get_placement("zero4")
