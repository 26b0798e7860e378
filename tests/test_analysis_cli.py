"""The ``hf-smoothout`` command line end to end on tiny BERTs built from a config and datasets saved to disk."""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json

import datasets
import matplotlib.image
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, ViTConfig, ViTForImageClassification

from hf_smoothout.analysis import SharpnessOptions, measure_sharpness, model_dataloader
from hf_smoothout.cli import build_parser, load_model, load_split, load_tokenizer, main

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
BATCH, MAX_BATCHES = 8, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(seed: int, hidden: int = 16) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def sequences(n: int, seed: int, fixed_length: int | None = None) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "label": [], "text": []}
    for _ in range(n):
        length = fixed_length or int(torch.randint(3, 12, (1,), generator=g))
        ids = [2, *torch.randint(5, 50, (length,), generator=g).tolist(), 3]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["label"].append(sum(ids) % 2)
        rows["text"].append(" ".join(VOCAB[i] for i in ids))  # a raw column the model does not take: dropped
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    for seed in (0, 1):  # with a tokenizer: variable-length sequences, padded by the collator
        tiny_bert(seed).save_pretrained(root / f"bert{seed}")
        tokenizer.save_pretrained(root / f"bert{seed}")
    tiny_bert(2).save_pretrained(root / "plain")  # no tokenizer: fixed-length sequences
    tiny_bert(3, hidden=8).save_pretrained(root / "other_architecture")
    variable = datasets.Dataset.from_dict(sequences(40, seed=0))
    datasets.DatasetDict(
        {"train": variable.select(range(28)), "validation": variable.select(range(28, 40))}
    ).save_to_disk(root / "variable")
    fixed = datasets.Dataset.from_dict(sequences(24, seed=1, fixed_length=6)).rename_column("label", "labels")
    fixed.save_to_disk(root / "fixed")
    return root


def hand_loss(model, rows: dict[str, list], start: int = 0) -> float:
    """Example-weighted mean loss over the first MAX_BATCHES batches of BATCH rows, padded by hand."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(MAX_BATCHES):
            ids = rows["input_ids"][start + b * BATCH : start + (b + 1) * BATCH]
            labels = (rows.get("label") or rows["labels"])[start + b * BATCH : start + (b + 1) * BATCH]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=torch.tensor(labels)).loss
            total += float(loss) * len(ids)
            count += len(ids)
    return total / count


SHARPNESS_ARGS = ["--batch-size", str(BATCH), "--max-batches", str(MAX_BATCHES), "--no-progress", "--seed", "3"]
KNOBS = [
    "--repeats",
    "2",
    "--iterations",
    "3",
    "--subspace-dim",
    "4",
    "--power-iterations",
    "4",
    "--trace-samples",
    "3",
]


@pytest.mark.parametrize("folder, data, rows", [("bert0", "variable", sequences(40, 0)), ("plain", "fixed", None)])
def test_sharpness_command_writes_the_measures_of_the_api(workspace, folder, data, rows):
    rows = rows or sequences(24, seed=1, fixed_length=6)
    measures = ["epsilon", "epsilon_subspace", "hessian_top", "hessian_trace"]
    argv = [
        "sharpness",
        "--model",
        str(workspace / folder),
        "--dataset",
        str(workspace / data),
        "--measures",
        *measures,
    ]
    assert main(argv + SHARPNESS_ARGS + KNOBS) == 0

    saved = json.loads((workspace / folder / "analysis" / "sharpness.json").read_text())
    assert saved["split"] == ("train" if data == "variable" else None)
    assert saved["options"]["max_batches"] == MAX_BATCHES and saved["options"]["repeats"] == 2
    assert list(saved["measures"]) == measures

    model = load_model(workspace / folder)
    expected_loss = hand_loss(model, rows)
    for name in ("epsilon", "epsilon_subspace"):
        assert saved["measures"][name]["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert saved["measures"][name]["num_examples"] == BATCH * MAX_BATCHES
        assert len(saved["measures"][name]["values"]) == 2 and saved["measures"][name]["value"] > 0
    assert saved["measures"]["epsilon_subspace"]["subspace_dim"] == 4
    assert saved["measures"]["hessian_top"]["iterations"] <= 4 and saved["measures"]["hessian_trace"]["samples"] == 3

    # the same numbers as the Python API with the same settings
    dataset, _ = load_split(workspace / data, "train")
    loader = model_dataloader(dataset, model, batch_size=BATCH, tokenizer=load_tokenizer(workspace / folder))
    options = SharpnessOptions(
        epsilon_iterations=3, subspace_dim=4, repeats=2, power_iterations=4, trace_samples=3, max_batches=2, seed=3
    )
    for name in measures:
        api = measure_sharpness(model, loader, name, options, progress=False)
        assert saved["measures"][name]["value"] == pytest.approx(api.value, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("task", ["auto", "image-classification"])
def test_sharpness_command_on_an_image_classifier(workspace, tmp_path, task):
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(20, 3, 8, 8, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    datasets.Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()}).save_to_disk(
        tmp_path / "img"
    )
    argv = ["sharpness", "--model", str(tmp_path / "vit"), "--dataset", str(tmp_path / "img"), "--task", task]
    assert main([*argv, "--measures", "hessian_top", "epsilon", "--power-iterations", "3", "--iterations", "2",
                 "--repeats", "1", *SHARPNESS_ARGS]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "vit" / "analysis" / "sharpness.json").read_text())
    model = load_model(tmp_path / "vit", task)
    assert isinstance(model, ViTForImageClassification)
    model.eval()
    with torch.no_grad():
        expected = float(model(pixel_values=pixels[:16], labels=labels[:16]).loss)  # two batches of 8, same size
    assert saved["measures"]["epsilon"]["loss"] == pytest.approx(expected, rel=1e-5)
    options = SharpnessOptions(power_iterations=3, max_batches=2, seed=3)
    loader = model_dataloader(load_split(tmp_path / "img", None)[0], model, batch_size=BATCH)
    api = measure_sharpness(model, loader, "hessian_top", options, progress=False)
    assert saved["measures"]["hessian_top"]["value"] == pytest.approx(api.value, rel=1e-6)


def read_csv(path) -> list[dict[str, float]]:
    with open(path) as handle:
        return [{k: float(v) if v else float("nan") for k, v in row.items()} for row in csv.DictReader(handle)]


def test_landscape_command_interpolates_between_two_models(workspace, tmp_path):
    rows = sequences(40, 0)
    argv = [
        "landscape", "--model-a", str(workspace / "bert0"), "--model-b", str(workspace / "bert1"),
        "--dataset", str(workspace / "variable"), "--points", "7", "--output-dir", str(tmp_path),
        "--figure-size", "5", "4", "--dpi", "60", *SHARPNESS_ARGS,
    ]  # fmt: skip
    assert main(argv) == 0
    table = read_csv(tmp_path / "landscape_interpolation.csv")
    assert [r["alpha"] for r in table] == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    model_a, model_b = load_model(workspace / "bert0"), load_model(workspace / "bert1")
    assert table[2]["train_loss"] == pytest.approx(hand_loss(model_a, rows), rel=1e-6)
    assert table[4]["train_loss"] == pytest.approx(hand_loss(model_b, rows), rel=1e-6)
    # the validation split of the DatasetDict was found and evaluated too
    assert table[2]["validation_loss"] == pytest.approx(hand_loss(model_a, rows, start=28), rel=1e-6)
    assert all(0.0 <= r["validation_accuracy"] <= 1.0 for r in table)
    saved = json.loads((tmp_path / "landscape_interpolation.json").read_text())
    assert saved["metrics"]["train_loss"] == [r["train_loss"] for r in table]
    assert saved["info"]["model_b"] == str(workspace / "bert1")
    assert matplotlib.image.imread(tmp_path / "landscape_interpolation.png").shape[:2] == (240, 300)


def test_landscape_command_random_directions_into_the_model_folder(workspace):
    argv = [
        "landscape", "--model", str(workspace / "plain"), "--directions", "random", "--dims", "1", "2",
        "--dataset", str(workspace / "fixed"), "--points", "5", "--grid-points", "3", *SHARPNESS_ARGS,
    ]  # fmt: skip
    assert main(argv) == 0
    folder = workspace / "plain" / "analysis"
    loss = hand_loss(load_model(workspace / "plain"), sequences(24, seed=1, fixed_length=6))
    line = read_csv(folder / "landscape_random_1d.csv")
    assert [r["alpha"] for r in line] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert line[2]["train_loss"] == pytest.approx(loss, rel=1e-6)
    assert "validation_loss" not in line[0]  # a plain Dataset has no validation split
    plane = json.loads((folder / "landscape_random_2d.json").read_text())
    assert plane["alphas"] == plane["betas"] == [-1.0, 0.0, 1.0]
    assert plane["metrics"]["train_loss"][1][1] == pytest.approx(loss, rel=1e-6)
    assert len(read_csv(folder / "landscape_random_2d.csv")) == 9
    for kind in ("random_1d", "random_2d"):
        assert matplotlib.image.imread(folder / f"landscape_{kind}.png").shape[:2] == (640, 960)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["landscape", "--model-a", "{bert0}", "--model-b", "{other_architecture}"], "different architectures"),
        (["landscape", "--model-a", "{bert0}", "--directions", "interpolation"], "needs --model-b"),
        (["sharpness", "--model", "{bert0}", "--split", "nope"], "holds splits"),
        (["sharpness", "--model", "{bert0}", "--max-batches", "0"], "--max-batches must be a positive integer"),
        (["sharpness", "--model", "{variable}"], "not a model folder"),
        (["sharpness", "--model", "{bert0}", "--task", "image-classification"], "Could not load"),
        (["landscape", "--model", "{bert0}", "--model-b", "{bert1}", "--directions", "random"], "only used with"),
    ],
)
def test_command_errors_exit_with_a_message(workspace, capsys, extra, message):
    argv = [a.format(**{p.name: p for p in workspace.iterdir()}) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dataset", str(workspace / "variable"), "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def subcommand_parsers():
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["sharpness", "landscape"])
def test_help_documents_every_option(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [a for a in subcommand_parsers()[command]._actions if a.option_strings]
    assert len(options) > 10
    for action in options:
        assert action.help, f"{action.option_strings} has no help"
        for option in action.option_strings:
            assert option in text, option


def test_top_level_help_lists_the_subcommands_and_the_script_is_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "sharpness" in text and "landscape" in text
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("hf-smoothout") == "hf_smoothout.cli:main"
