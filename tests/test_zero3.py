"""DeepSpeed ZeRO-3 on two CPU processes (gloo): each rank perturbs its own flat slices in place (no gathering),
the forward gathers one global noise sample with the exact per-row law, and the slices equal DeepSpeed's fp32 master
after every step (`hf_smoothout.placement.zero3`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import run_launcher
from test_deepspeed import deepspeed_config

SCRIPT = Path(__file__).with_name("zero3_train.py")

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)"),
]


def zero3_config(tmp_path: Path) -> Path:
    # biases and LayerNorm weights (32 and 75 elements) stay gathered between steps ("persistent"): the copies
    # SmoothOut must release so that the forward gathers the noisy slices
    return deepspeed_config(
        tmp_path, 3, stage3_param_persistence_threshold=100, stage3_gather_16bit_weights_on_model_save=True
    )


def run_zero3(tmp_path: Path, *extra: str, lr: str = "0.01", save: bool = False) -> dict:
    saving = ["--save_strategy", "steps", "--save_steps", "2"] if save else ["--save_strategy", "no"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        "--use_cpu", "--deepspeed", str(zero3_config(tmp_path)), "--output_dir", str(tmp_path),
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
        "--learning_rate", lr, "--report_to", "none", *saving, "--disable_tqdm", "true",
        "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "2",
        "--smoothout_strength", "0.05", "--seed", "3", *extra,
    ]  # fmt: skip
    run_launcher(cmd)
    return json.loads((tmp_path / "zero3_result.json").read_text())


def test_zero3_slices_get_the_row_law_equal_the_fp32_master_and_resume_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    result = run_zero3(tmp_path / "whole", save=True)  # 4 steps, a checkpoint at step 2
    assert result["world_size"] == 2 and result["zero_stage"] == 3 and result["steps"] == 4
    assert result["placement"] == "zero3" and result["restore"] == "copy"
    assert result["dtype"] == "torch.float32" and result["evaluated"]
    assert result["master_equal_each_step"] == [True] * 4  # restored before DeepSpeed's step, every rank
    assert result["no_gathered_copy_after_step"] == [True] * 4
    assert result["forward_saw_noise_each_step"] == [True] * 4  # also right after an evaluation gathered everything
    assert result["draws"] == 8 and not result["weights_bit_identical_to_start"]
    assert result["max_relative_row_norm_error"] < 1e-5  # rows cut by the slices: norms all-reduced
    assert result["replay_max_relative_error"] < 1e-5  # = one unsharded copy drawing the same element blocks
    assert result["saved_weights_are_the_clean_master"]
    # resumed from the step-2 checkpoint (DeepSpeed's state and the noise state): the same end, dropout on
    assert (tmp_path / "whole" / "checkpoint-2" / "smoothout_state_1.pth").is_file()
    resumed = run_zero3(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed["steps"] == 4 and resumed["draws"] == 8  # the noise position continued from the checkpoint
    assert resumed["master_equal_each_step"] == [True] * 2
    assert resumed["final_weights"] == result["final_weights"]


def test_zero3_in_bf16_at_learning_rate_0_leaves_the_weights_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    result = run_zero3(tmp_path, "--bf16", "true", lr="0")
    assert result["placement"] == "zero3" and result["dtype"] == "torch.bfloat16" and result["steps"] == 4
    assert result["master_equal_each_step"] == [True] * 4  # bf16 slices = the fp32 master, cast
    assert result["forward_saw_noise_each_step"] == [True] * 4
    assert result["max_relative_row_norm_error"] < 5e-2  # the noise is added in bf16 (8 bits of mantissa)
    assert result["weights_bit_identical_to_start"]  # no noise leaked into the weights or the fp32 master
    assert result["saved_weights_are_the_clean_master"]
