"""`SharpnessCallback` inside real (tiny) `SmoothOutTrainer` runs: logged at every evaluation, equal to the API's
value, and training is bit-identical to a run without it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyClassifier, make_classification_data
from transformers import TrainerCallback, TrainingArguments

from hf_smoothout import SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.analysis import MEASURES, SharpnessCallback, measure_sharpness, model_dataloader

TRAIN = make_classification_data(n=48, seed=0)
EVAL = make_classification_data(n=32, seed=1)
KNOBS = dict(repeats=2, epsilon_iterations=3, subspace_dim=3, power_iterations=5, trace_samples=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def run(tmp_path, callbacks=(), attach: SharpnessCallback | None = None) -> SmoothOutTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=8,
        per_device_eval_batch_size=16, max_steps=6, eval_strategy="steps", eval_steps=3, logging_steps=3,
        save_strategy="no", learning_rate=0.05, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.1)  # dropout: the callback must not shift torch's RNG stream
    trainer = SmoothOutTrainer(
        model, args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=list(callbacks),
        smoothout_config=SmoothOutConfig(strength=0.01, seed=0),
    )  # fmt: skip
    if attach is not None:
        attach.attach(trainer)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    trainer = run(tmp_path_factory.mktemp("baseline"))
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("measure", MEASURES)
def test_callback_logs_the_measure_at_every_evaluation(tmp_path, baseline, measure):
    callback = SharpnessCallback(measure, dataset=TRAIN, max_batches=2, **KNOBS)
    trainer = run(tmp_path, callbacks=[callback])
    key = f"eval_sharpness_{measure}"

    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [3, 6]
    for entry in evaluations:  # merged into the evaluation's own log entry
        assert math.isfinite(entry[key]) and entry["eval_sharpness_runtime"] >= 0
    if measure.startswith("epsilon") or measure == "hessian_trace":
        assert all(entry[f"{key}_std"] >= 0 for entry in evaluations)
    assert evaluations[0][key] != evaluations[1][key]  # measured on the weights of each evaluation

    # training was not disturbed: same weights as the run without the callback (weights, RNG restored)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), baseline[name]), name

    # the last evaluation saw the final weights: the API gives the same number on them
    loader = model_dataloader(TRAIN, trainer.model, batch_size=16)
    expected = measure_sharpness(trainer.model, loader, measure, callback.options, progress=False)
    assert evaluations[1][key] == pytest.approx(expected.value, rel=1e-9, abs=1e-12)
    if measure == "epsilon":
        assert expected.value > 0

    metrics = trainer.evaluate()
    assert metrics[key] == pytest.approx(expected.value, rel=1e-9, abs=1e-12)


def test_attached_callback_logs_through_the_trainer_on_its_eval_data(tmp_path, baseline):
    recorder = LogRecorder()
    callback = SharpnessCallback(["hessian_top", "hessian_trace"], max_batches=1, **KNOBS)  # no data: eval loader
    trainer = run(tmp_path, callbacks=[recorder], attach=callback)
    logged = [log for log in recorder.logs if "eval_sharpness_hessian_top" in log]
    assert len(logged) == 2 and all("eval_loss" not in log for log in logged)  # own entries, seen by on_log
    assert all(set(log) >= {"eval_sharpness_hessian_trace", "eval_sharpness_hessian_trace_std"} for log in logged)
    history = [e for e in trainer.state.log_history if "eval_sharpness_hessian_top" in e]
    assert [e["step"] for e in history] == [3, 6]
    eval_loader = model_dataloader(EVAL, trainer.model, batch_size=16)  # what the Trainer's eval loader yields
    expected = measure_sharpness(trainer.model, eval_loader, "hessian_top", callback.options, progress=False)
    assert history[1]["eval_sharpness_hessian_top"] == pytest.approx(expected.value, rel=1e-9)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), baseline[name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(measure="sam"), "Unknown sharpness measure"),
        (dict(measure=[]), "at least one measure"),
        (dict(dataloader=[{}], dataset=TRAIN), "not both"),
        (dict(samples=3), "Unknown SharpnessCallback options"),
    ],
)
def test_callback_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharpnessCallback(**kwargs)
