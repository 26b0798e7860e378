"""Golden characterization: the noisy weights of the first draws and the result of a short Trainer run.

A refactoring of the engine must keep these bit-identical (``tests/golden/noise.json``). Exact hashes are
compared on a CPU with the SIMD capability and torch thread count that recorded them (row norms and matmuls are
reductions whose rounding depends on both); elsewhere the noise's sum of squares must agree (1e-4 relative, bf16 2e-2).
Regenerate after an *intended* change with ``HF_SMOOTHOUT_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py``
and say in the commit which hash moved and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_classification_data
from golden_hashes import fingerprint
from test_trainer import model_with_seed, training_args
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer

GOLDEN = Path(__file__).with_name("golden") / "noise.json"
WRITE = os.environ.get("HF_SMOOTHOUT_WRITE_GOLDEN") == "1"
# Reductions (row norms, matmuls) round by SIMD width and by how torch splits them over its threads.
CAPABILITY = f"{torch.backends.cpu.get_cpu_capability()}/threads={torch.get_num_threads()}"

LAWS = ["filter", "filter_std", "none", "weight"]
DISTRIBUTIONS = ["uniform", "gaussian"]
RESTORES = ["copy", "swap", "regenerate"]
DTYPES = ["float32", "bfloat16"]
THREADS = [1, 2]
DRAWS = (0, 3)


def characterized_model(dtype: torch.dtype) -> nn.Module:
    """Several shapes (a conv filter bank, a wide and a tall linear, an embedding, 1-D parameters), ~1.2M weights:
    two noise streams in the float32 group."""
    torch.manual_seed(1234)
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(300, 64),
            "conv": nn.Conv2d(3, 16, 5),
            "wide": nn.Linear(1024, 512),
            "tall": nn.Linear(64, 1500),
            "norm": nn.LayerNorm(64),
        }
    )
    return model.to(dtype)


def noise_case(adapt: str, distribution: str, restore: str, dtype: str, threads: int) -> dict[str, object]:
    model = characterized_model(getattr(torch, dtype))
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = SmoothOut(
        model,
        SmoothOutConfig(strength=0.05, adapt=adapt, distribution=distribution, restore=restore, seed=7),
        num_threads=threads,
    )
    result: dict[str, object] = {}
    for draw in range(max(DRAWS) + 1):
        with engine.perturbed(step=draw):
            if draw in DRAWS:
                noisy = {n: p.detach().clone() for n, p in model.named_parameters()}
                result[f"draw{draw}"] = fingerprint(noisy, clean)
        clean = {n: p.detach().clone() for n, p in model.named_parameters()}  # regenerate drifts: re-base
    engine.close()
    return result


def trainer_case(restore: str) -> dict[str, object]:
    model = model_with_seed()
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SmoothOutTrainer(
        model,
        training_args(
            Path(os.environ.get("TMPDIR", "/tmp")) / f"golden-{restore}",
            gradient_accumulation_steps=2,
            per_device_train_batch_size=4,
            max_steps=4,
        ),
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(strength=0.2, seed=5, restore=restore),
    )
    trainer.train()
    return fingerprint({n: p for n, p in model.named_parameters()}, clean)


CASES = [
    (adapt, distribution, restore, dtype, threads)
    for adapt in LAWS
    for distribution in DISTRIBUTIONS
    for restore in RESTORES
    for dtype in DTYPES
    for threads in THREADS
    if not (restore == "regenerate" and dtype == "bfloat16")  # its drift is the point of the restore, not a golden
]


def case_id(case: tuple) -> str:
    return "-".join(str(part) for part in case)


def load_golden() -> dict[str, object]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"capability": CAPABILITY, "cases": {}}


def check(key: str, got: dict[str, object], golden: dict[str, object]) -> None:
    if WRITE:
        golden["cases"][key] = got
        golden["capability"] = CAPABILITY
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    expected = golden["cases"].get(key)
    assert expected is not None, f"no golden value for {key}: record it with HF_SMOOTHOUT_WRITE_GOLDEN=1"
    parts = [(got, expected)] if "sha256" in got else [(got[k], expected[k]) for k in sorted(got)]
    for mine, theirs in parts:
        if golden["capability"] == CAPABILITY:
            assert mine["sha256"] == theirs["sha256"], key
        else:  # another rounding of the reductions: the noise's energy agrees, bf16 to its resolution
            rel = 2e-2 if "bfloat16" in key else 1e-4
            assert mine["sumsq"] == pytest.approx(theirs["sumsq"], rel=rel), key


@pytest.fixture(scope="module")
def golden() -> dict[str, object]:
    return load_golden()


@pytest.mark.usefixtures("draw_on_workers")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_noisy_weights_of_the_first_draws_match_the_golden_hashes(case, golden):
    check(f"noise/{case_id(case)}", noise_case(*case), golden)


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_a_short_trainer_run_with_accumulation_ends_at_the_golden_weights(restore, golden):
    check(f"trainer/{restore}", trainer_case(restore), golden)


@pytest.mark.parametrize("adapt", LAWS)
def test_the_merged_space_noise_matches_the_golden_hashes(adapt, golden):
    peft = pytest.importorskip("peft")
    torch.manual_seed(99)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights="gaussian"))
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, space="lora_merged", seed=11))
    with engine.perturbed(step=0):
        noisy = engine.merged_space.noisy_weights()
    clean = {layer.name: layer.weight.detach().clone() for layer in engine.merged_space.layers}
    check(f"merged/{adapt}", fingerprint(noisy, clean), golden)
