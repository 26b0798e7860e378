"""How far the frozen base weights of a LoRA model drift when noise is added to them in place and removed again.

The alternative to ``space="lora_merged"`` (which never writes the base) is what Flat-LoRA's trainer does:
``W += tau`` before the forward pass and ``W -= tau`` after the backward pass, in the weights' own dtype.
In bf16 every add and subtract rounds, so ``W`` random-walks away from the pretrained weights. This script
replays that on MiniLM-L6's linear weights (offline copy; random weights of the same shapes and scale
without it) for ``--steps`` draws, Flat-LoRA's law (Gaussian, std ``a * ||W'_row|| / sqrt(n)``), and prints
how many weights changed and by how much, for bf16 and fp32 bases, beside the engine's own
``restore="regenerate"`` (fp32) and ``space="lora_merged"``. Not a timing: it may run beside other work.

Usage:
    python benchmarks/lora_drift.py --steps 1000 --strength 0.05
"""

from __future__ import annotations

import argparse
import math

import torch


def minilm_linear_weights(layers: int) -> tuple[list[torch.Tensor], str]:
    """The 2-D weights of MiniLM-L6's first ``layers`` transformer layers (float32), and where they came from."""
    try:
        from recipe_kit.offline import minilm_dir
        from safetensors.torch import load_file

        folder = minilm_dir()
        files = sorted(folder.glob("*.safetensors"))
        state = {k: v for f in files for k, v in load_file(str(f)).items()}
        names = sorted(
            n
            for n, t in state.items()
            if t.ndim == 2 and ".layer." in n and int(n.split(".layer.")[1].split(".")[0]) < layers
        )
        if names:
            return [state[n].float() for n in names], f"MiniLM-L6 pretrained weights ({len(names)} matrices)"
    except Exception:  # no offline copy: same shapes, similar scale
        pass
    g = torch.Generator().manual_seed(0)
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    return [torch.randn(s, generator=g) * 0.05 for _ in range(layers) for s in shapes], "random weights (MiniLM shapes)"


def flat_lora_noise(weight: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Flat-LoRA's draw: N(0, (a * ||w_row|| / sqrt(n))^2) per element, in float32."""
    std = strength * weight.float().norm(dim=1, keepdim=True) / math.sqrt(weight.shape[1])
    return torch.randn(weight.shape, generator=generator) * std


def in_place_drift(weights: list[torch.Tensor], dtype: torch.dtype, steps: int, strength: float) -> dict[str, float]:
    """Replay ``W += tau; W -= tau`` for ``steps`` draws in ``dtype``; drift against the start."""
    start = [w.to(dtype) for w in weights]
    live = [w.clone() for w in start]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for w in live:
            tau = flat_lora_noise(w, strength, g)
            w.add_(tau)  # rounds to dtype
            w.sub_(tau)  # rounds again: not the inverse
    return drift(start, live)


def drift(start: list[torch.Tensor], end: list[torch.Tensor]) -> dict[str, float]:
    changed = sum(int((a != b).sum()) for a, b in zip(start, end, strict=True))
    total = sum(a.numel() for a in start)
    diff = math.sqrt(sum(float((b.double() - a.double()).pow(2).sum()) for a, b in zip(start, end, strict=True)))
    norm = math.sqrt(sum(float(a.double().pow(2).sum()) for a in start))
    return {"changed": changed / total, "relative": diff / norm}


def engine_drift(weights: list[torch.Tensor], steps: int, strength: float, space: str) -> dict[str, float]:
    """The engine's own paths on the same weights: regenerate restore (fp32), or the merged space (LoRA, B = 0)."""
    from torch import nn

    from hf_smoothout import SmoothOut, SmoothOutConfig

    modules = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
    with torch.no_grad():
        for m, w in zip(modules, weights, strict=True):
            m.weight.copy_(w)
    model: nn.Module = modules
    config = SmoothOutConfig(strength=strength, adapt="filter_std", distribution="gaussian", seed=0)
    if space == "lora_merged":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(modules, LoraConfig(r=4, target_modules=[str(i) for i in range(len(modules))]))
        config = SmoothOutConfig(**{**config.to_dict(), "space": "lora_merged"})
    else:
        config = SmoothOutConfig(**{**config.to_dict(), "restore": "regenerate"})
    engine = SmoothOut(model, config, num_threads=1)
    start = [m.weight.detach().clone() for m in modules]
    inputs = [torch.randn(2, w.shape[1]) for w in weights]
    for step in range(steps):
        with engine.perturbed(step):
            if space == "lora_merged":  # armed forwards: W + tau is built in scratch and dropped, W never written
                for layer, x in zip(model.base_model.model, inputs, strict=True):
                    layer(x)
    end = [m.get_base_layer().weight.detach() if hasattr(m, "get_base_layer") else m.weight.detach() for m in modules]
    return drift(start, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--strength", type=float, default=0.05, help="a: noise std = a * ||w_row|| / sqrt(n)")
    parser.add_argument("--layers", type=int, default=2, help="MiniLM transformer layers whose weights are used")
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights, source = minilm_linear_weights(args.layers)
    count = sum(w.numel() for w in weights)
    print(f"{source}, {count / 1e6:.2f}M weights; {args.steps} draws of strength {args.strength:g} (Flat-LoRA's law)")
    print(f"{'what':<44} {'weights changed':>16} {'||W_T - W_0|| / ||W_0||':>24}")
    rows = [
        ("in place W += tau; W -= tau, bf16 base", in_place_drift(weights, torch.bfloat16, args.steps, args.strength)),
        ("in place W += tau; W -= tau, fp32 base", in_place_drift(weights, torch.float32, args.steps, args.strength)),
        ("engine restore='regenerate', fp32 base", engine_drift(weights, args.steps, args.strength, "trainable")),
        ("engine space='lora_merged' (bf16 or fp32)", engine_drift(weights, args.steps, args.strength, "lora_merged")),
    ]
    for name, result in rows:
        print(f"{name:<44} {100 * result['changed']:>15.2f}% {result['relative']:>24.3e}")


if __name__ == "__main__":
    main()
