"""Fault suite: each test reproduces a way weights could silently stay noisy, or a bad input could pass unnoticed.

Groups: interrupts (Ctrl-C while workers draw), replaced storage or parameters, config immutability and
type strictness, implausible strengths and non-finite noise, resume state, early checks, overlapping
engines, mixed precision on CPU, and every command line's ``--help``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import runpy
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from torch import nn

import hf_smoothout.noise as noise_module
from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.checkpoint import STATE_FILE
from hf_smoothout.engine import NonFiniteNoiseError
from hf_smoothout.modelcard import atomic_write_text
from hf_smoothout.ownership import owner_of

pytestmark = pytest.mark.usefixtures("draw_on_workers", "python_sigint_handler")
ROOT = Path(__file__).resolve().parents[1]
MAIN_THREAD = threading.main_thread().ident


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test: a shell starts background jobs (``pytest &``) with SIGINT ignored,
    and then no ``KeyboardInterrupt`` would ever be raised."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def big_model() -> nn.Module:
    """2.1M CPU parameters: enough for the engine to draw on worker threads."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))


def interrupt_main_thread() -> None:
    signal.pthread_kill(MAIN_THREAD, signal.SIGINT)


def join_ignoring_interrupts(thread: threading.Thread) -> None:
    """Wait for ``thread``; an interrupt it sent that lands here is absorbed."""
    while True:
        try:
            thread.join()
            time.sleep(0.002)  # let a pending signal be delivered inside this try
            return
        except KeyboardInterrupt:
            continue


class BlockingDraw:
    """Wraps the engine's ``draw_``: the first draw on a worker thread waits until the test releases it."""

    def __init__(self, original) -> None:
        self.original = original
        self.inside = threading.Event()
        self.release = threading.Event()
        self.armed = True

    def __call__(self, out, distribution, generator):
        result = self.original(out, distribution, generator)
        if self.armed and threading.current_thread() is not threading.main_thread():
            self.armed = False
            self.inside.set()
            self.release.wait(timeout=20)
        return result


def interrupt_while_worker_blocked(blocker: BlockingDraw) -> threading.Thread:
    """Once a worker is inside a draw: SIGINT the main thread, give it time to react, then let the worker go on."""

    def run() -> None:
        blocker.inside.wait(timeout=20)
        interrupt_main_thread()
        time.sleep(0.3)  # the main thread has received the interrupt long before the worker continues
        blocker.release.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------- 1. interrupts
def test_ctrl_c_while_workers_draw_leaves_clean_weights(monkeypatch):
    model = big_model()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0), num_threads=2)
    assert engine.describe()["workers"] == 2
    clean = clone_params(model)
    blocker = BlockingDraw(noise_module.draw_)
    monkeypatch.setattr(noise_module, "draw_", blocker)
    helper = interrupt_while_worker_blocked(blocker)
    with pytest.raises(KeyboardInterrupt):
        engine.perturb()
    join_ignoring_interrupts(helper)
    engine.close()  # every worker has finished
    assert not engine.is_perturbed
    assert_params_equal(model, clean)
    assert all(owner_of(p) is None for p in model.parameters())


def test_ctrl_c_while_workers_regenerate_finishes_the_restore(monkeypatch):
    model = big_model()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, restore="regenerate", seed=0), num_threads=2)
    clean = clone_params(model)
    engine.perturb()
    blocker = BlockingDraw(noise_module.draw_)
    monkeypatch.setattr(noise_module, "draw_", blocker)
    helper = interrupt_while_worker_blocked(blocker)
    with pytest.raises(KeyboardInterrupt):
        engine.restore()  # the interrupt is delivered once the restore is complete
    join_ignoring_interrupts(helper)
    engine.close()
    assert not engine.is_perturbed
    for name, p in model.named_parameters():
        assert torch.allclose(p, clean[name], rtol=0, atol=1e-6), name  # regenerate: equal up to rounding


@pytest.mark.slow
def test_twenty_random_interrupts_never_leave_noise():
    model = big_model()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0), num_threads=2)
    clean = clone_params(model)
    rng = random.Random(0)
    interrupted = 0
    for _ in range(20):
        timer = threading.Timer(rng.uniform(0.0, 0.02), interrupt_main_thread)
        try:
            timer.start()
            with engine.perturbed():
                time.sleep(0.002)
            timer.join()
            time.sleep(0.002)
        except KeyboardInterrupt:
            interrupted += 1
        join_ignoring_interrupts(timer)
        engine.close()
        assert not engine.is_perturbed
        assert_params_equal(model, clean)
    assert interrupted == 20


def test_interrupt_right_after_perturb_in_training_step_still_restores(tmp_path, monkeypatch):
    model = model_with_seed()
    trainer = SmoothOutTrainer(
        model,
        training_args(tmp_path, max_steps=3),
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(strength=0.3, seed=0),
    )
    real_perturb = SmoothOut.perturb

    def perturb_then_interrupt(self, *args, **kwargs):
        real_perturb(self, *args, **kwargs)
        raise KeyboardInterrupt  # as if Ctrl-C landed between perturb returning and the next line

    monkeypatch.setattr(SmoothOut, "perturb", perturb_then_interrupt)
    clean = clone_params(model)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not trainer.smoothout.is_perturbed
    assert_params_equal(model, clean)


# ---------------------------------------------------------------------------------------------- 2. replaced storage
@pytest.mark.parametrize("replace", ["data_clone", "half_float"])
def test_replaced_storage_is_rebound(tiny_model, replace):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=0))
    with engine.perturbed():
        pass
    if replace == "data_clone":
        for p in tiny_model.parameters():
            p.data = p.data.clone()
    else:
        tiny_model.half()
        tiny_model.float()
    clean = clone_params(tiny_model)
    with engine.perturbed():
        assert not torch.equal(tiny_model.fc1.weight, clean["fc1.weight"])  # the noise reaches the live weights
    assert_params_equal(tiny_model, clean)  # and is removed from them


def test_optimizer_updates_survive_after_storage_replacement(tiny_model, tiny_data):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.1, seed=0))
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    tiny_model.half()
    tiny_model.float()
    batch = {
        "x": torch.stack([d["x"] for d in tiny_data.items]),
        "labels": torch.stack([d["labels"] for d in tiny_data.items]),
    }
    losses = []
    for step in range(20):
        with engine.perturbed(step):
            loss = tiny_model(**batch)["loss"]
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step = clone_params(tiny_model)
        with engine.perturbed(step):
            pass
        assert_params_equal(tiny_model, after_step)  # the update is not overwritten by a stale backup
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # training moves (it stalled when restores hit dead tensors)


def test_replaced_parameter_object_is_refused(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.1, seed=0))
    fresh = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.load_state_dict(fresh, assign=True)
    clean = clone_params(tiny_model)
    with pytest.raises(RuntimeError, match="replaced by a different Parameter"):
        engine.perturb()
    assert not engine.is_perturbed
    assert_params_equal(tiny_model, clean)


# ---------------------------------------------------------------------------------------------- 3-4. config
def test_config_is_immutable_and_replace_revalidates():
    cfg = SmoothOutConfig(exclude=["classifier"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.exclude = ["fc1"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strength = -0.05
    with pytest.raises(AttributeError):
        cfg.exclude.append("fc1")  # a tuple
    with pytest.raises(ValueError, match="strength"):
        dataclasses.replace(cfg, strength=-0.05)
    with pytest.raises(ValueError, match="strength"):
        dataclasses.replace(cfg, strength=float("nan"))
    with pytest.raises(ValueError, match="samples"):
        dataclasses.replace(cfg, samples=0)
    assert not dataclasses.replace(cfg, exclude=["fc1"]).selects_name("fc1.weight")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"denoise": "no"}, "denoise"),
        ({"denoise": 0}, "denoise"),
        ({"skip_norm_layers": "false"}, "skip_norm_layers"),
        ({"skip_bias": 1}, "skip_bias"),
        ({"independent_ranks": None}, "independent_ranks"),
        ({"anneal_index": "0.5"}, "anneal_index"),
        ({"tanh_scale": "10"}, "tanh_scale"),
        ({"include": [1]}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"adapt": ["filter"]}, "adapt"),
    ],
)
def test_python_config_is_as_strict_as_the_cli(kwargs, field):
    with pytest.raises(ValueError, match=rf"SmoothOutConfig\.{field}"):
        SmoothOutConfig(**kwargs)


def test_largest_seed_is_accepted_and_distinct_from_zero(tiny_model):
    top = SmoothOut(tiny_model, SmoothOutConfig(seed=2**64 - 1))
    zero = SmoothOut(nn.Linear(6, 8), SmoothOutConfig(seed=0))
    assert top.base_seed != zero.base_seed


# ---------------------------------------------------------------------------------------------- 5. strength bounds
@pytest.mark.parametrize(("adapt", "strength"), [("filter", 1e30), ("weight", 3.0), ("none", 10.0)])
def test_implausible_strength_warns(tiny_model, adapt, strength):
    with pytest.warns(UserWarning, match="larger than the weights"):
        SmoothOut(tiny_model, SmoothOutConfig(strength=strength, adapt=adapt))


def test_plausible_strength_does_not_warn(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmoothOut(tiny_model, SmoothOutConfig(strength=0.05))
        SmoothOut(tiny_model, SmoothOutConfig(strength=1e-3, adapt="none"))


def test_overflowing_noise_is_refused_and_undone(tiny_model):
    with pytest.warns(UserWarning):
        engine = SmoothOut(tiny_model, SmoothOutConfig(strength=1e38, adapt="weight", seed=0))
    with torch.no_grad():
        tiny_model.fc1.weight.mul_(100.0)  # |w| * a overflows float32
    clean = clone_params(tiny_model)
    with pytest.raises(NonFiniteNoiseError, match="non-finite"):
        engine.perturb()
    assert not engine.is_perturbed
    assert_params_equal(tiny_model, clean)


class NoNormClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def test_non_finite_loss_at_noisy_weights_stops_training_with_clean_weights(tmp_path):
    torch.manual_seed(0)
    model = NoNormClassifier()
    clean = clone_params(model)
    with pytest.warns(UserWarning, match="larger than the weights"):
        trainer = SmoothOutTrainer(
            model,
            training_args(tmp_path, max_steps=4),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=1e30, adapt="none", seed=0),
        )
    with pytest.raises(NonFiniteNoiseError, match="clean loss"):
        trainer.train()
    assert_params_equal(model, clean)  # refused at the first step, before any update


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


# ---------------------------------------------------------------------------------------------- 7. early checks
@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (SmoothOutConfig(include=["decoder"]), "selects no trainable parameter"),
        (SmoothOutConfig(include=["fc1"]), "only match frozen parameters"),
    ],
)
def test_empty_selection_fails_at_construction(tmp_path, cfg, message):
    model = model_with_seed()
    model.fc1.requires_grad_(False)
    with pytest.raises(ValueError, match=message):
        SmoothOutTrainer(model, training_args(tmp_path), train_dataset=make_classification_data(), smoothout_config=cfg)


def test_regenerate_with_independent_ranks_fails_at_construction(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    args = training_args(tmp_path)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="regenerate"):
        SmoothOutTrainer(
            model_with_seed(),
            args,
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(restore="regenerate"),
        )


# ---------------------------------------------------------------------------------------------- 8. two engines
def test_overlapping_engines_are_refused(tiny_model):
    first = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=0))
    second = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=1))
    clean = clone_params(tiny_model)
    first.perturb()
    noisy = clone_params(tiny_model)
    with pytest.raises(RuntimeError, match="already perturbed by another SmoothOut engine"):
        second.perturb()
    assert_params_equal(tiny_model, noisy)  # the refused engine touched nothing
    assert not second.is_perturbed
    first.restore()
    assert_params_equal(tiny_model, clean)
    with second.perturbed():  # free again
        pass
    assert_params_equal(tiny_model, clean)


def test_engines_on_disjoint_parameters_may_overlap(tiny_model):
    head = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, include=["fc2"], seed=0))
    body = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, include=["fc1"], seed=1))
    clean = clone_params(tiny_model)
    head.perturb()
    body.perturb()
    head.restore()
    body.restore()
    assert_params_equal(tiny_model, clean)


def test_a_dropped_engine_releases_its_claim(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=0))
    engine.perturb()
    engine.restore()
    other = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=1))
    engine.perturb()
    del engine  # perturbed and gone: its claim dies with it
    import gc

    gc.collect()
    other.perturb()
    other.restore()


# ---------------------------------------------------------------------------------------------- 9. fp16 on CPU
def test_fp16_on_cpu_does_not_warn_about_fp16_resolution(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SmoothOutTrainer(
            model_with_seed(),
            training_args(tmp_path, fp16=True, max_steps=1),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=1e-5, seed=0),
        )
        trainer.train()
    assert not [w for w in caught if "resolution" in str(w.message)]


def test_bf16_on_cpu_still_warns_about_resolution_at_construction(tmp_path):
    with pytest.warns(UserWarning, match="resolution"):
        SmoothOutTrainer(
            model_with_seed(),
            training_args(tmp_path, bf16=True, max_steps=1),
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=1e-5, seed=0),
        )


# ---------------------------------------------------------------------------------------------- 10. CLIs and files
ENTRY_POINTS = [
    ["recipes/glue.py"],
    ["recipes/image_classification.py"],
    *[[str(p.relative_to(ROOT))] for p in sorted((ROOT / "study").glob("*.py")) if "__main__" in p.read_text()],
    ["benchmarks/overhead.py"],
    ["benchmarks/perturb.py"],
    ["-m", "hf_smoothout.cli"],
    ["-m", "hf_smoothout.cli", "sharpness"],
    ["-m", "hf_smoothout.cli", "landscape"],
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: " ".join(e))
def test_every_command_line_prints_its_help(entry, capsys, monkeypatch):
    if entry[0] == "-m":
        target, rest = entry[1], entry[2:]
        monkeypatch.setattr(sys, "argv", [target, *rest, "--help"])
        run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=False)  # noqa: E731
    else:
        path = ROOT / entry[0]
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        monkeypatch.syspath_prepend(str(path.parent))
        run = lambda: runpy.run_path(str(path), run_name="__main__")  # noqa: E731
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_keep_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "README.md", "card")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))
