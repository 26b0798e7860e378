"""Minimal reproduction, without hf_smoothout: under transformers' FSDP2 (``DistributedConfig(fsdp_size=2)``) a tied
embedding whose row count does not divide by the shard count is all-gathered from a stale copy on the short rank.

Run (2 CPU processes, gloo; about 20 s)::

    OMP_NUM_THREADS=1 timeout 300 torchrun --standalone --nproc_per_node 2 tests/fsdp_tied_repro.py [--out DIR]

What happens: transformers applies ``fully_shard`` to the model *before* it ties ``lm_head.weight`` to
``transformer.wte.weight``, so the root FSDP parameter group holds two ``FSDPParam`` objects (the Embedding's and the
Linear's) over what becomes one DTensor parameter. At FSDP2's lazy init (the first forward),
``FSDPParam.reset_sharded_param`` of the Linear's entry finds the tied DTensor's local tensor (32 rows on rank 1)
shorter than the padded shard (33 rows) and not in its own storage: it copies it into a new padded buffer and
points the DTensor's ``_local_tensor`` there. The Embedding's entry keeps all-gathering from its own
``_sharded_param_data``, which nothing writes any more (not the optimizer, not an in-place change of
``param.to_local()``). On rank 0 (33 rows, no padding needed) the storage stays shared, and with 64 rows nothing is
copied at all.

For each vocabulary (65, then 64 as the control) rank 0 prints five lines (the gaps of rows that differ are the
parameter's update since lazy init, then that plus the in-place change). Measured here (torch 2.13, transformers
5.24, CPU), for 65 rows::

    vocab 65: FSDP params over the tied weight: 2; all-gather storage is the parameter's local shard:
              rank 0 [True, True], rank 1 [False, True]
    vocab 65: after an optimizer step and an eval pass, the eval forward read 32 of 65 rows that differ from the
              parameter (max |diff| 0.0328)
    vocab 65: the next train forward read 32 rows that differ from the parameter
    vocab 65: after adding 1.0 in place to every rank's local shard, the forward read 32 rows that differ
              (max |diff| 1.0328)
    vocab 65: lm_head (the same parameter) read 0 differing rows

(each printed on one line). With 64 rows every record shares the parameter's storage on both ranks and every count
is 0.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.distributed import DistributedConfig


def gather(value: object) -> list[object]:
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def off_rows(read: torch.Tensor, param: torch.Tensor) -> tuple[int, float]:
    """Rows of the gathered weight a forward read that differ from the parameter's whole value, and the largest gap."""
    gap = (read - param.full_tensor()).abs()
    return int((gap.amax(dim=1) > 0).sum()), float(gap.max())


def check(vocab: int, out: str) -> None:
    path = os.path.join(out, f"tiny_gpt2_lm_{vocab}")
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)  # fmt: skip
        GPT2LMHeadModel(config).save_pretrained(path)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=2))
    wte, head = model.get_input_embeddings(), model.get_output_embeddings()
    param = wte.weight  # one DTensor parameter, tied: head.weight is the same object
    assert head.weight is param and type(param).__name__ == "DTensor"
    read: dict[str, torch.Tensor] = {}
    wte.register_forward_hook(lambda m, i, o: read.__setitem__("wte", m.weight.detach().clone()))
    head.register_forward_hook(lambda m, i, o: read.__setitem__("lm_head", m.weight.detach().clone()))
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)  # the same dropout masks on every rank and every run

    model.train()  # the first forward runs FSDP2's lazy init
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    fsdp_params = [
        fp for group in model._get_fsdp_state()._fsdp_param_groups for fp in group.fsdp_params
        if fp.sharded_param is param
    ]  # fmt: skip
    local = param.to_local().untyped_storage().data_ptr()
    shared = [fp._sharded_param_data.untyped_storage().data_ptr() == local for fp in fsdp_params]
    per_rank = ", ".join(f"rank {r} {s}" for r, s in enumerate(gather(shared)))
    say(f"vocab {vocab}: FSDP params over the tied weight: {len(fsdp_params)}; "
        f"all-gather storage is the parameter's local shard: {per_rank}")  # fmt: skip

    model.eval()
    with torch.no_grad():  # an evaluation pass: FSDP2's root keeps the gathered weights afterwards
        model(ids)
    rows, gap = off_rows(read["wte"], param)
    say(f"vocab {vocab}: after an optimizer step and an eval pass, the eval forward read {rows} of {vocab} rows "
        f"that differ from the parameter (max |diff| {gap:.4f})")  # fmt: skip
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.zero_grad()
    rows, _ = off_rows(read["wte"], param)
    say(f"vocab {vocab}: the next train forward read {rows} rows that differ from the parameter")

    with torch.no_grad():  # what SmoothOut does: change every rank's local shard in place
        param.to_local().add_(1.0)
    model(ids, labels=ids).loss.backward()
    rows, gap = off_rows(read["wte"], param)
    say(f"vocab {vocab}: after adding 1.0 in place to every rank's local shard, the forward read {rows} rows "
        f"that differ (max |diff| {gap:.4f})")  # fmt: skip
    rows, _ = off_rows(read["lm_head"], param)
    say(f"vocab {vocab}: lm_head (the same parameter) read {rows} differing rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to save the tiny models (default: a temporary folder)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, "run with torchrun --nproc_per_node 2"
    out = args.out or gather(tempfile.mkdtemp() if dist.get_rank() == 0 else None)[0]
    for vocab in (65, 64):
        check(vocab, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
