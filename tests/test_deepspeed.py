"""DeepSpeed ZeRO on two CPU processes (gloo): the noise is removed before DeepSpeed's optimizer step.

After every step the module's weights equal DeepSpeed's fp32 master partition (cast to the weights'
dtype), ranks stay bit-identical and draw different noise. ZeRO-3: tests/test_zero3.py; its parameter offload is
refused at construction.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import run_launcher

SCRIPT = Path(__file__).with_name("deepspeed_train.py")

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)"),
]


def zero_config(stage: int, **zero: object) -> dict:
    """A DeepSpeed config for the Trainer ("auto" values from its arguments), ZeRO ``stage`` with ``zero`` settings."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW (no DeepSpeed op to compile for it)
    }


def deepspeed_config(tmp_path: Path, stage: int, **zero: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(zero_config(stage, **zero)))
    return path


def launch(tmp_path: Path, stage: int, *extra: str, **zero: object) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        "--use_cpu", "--deepspeed", str(deepspeed_config(tmp_path, stage, **zero)), "--output_dir", str(tmp_path),
        "--max_steps", "6", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
        "--learning_rate", "0.01", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--smoothout_strength", "0.05", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(("stage", "extra", "dtype"), [(2, [], "float32"), (2, ["--bf16", "true"], "bfloat16"),
                                                       (1, [], "float32")])  # fmt: skip
def test_zero_weights_equal_the_fp32_master_after_every_step(tmp_path, monkeypatch, stage, extra, dtype):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_launcher(launch(tmp_path, stage, *extra))
    result = json.loads((tmp_path / "deepspeed_result.json").read_text())
    assert result["world_size"] == 2 and result["zero_stage"] == stage
    assert result["dtype"] == f"torch.{dtype}" and result["steps"] == 6
    assert result["master_equal_each_step"] == [True] * 6
    assert result["restore_mode"] == "copy"
    assert result["noise_differs_across_ranks"]
    assert result["params_identical_across_ranks"]
    assert result["params_changed"]


def test_zero3_with_parameter_offload_is_refused_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(AssertionError, match="does not support ZeRO-3 with offload_param"):  # the launch exits 1
        run_launcher(launch(tmp_path, 3, offload_param={"device": "cpu"}))


@pytest.mark.parametrize("mode", ["prepared", "inner"])
def test_the_plain_accelerate_loop_under_zero2_steps_on_clean_weights_or_refuses(tmp_path, monkeypatch, mode):
    """The README's loop: built on what ``accelerator.prepare`` returned, the engine guards DeepSpeed's step (weights
    move and equal the fp32 master every step); built on the inner module it refuses at the first perturb."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    script = Path(__file__).with_name("deepspeed_plain_loop.py")
    run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(script), str(tmp_path), mode])  # fmt: skip
    result = json.loads((tmp_path / f"plain_loop_{mode}.json").read_text())
    assert result["world_size"] == 2
    if mode == "prepared":
        assert result["error"] is None and result["master_equal"] == [True] * 6
        assert min(result["moved"]) > 1e-3
    else:
        assert "built on the inner module" in result["error"] and result["moved"] == []
