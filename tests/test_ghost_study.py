"""The Fashion-MNIST ghost-batch study (``study/fmnist_ghost_batch.py``): its pieces on synthetic data, and the
whole study end to end on tiny settings (real data, a few hundred examples)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_script
from study_kit.chunk_sam import SAM_EPS
from study_kit.ledger import read_runs
from study_kit.stats import paired_interval
from study_kit.sweep import extension_point
from test_study import fashion_mnist_available
from transformers import TrainerCallback

from hf_smoothout import SmoothOutTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
GHOST, LARGE, SMALL = 16, 64, 16


def load_study():
    return load_script(ROOT / "study" / "fmnist_ghost_batch.py")


study_module = load_study()


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST not installed (scripts/install_offline_data.sh)"
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and fair to whatever else runs on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_study(tmp_path: Path, **overrides):
    settings = {
        "output_dir": str(tmp_path / "study"),
        "hidden": 8,
        "depth": 1,
        "epochs": 2.0,
        "small_batch": SMALL,
        "ghost_batch_size": GHOST,
        "large_batch": LARGE,
        **overrides,
    }
    return study_module.GhostStudyArguments(**settings)


def synthetic_data(n: int = 96, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 784, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    examples = study_module.TensorExamples(pixels, labels)
    return {"train": examples, "validation": examples.subset(32, seed=1), "test": examples.subset(32, seed=2)}


# ---------------------------------------------------------------------------------------------- pieces
def test_each_arm_gets_the_lr_rule_and_the_step_schedule_of_its_batch():
    s = study_module
    default = s.GhostStudyArguments()
    ghost, naive, small = (s.arm_schedule(default, s.ARMS[n], 55000) for n in ("ghost", "naive", "small_baseline"))
    assert ghost["lr"] == naive["lr"] == pytest.approx(0.1 * math.sqrt(32))  # lr * (B / ghost) ** 0.5
    assert small["lr"] == pytest.approx(0.1)
    assert ghost["steps_per_epoch"] == naive["steps_per_epoch"] == 14 and small["steps_per_epoch"] == 430
    assert ghost["milestone_steps"] == [140, 280, 420]  # epochs 10 / 20 / 30 of 50
    assert s.arm_schedule(s.GhostStudyArguments(epochs=10), s.ARMS["ghost"], 55000)["milestone_steps"] == [28, 56, 84]
    linear = s.GhostStudyArguments(lr_rule="linear")
    assert s.arm_schedule(linear, s.ARMS["sam"], 55000)["lr"] == pytest.approx(0.1 * 32)


def test_every_recorded_run_gets_the_same_key_lr_and_step_schedule_today():
    """The ledger stays reusable: each run recorded in ``study/runs/fmnist_ghost/runs.jsonl`` gets, from today's
    code and its recorded settings, the key it was stored under and the LR and LR-drop steps it trained with."""
    ledger = ROOT / "study" / "runs" / "fmnist_ghost" / "runs.jsonl"
    runs = read_runs(ledger).values()
    assert len(runs) >= 72
    for record in runs:
        study = study_module.GhostStudyArguments(**record["settings"])
        arm = study_module.ARMS[record["arm"]]
        key = study_module.run_key(record["phase"], record["batch"], arm.name, record["value"], record["seed"])
        assert key == record["key"]
        schedule = study_module.arm_schedule(study, arm, 55000)  # max_train_samples None: 60,000 - 5,000
        assert schedule["lr"] == record["lr"]  # bit for bit
        assert schedule["milestone_steps"] == record["milestone_steps"]
        assert schedule["steps_per_epoch"] == record["steps_per_epoch"]
        assert study_module.micro_and_accumulation(study, arm) == (record["micro_batch"], record["accumulation"])
        assert study_module.run_settings(study, record["phase"]) == record["settings"]


def test_ghost_arm_accumulates_chunks_and_naive_arm_does_not(tmp_path):
    s = study_module
    study = tiny_study(tmp_path)
    data = synthetic_data()
    built = {}
    for name in ("ghost", "naive", "small_baseline", "adasmoothout", "sam"):
        trainer, model, _, reset, info = s.build_trainer(
            study, data, s.ARMS[name], 0.05, 0, epochs=2, eval_data=None, output_dir=tmp_path / name
        )
        built[name] = (trainer, model, reset, info)
    ghost, naive = built["ghost"][0], built["naive"][0]
    assert (ghost.args.per_device_train_batch_size, ghost.args.gradient_accumulation_steps) == (GHOST, LARGE // GHOST)
    assert (naive.args.per_device_train_batch_size, naive.args.gradient_accumulation_steps) == (LARGE, 1)
    assert built["adasmoothout"][0].args.gradient_accumulation_steps == LARGE // GHOST
    assert built["small_baseline"][0].args.gradient_accumulation_steps == 1
    # the optimizer and scheduler the Trainer uses are ours: SGD with the authors' settings, step schedule
    for trainer, _model, reset, _info in built.values():
        assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.param_groups[0]["params"]
        group = trainer.optimizer.param_groups[0]
        assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
        assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.MultiStepLR)
        assert reset is not None and any(cb is reset for cb in trainer.callback_handler.callbacks)
    assert built["ghost"][3]["lr"] == pytest.approx(0.1 * math.sqrt(LARGE / GHOST))
    assert built["small_baseline"][3]["lr"] == pytest.approx(0.1)
    assert isinstance(built["sam"][0], s.ChunkSAMTrainer) and not built["sam"][0].smoothout_config.enabled
    assert built["adasmoothout"][0].smoothout_config.adapt == "filter"
    assert built["adasmoothout"][0].smoothout_config.skip_norm_layers  # BatchNorm stays clean, as the authors'
    assert not built["ghost"][0].smoothout_config.enabled


def test_momentum_reset_clears_sgd_state_every_epoch(tmp_path):
    s = study_module
    study = tiny_study(tmp_path, epochs=3.0)
    trainer, _, _, reset, info = s.build_trainer(
        study, synthetic_data(), s.ARMS["ghost"], 0.0, 0, epochs=3, eval_data=None, output_dir=tmp_path / "run"
    )

    class Probe(TrainerCallback):  # runs after the reset callback
        def __init__(self):
            self.at_begin, self.at_end = [], []

        def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
            self.at_begin.append(sum("momentum_buffer" in v for v in optimizer.state.values()))

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            self.at_end.append(sum("momentum_buffer" in v for v in optimizer.state.values()))

    probe = Probe()
    trainer.add_callback(probe)
    trainer.train()
    assert probe.at_begin == [0, 0, 0]  # cleared at every epoch start ...
    assert all(n > 0 for n in probe.at_end)  # ... after SGD had built its buffers
    assert reset.resets == 2
    assert trainer.state.global_step == 3 * info["steps_per_epoch"]

    # the callback on its own
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    assert "momentum_buffer" in opt.state[p]
    s.MomentumResetCallback().on_epoch_begin(None, None, None, optimizer=opt)
    assert len(opt.state) == 0


def test_chunk_sam_step_restores_weights_and_uses_the_sam_gradient(tmp_path):
    s = study_module
    torch.manual_seed(0)
    model = s.KeskarMLP(hidden=8, depth=2)
    model.train()
    generator = torch.Generator().manual_seed(3)
    batch = {"pixel_values": torch.randn(12, 784, generator=generator), "labels": torch.arange(12) % 10}
    args = SmoothOutTrainingArguments(
        output_dir=str(tmp_path / "sam"), smoothout_strength=0.0, use_cpu=True, report_to="none"
    )
    rho = 0.5
    trainer = s.ChunkSAMTrainer(model, args, sam_rho=rho)
    trainer.current_gradient_accumulation_steps = 2  # as inside an accumulation of two chunks

    params = [p for p in model.parameters() if p.requires_grad]
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)  # the expected gradients, by hand
    reference.train()
    clean = reference(**batch)["loss"]
    ref_params = list(reference.parameters())
    g = torch.autograd.grad(clean, ref_params)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    stats_after_one_pass = copy.deepcopy(reference.state_dict())  # BN statistics after the clean pass only
    with torch.no_grad():
        for p, x in zip(ref_params, g, strict=True):
            p.add_(rho * x / (norm + SAM_EPS))
    sam_grad = torch.autograd.grad(reference(**batch)["loss"], ref_params)

    loss = trainer.training_step(model, batch)

    for name, tensor in model.state_dict().items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(tensor, stats_after_one_pass[name]), name  # updated once, by the clean pass
        else:
            assert torch.equal(tensor, before[name]), name  # weights restored bit-exactly
    for p, expected in zip(params, sam_grad, strict=True):
        assert torch.allclose(p.grad, expected / 2, atol=1e-6, rtol=1e-4)  # SAM gradient, scaled for 2 chunks
    got = torch.cat([p.grad.flatten() for p in params])
    plain_flat = torch.cat([x.flatten() for x in g]) / 2
    assert not torch.allclose(got, plain_flat, atol=1e-4)  # differs from the plain SGD gradient
    assert loss.item() == pytest.approx(clean.item() / 2)  # the clean loss is what gets logged

    with pytest.raises(ValueError, match="SAM alone"):
        s.ChunkSAMTrainer(model, SmoothOutTrainingArguments(output_dir=str(tmp_path / "x")), sam_rho=0.1)


def test_one_draw_per_step_arm_holds_the_noise_over_the_window(tmp_path):
    s = study_module
    trainer, *_ = s.build_trainer(
        tiny_study(tmp_path), synthetic_data(), s.ARMS["ada_draw_step"], 0.1, 0,
        epochs=1, eval_data=None, output_dir=tmp_path / "step",
    )  # fmt: skip
    assert trainer.args.smoothout_noise_every == "step" and trainer.args.gradient_accumulation_steps == LARGE // GHOST
    assert trainer.smoothout_config.adapt == "filter" and trainer.smoothout_config.strength == 0.1
    assert trainer.smoothout_config.noise_every == "step"


def test_sweep_extends_from_an_edge_up_to_the_limit(tmp_path):
    s = study_module
    study = tiny_study(tmp_path, strengths_filter=[0.01, 0.1], max_extensions=2)
    arm = s.ARMS["adasmoothout"]
    runs = {}

    def score(value: float, accuracy: float) -> None:
        key = s.run_key("sweep", LARGE, "adasmoothout", value, study.sweep_seed)
        runs[key] = {"key": key, "validation_accuracy": accuracy}

    assert s.arm_sweep(study, arm, runs).todo == [0.01, 0.1]
    score(0.01, 0.5)
    score(0.1, 0.7)  # best at the upper edge -> one log step (x10) further
    state = s.arm_sweep(study, arm, runs)
    assert state.todo == [1.0] and state.extensions == [1.0] and state.chosen is None
    score(1.0, 0.8)  # still the edge -> a second extension
    state = s.arm_sweep(study, arm, runs)
    assert state.todo == [10.0] and state.extensions == [1.0, 10.0]
    score(10.0, 0.9)  # edge again, but the limit of two extensions is reached
    state = s.arm_sweep(study, arm, runs)
    assert state.todo == [] and state.chosen == 10.0 and state.at_edge
    # interior best: no extension
    runs.clear()
    study = tiny_study(tmp_path, strengths_filter=[0.01, 0.03, 0.1])
    score(0.01, 0.5)
    score(0.03, 0.9)
    score(0.1, 0.6)
    state = s.arm_sweep(study, arm, runs)
    assert state.todo == [] and state.chosen == 0.03 and state.extensions == []


# ---------------------------------------------------------------------------------------------- end to end
TINY = [
    "--hidden", "16", "--depth", "2", "--max_train_samples", "400", "--max_test_samples", "100",
    "--epochs", "2", "--small_batch", str(SMALL), "--ghost_batch_size", str(GHOST), "--large_batch", str(LARGE),
    "--seeds", "0", "1",
    "--strengths_none", "0.001", "0.01", "--strengths_filter", "0.05", "0.2", "--sam_rhos", "0.05", "0.2",
    "--small_strengths_none", "0.01", "--small_strengths_filter", "0.1",
    "--sharpness_samples", "50", "--sharpness_iterations", "1", "--sharpness_repeats", "1",
    "--hessian_iterations", "2", "--subspace_dim", "3",
]  # fmt: skip


@pytest.mark.slow
@needs_fashion_mnist
def test_study_end_to_end_resumes_and_reports(tmp_path, capsys):
    s = study_module
    out = tmp_path / "study"
    args = ["--output_dir", str(out), *TINY]

    s.main([*args, "--stage", "plan"])  # nothing run yet: every sweep point is listed, finals wait for sweeps
    planned = capsys.readouterr().out
    assert "sweep-b64-smoothout-v0.001-s100" in planned and "final-b64-sam-v?-s1" in planned
    assert not (out / "runs.jsonl").exists()

    s.main(args)  # --stage all
    capsys.readouterr()
    path = out / "runs.jsonl"
    lines = path.read_text().splitlines()
    runs = {r["key"]: r for r in map(json.loads, lines)}
    assert len(runs) == len(lines)
    study = s.GhostStudyArguments(**{**json.loads((out / "study_arguments.json").read_text()), "stage": "all"})

    # sweeps: complete, extended from edges (two-point grids always start at an edge), validation only
    for name in ("smoothout", "adasmoothout", "sam", "small_smoothout", "small_adasmoothout"):
        state = s.arm_sweep(study, s.ARMS[name], runs)
        assert state.todo == [] and state.chosen is not None
        base = sorted(getattr(study, s.ARMS[name].grid))
        if len(base) == 2:
            assert 1 <= len(state.extensions) <= 2
            assert not state.at_edge or len(state.extensions) == 2
        grid = base
        for point in state.extensions:  # each extension is one log step beyond the then-edge
            assert point in (extension_point(grid, low=True), extension_point(grid, low=False))
            grid = sorted([*grid, point])
        assert grid == state.grid
    sweeps = [r for r in runs.values() if r["phase"] == "sweep"]
    assert all("test_accuracy" not in r and len(r["validation_curve"]) == 2 for r in sweeps)

    # finals: every arm x seed at the chosen value; the per-chunk protocol really ran
    expected_arms = list(s.ARMS)
    finals = [r for r in runs.values() if r["phase"] == "final"]
    assert sorted((r["arm"], r["seed"]) for r in finals) == sorted((n, seed) for n in expected_arms for seed in (0, 1))
    steps_per_epoch = math.ceil(math.ceil(360 / GHOST) / (LARGE // GHOST))  # 360 training examples
    for r in finals:
        assert len(r["test_curve"]) == 2 and r["test_curve"][-1] == r["test_accuracy"]
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
        assert r["hessian_top"] == r["hessian_top"] and r["epsilon_subspace"] >= 0.0
        assert r["momentum_resets"] == 1
        assert (out / "models" / f"{r['key']}.safetensors").is_file()
        if r["batch"] == LARGE and r["arm"] != "naive":
            assert (r["micro_batch"], r["accumulation"]) == (GHOST, LARGE // GHOST)
            assert r["steps"] == 2 * steps_per_epoch
        lr = 0.1 * math.sqrt(r["batch"] / GHOST)
        assert r["lr"] == pytest.approx(lr)
        decays = sum(m <= r["steps_per_epoch"] for m in r["milestone_steps"])
        assert r["lr_per_epoch"] == pytest.approx([lr, lr * 0.1**decays])
    naive = next(r for r in finals if r["arm"] == "naive")
    assert (naive["micro_batch"], naive["accumulation"]) == (LARGE, 1)
    ada = s.chosen_value(study, s.ARMS["adasmoothout"], runs)
    ablations = [r for r in finals if r["arm"] in ("ada_nodenoise", "ada_gaussian")]
    assert {r["value"] for r in ablations} == {ada}
    assert all(not r["noise"]["denoise"] for r in ablations if r["arm"] == "ada_nodenoise")
    assert all(r["noise"]["distribution"] == "gaussian" for r in ablations if r["arm"] == "ada_gaussian")

    # report: paired differences to the ghost baseline with a 95 % t-interval, the curves plot
    text = (out / "report.md").read_text()
    assert "## Paired difference to the ghost-BN baseline" in text and "95 % t-interval" in text
    by = {(r["arm"], r["seed"]): r["test_accuracy"] for r in finals}
    diffs = [round(100 * (by[("adasmoothout", sd)] - by[("ghost", sd)]), 10) + 0.0 for sd in (0, 1)]
    mean, low, high = paired_interval(diffs)
    assert f"| adasmoothout | 2 | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] |" in text
    assert "Differences from the authors'" in text and "Large-batch gap" in text
    assert (out / "plots" / "test_accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "plots" / "ghost_baseline_vs_adasmoothout" / "landscape_interpolation.png").is_file()

    # resume: a second run adds nothing
    for stage in s.TRAINING_STAGES:
        s.main([*args, "--stage", stage])
    assert path.read_text().splitlines() == lines

    # killed while writing the last record: that line is ignored, the run is redone, nothing fuses
    last = json.loads(lines[-1])
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    s.main([*args, "--stage", "small"])
    redone = path.read_text().splitlines()
    assert len(redone) == len(lines) and redone[:-1] == lines[:-1]
    assert json.loads(redone[-1])["key"] == last["key"]

    capsys.readouterr()
    s.main([*args, "--stage", "plan"])
    assert "Nothing left to run" in capsys.readouterr().out

    # cost: interleaved benchmark, ratio to the ghost baseline measured in the same run
    s.main([*args, "--stage", "cost", "--cost_rounds", "2", "--cost_arms", "naive", "sam"])
    assert "only valid when nothing else runs" in capsys.readouterr().out
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["arms"]) == {"ghost", "naive", "sam"}
    assert cost["arms"]["ghost"]["ratio_to_ghost"] == 1.0
    assert all(len(a["per_epoch_s"]) == 2 and a["median_s"] > 0 for a in cost["arms"].values())
    assert cost["arms"]["sam"]["value"] == s.chosen_value(study, s.ARMS["sam"], runs)
    assert path.read_text().splitlines() == redone  # benchmarks are not study runs
    s.main([*args, "--stage", "report"])
    text = (out / "report.md").read_text()
    ghost_row = next(line for line in text.splitlines() if line.startswith("| ghost (ghost-BN baseline)"))
    assert "| 1.00 |" in ghost_row


def test_summaries_of_a_diverged_cell_say_so_instead_of_failing():
    """A diverged arm (no de-noising) has NaN sharpness on every seed: the report must still render."""
    from study_kit import stats

    assert stats.mean_std([0.9, 0.92], scale=100) == "91.00 ± 1.41"
    assert stats.mean_std([float("nan"), float("nan"), float("nan")]) == "n/a (3 of 3 non-finite)"
    assert stats.mean_std([1.0, float("inf")]) == "n/a (1 of 2 non-finite)"
    assert stats.mean_std([]) == "-"
