"""FSDP2 with ``space="lora_merged"`` on two CPU processes (gloo), through accelerate's FSDP2 plugin: the merged-space
forward builds ``W + tau`` from the unsharded weight FSDP2 gathers for the layer anyway, so no extra gather runs, and
the frozen base stays bit-identical on every rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_launcher

SCRIPT = Path(__file__).with_name("fsdp_lora_train.py")
FSDP = ["--fsdp", "full_shard", "--fsdp_config", '{"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}']


def run_fsdp_lora(out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        "--use_cpu", "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--learning_rate", "0.01", "--report_to", "none", "--disable_tqdm", "true",
        "--smoothout_strength", "0.05", "--smoothout_space", "lora_merged", "--seed", "3", "--max_grad_norm", "0",
        "--average_tokens_across_devices", "false", *FSDP, *extra,
    ]  # fmt: skip
    run_launcher(cmd)
    return json.loads((out / "fsdp_lora_result.json").read_text())


@pytest.mark.multiprocess
def test_fsdp2_merged_lora_keeps_the_base_bit_identical_gives_the_hand_gradient_at_w_plus_tau_and_resumes(tmp_path):
    result = run_fsdp_lora(tmp_path / "whole", "--save_strategy", "steps", "--save_steps", "2")
    assert result["world_size"] == 2 and result["steps"] == 4 and result["layers"] == 6 and result["draws"] == 4
    assert result["engine_on_shards"] == "fsdp2"
    assert result["base_unchanged_each_step"] == [True] * 4 and result["base_unchanged_at_end"]
    assert result["adapters_changed"]
    assert result["max_relative_row_norm_error"] < 1e-5  # every row of tau has norm a * ||W'_row||
    assert result["noise_differs_across_ranks"]  # independent_ranks=True (default): each rank its own W' + tau
    assert result["hand_gradient_max_relative_error"] < 1e-5  # measured 0: the same arithmetic, unsharded
    assert result["clean_gradient_max_relative_error"] > 1e-2  # the gradient at the clean weights is another one
    # resumed from the step-2 checkpoint: the same adapters at the end, the noise position continued
    checkpoint = str(tmp_path / "whole" / "checkpoint-2")
    resumed = run_fsdp_lora(tmp_path / "resumed", "--save_strategy", "no", "--resume_from_checkpoint", checkpoint)
    assert resumed["steps"] == 4 and resumed["draws"] == 4 and resumed["base_unchanged_at_end"]
    assert resumed["final_adapters"] == result["final_adapters"]
