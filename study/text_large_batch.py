"""Study: MiniLM fine-tuning with a large effective batch -- baseline vs SmoothOut vs AdaSmoothOut.

Every run is one invocation of ``recipes/glue.py`` on its offline default (Rotten Tomatoes sentences,
the SST-2 stand-in, seeded stratified 80/20 split; pretrained MiniLM-L6 cut to its first 2 layers),
with the effective batch ``per_device x accumulation`` and the authors' sqrt LR rule relative to the
per-device batch. Only the SmoothOut settings differ between methods. Runs whose ``all_results.json``
exists are skipped, so the script resumes; ``report.md`` gets accuracy mean +- std over seeds.

Usage (about 30 minutes on 2 CPU cores with the defaults):
    python study/text_large_batch.py --output_dir study_outputs/text
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "glue.py"


@dataclass
class TextStudyArguments:
    output_dir: str = field(default="study_outputs/text", metadata={"help": "Where runs and the report go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds; one run per method."})
    epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    per_device_batch: int = field(default=32, metadata={"help": "Micro-batch size (also the LR reference batch)."})
    accumulation: int = field(default=8, metadata={"help": "Gradient accumulation: effective batch = per_device x it."})
    learning_rate: float = field(default=1e-4, metadata={"help": "LR at the reference batch (sqrt-scaled up)."})
    strength_none: float = field(default=0.001, metadata={"help": "SmoothOut (adapt none) strength."})
    strength_filter: float = field(default=0.01, metadata={"help": "AdaSmoothOut (adapt filter) strength."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Keep the first N layers of MiniLM."})
    max_seq_length: int = field(default=64, metadata={"help": "Token limit per sentence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples (tests)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation examples (tests)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Another model folder (tests)."})


def methods(study: TextStudyArguments) -> dict[str, list[str]]:
    return {
        "baseline": ["--smoothout_strength", "0"],
        "smoothout": ["--smoothout_strength", str(study.strength_none), "--smoothout_adapt", "none"],
        "adasmoothout": ["--smoothout_strength", str(study.strength_filter), "--smoothout_adapt", "filter"],
    }


def recipe_command(study: TextStudyArguments, out: Path, seed: int, method_flags: list[str]) -> list[str]:
    cmd = [
        sys.executable,
        str(RECIPE),
        "--task_name",
        "sst2",
        "--output_dir",
        str(out),
        "--seed",
        str(seed),
        "--num_train_epochs",
        str(study.epochs),
        "--per_device_train_batch_size",
        str(study.per_device_batch),
        "--gradient_accumulation_steps",
        str(study.accumulation),
        "--learning_rate",
        str(study.learning_rate),
        "--lr_scaling",
        "sqrt",
        "--reference_batch_size",
        str(study.per_device_batch),
        "--num_hidden_layers",
        str(study.num_hidden_layers),
        "--max_seq_length",
        str(study.max_seq_length),
        "--per_device_eval_batch_size",
        "128",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        "10",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        *method_flags,
    ]
    for flag, value in (
        ("--max_train_samples", study.max_train_samples),
        ("--max_eval_samples", study.max_eval_samples),
        ("--model_name_or_path", study.model_name_or_path),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def report(study: TextStudyArguments) -> str:
    root = Path(study.output_dir)
    lines = [
        f"MiniLM-L6 (first {study.num_hidden_layers} layers), Rotten Tomatoes sentences, effective batch "
        f"{study.per_device_batch * study.accumulation} "
        f"({study.per_device_batch} x {study.accumulation} accumulation), "
        f"{study.epochs:g} epoch(s), LR {study.learning_rate:g} at batch {study.per_device_batch}, sqrt rule; "
        f"max length {study.max_seq_length}; seeds {study.seeds}.",
        "",
        "| method | strength | eval accuracy % | eval loss | train loss |",
        "|---|---|---|---|---|",
    ]
    for method, flags in methods(study).items():
        results = [
            json.loads((root / f"{method}-s{s}" / "all_results.json").read_text())
            for s in study.seeds
            if (root / f"{method}-s{s}" / "all_results.json").is_file()
        ]
        if not results:
            continue
        acc = [r["eval_accuracy"] for r in results]
        loss = [r["eval_loss"] for r in results]
        train = [r["train_loss"] for r in results]
        lines.append(
            f"| {method} | {flags[1]} | {mean_std(acc)} | {statistics.mean(loss):.4f} ± "
            f"{statistics.stdev(loss) if len(loss) > 1 else 0.0:.4f} | {statistics.mean(train):.4f} |"
        )
    text = "\n".join(lines) + "\n"
    (root / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    (study,) = HfArgumentParser(TextStudyArguments).parse_args_into_dataclasses(args=argv)
    root = Path(study.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for seed in study.seeds:
        for method, flags in methods(study).items():
            out = root / f"{method}-s{seed}"
            if (out / "all_results.json").is_file():
                continue
            log = root / f"{method}-s{seed}.log"
            with log.open("w") as handle:
                done = subprocess.run(recipe_command(study, out, seed, flags), stdout=handle, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise RuntimeError(f"{method} seed {seed} failed (exit {done.returncode}); see {log}")
            print(
                f"{method} seed {seed}: {json.loads((out / 'all_results.json').read_text())['eval_accuracy']:.4f}",
                flush=True,
            )
    print(report(study))


if __name__ == "__main__":
    main()
