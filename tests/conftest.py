"""Tiny models and data built from code (no Hub), shared by the tests."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter, which it picks when its functions are defined:
    # so before anything imports triton (tests/test_triton_kernel.py; on a GPU, tests/test_cuda.py runs the kernel).
    os.environ.setdefault("TRITON_INTERPRET", "1")


class TinyClassifier(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear, with a cross-entropy loss; optional dropout."""

    def __init__(self, dim: int = 6, hidden: int = 8, classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)
        self.fail_forward = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.fail_forward:
            raise RuntimeError("forward failed on purpose")
        logits = self.fc2(self.drop(torch.nn.functional.gelu(self.norm(self.fc1(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def make_classification_data(n: int = 64, dim: int = 6, classes: int = 3, seed: int = 0) -> ListDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return ListDataset([{"x": x[i], "labels": y[i]} for i in range(n)])


def clone_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), reference[name]), f"{name} differs"


@pytest.fixture
def draw_on_workers(monkeypatch):
    """Exercise the engine's worker-thread paths on models below its own size threshold for them (4M weights)."""
    import hf_smoothout.plan as plan_module

    monkeypatch.setattr(plan_module, "MIN_PARALLEL_ELEMENTS", 1 << 20)


@pytest.fixture
def tiny_model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


@pytest.fixture
def tiny_data() -> ListDataset:
    return make_classification_data()


def run_launcher(cmd: list[str], timeout: float = 240) -> str:
    """Run a multi-process launch (``torchrun ...``) with one thread per process and a hard timeout.

    Kills the whole process group on timeout (gloo shutdown can hang) and fails the test; asserts a zero
    exit status; returns the combined output.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} timed out after {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def load_script(path: Path) -> ModuleType:
    """Import a script that is not in a package (a study) as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def assert_recipe_help(main, description: str, example: str, capsys) -> None:
    """``main(["--help"])`` prints a one-line usage, then ``description``, and ends with examples with ``example``."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("usage: ") and len(text.split("\n\n")[0].splitlines()) == 1
    assert description in text
    assert "examples:" in text and example in text.split("examples:")[1]


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test: a shell starts background jobs (``pytest &``) with SIGINT ignored,
    and then no ``KeyboardInterrupt`` would ever be raised."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
