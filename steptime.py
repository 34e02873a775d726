"""Time a few training steps of the chosen network on random images: what --time-budget sizes the input from."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from config import ModelConfig
from model import build_model, early_layers, hold_statistics, set_trainable


def step_seconds(model_cfg: ModelConfig, size: int, channels: int, classes: int, batch: int, fixed_stages: int,
                 steps: int = 3, warmup: int = 2) -> float:
    """Seconds per optimizer step (forward, backward, AdamW) at this input size, on the CPU threads torch has now,
    in fp32 and channels_last as fine-tuning on a CPU runs; the weights are random: the arithmetic is the same."""
    torch.manual_seed(0)
    model = build_model(model_cfg, num_classes=classes, image_size=size, in_chans=channels)
    model = model.to(memory_format=torch.channels_last).train()
    fixed = early_layers(model, fixed_stages)
    set_trainable(model, False, fixed)
    hold_statistics(fixed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    x = torch.randn(batch, channels, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(classes, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps
