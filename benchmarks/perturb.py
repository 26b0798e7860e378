"""perturb + restore alone, on a BERT-base-sized parameter set, against the floor measured in the same run.

Floors: (1) generating the same count of random numbers with torch's CPU/GPU generator (one stream, the
standard way) + one copy pass + one add pass, all into preallocated memory; (2) the same with the
random numbers drawn on as many threads as the engine uses; (3) the memory-traffic floor: three copy
passes over the selected bytes (back up, write the noisy weights, restore), what the method must move
at the least, with no random numbers at all. Ratios are printed against (1) and (3). Variants are interleaved
(round-robin) after a warm-up; medians are printed with ratios, plus the engine's extra memory
relative to the selected parameters' bytes and the bytes allocated during perturb + restore.

Usage:
    python benchmarks/perturb.py                 # BERT-base (109M params), 7 repeats
    python benchmarks/perturb.py --repeats 11 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import BertConfig, BertModel

from hf_smoothout import SmoothOut, SmoothOutConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def allocated_bytes_during(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by torch while ``fn`` runs (profiler memory events; CUDA: peak delta)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=768, help="BERT hidden size (768 = BERT-base)")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden,
        num_attention_heads=max(1, args.hidden // 64),
    )
    model = BertModel(config).to(device)
    variants: dict[str, SmoothOut] = {}
    for adapt in ("filter", "none", "weight"):
        for restore in ("copy", "swap", "regenerate"):
            cfg = SmoothOutConfig(strength=0.01, adapt=adapt, restore=restore, seed=0)
            variants[f"{adapt}/{restore}"] = SmoothOut(model, cfg)
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:  # the fused kernel (opt-in)
        for adapt in ("filter", "none"):
            for restore in ("copy", "swap"):
                cfg = SmoothOutConfig(strength=0.01, adapt=adapt, restore=restore, seed=0, kernel="triton")
                variants[f"{adapt}/{restore} triton"] = SmoothOut(model, cfg)
    default = SmoothOut(model, SmoothOutConfig(strength=0.01, seed=0))  # restore="auto"
    variants[f"filter/default ({default.restore_mode})"] = default
    engine = variants["filter/copy"]
    selected = engine.parameters
    count = sum(p.numel() for p in selected)
    param_bytes = sum(p.numel() * p.element_size() for p in selected)

    # Floor buffers: preallocated, same sizes as the selected parameters.
    rand_bufs = [torch.empty_like(p) for p in selected]
    copy_bufs = [torch.empty_like(p) for p in selected]
    data = [p.detach().clone() for p in selected]
    gen = torch.Generator(device=device).manual_seed(0)
    threads = engine.describe()["workers"]
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def floor() -> None:
        for r in rand_bufs:
            r.uniform_(-1, 1, generator=gen)
        torch._foreach_copy_(copy_bufs, data)
        torch._foreach_add_(data, rand_bufs)

    def draw_part(i: int) -> None:
        for r in rand_bufs[i::threads]:
            r.uniform_(-1, 1, generator=gens[i])

    def floor_parallel() -> None:
        list(pool.map(draw_part, range(threads)))
        torch._foreach_copy_(copy_bufs, data)
        torch._foreach_add_(data, rand_bufs)

    def cycle(so: SmoothOut) -> Callable[[], None]:
        def run() -> None:
            so.perturb(0)
            so.restore()

        return run

    def memory_floor() -> None:
        torch._foreach_copy_(copy_bufs, data)  # back up
        torch._foreach_copy_(data, copy_bufs)  # write the noisy weights (same bytes)
        torch._foreach_copy_(data, copy_bufs)  # restore

    runs: dict[str, Callable[[], None]] = {
        "floor (1 RNG stream)": floor,
        f"floor ({threads} RNG threads)": floor_parallel,
        "memory floor (3 copies)": memory_floor,
    }
    runs.update({name: cycle(so) for name, so in variants.items()})
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))

    base = statistics.median(times["floor (1 RNG stream)"])
    memory = statistics.median(times["memory floor (3 copies)"])
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} engine workers={threads}")
    print(f"selected parameters: {count / 1e6:.1f}M ({param_bytes / 2**20:.0f} MiB); repeats={args.repeats}")
    print(
        f"{'variant':<26} {'median ms':>10} {'x floor':>8} {'x mem floor':>12} {'extra mem / params':>19} "
        f"{'alloc during':>13}"
    )
    for name, fn in runs.items():
        med = statistics.median(times[name]) * 1000
        so = variants.get(name)
        mem = f"{so.buffer_bytes / param_bytes:.4f}" if so else "-"
        alloc = f"{allocated_bytes_during(fn, device) / 2**10:.0f} KiB" if so else "-"
        print(
            f"{name:<26} {med:>10.1f} {med / (base * 1000):>8.2f} {med / (memory * 1000):>12.2f} {mem:>19} {alloc:>13}"
        )


if __name__ == "__main__":
    main()
