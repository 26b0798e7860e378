"""ZeRO-3 step cost: a plain DeepSpeed ZeRO-3 step vs the same step with SmoothOut perturbing each rank's slices in
place (`hf_smoothout.placement.zero3`) vs the gathering alternative's extra cost.

Two processes (gloo on CPU, NCCL on GPUs), a BERT classifier (``--hidden``, ``--layers``), micro-batch ``--batch`` x
``--seq`` per rank, ZeRO-3 with DeepSpeed's default persistence threshold rule as transformers sets it (10 x hidden).
Arms, interleaved round by round (the machine's noise hits them alike), each timed as the slowest rank:

- ``plain``: forward + ``engine.backward`` + ``engine.step``;
- ``smoothout``: the same with ``SmoothOut.perturb`` before the forward (built on the DeepSpeed engine: its step
  guard restores before the optimizer step), ``--adapt`` (default ``filter``);
- ``gather``: ``deepspeed.zero.GatheredParameters`` over every weight matrix, entered and left (what perturbing
  whole weights would add before any noise is drawn; it also needs the whole model in memory on every rank).

Printed: median ms per arm and the ratio to ``plain`` (medians over ``--rounds``); run it on an idle machine.

Usage:
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 benchmarks/zero3_cost.py --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import deepspeed
import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

from hf_smoothout import SmoothOut, SmoothOutConfig


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item()) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--adapt", default="filter", help="the noise law (hf_smoothout.laws)")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                        intermediate_size=4 * args.hidden, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * args.hidden},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    smoothout = SmoothOut(engine, SmoothOutConfig(strength=0.01, adapt=args.adapt, seed=0))
    assert smoothout.describe()["placement"] == "zero3"
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(engine.device)
    labels = torch.randint(0, 2, (args.batch,), generator=generator).to(engine.device)
    matrices = [p for p in model.parameters() if len(p.ds_shape) >= 2]

    def plain() -> None:
        engine.backward(engine(input_ids=ids, labels=labels).loss)
        engine.step()

    def with_smoothout() -> None:
        smoothout.perturb(step=0)
        try:
            plain()  # the step guard restores before DeepSpeed's optimizer step
        finally:
            smoothout.restore()

    def gather() -> None:
        with deepspeed.zero.GatheredParameters(matrices, modifier_rank=None):
            pass

    arms = {"plain": plain, "smoothout": with_smoothout, "gather": gather}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(args.rounds + 1):
        for name, run in arms.items():
            dist.barrier()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = slowest(time.perf_counter() - start)
            if round_index:  # the first round warms up
                times[name].append(elapsed)
    if rank == 0:
        numel = sum(int(p.ds_numel) for p in model.parameters())
        base = statistics.median(times["plain"])
        print(f"ZeRO-3, {dist.get_world_size()} ranks, BERT {args.hidden}x{args.layers} ({numel / 1e6:.1f}M weights), "
              f"batch {args.batch}x{args.seq}, adapt={args.adapt}, {args.rounds} rounds")  # fmt: skip
        print("| arm | median ms | x plain step |")
        print("|---|---|---|")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.1f} | {median / base:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
