"""Every setting in one place: frozen dataclasses with defaults, the named presets, and the train.py CLI built from them."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import torch


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["cifar10", "folder"] = _opt("cifar10", "cifar10, or folder: train/<class>/*, optional val/ and test/")
    data_dir: str = _opt("data", "where the data lives (CIFAR-10 is downloaded here when no local copy is found)")
    val_fraction: float = _opt(0.1, "share of the training set held out for validation, stratified (0.1 = 45k/5k on CIFAR-10)")
    split_seed: int = _opt(0, "seed of the train/validation split")
    image_size: int = _opt(32, "side of the square model input, in pixels")
    channels: Literal[1, 3] = _opt(3, "1: grayscale, kept single-channel (cheaper); 3: RGB. Folders: chosen from the images")
    resize: Literal["squash", "crop", "pad"] = _opt("squash", "how a non-square image becomes square: squash (stretch), "
                                                              "crop (centre square) or pad (letterbox); stored in the checkpoint")
    in_memory: bool = _opt(True, "decode the dataset once into a uint8 tensor and augment whole batches; "
                                 "--no-in-memory streams per-image transforms through worker processes")
    workers: int = _opt(2, "data loader worker processes (streaming mode and image decoding)")
    limit: int = _opt(0, "use about this many training images (before the validation split), stratified per class (0 = all)")
    download: bool = _opt(True, "download CIFAR-10 with torchvision when no local copy is found")

    def __post_init__(self):
        _check(0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)")
        _check(8 <= self.image_size <= 1024, "--image-size must be between 8 and 1024")
        _check(self.workers >= 0, "--workers must be >= 0")
        _check(self.limit >= 0, "--limit must be >= 0")
        _check(self.dataset != "cifar10" or self.image_size == 32, "CIFAR-10 images are 32x32: use --image-size 32")
        _check(self.dataset != "cifar10" or self.channels == 3, "CIFAR-10 images are RGB: use --channels 3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _opt("airbench", "baseline: conv-pool-conv-pool-fc; airbench: whitened conv groups; or a timm backbone "
                                 "such as tf_efficientnet_lite0 (ImageNet weights, see --pretrained and --weights)")
    pretrained: bool = _opt(True, "timm backbones: start from ImageNet weights (--weights, an installed weights package, "
                                  "or timm's download)")
    weights: str = _opt("", "timm backbones: a local ImageNet state-dict file (.pth, .pt or .safetensors) to start from")
    widths: tuple[int, ...] = _opt((64, 128, 128), "channels per conv block")
    hidden: int = _opt(256, "baseline only: width of the hidden fully connected layer (0 = none)")
    dropout: float = _opt(0.0, "dropout before the classifier")
    norm: Literal["batch", "none"] = _opt("batch", "normalization after each conv")
    bn_momentum: float = _opt(0.4, "BatchNorm running-stat momentum (PyTorch convention: weight of the new batch)")
    logit_scale: float = _opt(1 / 9, "airbench only: constant scale of the output logits")

    def __post_init__(self):
        _check(bool(self.arch), "--arch must name a network")
        _check(len(self.widths) >= 1 and all(w > 0 for w in self.widths), "--widths must be positive integers")
        _check(self.arch != "baseline" or len(self.widths) == 2, "--widths takes two values for --arch baseline")
        _check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")
        _check(0.0 < self.bn_momentum <= 1.0, "--bn-momentum must be in (0, 1]")
        _check(self.hidden >= 0, "--hidden must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    preset: Literal["auto", "baseline", "fast", "best"] = _opt(
        "auto", "named set of defaults (see PRESETS in config.py); auto: fast for CIFAR-10, and for a folder settings "
                "chosen from its images (printed and logged); other flags override it")
    epochs: float = _opt(15.0, "passes over the training split (fractions allowed)")
    batch_size: int = _opt(1024, "examples per step (under torchrun: in all processes together); on a CPU the "
                                 "airbench nets with SGD take 256 unless it is given")
    optimizer: Literal["sgd", "adam", "muon"] = _opt("sgd", "sgd (Nesterov), adam, or muon: Muon on the convolution "
                                                            "filters (--muon-lr), Nesterov SGD on the rest (--lr)")
    lr: float = _opt(11.5, "SGD: learning rate per 1024 examples, decoupled from batch size and momentum; "
                           "Adam: the usual step size")
    momentum: float = _opt(0.85, "SGD Nesterov momentum")
    muon_lr: float = _opt(0.24, "muon: step size of the convolution filters per step, whatever the batch size (each "
                                "filter bank kept at norm sqrt(out channels), the step orthogonalized; no weight decay)")
    muon_momentum: float = _opt(0.6, "muon: Nesterov momentum of the convolution filters")
    weight_decay: float = _opt(0.0153, "SGD: weight decay per 1024 examples, decoupled from the learning rate; Adam: AdamW's decay")
    bias_lr_scale: float = _opt(64.0, "multiplier on the learning rate of normalization biases")
    label_smoothing: float = _opt(0.2, "label smoothing of the cross-entropy loss")
    balance: Literal["none", "weights"] = _opt("none", "imbalanced classes: weights = class-weighted loss (inverse square "
                                                      "root of each class's share)")
    select_metric: Literal["acc", "macro_f1"] = _opt("acc", "validation metric that picks the best checkpoint")
    freeze_epochs: float = _opt(0.0, "timm backbones: epochs that train only the new classifier head before the whole network")
    layer_decay: float = _opt(1.0, "learning-rate factor per layer from the head down (timm backbones; 1 = same rate everywhere)")
    warmup: float = _opt(0.23, "share of steps spent warming the learning rate up to its peak")
    lr_start: float = _opt(0.2, "learning rate at step 0, as a share of the peak")
    lr_end: float = _opt(0.07, "learning rate at the last step, as a share of the peak")
    lookahead: bool = _opt(True, "average weights every 5 steps (lookahead / EMA), from epoch 3 on")
    whiten_bias_epochs: float = _opt(3.0, "airbench only: epochs during which the whitening layer's bias trains")
    translate: int = _opt(2, "random translation in pixels (reflect padding); 0 = off")
    flip: Literal["alternate", "random", "none"] = _opt("alternate", "horizontal flips: alternate each image's flip every epoch, random, or none")
    crop_scale: float = _opt(0.0, "random-resized crops: smallest share of the image area a crop keeps (0 = off)")
    rotate90: bool = _opt(False, "also vertical flips and 90-degree rotations (for textures and inspection images "
                                 "whose label does not depend on orientation)")
    tta: int = _opt(2, "test-time augmentation for final evaluation: 0 none, 1 flip, 2 flip + 1px translations")
    patience: int = _opt(0, "stop after this many epochs without a better validation accuracy (0 = never)")
    seed: int = _opt(0, "seed of initialization, shuffling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto picks CUDA when present")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _opt("auto", "auto: bf16 on CUDA and BF16-capable CPUs, else fp32")
    channels_last: bool = _opt(True, "use the channels_last memory format (faster convolutions on CPU and GPU)")
    compile: bool = _opt(False, "torch.compile the model (pays a compile cost up front)")
    threads: int = _opt(0, "torch CPU threads (0 = one per core)")
    out: str = _opt("models/cnn.pt", "where the best checkpoint is written (and beside it, after every epoch, the "
                                      "last one with the whole training state: models/cnn.last.pt)")
    resume: bool = _opt(False, "continue the run whose last checkpoint is beside --out (same settings, same MLflow run) "
                               "from its last finished epoch; without one, start a new run")
    experiment: str = _opt("cv-image-classification", "MLflow experiment name")
    run_name: str = _opt("", "MLflow run name (default: preset and time)")
    mlflow: bool = _opt(True, "log to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo)")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0 = no cap); for smoke runs")
    register: bool = _opt(True, "register the model in the MLflow registry and move its 'champion' alias to it when "
                                "it beats the champion on the same validation split (--smoke: off)")
    model_name: str = _opt("", "registered model name (default: cater-cifar10, or cater-<folder name>)")
    parent_run: str = _opt("", "MLflow run id to nest this run under (sweep.py sets it for its child runs)")

    def __post_init__(self):
        _check(self.epochs > 0, "--epochs must be > 0")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.lr > 0, "--lr must be > 0")
        _check(0.0 <= self.momentum < 1.0, "--momentum must be in [0, 1)")
        _check(self.muon_lr > 0, "--muon-lr must be > 0")
        _check(0.0 <= self.muon_momentum < 1.0, "--muon-momentum must be in [0, 1)")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(self.bias_lr_scale > 0, "--bias-lr-scale must be > 0")
        _check(0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
        _check(0.0 <= self.warmup < 1.0, "--warmup must be in [0, 1)")
        _check(self.lr_start >= 0 and self.lr_end >= 0, "--lr-start and --lr-end must be >= 0")
        _check(self.translate >= 0, "--translate must be >= 0")
        _check(self.crop_scale == 0 or 0.05 <= self.crop_scale <= 1, "--crop-scale must be 0 (off) or in [0.05, 1]")
        _check(self.freeze_epochs >= 0, "--freeze-epochs must be >= 0")
        _check(0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]")
        _check(self.tta in (0, 1, 2), "--tta must be 0, 1 or 2")
        _check(self.patience >= 0, "--patience must be >= 0")
        _check(self.threads >= 0, "--threads must be >= 0")
        _check(self.max_steps >= 0, "--max-steps must be >= 0")
        _check(bool(self.out), "--out must name a file")


# Presets fill in defaults; flags given on the command line win over them.
# fast/best follow the public airbench93/airbench94 recipes (Keller Jordan), on a 45k/5k split.
PRESETS: dict[str, dict] = {
    "baseline": dict(
        arch="baseline", widths=(32, 64), hidden=256, dropout=0.25, bn_momentum=0.1,
        epochs=15, batch_size=128, optimizer="adam", lr=2e-3, weight_decay=0.01, label_smoothing=0.0,
        warmup=0.1, lr_start=0.1, lr_end=0.0, lookahead=False, translate=4, flip="random", tta=0,
    ),
    "fast": dict(arch="airbench", widths=(64, 128, 128), epochs=15.0),
    "best": dict(arch="airbench", widths=(64, 256, 256), epochs=12.0),
}
# "auto" (the default) is fast on CIFAR-10; on a folder, autoconfig.choose fills in settings from the images.


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


class ConfigError(ValueError):
    """A setting with a value that cannot work; the message names the flag."""


def pick_device(choice: str, setting: str) -> torch.device:
    """auto: CUDA when present, else CPU. A CUDA device where there is none is refused, naming the setting."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={choice} was asked for but no CUDA device is available")
    return torch.device(choice)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


SECTIONS = (DataConfig, ModelConfig, TrainConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One flag per dataclass field; defaults stay None so presets and explicit flags can be told apart."""
    parser = argparse.ArgumentParser(
        prog="train.py", allow_abbrev=False,
        description="Train a CNN image classifier and log the run to MLflow. Defaults shown are the fast preset's; "
                    "another --preset fills in its own (see PRESETS in config.py), and explicit flags win.",
    )
    for section in SECTIONS:
        group = parser.add_argument_group(section.__name__)
        hints = get_type_hints(section)
        for f in fields(section):
            kind = hints[f.name]
            kwargs = dict(dest=f.name, default=None, help=f"{f.metadata['help']} (default: {f.default})")
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(kind) is Literal:
                choices = get_args(kind)
                kwargs.update(type=type(choices[0]), choices=choices)
            elif get_origin(kind) is tuple:
                kwargs.update(type=get_args(kind)[0], nargs="+")
            else:
                kwargs["type"] = kind
            group.add_argument(_flag(f.name), **kwargs)
    parser.add_argument("--smoke", action="store_true", help="a few batches through every stage (sets --epochs 1 "
                        "--max-steps 3 --limit 512 --no-register --out models/smoke.pt unless given)")
    return parser


def resolve(values: dict, chosen: dict | None = None) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """Preset defaults, then settings chosen from the data (autoconfig), then explicit values; raises ConfigError."""
    explicit = {k: v for k, v in values.items() if v is not None}
    preset = explicit.get("preset", TrainConfig.preset)
    if preset != "auto" and preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {['auto', *sorted(PRESETS)]}")
    if preset == "auto" and not chosen:
        preset = "fast"  # CIFAR-10, or a folder whose settings were all given
    # auto on a folder builds on the preset of the network asked for (the baseline CNN has its own recipe)
    base = PRESETS.get(preset) or PRESETS["baseline" if explicit.get("arch") == "baseline" else "fast"]
    merged = {**base, **(chosen or {}), **explicit, "preset": preset}
    out = []
    for section in SECTIONS:
        names = {f.name for f in fields(section)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in merged.items() if k in names}
        out.append(section(**kwargs))
    return tuple(out)


def parse_values(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The command line as {setting: value or None when not given}, with --smoke expanded."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("smoke"):
        # a smoke run must not replace a user's trained models/cnn.pt: it writes models/smoke.pt unless --out says
        for name, value in (("epochs", 1.0), ("max_steps", 3), ("limit", 512), ("register", False),
                            ("out", "models/smoke.pt")):
            if args.get(name) is None:
                args[name] = value
    return parser, args


def parse_args(argv: list[str] | None = None) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    parser, args = parse_values(argv)
    try:
        return resolve(args)
    except ConfigError as e:
        parser.error(str(e))


def flat_params(*configs) -> dict:
    """Every setting as name -> value, for logging."""
    return {k: v for c in configs for k, v in dataclasses.asdict(c).items()}


@dataclass(frozen=True)
class ServeConfig:
    """Serving settings (api.py), read from the environment by from_env(): each field F from CATER_<F>, e.g. CATER_PORT."""

    model_path: str = "models/cnn.pt"  # checkpoint written by train.py
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    tta: int = 0  # test-time augmentation level at serving: 0 off, 1 flip, 2 flip + shifts (see transforms.tta_views)
    top_k: int = 3  # classes returned when the request does not say
    max_batch_size: int = 0  # images per forward pass; 0 = device default (CPU 32, CUDA 128)
    max_wait_ms: float = 0.0  # extra wait for a fuller batch; 0 = take what is queued (batches still form under load)
    max_body_bytes: int = 4 * 1024 * 1024  # request body limit, enforced while reading (413 above it)
    max_pixels: int = 16_000_000  # width x height limit, checked before decoding (413 above it)
    max_batch_images: int = 64  # images per /predict/batch request
    queue_budget_ms: float = 500.0  # admit work only while the measured throughput answers it within this; else 503
    max_queue: int = 4096  # images admitted at once, at most (memory bound whatever the throughput)
    timeout_s: float = 30.0  # a request not answered by then gets 504; a forward pass running longer marks the server down
    drain_s: float = 0.0  # after SIGTERM: /ready answers 503 and requests are still served this long, then shutdown
    api_key: str = ""  # when set, the predict routes need X-API-Key: <key> or Authorization: Bearer <key>
    cors_origins: str = ""  # comma-separated allowed origins; empty = no CORS headers
    threads: int = 0  # torch CPU threads; 0 = one per core minus one for the event loop (at least 1)
    access_log: bool = False  # uvicorn's per-request log line (Prometheus /metrics counts requests either way)

    def __post_init__(self):
        _check(bool(self.model_path), "CATER_MODEL_PATH must name a file")
        _check(0 <= self.port <= 65535, "CATER_PORT must be in [0, 65535]")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "CATER_DEVICE must be auto, cpu, cuda or cuda:N")
        _check(self.tta in (0, 1, 2), "CATER_TTA must be 0, 1 or 2")
        _check(self.top_k >= 1, "CATER_TOP_K must be >= 1")
        _check(self.max_batch_size >= 0, "CATER_MAX_BATCH_SIZE must be >= 0")
        _check(self.max_wait_ms >= 0, "CATER_MAX_WAIT_MS must be >= 0")
        _check(self.max_body_bytes >= 1024, "CATER_MAX_BODY_BYTES must be >= 1024")
        _check(self.max_pixels >= 1, "CATER_MAX_PIXELS must be >= 1")
        _check(self.max_batch_images >= 1, "CATER_MAX_BATCH_IMAGES must be >= 1")
        _check(self.threads >= 0, "CATER_THREADS must be >= 0")
        _check(self.queue_budget_ms > 0, "CATER_QUEUE_BUDGET_MS must be > 0")
        _check(self.max_queue >= 1, "CATER_MAX_QUEUE must be >= 1")
        _check(self.timeout_s > 0, "CATER_TIMEOUT_S must be > 0")
        _check(self.drain_s >= 0, "CATER_DRAIN_S must be >= 0")

    @classmethod
    def from_env(cls, env=None) -> "ServeConfig":
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            name = "CATER_" + f.name.upper()
            raw = env.get(name)
            if raw is None:
                continue
            kind = hints[f.name]
            if kind is bool:
                if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")
                kwargs[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                continue
            try:
                kwargs[f.name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**kwargs)
