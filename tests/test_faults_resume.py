"""Faults around the noise state in checkpoints: recorded settings, resumes with other settings or fewer
processes, damaged or invalid states, atomic replacement."""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_classification_data
from test_trainer import model_with_seed, training_args

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.checkpoint import STATE_FILE

pytestmark = pytest.mark.usefixtures("draw_on_workers")
ROOT = Path(__file__).resolve().parents[1]
MAIN_THREAD = threading.main_thread().ident


# ---------------------------------------------------------------------------------------------- 6. resume
def train_with_checkpoint(tmp_path, cfg: SmoothOutConfig, **overrides) -> Path:
    args = training_args(tmp_path / "first", max_steps=4, save_strategy="steps", save_steps=2, **overrides)
    SmoothOutTrainer(model_with_seed(), args, train_dataset=make_classification_data(), smoothout_config=cfg).train()
    return tmp_path / "first" / "out" / "checkpoint-2"


def resume(tmp_path, checkpoint: Path, cfg: SmoothOutConfig) -> SmoothOutTrainer:
    args = training_args(tmp_path / "second", max_steps=4, save_strategy="no")
    trainer = SmoothOutTrainer(model_with_seed(), args, train_dataset=make_classification_data(), smoothout_config=cfg)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_checkpoint_state_records_config_and_world_size(tmp_path):
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    state = torch.load(train_with_checkpoint(tmp_path, cfg) / STATE_FILE.format(rank=0), weights_only=True)
    assert state["config"] == cfg.to_dict()
    assert state["world_size"] == 1 and state["draws"] == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"strength": 0.3}, "strength"),
        ({"samples": 2}, "samples"),
        ({"schedule": "anneal"}, "schedule"),
        ({"seed": 6}, "seed"),
    ],
)
def test_resume_with_other_settings_warns_naming_the_field(tmp_path, change, field):
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    checkpoint = train_with_checkpoint(tmp_path, cfg)
    with pytest.warns(UserWarning, match=rf"other settings \({field}: "):
        resume(tmp_path, checkpoint, dataclasses.replace(cfg, **change))


def test_resume_with_same_settings_is_silent(tmp_path):
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    checkpoint = train_with_checkpoint(tmp_path, cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SmoothOut")
        resume(tmp_path, checkpoint, cfg)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "negative_draws", "not_a_dict"])
def test_damaged_noise_state_names_the_file(tmp_path, damage):
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    checkpoint = train_with_checkpoint(tmp_path, cfg)
    path = checkpoint / STATE_FILE.format(rank=0)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:101])
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "negative_draws":
        torch.save({"base_seed": 5, "draws": -3}, path)
    else:
        torch.save([1, 2], path)
    with pytest.raises(
        (RuntimeError, ValueError), match=r"(?s)smoothout_state_0\.pth.*(corrupt|Not a).*earlier checkpoint"
    ):
        resume(tmp_path, checkpoint, cfg)


def test_engine_rejects_invalid_states(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(seed=1))
    for state in (
        {"base_seed": 1, "draws": -1},
        {"base_seed": -1, "draws": 0},
        {"base_seed": 2**64, "draws": 0},
        {"base_seed": 1, "draws": 1.5},
        {"draws": 3},
        "state",
    ):
        with pytest.raises(ValueError, match="SmoothOut state"):
            engine.load_state_dict(state)


def test_resume_with_fewer_processes_warns(tmp_path):
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    checkpoint = train_with_checkpoint(tmp_path, cfg)
    path = checkpoint / STATE_FILE.format(rank=0)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "world_size": 2}, path)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) and is resumed by 1.*ranks 1\.\.1 end here"):
        resume(tmp_path, checkpoint, cfg)


def test_state_file_is_replaced_atomically(tmp_path):
    checkpoint = train_with_checkpoint(tmp_path, SmoothOutConfig(strength=0.2, seed=5))
    assert not list(checkpoint.glob("*.tmp"))
