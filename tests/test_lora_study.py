"""The LoRA study's bookkeeping (strength choice, pairing, cost ratios) on recorded results, and one real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script
from test_text_study import offline_text_available

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    return load_script(ROOT / "study" / "lora_text.py")


def record(study, run, **values) -> None:
    folder = run.folder(study)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "all_results.json").write_text(json.dumps(values))


def test_choice_pairing_and_cost_ratio_from_recorded_results(tmp_path):
    lora = load_study()
    (study,) = lora.HfArgumentParser(lora.LoraStudyArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--tasks", "sst2", "--cost_steps", "10"]
    )
    holdout = {("lora_adapters", 0.03): 0.80, ("lora_adapters", 0.1): 0.82, ("lora_adapters", 0.3): 0.82}
    holdout |= {("lora_merged", 0.01): 0.79, ("lora_merged", 0.03): 0.81, ("lora_merged", 0.1): 0.78}
    for run in lora.sweep_runs(study):
        record(study, run, holdout_accuracy=holdout[(run.arm, run.strength)])
    assert lora.chosen_strengths(study, "sst2") == {
        "lora": 0.0,
        "lora_adapters": 0.1,
        "lora_merged": 0.03,
    }  # tie: smaller

    accuracy = {"lora": [0.80, 0.81, 0.79], "lora_adapters": [0.80, 0.82, 0.80], "lora_merged": [0.82, 0.83, 0.80]}
    finals = lora.final_runs(study)
    assert {(r.arm, r.strength) for r in finals} == {("lora", 0.0), ("lora_adapters", 0.1), ("lora_merged", 0.03)}
    for run in finals:
        record(study, run, eval_accuracy=accuracy[run.arm][study.seeds.index(run.seed)])
    for run in lora.cost_runs(study):
        record(study, run, train_runtime={"lora": 10.0, "lora_adapters": 12.0, "lora_merged": 11.0}[run.arm])

    text = lora.report(study)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| lora")}
    assert "80.00 ± 1.00 (n=3)" in rows["lora"]
    assert "+0.67 [-0.77, +2.10]" in rows["lora_adapters"]  # diffs 0, +1, +1 points
    assert "+1.67 [+0.23, +3.10]" in rows["lora_merged"]  # diffs +2, +2, +1 points
    assert rows["lora_adapters"].endswith("1.20x |") and rows["lora_merged"].endswith("1.10x |")
    assert (tmp_path / "report.md").read_text() == text


def test_commands_name_the_space_and_the_holdout(tmp_path):
    lora = load_study()
    (study,) = lora.HfArgumentParser(lora.LoraStudyArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path)]
    )
    merged = lora.recipe_command(study, lora.Run("sweep", "mnli", "lora_merged", 0.03, 100))
    assert merged[merged.index("--smoothout_space") + 1] == "lora_merged"
    assert merged[merged.index("--holdout_fraction") + 1] == "0.1"
    plain = lora.recipe_command(study, lora.Run("final", "sst2", "lora", 0.0, 0))
    assert "--smoothout_space" not in plain and "--holdout_fraction" not in plain
    assert plain[plain.index("--lora_r") + 1] == "8"
    with pytest.raises(ValueError, match="sweep_seed"):
        lora.LoraStudyArguments(seeds=[100]).check()


@pytest.mark.slow
@pytest.mark.studies
@pytest.mark.skipif(not offline_text_available(), reason="offline MiniLM / Rotten Tomatoes not installed")
def test_tiny_study_runs_end_to_end(tmp_path):
    lora = load_study()
    tiny = ["--output_dir", str(tmp_path), "--tasks", "sst2", "--seeds", "0", "--strengths_adapters", "0.1"]
    tiny += ["--strengths_merged", "0.03", "--epochs", "1", "--max_train_samples", "64", "--max_eval_samples", "32"]
    tiny += ["--num_hidden_layers", "1", "--max_seq_length", "24"]
    lora.main([*tiny, "--stage", "all"])
    text = (tmp_path / "report.md").read_text()
    assert "| lora_merged | 0.03 |" in text and "(n=1)" in text
    log = (tmp_path / "final" / "sst2" / "lora_merged-s0.log").read_text()
    assert "'space': 'lora_merged'" in log and "trainable parameters" in log
