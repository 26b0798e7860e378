"""Faults: Ctrl-C while worker threads draw or regenerate, and interrupts at random points: the weights are
always clean afterwards and no parameter stays claimed."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from torch import nn

import hf_smoothout.noise as noise_module
from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.ownership import owner_of

pytestmark = pytest.mark.usefixtures("draw_on_workers", "python_sigint_handler")
ROOT = Path(__file__).resolve().parents[1]
MAIN_THREAD = threading.main_thread().ident


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
