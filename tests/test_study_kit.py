"""The study kit (``study/study_kit``): sweeps with grid extension, the ledger, the schedule, the report pieces and
the cost tools, and the learning rates and LR-drop steps the studies' real configurations get from them."""

from __future__ import annotations

import doctest
import importlib
import json
import math
import pkgutil
import statistics
from pathlib import Path

import pytest
import study_kit
import torch
from conftest import load_script
from recipe_kit.protocol import ProtocolOptions
from study_kit import cost, ledger, report, schedule, sweep

ROOT = Path(__file__).resolve().parents[1]


def scored(scores: dict[float, float]):
    return lambda value: scores.get(value)


# ---------------------------------------------------------------------------------------------- sweep
def test_a_best_point_on_the_grid_edge_adds_one_point_beyond_it():
    state = sweep.sweep_state("ada", [0.01, 0.03, 0.1], scored({0.01: 0.5, 0.03: 0.6, 0.1: 0.7}), max_extensions=2)
    assert state.todo == [0.333] and state.extensions == [0.333] and state.chosen is None  # 0.1 * (0.1 / 0.03)
    low = sweep.sweep_state("ada", [0.01, 0.03, 0.1], scored({0.01: 0.9, 0.03: 0.6, 0.1: 0.7}), max_extensions=2)
    assert low.todo == [0.00333] and low.grid == [0.00333, 0.01, 0.03, 0.1]


def test_an_interior_best_point_ends_the_sweep_without_extensions():
    state = sweep.sweep_state("ada", [0.1, 0.01, 0.03], scored({0.01: 0.5, 0.03: 0.9, 0.1: 0.6}), max_extensions=2)
    assert (state.chosen, state.extensions, state.todo, state.at_edge) == (0.03, [], [], False)


def test_extensions_stop_at_the_limit_and_the_choice_is_flagged_at_the_edge():
    scores = {0.01: 0.5, 0.1: 0.7, 1.0: 0.8, 10.0: 0.9}
    state = sweep.sweep_state("ada", [0.01, 0.1], scored(scores), max_extensions=2)
    assert state.extensions == [1.0, 10.0] and state.chosen == 10.0 and state.at_edge
    assert sweep.point_label(state, 10.0) == "10 (chosen, extension)" and sweep.point_label(state, 0.1) == "0.1"


def test_ties_go_to_the_larger_value_unless_the_smaller_is_preferred():
    pairs = [(0.03, 0.8), (0.1, 0.82), (0.3, 0.82)]
    assert sweep.best_value(pairs) == 0.3 and sweep.best_value(pairs, prefer="smaller") == 0.1
    assert sweep.best_value([]) is None


def test_a_sweep_runs_its_points_and_extensions_until_it_has_chosen(capsys):
    scores: dict[float, float] = {}
    accuracy = {0.01: 0.5, 0.1: 0.7, 1.0: 0.6}
    state = sweep.run_sweep(
        lambda: sweep.sweep_state("ada", [0.01, 0.1], scores.get, 2), lambda v: scores.update({v: accuracy[v]})
    )
    assert state.chosen == 0.1 and sorted(scores) == [0.01, 0.1, 1.0]
    assert capsys.readouterr().out == "Sweep ada: chosen 0.1; extensions [1.0]\n"


# ---------------------------------------------------------------------------------------------- ledger
def test_the_ledger_ignores_a_line_cut_off_by_a_kill_and_appends_after_it(tmp_path):
    path = tmp_path / "runs.jsonl"
    ledger.append_run(path, {"key": "a", "x": 1})
    path.write_text(path.read_text() + '{"key": "b", "x": ')  # killed while writing
    assert list(ledger.read_runs(path)) == ["a"]
    ledger.append_run(path, {"key": "c"})
    assert list(ledger.read_runs(path)) == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_run_in_the_ledger_is_reused_only_with_the_same_settings(tmp_path):
    path, runs = tmp_path / "runs.jsonl", {}
    trained = []

    def train():
        trained.append(1)
        return {"key": "k", "settings": {"epochs": 2.0}}

    assert ledger.run_once(path, runs, "k", train, {"epochs": 2.0})[1] is True
    record, again = ledger.run_once(path, ledger.read_runs(path), "k", train, {"epochs": 2.0})
    assert not again and record["settings"] == {"epochs": 2.0} and len(trained) == 1
    with pytest.raises(ValueError, match=r"Run k in runs.jsonl was made with other settings \(epochs\)"):
        ledger.run_once(path, ledger.read_runs(path), "k", train, {"epochs": 3.0})


def test_run_keys_keep_the_format_of_the_recorded_runs():
    assert ledger.run_key("final", 4096, "adasmoothout", 0.3, 3) == "final-b4096-adasmoothout-v0.3-s3"
    assert ledger.run_key("sweep", 4096, "smoothout", 0.0333, 100) == "sweep-b4096-smoothout-v0.0333-s100"
    assert ledger.run_key("sweep", 128, "smoothout", 0.00025, 100, tag="a") == "sweep-b128-smoothout-a0.00025-s100"


# ---------------------------------------------------------------------------------------------- schedule
def test_the_learning_rate_scales_with_the_batch_ratio_to_the_power_of_the_rule():
    assert schedule.scale_learning_rate(0.1, 4096, 128, "sqrt") == 0.1 * math.sqrt(32)
    assert schedule.scale_learning_rate(0.1, 4096, 128, "linear") == 0.1 * 32
    assert schedule.scale_learning_rate(0.1, 4096, 128, "none") == 0.1
    assert schedule.scale_learning_rate(0.1, 4096, None, "none") == 0.1  # no reference needed
    for rule, power in (("sqrt", 0.5), ("linear", 1.0), ("none", 0.0)):
        assert schedule.scale_learning_rate(0.05, 512, 32, rule) == pytest.approx(0.05 * (512 / 32) ** power)


def test_milestones_fall_at_the_fractions_of_the_training_steps_and_never_coincide():
    assert schedule.milestone_steps([0.2, 0.4, 0.6], 50 * 14) == [140, 280, 420]
    assert schedule.milestone_steps([0.4, 0.6], 4) == [2, 3]  # 1.6 and 2.4 both round to 2
    assert schedule.milestone_steps([0.1], 2) == [1]  # never step 0 (no drop at all)
    assert ProtocolOptions(lr_milestones=[0.2, 0.4, 0.6]).milestone_steps(700) == [140, 280, 420]  # the recipes'
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = schedule.step_scheduler(opt, [2, 4, 6], 0.1)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])


def test_the_ghost_study_real_configuration_keeps_its_milestones_and_learning_rates():
    """Batch 4096 in ghost chunks of 128, 55,000 training examples, 50 epochs, drops at 0.2 / 0.4 / 0.6 of the
    epochs, LR 0.1 at 128 with the sqrt rule: the values every recorded run trained with, bit for bit."""
    ghost = load_script(ROOT / "study" / "fmnist_ghost_batch.py")
    study = ghost.GhostStudyArguments()
    assert (study.large_batch, study.ghost_batch_size, study.epochs, study.lr_milestones) == (
        4096,
        128,
        50.0,
        [0.2, 0.4, 0.6],
    )
    assert (study.base_lr, study.lr_rule, study.small_batch) == (0.1, "sqrt", 128)
    large = {"lr": 0.5656854249492381, "steps_per_epoch": 14, "milestone_steps": [140, 280, 420]}
    small = {"lr": 0.1, "steps_per_epoch": 430, "milestone_steps": [4300, 8600, 12900]}
    for name, arm in ghost.ARMS.items():
        assert ghost.arm_schedule(study, arm, 55000) == (large if arm.scale == "large" else small), name
    # the rounding of the single milestone rule agrees with the study's former round(f * epochs * steps) wherever
    # the study's batches take it: every epoch count up to 100, at both batch sizes
    for epochs in range(1, 101):
        for steps in (14, 430):
            former = [round(f * epochs * steps) for f in study.lr_milestones]
            assert schedule.milestone_steps(study.lr_milestones, epochs * steps) == former, (epochs, steps)


def test_the_large_batch_study_defaults_keep_their_learning_rates():
    """``fmnist_large_batch.py``: LR 0.05 at batch 128 with the sqrt rule; no milestones (linear decay)."""
    large_study = load_script(ROOT / "study" / "fmnist_large_batch.py")
    study = large_study.StudyArguments()
    assert (study.base_lr, study.small_batch, study.large_batch, study.lr_rule) == (0.05, 128, 4096, "sqrt")
    assert large_study.batch_lr(study, 128) == 0.05
    assert large_study.batch_lr(study, 4096) == 0.28284271247461906 == 0.05 * math.sqrt(32)
    assert large_study.run_key("final", 4096, "smoothout", 0.004, 0) == "final-b4096-smoothout-a0.004-s0"


# ---------------------------------------------------------------------------------------------- report
def test_a_paired_row_gives_the_mean_difference_in_points_with_its_t_interval():
    from scipy.stats import t

    ours, reference = {0: 0.905, 1: 0.915, 2: 0.91, 3: 0.92}, {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.9, 4: 0.5}
    row = report.paired_interval_row("ada", ours, reference, [0, 1, 2, 3, 4])
    diffs = [0.5, 1.5, 1.0, 2.0]
    half = t.ppf(0.975, 3) * statistics.stdev(diffs) / 2
    assert row == [
        "ada",
        "4",
        "+1.25",
        f"[{1.25 - half:+.2f}, {1.25 + half:+.2f}]",
        "0: +0.50, 1: +1.50, 2: +1.00, 3: +2.00",
    ]
    assert report.paired_interval_row("ada", {0: 0.9}, {0: 0.9}, [0])[2:4] == ["+0.00", "n/a (one pair)"]  # no -0.00
    assert report.paired_interval_row("gap", ours, reference, [0], sign=-1)[2] == "-0.50"
    assert report.paired_interval_row("ada", ours, {}, [0, 1]) is None


def test_the_gap_share_compares_the_arm_with_both_ends_of_the_gap():
    row = report.gap_share_row(
        "ada", {0: 0.88, 1: 0.89, 2: 0.9}, {0: 0.87, 1: 0.87, 2: 0.9}, {0: 0.91, 1: 0.9, 2: 0.9}, [0, 1, 2]
    )
    assert row == ["ada", "2", "43 %", "25 %, 67 %"]  # seed 2 has no gap: left out


def test_tables_sections_and_cell_summaries_render_as_the_reports_show_them():
    assert report.section("Sweeps", ["a"], [], "(no sweep runs yet)") == ["", "## Sweeps", "", "(no sweep runs yet)"]
    assert report.table_lines(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    cell = [{"test_accuracy": 0.9, "hessian_top": 10.0}, {"test_accuracy": 0.92, "hessian_top": None}]
    assert report.cell_summary(cell, "test_accuracy", 100) == "91.00 ± 1.41"
    assert report.cell_summary(cell, "hessian_top", 1, 1) == "10.0 ± 0.0"
    assert report.value_label(0.005, tunes="rho") == "0.005 (rho)"


def test_mean_curves_are_plotted_one_panel_per_group(tmp_path):
    series = [("large", "ghost", [[0.8, 0.85], [0.82, 0.86, 0.9]]), ("small", "small", [None]), ("small", "b", [[0.9]])]
    path = report.plot_mean_curves(tmp_path / "curves.png", {"large": "batch 4096", "small": "batch 128"}, series)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.plot_mean_curves(tmp_path / "none.png", {"large": "x"}, []) is None


# ---------------------------------------------------------------------------------------------- cost
def test_the_plan_estimate_falls_back_from_own_runs_to_similar_arms_to_cost_json_to_the_default():
    runs = {"a": {"arm": "ghost", "train_runtime_s": 300.0, "epochs": 50.0}}
    similar = lambda arm: arm == "ghost"  # noqa: E731
    assert cost.epoch_seconds_estimate(runs, "ghost", similar, None, 1.0) == (6.0, "measured (1 runs)")
    assert cost.epoch_seconds_estimate(runs, "smoothout", similar, None, 1.0) == (
        6.0,
        "measured on similar arms (1 runs)",
    )
    benchmark = {"arms": {"sam": {"median_s": 11.0}}}
    assert cost.epoch_seconds_estimate(runs, "sam", lambda arm: False, benchmark, 1.0) == (11.0, "cost.json")
    assert cost.epoch_seconds_estimate({}, "naive", similar, benchmark, 5.2) == (5.2, "pilot default")


def test_a_benchmark_interleaves_the_arms_and_writes_ratios_to_the_reference(tmp_path, capsys):
    calls = []

    def seconds_of(arm, round_index):
        calls.append((arm, round_index))
        return {"ghost": 5.0, "sam": 10.0 + round_index}[arm]

    path = tmp_path / "cost.json"
    result = cost.benchmark(path, ["ghost", "sam"], 3, seconds_of, lambda arm: {"label": arm}, "ghost", {"threads": 1})
    assert calls == [("ghost", 0), ("sam", 0), ("ghost", 1), ("sam", 1), ("ghost", 2), ("sam", 2)]
    assert json.loads(path.read_text()) == result and not path.with_suffix(".json.tmp").exists()
    assert list(result)[:4] == ["note", "reference_arm", "rounds", "threads"]
    assert result["arms"]["sam"] == {
        "label": "sam",
        "per_epoch_s": [10.0, 11.0, 12.0],
        "median_s": 11.0,
        "ratio_to_ghost": 2.2,
    }
    assert "only valid when nothing else runs" in capsys.readouterr().out
    note = cost.cost_column_note(result, "ghost", "ghost baseline")
    assert note.startswith("- cost column: median per-epoch wall time over 3 interleaved rounds relative to the ghost ")


# ---------------------------------------------------------------------------------------------- kit modules
def test_every_kit_module_explains_itself_with_an_example_that_runs():
    for module_info in pkgutil.iter_modules(study_kit.__path__):
        module = importlib.import_module(f"study_kit.{module_info.name}")
        assert module.__doc__ and "Example:" in module.__doc__, module_info.name
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module_info.name
