"""``SmoothOutArguments`` gives any ``TrainingArguments`` subclass the ``--smoothout_*`` flags."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import make_classification_data
from test_trainer import model_with_seed
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

from hf_smoothout import SmoothOutArguments, SmoothOutConfig, SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.trainer import log_settings_source


@dataclass
class SmoothOutSeq2SeqArguments(SmoothOutArguments, Seq2SeqTrainingArguments):
    pass


def test_a_seq2seq_arguments_class_gets_every_flag_and_validation():
    (args,) = HfArgumentParser(SmoothOutSeq2SeqArguments).parse_args_into_dataclasses(
        ["--output_dir", "out", "--use_cpu", "true", "--smoothout_strength", "0.03", "--predict_with_generate", "true"]
    )
    assert args.predict_with_generate and args.to_smoothout_config().strength == 0.03
    names = {f for f in SmoothOutConfig.field_names()}
    assert {f"smoothout_{n}" for n in names} <= set(vars(args))
    with pytest.raises(ValueError, match="strength"):
        SmoothOutSeq2SeqArguments(output_dir="out", use_cpu=True, smoothout_strength=-1.0)


def test_trl_configs_compose_with_the_mixin_through_trl_parser_and_reach_the_engine(tmp_path):
    trl = pytest.importorskip("trl")

    @dataclass
    class SmoothOutSFTConfig(SmoothOutArguments, trl.SFTConfig):
        pass

    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    argv += ["--smoothout_strength", "0.04", "--smoothout_adapt", "none"]
    (args,) = trl.TrlParser(SmoothOutSFTConfig).parse_args_and_config(argv)
    assert args.to_smoothout_config().adapt == "none"
    trainer = SmoothOutTrainer(model_with_seed(), args, train_dataset=make_classification_data())
    assert trainer.smoothout_config.strength == 0.04 and trainer.smoothout_config.adapt == "none"


def test_where_the_settings_came_from_is_said_and_a_class_without_fields_is_warned_about():
    config = SmoothOutConfig()
    plain = TrainingArguments(output_dir="out", use_cpu=True, report_to="none")
    assert "has no smoothout_* fields" in log_settings_source(plain, None, config)
    assert "smoothout_config=" in log_settings_source(plain, config, config)
    ours = SmoothOutTrainingArguments(output_dir="out", use_cpu=True, report_to="none")
    assert "SmoothOutTrainingArguments smoothout_* fields" in log_settings_source(ours, None, config)
