"""Heat maps of what a model looked at: Grad-CAM (captum) on its last spatial feature map, drawn over the image.

The server's /explain, make evaluate's report and the training report use it on a PyTorch model (ours or a timm
backbone); an ONNX file has no gradients to follow.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from transforms import normalize

DISPLAY_SIDE = 224  # overlays are drawn at least this large: a 32 px input is too small to see where the heat is
HEAT_OPACITY = 0.55  # of the hottest point; the heat's colour fades out where the map is cold
MIN_SIDE = 5  # of the feature map explained: the airbench net's last group is 3x3 at 32 px, too coarse to point


def cam_layer(model: nn.Module, channels: int, size: int) -> tuple[str, nn.Module]:
    """(name, module) of the layer explained: the last one whose output is a spatial map at least MIN_SIDE on a side,
    found by one forward pass with hooks. That is a timm backbone's last feature block (EfficientNet's bn2, 7x7 at
    224 px, 5x5 at 160), the first conv of the airbench net's last group (its last map before pooling, 7x7 at 32 px:
    its maps sat on the objects more than those of the group before, on CIFAR-10's worst mistakes) and the
    baseline's second pooling; failing that, the last map more than 1x1. In-place activations are passed over
    (their output is their input, changed under the hook)."""
    found: list[tuple[str, nn.Module, int]] = []  # (name, module, smaller side), in the order they ran

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
                found.append((name, module, min(output.shape[-2:])))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if name and not getattr(m, "inplace", False)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise ValueError("the model has no layer with a spatial output to explain")
    name, module, _ = ([f for f in found if f[2] >= MIN_SIDE] or found)[-1]
    return name, module


class Explainer:
    """Grad-CAM heat maps for an eval-mode PyTorch model and its checkpoint metadata (normalization, input size)."""

    def __init__(self, model: nn.Module, meta: dict):
        from captum.attr import LayerGradCam  # imported here: the server and reports only pay for it when used

        self.model, self.meta = model, meta
        self.size, channels = meta["image_size"], meta.get("channels", 3)
        self.layer_name, layer = cam_layer(model, channels, self.size)
        self.cam = LayerGradCam(model, layer)

    def heat(self, images: torch.Tensor, targets: list[int]) -> np.ndarray:
        """uint8 images (N x C x S x S, as transforms.pil_to_uint8 makes them) and the class to explain for each ->
        N x S x S heat maps in [0, 1] (1 = what raised that class's score most; all 0 where nothing did)."""
        device = next(self.model.parameters()).device
        x = normalize(images.to(device), self.meta["mean"], self.meta["std"])
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(True)  # so the gradient reaches the layer even where the weights are frozen
            maps = self.cam.attribute(x, target=torch.tensor(targets, device=device), relu_attributions=True)
        maps = nn.functional.interpolate(maps.detach().float(), size=(self.size, self.size), mode="bilinear",
                                         align_corners=False).squeeze(1)
        top = maps.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
        return (maps / top).clamp(0, 1).cpu().numpy()


def peak(heat: np.ndarray) -> tuple[float, float]:
    """(x, y) of the hottest point, as fractions of the map's width and height (pixel centres)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return (x + 0.5) / heat.shape[1], (y + 0.5) / heat.shape[0]


def overlay(image: torch.Tensor | np.ndarray, heat: np.ndarray, side: int = DISPLAY_SIDE) -> Image.Image:
    """The heat map over the image (C x S x S uint8, what the model saw), in blue-yellow-red, at least `side` px."""
    pixels = np.asarray(image)
    pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    base = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    side = max(side, base.width)
    base = base.resize((side, side), Image.Resampling.BICUBIC)
    level = Image.fromarray((heat * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    colour = ImageOps.colorize(level, black="#2040ff", mid="#ffe020", white="#ff2010")
    alpha = level.point(lambda v: int(v * HEAT_OPACITY))
    return Image.composite(colour, base, alpha)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlays(explainer: Explainer, images: torch.Tensor, targets: list[int], side: int = 128,
             batch: int = 16) -> list[np.ndarray]:
    """Heat maps for the classes in targets drawn over uint8 images (N x C x S x S), as HxWx3 uint8 arrays for a
    report's grid of pictures."""
    drawn = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        heat = explainer.heat(chunk, targets[start:start + batch])
        drawn += [np.asarray(overlay(x.cpu(), h, side)) for x, h in zip(chunk, heat)]
    return drawn
