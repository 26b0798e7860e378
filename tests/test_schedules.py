import itertools
import math

import pytest

from hf_smoothout import noise_coefficient


@pytest.mark.parametrize("step", [0, 1, 10, 1000])
def test_constant(step):
    assert noise_coefficient("constant", step) == 1.0


@pytest.mark.parametrize(("step", "index", "expected"), [(0, 0.55, 1.0), (3, 0.55, 4**-0.275), (99, 1.0, 0.1)])
def test_anneal_values(step, index, expected):
    assert noise_coefficient("anneal", step, anneal_index=index) == pytest.approx(expected, rel=1e-12)


def test_anneal_decreases():
    values = [noise_coefficient("anneal", t) for t in range(50)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, (math.tanh(-5.0) + 1) / 2), (50, 0.5), (100, (math.tanh(5.0) + 1) / 2), (25, (math.tanh(-2.5) + 1) / 2)],
)
def test_tanh_values_ramp_up(step, expected):
    assert noise_coefficient("tanh", step, total_steps=100, tanh_scale=10.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step", [0, 10, 50, 90, 100, 130])
def test_cosine_ramps_from_zero_to_one_like_flat_lora(step):
    expected = 0.5 * (1 - math.cos(min(step, 100) / 100 * math.pi))  # Flat-LoRA's factor, held at 1 past the end
    assert noise_coefficient("cosine", step, total_steps=100) == pytest.approx(expected, abs=1e-15)


def test_cosine_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        noise_coefficient("cosine", 3)


def test_tanh_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        noise_coefficient("tanh", 3)


def test_unknown_schedule_and_negative_step():
    with pytest.raises(ValueError, match="Unknown schedule"):
        noise_coefficient("linear", 3)
    with pytest.raises(ValueError, match="step"):
        noise_coefficient("constant", -1)
