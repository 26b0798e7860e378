"""Run a training script the way ``accelerate launch --config_file recipes/configs/accelerate_fsdp2.yaml`` runs it
on GPUs, on CPU processes: ``torchrun --nproc_per_node 2 tests/emulated_accelerate_fsdp.py SCRIPT ARGS...`` with
the config's environment (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ...) set by the caller.

Every ``Trainer`` builds its ``Accelerator`` after `fsdp_train.emulate_accelerate_fsdp_on_cpu`, so accelerate takes
its FSDP branch instead of falling back to DDP on CPU (tests/test_recipe_glue.py).
"""

from __future__ import annotations

import os
import runpy
import sys

import transformers

sys.path.insert(0, os.path.dirname(__file__))
from fsdp_train import emulate_accelerate_fsdp_on_cpu

_build_accelerator = transformers.Trainer.create_accelerator_and_postprocess


def _build_fsdp_accelerator(self: transformers.Trainer) -> None:
    emulate_accelerate_fsdp_on_cpu()
    _build_accelerator(self)
    assert self.is_fsdp_enabled, "accelerate did not take its FSDP branch: is ACCELERATE_USE_FSDP set?"


if __name__ == "__main__":
    transformers.Trainer.create_accelerator_and_postprocess = _build_fsdp_accelerator
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
