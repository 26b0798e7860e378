"""One process resumes a checkpoint that two FSDP2 processes (sharded at load) wrote, launched by tests/test_fsdp.py
with ``torchrun --standalone --nproc_per_node 1 tests/fsdp_resume_fewer.py --use_cpu --output_dir DIR ...``.

``DistributedConfig(fsdp_size=1)`` leaves the model unsharded, so the optimizer and schedule exist only in the
checkpoint's sharded state: resuming must stop with a message instead of restarting both silently. Writes
``DIR/fsdp_resume_fewer.json`` with the error (or None) and the learning rates of any steps that ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(__file__))
from deepspeed_train import token_data
from fsdp_train import load

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.sharded_resume import ShardedResumeMixin


class ResumableTrainer(ShardedResumeMixin, SmoothOutTrainer):
    """The opt-in sharded resume (DistributedConfig)."""


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    checkpoint = os.path.join(args.output_dir, "full", f"checkpoint-{args.save_steps:g}")
    model = load(os.path.join(args.output_dir, "tiny_bert"), "transformers", 1)
    model.accepts_loss_kwargs = False
    run_args = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, "fewer"))
    trainer = ResumableTrainer(model, run_args, train_dataset=token_data())
    result: dict = {"world_size": run_args.world_size, "error": None, "learning_rates": []}
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
        result["learning_rates"] = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    except ValueError as err:
        result["error"] = str(err)
    with open(os.path.join(args.output_dir, "fsdp_resume_fewer.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
