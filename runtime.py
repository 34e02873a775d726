"""Where training and serving run: the CPU cores this process may use, the device, and the numerics on it."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import distributed
from config import ConfigError, TrainConfig
from distributed import Ranks


def available_cores() -> int:
    """CPU cores this process may use: the affinity mask (Linux; else all cores), capped by a cgroup CPU quota
    (a container's --cpus), which the affinity mask does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """Cores' worth of CPU time the process's cgroups allow (quota / period; the smallest from its own group up
    to the root), or None without a limit. cgroup v2 keeps it in cpu.max ("max 100000" or "150000 100000"),
    v1 in cpu.cfs_quota_us (-1 = none) and cpu.cfs_period_us."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = Path(root), ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1
            base, files = Path(root) / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        limits = []
        for depth in range(len(parts), -1, -1):  # the process's own group, then each parent
            folder = base.joinpath(*parts[:depth])
            try:
                quota, period = " ".join((folder / f).read_text() for f in files).split()
                if quota not in ("max", "-1") and float(period) > 0:
                    limits.append(float(quota) / float(period))
            except (OSError, ValueError):
                continue
        return min(limits) if limits else None
    return None


def pick_device(choice: str, setting: str) -> torch.device:
    """auto: CUDA when present, else CPU. A CUDA device where there is none is refused, naming the setting."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={choice} was asked for but no CUDA device is available")
    return torch.device(choice)


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: where bf16 convolutions run faster than fp32 on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if choice == "auto":
        if device.type == "cuda":
            # Emulated bf16 (pre-Ampere GPUs) is slower than fp16 with loss scaling.
            choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            choice = "bf16" if cpu_has_bf16() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    ranks: Ranks = field(default_factory=Ranks)  # this process's place among torchrun's processes

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def wrap(self, model: torch.nn.Module, compile: bool) -> torch.nn.Module:
        """What the loop runs: under torchrun DistributedDataParallel (its gradients summed across ranks), compiled
        with --compile. DDP syncs the parameters that train when it is built: fit wraps again when that set changes
        (the whitening bias stops, a frozen body starts), rather than searching every step for unused ones."""
        net = model
        if self.ranks.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(net) if compile else net


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers (its state_dict has the plain names)."""
    while isinstance(net, torch.nn.parallel.DistributedDataParallel) or hasattr(net, "_orig_mod"):
        net = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net._orig_mod
    return net


def runtime(train_cfg: TrainConfig, ranks: Ranks) -> Runtime:
    """The CPU threads (the cores shared among this machine's processes), the device (this rank's GPU under
    torchrun, after joining the process group) and its numerics."""
    torch.set_num_threads(train_cfg.threads or max(1, available_cores() // ranks.local_world))
    device = distributed.join(ranks, pick_device(train_cfg.device, "--device"))
    # channels_last is faster in fp32 too: 1.6x for the airbench net on CPU
    return Runtime(device, pick_precision(train_cfg.precision, device), train_cfg.channels_last, ranks)
