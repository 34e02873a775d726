"""What every training setting is: frozen dataclasses with their defaults, bounds and help, and the named presets.

settings.py decides their values for a run (presets, the data, the device, the flags given); nothing here does work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in '900', '900s', '30m', '1.5h'; ValueError for anything else or a duration that is not positive."""
    text = text.strip().lower()
    scale = DURATION_UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    seconds = float(number) * scale  # ValueError on junk
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def _is_duration(text: str) -> bool:
    try:
        parse_duration(text)
    except ValueError:
        return False
    return True


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
    # augmentation of the training images
    translate: int = _opt(2, "random translation in pixels (reflect padding); 0 = off")
    flip: Literal["alternate", "random", "none"] = _opt("alternate", "horizontal flips: alternate each image's flip every epoch, random, or none")
    crop_scale: float = _opt(0.0, "random-resized crops: smallest share of the image area a crop keeps (0 = off)")
    rotate90: bool = _opt(False, "also vertical flips and 90-degree rotations (for textures and inspection images "
                                 "whose label does not depend on orientation)")
    erase: float = _opt(0.0, "random erasing: the share of training images that get one random rectangle (a fiftieth to a "
                             "third of the area) blanked to the mean (0 = off)")

    def __post_init__(self):
        check(0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)")
        check(8 <= self.image_size <= 1024, "--image-size must be between 8 and 1024")
        check(self.workers >= 0, "--workers must be >= 0")
        check(self.limit >= 0, "--limit must be >= 0")
        check(self.translate >= 0, "--translate must be >= 0")
        check(0 <= self.erase <= 1, "--erase must be in [0, 1]")
        check(self.crop_scale == 0 or 0.05 <= self.crop_scale <= 1, "--crop-scale must be 0 (off) or in [0.05, 1]")
        check(self.dataset != "cifar10" or self.image_size == 32, "CIFAR-10 images are 32x32: use --image-size 32")
        check(self.dataset != "cifar10" or self.channels == 3, "CIFAR-10 images are RGB: use --channels 3")


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
        check(bool(self.arch), "--arch must name a network")
        check(len(self.widths) >= 1 and all(w > 0 for w in self.widths), "--widths must be positive integers")
        check(self.arch != "baseline" or len(self.widths) == 2, "--widths takes two values for --arch baseline")
        check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")
        check(0.0 < self.bn_momentum <= 1.0, "--bn-momentum must be in (0, 1]")
        check(self.hidden >= 0, "--hidden must be >= 0")


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
    balance: Literal["none", "weights", "sample"] = _opt("none", "imbalanced classes: weights = class-weighted loss (inverse "
                                                                "square root of each class's share); sample = draw "
                                                                "every class equally often (oversampling)")
    select_metric: Literal["acc", "macro_f1"] = _opt("acc", "validation metric that picks the best checkpoint")
    freeze_epochs: float = _opt(0.0, "timm backbones: epochs that train only the new classifier head before the whole network")
    fixed_stages: int = _opt(0, "timm backbones: the stem and this many first stages keep their pretrained weights "
                                "and BatchNorm statistics for the whole run (no backward through them: faster steps)")
    progressive: float = _opt(0.0, "progressive resizing: the first 3/4 of the epochs train at sizes rising from this "
                                   "share of --image-size to the full size (e.g. 0.6; 0 = off); validation and the "
                                   "saved model use the full size")
    layer_decay: float = _opt(1.0, "learning-rate factor per layer from the head down (timm backbones; 1 = same rate everywhere)")
    warmup: float = _opt(0.23, "share of steps spent warming the learning rate up to its peak")
    lr_start: float = _opt(0.2, "learning rate at step 0, as a share of the peak")
    lr_end: float = _opt(0.07, "learning rate at the last step, as a share of the peak")
    ema: float = _opt(0.0, "keep an exponential moving average of the weights, its decay warmed up from 0 to at most "
                           "this (timm's ModelEmaV3; e.g. 0.999); validation, the best checkpoint and the final report "
                           "use the average (0 = off)")
    lookahead: bool = _opt(True, "average weights every 5 steps (lookahead / EMA), from epoch 3 on")
    whiten_bias_epochs: float = _opt(3.0, "airbench only: epochs during which the whitening layer's bias trains")
    average_best: int = _opt(1, "at the end, average the weights of the best this-many epochs and keep the average "
                                "when it scores at least as well on validation (1 = the best epoch alone)")
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
    time_budget: str = _opt("", "train and evaluate within this time (e.g. 30m, 2h, 900s; loading the data comes "
                                "before it, logging the model after): fewer epochs when the chosen ones would not "
                                "fit, planned from the step time of the first whole-network steps")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0 = no cap); for smoke runs")
    register: bool = _opt(True, "register the model in the MLflow registry and move its 'champion' alias to it when "
                                "it beats the champion on the same validation split (--smoke: off)")
    model_name: str = _opt("", "registered model name (default: cater-cifar10, or cater-<folder name>)")
    parent_run: str = _opt("", "MLflow run id to nest this run under (sweep.py sets it for its child runs)")

    def __post_init__(self):
        check(self.epochs > 0, "--epochs must be > 0")
        check(self.batch_size >= 1, "--batch-size must be >= 1")
        check(self.lr > 0, "--lr must be > 0")
        check(0.0 <= self.momentum < 1.0, "--momentum must be in [0, 1)")
        check(self.muon_lr > 0, "--muon-lr must be > 0")
        check(0.0 <= self.muon_momentum < 1.0, "--muon-momentum must be in [0, 1)")
        check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        check(self.bias_lr_scale > 0, "--bias-lr-scale must be > 0")
        check(0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
        check(0.0 <= self.warmup < 1.0, "--warmup must be in [0, 1)")
        check(self.lr_start >= 0 and self.lr_end >= 0, "--lr-start and --lr-end must be >= 0")
        check(self.freeze_epochs >= 0, "--freeze-epochs must be >= 0")
        check(self.fixed_stages >= 0, "--fixed-stages must be >= 0")
        check(self.progressive == 0 or 0.25 <= self.progressive <= 1, "--progressive must be 0 (off) or in [0.25, 1]")
        check(0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]")
        check(self.tta in (0, 1, 2), "--tta must be 0, 1 or 2")
        check(self.ema == 0 or 0.5 <= self.ema < 1, "--ema must be 0 (off) or in [0.5, 1)")
        check(self.average_best >= 1, "--average-best must be >= 1")
        check(self.patience >= 0, "--patience must be >= 0")
        check(self.threads >= 0, "--threads must be >= 0")
        check(self.max_steps >= 0, "--max-steps must be >= 0")
        check(not self.time_budget or _is_duration(self.time_budget), "--time-budget must be a duration such as 900s, 30m or 2h")
        check(bool(self.out), "--out must name a file")


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


class ConfigError(ValueError):
    """A setting with a value that cannot work; the message names the flag."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flat_params(*configs) -> dict:
    """Every setting as name -> value, for logging."""
    return {k: v for c in configs for k, v in dataclasses.asdict(c).items()}


