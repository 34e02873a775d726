"""Decide a training run's settings: train.py's command line, and the one function that layers every setting.

    decide(argv) -> Settings(data, model, train, reasons)

The layers, each over the one before: config.py's defaults -> the preset -> what the data is like (for a folder
without --preset: autoconfig.choose) -> the device (autoconfig.device_batch; then a batch larger than the training
split is cut to fit it; on a CPU, an input size the data chose that leaves too few epochs within --time-budget is
lowered, from the time of a few training steps measured then) -> the flags given. Every value not given comes with
its reason, which train.py prints and logs; nothing downstream changes a setting.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Literal, NamedTuple, get_args, get_origin, get_type_hints

import torch

import autoconfig
from budget import KEEP_EPOCHS, TRAINING_SHARE, budget_size
from config import PRESETS, ConfigError, DataConfig, ModelConfig, TrainConfig, parse_duration
from data import looks_like_folder, scan_training, summarize_folder, total_steps, training_count
from model import SCRATCH_ARCHS
from resume import last_path
from steptime import step_seconds

SECTIONS = (DataConfig, ModelConfig, TrainConfig)
DEFAULTS = {f.name: f.default for section in SECTIONS for f in fields(section)}
# --smoke: a few batches through every stage. It must not replace a user's trained models/cnn.pt.
SMOKE = {"epochs": 1.0, "max_steps": 3, "limit": 512, "register": False, "out": "models/smoke.pt"}
CIFAR10_COUNTS = (5000,) * 10  # the official training set's classes


class Settings(NamedTuple):
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    reasons: list[str]  # "name=value: why", for each setting chosen from the data or the device


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
    smoke = " ".join(f"{_flag(k)} {v}" if not isinstance(v, bool) else _flag(("" if v else "no-") + k) for k, v in SMOKE.items())
    parser.add_argument("--smoke", action="store_true", help=f"a few batches through every stage (sets {smoke} unless given)")
    return parser


def given(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The flags given on the command line, as {setting: value}, with --smoke expanded."""
    parser = build_parser()
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if values.pop("smoke", False):
        values = {**SMOKE, **values}
    return parser, {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def layer(explicit: dict, cuda: bool) -> tuple[dict, list[str]]:
    """Every setting's value, from the preset, the data, the device and the flags given (explicit), in that order;
    with the reasons for what the data and the device chose. Raises ConfigError or data.DataError."""
    preset = explicit.get("preset", TrainConfig.preset)
    if preset != "auto" and preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {['auto', *sorted(PRESETS)]}")
    chosen, reasons, stats = {}, [], None
    if "dataset" not in explicit and "data_dir" in explicit and looks_like_folder(Path(explicit["data_dir"])):
        explicit = {**explicit, "dataset": "folder"}
        reasons.append(f"dataset=folder: {explicit['data_dir']} holds class folders, not CIFAR-10")
    if preset == "auto" and explicit.get("dataset") == "folder":
        stats = summarize_folder(Path(explicit.get("data_dir", DataConfig.data_dir)))
        chosen, why_data = autoconfig.choose(stats, explicit, cuda=cuda)
        reasons += why_data
    if preset == "auto" and not chosen:
        preset = "fast"  # CIFAR-10, or a folder whose settings were all given
    # auto on a folder builds on the preset of the network asked for (the baseline CNN has its own recipe)
    base = PRESETS.get(preset) or PRESETS["baseline" if explicit.get("arch") == "baseline" else "fast"]
    values = {**DEFAULTS, **base, **chosen, **explicit, "preset": preset}
    on_device, why = autoconfig.device_batch(values["arch"], values["optimizer"], values["batch_size"],
                                             {**chosen, **explicit}, cuda)
    values = {**values, **on_device}
    build(values)  # a value that cannot work is refused before the training folder is read
    if "batch_size" not in explicit or "image_size" in chosen:
        counts, has_val = pool_counts(values, stats)
        n_train = training_count(counts, values["limit"], values["val_fraction"], has_val)
        if "batch_size" not in explicit and 0 < n_train < values["batch_size"]:  # the batch fits the training split
            values["batch_size"] = 2 ** (n_train.bit_length() - 1)
            why = why + [f"batch_size={values['batch_size']}: the training split holds only {n_train} images"]
        if "image_size" in chosen and values["time_budget"] and values["arch"] not in SCRATCH_ARCHS and not cuda:
            values["image_size"], sized = size_for_budget(values, n_train, len(counts))
            why = why + [sized]
    return values, reasons + why


def size_for_budget(values: dict, n_train: int, classes: int) -> tuple[int, str]:
    """The chosen input size, or a smaller one when too few of the chosen epochs would fit in --time-budget at it,
    from the time of a few training steps measured now (on a CPU; under torchrun every process would measure its
    own, so there the size stays); with the reason."""
    size, budget = values["image_size"], values["time_budget"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return size, f"image_size={size}: kept under torchrun (the time budget sizes epochs only there)"
    if values["resume"] and (saved := resumed_size(last_path(values["out"]))):
        return saved, f"image_size={saved}: the size the run being resumed chose for its time budget"
    if values["threads"]:
        torch.set_num_threads(values["threads"])
    model_cfg = build(values)[1]
    steps = total_steps(n_train, values["batch_size"], values["epochs"])
    steps = min(steps, values["max_steps"] or steps)
    step_s = step_seconds(model_cfg, size, values["channels"], classes, values["batch_size"], values["fixed_stages"])
    new = budget_size(parse_duration(budget), size, step_s, steps)
    need = f"{steps} steps at {size}px take about {steps * step_s:.0f}s ({step_s:.2f}s per step, measured)"
    if new == size:
        return size, f"image_size={size}: time budget {budget}: {need}; the budget trims epochs if they do not all fit"
    return new, (f"image_size={new}: time budget {budget}: {need}, under {KEEP_EPOCHS:.0%} of them would fit in the "
                 f"{TRAINING_SHARE:.0%} of it left for training steps, so the input shrinks (a step's time goes with "
                 f"the pixels)")


def resumed_size(last: Path) -> int | None:
    """The input size saved in a last checkpoint, if there is a readable one (resume.load_last checks the rest)."""
    try:
        return torch.load(last, map_location="cpu", weights_only=True)["settings"]["image_size"]
    except Exception:  # none, unreadable or another format: the size is measured, and resuming explains itself
        return None


def pool_counts(values: dict, stats) -> tuple[tuple[int, ...], bool]:
    """The training pool's class counts, and whether a val/ folder comes with it."""
    if values["dataset"] == "cifar10":
        return CIFAR10_COUNTS, False
    if stats is not None:
        return stats.class_counts, stats.has_val
    root = Path(values["data_dir"])
    _, _, labels, classes = scan_training(root)
    return tuple(torch.bincount(labels, minlength=len(classes)).tolist()), (root / "val").is_dir()


def build(values: dict) -> list:
    """The three configs from every setting's value; ConfigError for a value that cannot work, alone or together."""
    configs = [section(**{f.name: values[f.name] for f in fields(section)}) for section in SECTIONS]
    check_together(*configs[1:])
    return configs


def check_together(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Settings that are fine alone but cannot work together."""
    if model_cfg.weights and (model_cfg.arch in SCRATCH_ARCHS or not model_cfg.pretrained):
        raise ConfigError("--weights is for a pretrained timm backbone: drop it, or pick one with --arch (and --pretrained)")
    if train_cfg.fixed_stages and (model_cfg.arch in SCRATCH_ARCHS or not model_cfg.pretrained):
        raise ConfigError("--fixed-stages keeps a pretrained timm backbone's early layers: drop it, or use --pretrained "
                          "with a timm --arch")
    if train_cfg.optimizer == "muon" and model_cfg.arch != "airbench":
        # Muon rescales each filter bank to a fixed norm, which only a BatchNorm right after the conv makes harmless
        raise ConfigError("--optimizer muon is for --arch airbench (every conv followed by BatchNorm): use sgd or adam")


def decide(argv: list[str] | None = None, values: dict | None = None) -> Settings:
    """The run's settings from the command line (argv), or from a dict of given values; a bad value is an
    argparse error naming the flag (exit 2) on the command line, a ConfigError from a dict."""
    parser, explicit = (None, values) if values is not None else given(argv)
    cuda = torch.cuda.is_available() and explicit.get("device", "auto") != "cpu"
    try:
        merged, reasons = layer(explicit, cuda)
        configs = build(merged)
    except ConfigError as e:
        if parser is None:
            raise
        parser.error(str(e))
    return Settings(*configs, reasons)
