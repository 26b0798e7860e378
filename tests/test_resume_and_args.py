"""Bit-exact resume, `SmoothOutTrainingArguments` parsing, and the mixin on `Seq2SeqTrainer`."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_smoothout import SmoothOutConfig, SmoothOutMixin, SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.checkpoint import STATE_FILE


@pytest.mark.parametrize("restore", ["copy", "regenerate"])
def test_resume_continues_bit_identically(tmp_path, restore):
    data = make_classification_data()
    cfg = SmoothOutConfig(strength=0.2, schedule="anneal", restore=restore, seed=5)
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, gradient_accumulation_steps=2)

    full_model = model_with_seed(dropout=0.1)
    full = SmoothOutTrainer(
        full_model, training_args(tmp_path / "full", **common), train_dataset=data, smoothout_config=cfg
    )
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-4"
    assert (checkpoint / STATE_FILE.format(rank=0)).is_file()

    resumed_model = model_with_seed(dropout=0.1)
    resumed = SmoothOutTrainer(
        resumed_model, training_args(tmp_path / "resumed", **common), train_dataset=data, smoothout_config=cfg
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_params_equal(resumed_model, clone_params(full_model))


def test_resume_without_noise_state_warns_and_differs(tmp_path, caplog):
    data = make_classification_data()
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full_model = model_with_seed()
    SmoothOutTrainer(
        full_model, training_args(tmp_path / "full", **common), train_dataset=data, smoothout_config=cfg
    ).train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    os.remove(checkpoint / STATE_FILE.format(rank=0))
    resumed_model = model_with_seed()
    resumed = SmoothOutTrainer(
        resumed_model, training_args(tmp_path / "r", **common), train_dataset=data, smoothout_config=cfg
    )
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "No SmoothOut noise state" in caplog.text
    assert not torch.equal(resumed_model.fc1.weight, full_model.fc1.weight)


def test_resume_from_true_finds_the_last_checkpoint_and_continues_bit_identically(tmp_path):
    data = make_classification_data()
    cfg = SmoothOutConfig(strength=0.2, seed=5)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full_model = model_with_seed()
    SmoothOutTrainer(
        full_model, training_args(tmp_path / "full", **common), train_dataset=data, smoothout_config=cfg
    ).train()
    first = SmoothOutTrainer(
        model_with_seed(), training_args(tmp_path / "run", **common), train_dataset=data, smoothout_config=cfg
    )
    first.train()
    shutil.rmtree(tmp_path / "run" / "out" / "checkpoint-6")  # as if it stopped after checkpoint-3
    resumed_model = model_with_seed()
    resumed = SmoothOutTrainer(
        resumed_model, training_args(tmp_path / "run", **common), train_dataset=data, smoothout_config=cfg
    )
    resumed.train(resume_from_checkpoint=True)  # checkpoint-3, its noise state included
    assert resumed.smoothout.state_dict()["draws"] == 6
    assert_params_equal(resumed_model, clone_params(full_model))


def test_the_mixin_overrides_no_private_trainer_method():
    from transformers import Trainer

    private = [n for n in vars(SmoothOutMixin) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)]
    assert private == []  # the opt-in ShardedResumeMixin holds the only private overrides, with their reasons


def test_the_noise_state_goes_to_the_checkpoint_of_a_search_trial(tmp_path):
    from hf_smoothout.checkpoint import checkpoint_folder

    (tmp_path / "run-0" / "checkpoint-4").mkdir(parents=True)
    assert checkpoint_folder(str(tmp_path), 4) == str(tmp_path / "run-0" / "checkpoint-4")
    (tmp_path / "checkpoint-4").mkdir()
    os.utime(tmp_path / "run-0" / "checkpoint-4", (1, 1))  # the older one
    assert checkpoint_folder(str(tmp_path), 4) == str(tmp_path / "checkpoint-4")
    assert checkpoint_folder(str(tmp_path), 5) is None


def test_arguments_parse_every_config_field(tmp_path):
    parser = HfArgumentParser(SmoothOutTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--seed",
            "7",
            "--smoothout_strength",
            "0.02",
            "--smoothout_adapt",
            "weight",
            "--smoothout_distribution",
            "gaussian",
            "--smoothout_schedule",
            "tanh",
            "--smoothout_anneal_index",
            "0.7",
            "--smoothout_tanh_scale",
            "4",
            "--smoothout_samples",
            "2",
            "--smoothout_restore",
            "regenerate",
            "--smoothout_skip_norm_layers",
            "false",
            "--smoothout_skip_bias",
            "true",
            "--smoothout_include",
            "encoder",
            "decoder",
            "--smoothout_exclude",
            "lm_head",
            "--smoothout_independent_ranks",
            "false",
        ]
    )
    cfg = args.to_smoothout_config()
    assert cfg == SmoothOutConfig(
        strength=0.02,
        adapt="weight",
        distribution="gaussian",
        schedule="tanh",
        anneal_index=0.7,
        tanh_scale=4.0,
        samples=2,
        restore="regenerate",
        skip_norm_layers=False,
        skip_bias=True,
        include=["encoder", "decoder"],
        exclude=["lm_head"],
        seed=7,
        independent_ranks=False,
    )
    fields = {
        f.name for f in SmoothOutTrainingArguments.__dataclass_fields__.values() if f.name.startswith("smoothout_")
    }
    assert fields == {"smoothout_" + name for name in SmoothOutConfig.field_names()}


def test_arguments_reject_bad_values_early(tmp_path):
    parser = HfArgumentParser(SmoothOutTrainingArguments)
    with pytest.raises(ValueError, match="strength"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--smoothout_strength", "-1"])
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--smoothout_adapt", "rows"])


def test_help_documents_the_options(capsys):
    parser = HfArgumentParser(SmoothOutTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in SmoothOutConfig.field_names():
        assert f"--smoothout_{name}" in text
    assert "AdaSmoothOut" in text


def test_conflicting_config_sources_are_refused(tmp_path):
    args = SmoothOutTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", smoothout_strength=0.3)
    with pytest.raises(ValueError, match="Pass only one"):
        SmoothOutTrainer(
            model_with_seed(),
            args,
            train_dataset=make_classification_data(),
            smoothout_config=SmoothOutConfig(strength=0.1),
        )
    trainer = SmoothOutTrainer(
        model_with_seed(),
        args,
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(strength=0.3),
    )
    assert trainer.smoothout_config.strength == 0.3 and trainer.smoothout_config.seed == args.seed


class SmoothOutSeq2SeqTrainer(SmoothOutMixin, Seq2SeqTrainer):
    pass


def test_mixin_with_seq2seq_trainer(tmp_path):
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0
    )
    model = T5ForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(1, 40, (7,), generator=g), "labels": torch.randint(1, 40, (5,), generator=g)}
        for _ in range(32)
    ]
    args = Seq2SeqTrainingArguments(
        str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-2,
        disable_tqdm=True,
    )

    class Checked(SmoothOutSeq2SeqTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            before = clone_params(model)
            loss = super().training_step(model, inputs, num_items_in_batch)
            assert_params_equal(model, before)
            return loss

    trainer = Checked(model, args, train_dataset=data, smoothout_config=SmoothOutConfig(strength=0.05, samples=2))
    start = clone_params(model)
    trainer.train()
    names = trainer.smoothout.parameter_names
    assert "shared.weight" in names and not any("layer_norm" in n for n in names)
    assert not torch.equal(model.shared.weight, start["shared.weight"])  # it trained
    assert [h["smoothout_strength"] for h in trainer.state.log_history if "loss" in h] == [0.05, 0.05]


def test_strength_zero_logs_zero(tmp_path):
    trainer = SmoothOutTrainer(
        model_with_seed(),
        training_args(tmp_path, max_steps=2),
        train_dataset=make_classification_data(),
        smoothout_config=SmoothOutConfig(strength=0.0),
    )
    trainer.train()
    assert [h["smoothout_strength"] for h in trainer.state.log_history if "loss" in h] == [0.0, 0.0]
