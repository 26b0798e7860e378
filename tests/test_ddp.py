"""Two CPU processes under DDP (gloo): ranks draw different noise, weights stay bit-identical."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_launcher
from test_golden import check, load_golden

SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.mark.multiprocess
@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_two_process_ddp_keeps_replicas_identical(tmp_path, restore):
    steps = 20
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--use_cpu",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "0.05",
        "--logging_steps",
        "5",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--smoothout_strength",
        "0.3",
        "--smoothout_adapt",
        "filter",
        "--seed",
        "3",
        "--smoothout_restore",
        restore,
    ]
    run_launcher(cmd)
    result = json.loads((tmp_path / "ddp_result.json").read_text())
    assert result["world_size"] == 2 and result["args_world_size"] == 2
    assert result["steps"] == steps
    assert result["noise_differs_across_ranks"]
    assert result["params_identical_across_ranks"]
    assert result["params_changed"]
    assert result["logged_strength"] == [0.3] * 4
    check(f"ddp2/{restore}", result["golden"], load_golden())  # the same noise and weights as when recorded
