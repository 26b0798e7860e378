"""The README's plain Accelerate loop under DeepSpeed ZeRO-2, two CPU processes; launched by
tests/test_deepspeed.py with ``torchrun --standalone --nproc_per_node 2 tests/deepspeed_plain_loop.py OUT_DIR MODE``
(``DS_ACCELERATOR=cpu``).

``MODE`` ``prepared``: SmoothOut is built on what ``accelerator.prepare`` returned (the DeepSpeed engine), which
guards DeepSpeed's optimizer step; after every step the weights must have moved and equal DeepSpeed's fp32 master.
``inner``: built on the unwrapped module, the first perturb must refuse with a message. Rank 0 writes
``OUT_DIR/plain_loop_<MODE>.json``.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator, DeepSpeedPlugin
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig


def master_equal(engine) -> bool:
    optimizer = engine.optimizer
    rank = dist.get_rank()
    return all(
        torch.equal(groups[rank], master.to(groups[rank].dtype))
        for groups, master in zip(
            optimizer.parallel_partitioned_bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True
        )
    )


def main(out_dir: str, mode: str) -> None:
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 8
    plugin.deepspeed_config["train_batch_size"] = 8 * int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(deepspeed_plugin=plugin)  # DS_ACCELERATOR=cpu: DeepSpeed on the CPU (gloo)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 2, (48,), generator=g)
    model, optimizer = accelerator.prepare(model, optimizer)
    target = model if mode == "prepared" else accelerator.unwrap_model(model)
    smoothout = SmoothOut(target, SmoothOutConfig(strength=0.05, seed=0, restore="copy"))
    result: dict = {"world_size": dist.get_world_size(), "moved": [], "master_equal": [], "error": None}
    try:
        for step in range(6):
            before = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
            batch = slice(8 * step, 8 * step + 8)
            with smoothout.perturbed(step=step):
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                accelerator.backward(loss)  # DeepSpeed steps inside here
            optimizer.step()
            optimizer.zero_grad()
            after = list(accelerator.unwrap_model(model).parameters())
            result["moved"].append(max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)))
            result["master_equal"].append(master_equal(model))
    except RuntimeError as err:
        result["error"] = str(err)
    if dist.get_rank() == 0:
        with open(f"{out_dir}/plain_loop_{mode}.json", "w") as f:
            json.dump(result, f)
    del model, optimizer, smoothout
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
