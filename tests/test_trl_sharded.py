"""TRL on top of the sharded placements (2 CPU processes, gloo): ``SFTTrainer`` + `SmoothOutMixin` for full fine-tuning
under DeepSpeed ZeRO-3, and for LoRA with ``space="lora_merged"`` under accelerate's FSDP2 plugin."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import run_launcher

SCRIPT = Path(__file__).with_name("trl_sharded_train.py")

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        importlib.util.find_spec("trl") is None or importlib.util.find_spec("deepspeed") is None,
        reason="needs trl and deepspeed",
    ),
]


def run_trl(tmp_path: Path, mode: str) -> dict:
    run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(SCRIPT), mode, str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / f"trl_{mode}_result.json").read_text())
    assert result["mode"] == mode and result["world_size"] == 2 and result["steps"] == 3
    assert result["draws"] == 6  # one per micro-batch: 3 steps x 2
    assert result["watched_forward_calls"] >= 6 and result["watched_forward_noisy"]
    return result


def test_sft_trainer_full_fine_tuning_under_zero3_steps_on_clean_slices(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    result = run_trl(tmp_path, "zero3")
    assert result["placement"] == "zero3"
    assert result["master_equal_each_step"] == [True] * 3


def test_sft_trainer_lora_merged_under_fsdp2_keeps_the_base_bit_identical(tmp_path):
    result = run_trl(tmp_path, "fsdp2_lora")
    assert result["merged_layers"] == 4
    assert result["base_bit_identical"] and result["adapters_moved"]
