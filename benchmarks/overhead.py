"""Whole Trainer step time: plain `Trainer` vs `SmoothOutTrainer` variants vs a SAM-style two-pass step.

Every arm trains the same model (same initial weights) on the same synthetic batches. Arms are
interleaved round by round in one process (the machine's noise hits them alike); in each round
every arm runs ``--steps`` optimizer steps through ``Trainer.train()`` and the first step of each
round is discarded as warm-up. A callback times ``on_step_begin`` -> ``on_step_end`` (forward,
backward, SmoothOut, clipping, optimizer step; not data loading). Printed: median step time, ratio
to plain, and extra memory relative to the trainable parameter bytes (CUDA: peak allocated delta
vs plain; CPU: bytes held by the SmoothOut engine). On CPU also the time spent inside the engine's
``perturb`` and ``restore`` per step, and ``1 + that / plain step``: the engine's own cost, which
varies far less between runs than the ratio of two arms' medians on a shared machine (it leaves out
what the noisy weights do to the forward and backward pass around it, e.g. colder caches).

Usage:
    python benchmarks/overhead.py --model minilm --batch 32 --seq 128      # MiniLM-size BERT, CPU
    python benchmarks/overhead.py --model cnn --batch 256                  # small CNN
    python benchmarks/overhead.py --model bert-base --batch 32 --seq 128   # GPU sizes
    python benchmarks/overhead.py --model mlp --batch 128 --accumulation 32  # the authors' ghost chunks:
        # B = 4096 from 32 chunks of 128, 5x512 batch-norm MLP (1.46M params), fresh noise per chunk
    python benchmarks/overhead.py --model minilm --batch 32 --seq 128 --lora_r 8  # PEFT LoRA on every linear
        # layer: plain LoRA vs noise on the adapters vs space="lora_merged" (extra memory vs the frozen base)
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import time

import torch

# the 5x512 batch-norm MLP of the large-batch studies, defined once in study/study_kit/fmnist_common.py
from study_kit.fmnist_common import KeskarMLP
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_smoothout import SmoothOutConfig, SmoothOutTrainer


class EngineClock:
    """Host time spent inside one engine's ``perturb`` and ``restore`` (wraps the two methods of that instance).

    On a CPU that is what they cost; on a GPU the host only enqueues kernels, so the column is left out there.
    """

    def __init__(self, engine) -> None:
        self.total = 0.0
        for name in ("perturb", "restore"):
            method = getattr(engine, name)

            def timed(*args, _method=method, **kwargs):
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.total += time.perf_counter() - start

            setattr(engine, name, timed)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device-synchronized), and the engine's share of it (`EngineClock`)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.engine_times: list[float] = []
        self.clock: EngineClock | None = None
        self._start = 0.0
        self._engine_start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()
        self._engine_start = self.clock.total if self.clock is not None else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        if self.clock is not None:
            self.engine_times.append(self.clock.total - self._engine_start)


class SAMStyleTrainer(Trainer):
    """Reference only: sharpness-aware two-pass step (ascent to w + rho * g/||g||, gradient there, back)."""

    rho = 0.05

    def training_step(self, model, inputs, num_items_in_batch=None):
        params = [p for p in model.parameters() if p.requires_grad]
        super().training_step(model, inputs, num_items_in_batch)
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            eps = torch._foreach_mul(grads, float(self.rho / (norm + 1e-12)))
            torch._foreach_add_(params, eps)
        model.zero_grad(set_to_none=True)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            with torch.no_grad():
                torch._foreach_sub_(params, eps)
        return loss


class SmallCNN(nn.Module):
    """conv(1->32) -> conv(32->64) -> fc(3136->256) -> fc(256->10), on 28x28 grayscale."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(pixel_values))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def build(model_name: str, batch: int, seq: int, n_batches: int):
    g = torch.Generator().manual_seed(0)
    n = batch * n_batches
    if model_name == "mlp":
        x = torch.randn(n, 28 * 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        return KeskarMLP(), [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]
    if model_name == "cnn":
        model = SmallCNN()
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        return model, [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]
    sizes = {"minilm": (384, 6, 12, 1536), "bert-base": (768, 12, 12, 3072)}[model_name]
    hidden, layers, heads, inter = sizes
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter, num_labels=2
    )
    model = BertForSequenceClassification(config)
    model.accepts_loss_kwargs = False
    ids = torch.randint(1000, config.vocab_size, (n, seq), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return model, [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": y[i]} for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "bert-base", "cnn", "mlp"], default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps (micro-batches)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per arm per round (first discarded)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strength", type=float, default=0.01)
    parser.add_argument("--arms", nargs="*", default=None, help="subset of arms to run (plain is always run)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora_r", type=int, default=0, help="wrap BERT models in PEFT LoRA of this rank (0: off)")
    args = parser.parse_args()
    use_cpu = not torch.cuda.is_available()

    torch.manual_seed(0)
    base_model, data = build(args.model, args.batch, args.seq, args.steps * args.accumulation)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear")
        base_model = get_peft_model(base_model, lora)
    param_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters() if not p.requires_grad)

    arms: dict[str, tuple[type[Trainer], SmoothOutConfig | None]] = {"plain Trainer": (Trainer, None)}
    arms["SmoothOut filter/default"] = (SmoothOutTrainer, SmoothOutConfig(strength=args.strength))  # restore="auto"
    for adapt in ("filter", "none", "weight"):
        arms[f"SmoothOut {adapt}/copy"] = (
            SmoothOutTrainer,
            SmoothOutConfig(strength=args.strength, adapt=adapt, restore="copy"),
        )
    arms["SmoothOut filter/swap"] = (SmoothOutTrainer, SmoothOutConfig(strength=args.strength, restore="swap"))
    arms["SmoothOut none/swap"] = (
        SmoothOutTrainer,
        SmoothOutConfig(strength=args.strength, adapt="none", restore="swap"),
    )
    arms["SmoothOut filter/no prefetch"] = (
        SmoothOutTrainer,
        SmoothOutConfig(strength=args.strength, adapt="filter", prefetch="never"),
    )
    arms["SmoothOut filter/regenerate"] = (
        SmoothOutTrainer,
        SmoothOutConfig(strength=args.strength, adapt="filter", restore="regenerate"),
    )
    arms["SmoothOut filter/copy K=2"] = (
        SmoothOutTrainer,
        SmoothOutConfig(strength=args.strength, samples=2, restore="copy"),
    )
    arms["SmoothOut filter/step noise"] = (
        SmoothOutTrainer,
        SmoothOutConfig(strength=args.strength, noise_every="step"),
    )
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:  # the fused kernel (opt-in)
        arms["SmoothOut filter/triton"] = (SmoothOutTrainer, SmoothOutConfig(strength=args.strength, kernel="triton"))
        arms["SmoothOut filter/swap triton"] = (
            SmoothOutTrainer,
            SmoothOutConfig(strength=args.strength, restore="swap", kernel="triton"),
        )
    arms["SAM-style two-pass"] = (SAMStyleTrainer, None)
    if args.lora_r:
        merged = SmoothOutConfig(strength=args.strength, space="lora_merged")
        arms["SmoothOut lora_merged"] = (SmoothOutTrainer, merged)
        flat = SmoothOutConfig(strength=args.strength, space="lora_merged", adapt="filter_std", distribution="gaussian")
        arms["Flat-LoRA law lora_merged"] = (SmoothOutTrainer, flat)
    if args.arms:
        arms = {k: v for k, v in arms.items() if k == "plain Trainer" or k in args.arms}

    trainers: dict[str, Trainer] = {}
    timers: dict[str, StepTimer] = {}
    for name, (cls, cfg) in arms.items():
        targs = TrainingArguments(
            output_dir="/tmp/hf_smoothout_overhead",
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=1e-4,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=use_cpu,
            bf16=args.bf16,
            dataloader_num_workers=0,
            seed=0,
        )
        timers[name] = StepTimer()
        kwargs = {"smoothout_config": cfg} if cfg is not None else {}
        trainers[name] = cls(copy.deepcopy(base_model), targs, train_dataset=data, callbacks=[timers[name]], **kwargs)
        engine = getattr(trainers[name], "smoothout", None)
        if engine is not None and not torch.cuda.is_available():
            timers[name].clock = EngineClock(engine)

    peak: dict[str, list[int]] = {name: [] for name in arms}
    samples: dict[str, list[float]] = {name: [] for name in arms}
    engine_samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            timers[name].times.clear()
            timers[name].engine_times.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            trainer.train()
            if torch.cuda.is_available():
                peak[name].append(torch.cuda.max_memory_allocated() - before)
            samples[name].extend(timers[name].times[1:])
            engine_samples[name].extend(timers[name].engine_times[1:])

    plain = statistics.median(samples["plain Trainer"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model={args.model} ({param_bytes / 4 / 1e6:.1f}M trainable params) batch={args.batch}"
        + (f"x{args.seq}" if args.model not in ("cnn", "mlp") else "")
        + (f" accumulation={args.accumulation}" if args.accumulation > 1 else "")
        + f" device={device} torch={torch.__version__}"
        + f" steps/arm={len(samples['plain Trainer'])} bf16={args.bf16}"
        + (f" LoRA r={args.lora_r}, frozen base {frozen_bytes / 1e6:.1f} MB" if args.lora_r else "")
    )
    memory_header = "extra memory / base" if args.lora_r else "extra memory / params"
    engine_header = "engine ms (x plain)" if not torch.cuda.is_available() else ""
    print(f"{'arm':<30} {'median step ms':>15} {'x plain':>8} {memory_header:>22} {engine_header:>21}")
    reference_bytes = frozen_bytes if args.lora_r else param_bytes
    for name in arms:
        med = statistics.median(samples[name])
        if torch.cuda.is_available():
            extra = (max(peak[name]) - max(peak["plain Trainer"])) / reference_bytes
        else:
            engine = getattr(trainers[name], "smoothout", None)
            extra = (engine.buffer_bytes / reference_bytes) if engine is not None else 0.0
        inside = ""
        if engine_samples[name]:  # perturb + restore per optimizer step, against the plain step: steadier than x plain
            engine_ms = statistics.median(engine_samples[name])
            inside = f"{engine_ms * 1000:.1f} ({1 + engine_ms / plain:.3f})"
        print(f"{name:<30} {med * 1000:>15.1f} {med / plain:>8.3f} {extra:>22.4f} {inside:>21}")


if __name__ == "__main__":
    main()
