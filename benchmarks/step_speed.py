"""Training-step speed by batch size: images/s of a preset's network (forward, backward, SGD step) on random data
on the CPU, in the precision train.py picks there (bf16 autocast where the CPU has BF16, else fp32), each batch size
timed twice in turn in one process, with calib_img_s in the same run. It is why train.py trains the
airbench nets at 256 images per step on a CPU and at 1024 on a GPU (autoconfig.CPU_BATCH_SIZE).

    python benchmarks/step_speed.py                                  # fast preset, batches 1024 512 256 128
    python benchmarks/step_speed.py --preset best --batch-sizes 1024 256
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

from config import PRESETS, ModelConfig  # noqa: E402
from machine import calib_img_s  # noqa: E402
from model import build_model  # noqa: E402
from runtime import Runtime, available_cores, pick_precision  # noqa: E402


def images_per_s(net: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, images: int,
                 rt: Runtime) -> float:
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with rt.autocast():
            loss = F.cross_entropy(net(x).float(), y, reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # oneDNN picks its kernels for this shape
        step()
    steps = max(3, images // batch)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["fast", "best"], default="fast")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 512, 256, 128])
    parser.add_argument("--images", type=int, default=6144, help="images per timing")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.images < 1:
        parser.error("--batch-sizes and --images must be >= 1")
    torch.set_num_threads(available_cores())
    torch.manual_seed(0)
    widths = PRESETS[args.preset]["widths"]
    net = build_model(ModelConfig(arch="airbench", widths=widths), 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.85, nesterov=True)
    rt = Runtime(torch.device("cpu"), pick_precision("auto", torch.device("cpu")), channels_last=True)
    calib = calib_img_s()
    print(f"{args.preset} preset's net (widths {list(widths)}), {rt.dtype or 'fp32'}, channels_last, "
          f"{torch.get_num_threads()} threads")
    speeds = {batch: [] for batch in args.batch_sizes}
    for _ in range(2):  # in turn, so a slow spell of the machine does not fall on one batch size only
        for batch in args.batch_sizes:
            speeds[batch].append(images_per_s(net, optimizer, batch, args.images, rt))
    first = args.batch_sizes[0]
    print(f"\n| batch | images/s (2 timings) | vs batch {first} |\n|---:|---:|---:|")
    for batch, values in speeds.items():
        print(f"| {batch} | {statistics.mean(values):.0f} ({values[0]:.0f}, {values[1]:.0f}) "
              f"| {statistics.mean(values) / statistics.mean(speeds[first]):.2f}x |")
    if calib:
        print(f"\ncalib_img_s {calib:.0f} (its net is timed at batch 512)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
