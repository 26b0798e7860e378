"""Model cards of SmoothOut runs: metadata, results, hyperparameters, baseline comparison, analysis, CLI, Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hf_smoothout import SmoothOutConfig, SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.modelcard import (
    build_model_card,
    comparison_table,
    flatten_numbers,
    main,
    write_model_card,
    write_run_info,
)


def make_run(folder: Path, strength: float, accuracy: float, seed: int = 42, **results: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = SmoothOutConfig(strength=strength, seed=seed)
    write_run_info(
        folder,
        {
            "model_name": f"minilm-sst2-{'smoothout' if strength else 'baseline'}",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "model_type": "bert",
            "model_notes": "first 2 of its 6 layers",
            "num_parameters": 15_616_130,
            "dataset": {
                "name": "GLUE SST-2",
                "hub_id": "nyu-mll/glue",
                "config": "sst2",
                "train_split": "train",
                "eval_splits": ["validation"],
                "num_train": 67349,
                "num_eval": 872,
            },
            "task": {"type": "text-classification", "name": "Text Classification"},
            "training": {
                "per_device_train_batch_size": 64,
                "gradient_accumulation_steps": 2,
                "world_size": 2,
                "effective_batch_size": 256,
                "learning_rate": 2e-4,
                "base_learning_rate": 1e-4,
                "lr_scaling": "sqrt",
                "reference_batch_size": 64,
                "max_steps": 500,
                "seed": seed,
            },
            "smoothout": config.to_dict(),
            "primary_metric": "eval_accuracy",
            "command": ["python", "recipes/glue.py", "--smoothout_strength", str(strength)],
        },
    )
    metrics = {"eval_accuracy": accuracy, "eval_loss": 0.4, "eval_runtime": 3.2, "eval_samples": 872, "epoch": 1.0}
    metrics.update({"train_loss": 0.3, "train_runtime": 100.0, **results})
    (folder / "all_results.json").write_text(json.dumps(metrics))
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_metadata_results_and_hyperparameters(tmp_path):
    run = make_run(tmp_path / "smoothout", 0.01, 0.875)
    card = write_model_card(run).read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "transformers" and meta["datasets"] == ["nyu-mll/glue"]
    assert "smoothout" in meta["tags"] and "text-classification" in meta["tags"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "GLUE SST-2", "type": "nyu-mll/glue", "config": "sst2", "split": "validation"}
    assert result["metrics"] == [{"type": "accuracy", "value": 0.875, "name": "accuracy"}]

    assert "fine-tuned version of [sentence-transformers/all-MiniLM-L6-v2]" in card
    assert "(first 2 of its 6 layers) on GLUE SST-2" in card
    assert "| **accuracy** | 0.8750 |" in card and "| train loss | 0.3000 |" in card
    assert "runtime" not in card and "| samples" not in card  # bookkeeping is not a result
    assert "effective batch size: 256 = 64 per device x 2 gradient accumulation x 2 processes" in card
    assert "learning rate: 0.0002 (sqrt scaling of the base rate 0.0001 from the reference batch 64)" in card
    for key in SmoothOutConfig(strength=0.01, seed=42).to_dict():
        assert f"| `{key}` |" in card, key
    assert "| `strength` | 0.01 |" in card and "| `adapt` | filter |" in card
    assert "```bash\npython recipes/glue.py --smoothout_strength 0.01\n```" in card
    assert "[](" not in card and "None dataset" not in card
    assert not list(run.glob(".README.md.*"))  # written through a temporary file that is gone


def test_comparison_with_baseline_shows_both_and_the_difference(tmp_path):
    baseline = make_run(tmp_path / "baseline", 0.0, 0.850)
    run = make_run(tmp_path / "smoothout", 0.01, 0.875)
    card = build_model_card(run, compare_to=baseline)
    assert "## Comparison with the baseline" in card
    header = "| metric | baseline (SmoothOut off) | AdaSmoothOut a=0.01 (filter, uniform, constant) | difference |"
    assert header in card
    assert "| accuracy | 0.8500 | 0.8750 | +0.0250 |" in card
    assert "| loss | 0.4000 | 0.4000 | +0.0000 |" in card
    assert "Apart from SmoothOut, the runs share model, data" in card
    assert comparison_table(run, baseline).splitlines()[0] == header
    base_card = build_model_card(baseline)
    assert "smoothout-baseline" in front_matter(base_card)["tags"] and "SmoothOut switched off" in base_card


def test_comparison_flags_other_differences(tmp_path):
    baseline = make_run(tmp_path / "baseline", 0.0, 0.86, seed=1)
    run = make_run(tmp_path / "smoothout", 0.02, 0.85, seed=2)
    card = build_model_card(run, compare_to=baseline)
    assert "| accuracy | 0.8600 | 0.8500 | -0.0100 |" in card
    assert "The runs differ in more than SmoothOut:" in card and "- seed: 1 (baseline) vs 2 (this run)" in card


def test_analysis_section_with_sharpness_and_plots(tmp_path):
    baseline = make_run(tmp_path / "baseline", 0.0, 0.85)
    run = make_run(tmp_path / "smoothout", 0.01, 0.87)
    for folder, value in ((run, 1.5), (baseline, 4.0)):
        (folder / "analysis").mkdir()
        sharpness = {"epsilon_sharpness": {"mean": value, "repeats": [value - 0.5, value + 0.5]}, "eps": 5e-4}
        (folder / "analysis" / "sharpness.json").write_text(json.dumps(sharpness))
    (run / "analysis" / "landscape_interpolation.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "analysis" / "landscape_random_direction.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    card = build_model_card(run, compare_to=baseline)
    assert "## Sharpness and loss landscape" in card
    assert "| quantity | baseline | this run | difference |" in card
    assert "| epsilon_sharpness.mean | 4.0000 | 1.5000 | -2.5000 |" in card
    assert "| epsilon_sharpness.repeats | 4.0000 ± 0.5000 (n=2) | 1.5000 ± 0.5000 (n=2) |  |" in card
    assert "![landscape_interpolation](analysis/landscape_interpolation.png)" in card
    assert "![landscape_random_direction](analysis/landscape_random_direction.png)" in card
    alone = build_model_card(run)
    assert "| quantity | value |" in alone and "| eps | 0.0005 |" in alone
    assert "Sharpness" not in build_model_card(make_run(tmp_path / "plain", 0.01, 0.8))


def test_flatten_numbers_summarizes_lists():
    assert flatten_numbers({"a": {"b": 1, "c": [1.0, 3.0]}, "d": "text"}) == {
        "a.b": 1,
        "a.c": "2.0000 ± 1.0000 (n=2)",
        "d": "text",
    }


def test_cli_rewrites_the_card_and_prints_the_table(tmp_path, capsys):
    baseline = make_run(tmp_path / "baseline", 0.0, 0.85)
    run = make_run(tmp_path / "smoothout", 0.01, 0.87)
    assert main([str(run), "--compare_to", str(baseline), "--print_table"]) == 0
    printed = capsys.readouterr().out
    assert "| accuracy | 0.8500 | 0.8700 | +0.0200 |" in printed
    assert "## Comparison with the baseline" in (run / "README.md").read_text()
    # compare_to recorded in smoothout_run.json is remembered when the card is re-run after the analysis
    info = json.loads((run / "smoothout_run.json").read_text())
    write_run_info(run, {**info, "compare_to": str(baseline)})
    (run / "README.md").unlink()
    assert main([str(run)]) == 0
    assert "## Comparison with the baseline" in (run / "README.md").read_text()


def test_cli_reports_a_missing_run(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert not (tmp_path / "empty" / "README.md").exists()


def test_trainer_create_model_card_without_a_recipe(tiny_model, tiny_data, tmp_path):
    """A plain script: SmoothOutTrainer.create_model_card (what push_to_hub calls) writes the SmoothOut card."""
    args = SmoothOutTrainingArguments(
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        smoothout_strength=0.02,
        smoothout_schedule="anneal",
    )
    trainer = SmoothOutTrainer(tiny_model, args, train_dataset=tiny_data, eval_dataset=tiny_data)
    trainer.train()
    trainer.evaluate()
    trainer.create_model_card(model_name="tiny-smoothout", dataset="toy blobs", tags=["demo"])
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["tags"][:2] == ["smoothout", "generated_from_trainer"] and "demo" in meta["tags"]
    assert "# tiny-smoothout" in card and "on toy blobs" in card
    assert "AdaSmoothOut a=0.02 (filter, uniform, anneal)" in card and "| `schedule` | anneal |" in card
    assert "effective batch size: 8 = 8 per device x 1 gradient accumulation x 1 process" in card
    assert "| loss |" in card  # the evaluation from the log history
    assert "[](" not in card and "None dataset" not in card
    stored = json.loads((tmp_path / "out" / "smoothout_run.json").read_text())
    assert stored["smoothout"]["schedule"] == "anneal" and stored["training"]["global_step"] == 2


def test_push_to_hub_writes_the_smoothout_card(tiny_model, tiny_data, tmp_path, monkeypatch):
    """push_to_hub goes through create_model_card; the upload itself is replaced (no network here)."""
    import transformers.trainer as trainer_module

    uploads = []

    class FakeApi:
        def upload_folder(self, **kwargs):
            uploads.append(kwargs)
            return "uploaded"

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    args = SmoothOutTrainingArguments(
        str(tmp_path / "out"), max_steps=1, report_to="none", save_strategy="no", use_cpu=True
    )
    trainer = SmoothOutTrainer(tiny_model, args, train_dataset=tiny_data)
    trainer.train()
    trainer.hub_model_id = "someone/tiny-smoothout"  # what init_hf_repo would set with a network
    assert trainer.push_to_hub(compare_to=None) == "uploaded"
    assert uploads and uploads[0]["repo_id"] == "someone/tiny-smoothout"
    assert "smoothout" in front_matter((tmp_path / "out" / "README.md").read_text())["tags"]


def test_missing_results_and_info_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not the output_dir of a finished run"):
        build_model_card(tmp_path)


def test_model_index_has_one_result_per_evaluation_split(tmp_path):
    run = make_run(tmp_path / "mnli", 0.01, 0.80, eval_mismatched_accuracy=0.81)
    info = json.loads((run / "smoothout_run.json").read_text())
    info["dataset"].update(
        config="mnli",
        eval_splits=["validation_matched", "validation_mismatched"],
        eval_prefixes={"eval": "validation_matched", "eval_mismatched": "validation_mismatched"},
    )
    write_run_info(run, info)
    card = build_model_card(run)
    results = front_matter(card)["model-index"][0]["results"]
    assert [(r["dataset"]["split"], r["metrics"][0]["value"]) for r in results] == [
        ("validation_matched", 0.80),
        ("validation_mismatched", 0.81),
    ]
    assert "| mismatched accuracy | 0.8100 |" in card


def test_the_card_renders_from_the_packaged_template_and_loads_back_as_a_hub_card(tmp_path):
    from huggingface_hub import ModelCard

    from hf_smoothout.modelcard import TEMPLATE

    assert TEMPLATE.is_file() and "{{ card_data }}" in TEMPLATE.read_text()
    card = ModelCard(write_model_card(make_run(tmp_path / "run", 0.01, 0.875)).read_text())
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.eval_results[0].metric_value == 0.875
    assert "## Training procedure" in card.text and "{{" not in card.text and "{%" not in card.text


def test_run_info_keeps_unknown_keys_and_round_trips(tmp_path):
    from hf_smoothout.modelcard import RunInfo, read_run

    run = make_run(tmp_path / "run", 0.01, 0.875)
    stored, _ = read_run(run)
    info = RunInfo.from_dict({**stored, "my_field": [1, 2]})
    assert info.training["effective_batch_size"] == 256 and info.extra == {"my_field": [1, 2]}
    assert info.get("training.seed") == 42 and info.get("dataset.missing") is None
    assert RunInfo.from_dict(info.to_dict()) == info
