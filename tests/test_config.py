import pytest

from hf_smoothout import SmoothOutConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": -0.1}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"strength": float("inf")}, "strength"),
        ({"strength": "big"}, "strength"),
        ({"adapt": "row"}, "adapt"),
        ({"distribution": "laplace"}, "distribution"),
        ({"schedule": "linear"}, "schedule"),
        ({"restore": "subtract"}, "restore"),
        ({"samples": 0}, "samples"),
        ({"samples": 1.5}, "samples"),
        ({"samples": 2, "denoise": False}, "denoise"),
        ({"anneal_index": 0.0}, "anneal_index"),
        ({"tanh_scale": -1.0}, "tanh_scale"),
        ({"seed": -3}, "seed"),
        ({"include": ["("]}, "include"),
        ({"adapt": "weight", "restore": "regenerate", "strength": 1.5}, "strength < 1"),
    ],
)
def test_invalid_values_raise_with_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmoothOutConfig(**kwargs)


def test_error_lists_allowed_values():
    with pytest.raises(ValueError, match="filter, filter_std, none, weight"):
        SmoothOutConfig(adapt="rows")


def test_name_selection_rules():
    cfg = SmoothOutConfig(include=["encoder"], exclude=[r"\.attention\."], skip_bias=True)
    assert cfg.selects_name("encoder.layer.0.output.dense.weight")
    assert not cfg.selects_name("encoder.layer.0.attention.self.query.weight")
    assert not cfg.selects_name("encoder.layer.0.output.dense.bias")
    assert not cfg.selects_name("classifier.weight")


def test_single_pattern_string_is_accepted_and_to_dict_is_plain():
    cfg = SmoothOutConfig(exclude="classifier")
    assert cfg.exclude == ("classifier",)
    data = cfg.to_dict()
    assert "_compiled" not in data and data["exclude"] == ["classifier"]
    assert SmoothOutConfig(**data) == cfg


def test_zero_strength_is_disabled():
    assert not SmoothOutConfig(strength=0).enabled
    assert SmoothOutConfig(strength=1e-4).enabled


def test_importing_the_package_loads_the_engine_without_transformers():
    import subprocess
    import sys

    code = (
        "import sys, hf_smoothout; "
        "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules, 'eager import'; "
        "hf_smoothout.SmoothOutTrainer; assert 'transformers' in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
