"""Fine-tuning at the CPU's limit: training images/s and achieved GFLOP/s of a timm backbone, beside this machine's
fp32 matrix-multiply GFLOP/s, in one run. Rows: the whole network trained (the defaults before --fixed-stages) and
the stem plus the first N stages held at their ImageNet weights (--fixed-stages N; autoconfig picks 3 on CPUs), in
fp32 and, where the CPU has BF16, under bf16 autocast.

FLOPs: the forward is counted by torch.utils.flop_counter (one image). A training step is that forward plus two
forwards' worth (input and weight gradients) for every layer behind the fixed ones. The flop counter's own count of
the backward is printed beside it: it counts depthwise convolutions' backward as if they were dense, so it overstates
the step many times over for EfficientNets and is not used.

    python benchmarks/finetune_speed.py                        # Lite0, 224 px, 1 channel, batch 32
    python benchmarks/finetune_speed.py --size 160 --fixed 0 2 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, however this is started

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from config import ModelConfig  # noqa: E402
from machine import calib_img_s, cpu_name, markdown_table  # noqa: E402
from model import build_model, early_layers, hold_statistics, set_trainable  # noqa: E402
from runtime import available_cores, cpu_has_bf16  # noqa: E402


def matmul_gflops(n: int = 2048, reps: int = 12) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(model: torch.nn.Module, fixed: list[torch.nn.Module], x: torch.Tensor) -> tuple[float, float, float]:
    """(forward, training step, the flop counter's forward + backward) in FLOPs per image."""
    one = x[:1]
    with FlopCounterMode(display=False) as counter:
        model(one)
    per_module = counter.get_flop_counts()  # "EfficientNet.blocks.0.0.conv_dw": {op: flops}, each module by name
    root = type(model).__name__
    names = {f"{root}.{name}" for name, m in model.named_modules() if any(m is f for f in fixed)}
    forward = counter.get_total_flops()
    held = sum(sum(ops.values()) for name, ops in per_module.items()
               if name in names and not any(name.startswith(n + ".") for n in names))  # outermost: none twice
    counter_step = counted(lambda: model(one).sum().backward())
    model.zero_grad(set_to_none=True)
    return forward, forward + 2 * (forward - held), counter_step


def images_per_s(model, fixed, x, y, bf16: bool, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    hold_statistics(fixed)
    for _ in range(2):  # oneDNN picks its kernels for these shapes
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fixed", type=int, nargs="+", default=[0, 2, 3], help="--fixed-stages values to time")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row (after 2 untimed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(available_cores())
    torch.manual_seed(0)
    calib = calib_img_s()
    peak = statistics.median(matmul_gflops() for _ in range(3))
    x = torch.randn(args.batch_size, args.channels, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (args.batch_size,))
    rows, base = [], None
    for bf16 in [False, True] if cpu_has_bf16() else [False]:
        for stages in args.fixed:
            model = build_model(ModelConfig(arch=args.arch), 4, args.size, args.channels).to(memory_format=torch.channels_last)
            fixed = early_layers(model, stages)
            set_trainable(model, False, fixed)
            forward, flops, counter_step = step_flops(model, fixed, x)
            speed = images_per_s(model, fixed, x, y, bf16, args.steps)
            base = base or speed
            rows.append([str(stages), "bf16" if bf16 else "fp32", f"{forward / 1e9:.3f}", f"{flops / 1e9:.3f}",
                         f"{counter_step / 1e9:.1f}", f"{speed:.1f}", f"{speed / base:.2f}x", f"{speed * flops / 1e9:.0f}",
                         f"{100 * speed * flops / 1e9 / peak:.0f}%"])
    print(f"{args.arch} at {args.size}px, {args.channels} channel(s), batch {args.batch_size}, channels_last, "
          f"{torch.get_num_threads()} threads on {cpu_name()}; fp32 matmul {peak:.0f} GFLOP/s (2048x2048, median of 3)")
    print(markdown_table([["fixed stages", "precision", "forward GFLOP/img", "step GFLOP/img", "flop counter's step",
                           "images/s", "vs first row", "GFLOP/s", "of matmul"], *rows], right=True))
    if calib:
        print(f"\ncalib_img_s {calib:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
