"""The one definition of preprocessing and augmentation, shared by training, evaluation and serving."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# Per-channel statistics of the CIFAR-10 training set; other datasets compute their own (channel_stats).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (16-bit, CMYK, palette, alpha, grayscale) as 8-bit RGB, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of letting convert() clip at 255.
        top = 65535 if image.mode.startswith("I;16") else max(image.getextrema()[1], 1)
        image = image.point(lambda v: v * (255 / top)).convert("L")
    elif image.mode == "F":
        lo, hi = image.getextrema()
        image = image.point(lambda v: (v - lo) * (255 / max(hi - lo, 1e-12))).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite onto white so transparent regions do not turn into black noise.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def pil_to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """RGB, resized to size x size, as a 3xHxW uint8 tensor: what the datasets store and the server feeds."""
    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (3xHxW or Nx3xHxW) to float, scaled to [0, 1] and standardized per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _eval(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    return normalize(pil_to_uint8(image, size), mean, std)


def _train(image: Image.Image, size: int, mean, std, translate: int, flip: bool) -> torch.Tensor:
    x = normalize(pil_to_uint8(image, size), mean, std).unsqueeze(0)
    x = random_translate(x, translate)
    if flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x.squeeze(0)


# partials of module-level functions, not closures: data-loader workers started by spawn must pickle them
def eval_transform(size: int, mean, std):
    """PIL image -> normalized float tensor; the evaluation and serving path."""
    return functools.partial(_eval, size=size, mean=mean, std=std)


def train_transform(size: int, mean, std, translate: int, flip: bool):
    """PIL image -> augmented, normalized tensor; the per-image path for streamed image folders (random flips)."""
    return functools.partial(_train, size=size, mean=mean, std=std, translate=translate, flip=flip)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW images, in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def random_translate(batch: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to pad pixels in x and y, filling by reflection; NCHW float."""
    if pad == 0:
        return batch
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad,) * 4, mode="reflect")
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(batch.device)
    # One gather per axis: build per-image row and column indices into the padded tensor.
    rows = (shifts[0].view(n, 1) + torch.arange(h, device=batch.device)).view(n, 1, h, 1).expand(n, batch.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (shifts[1].view(n, 1) + torch.arange(w, device=batch.device)).view(n, 1, 1, w).expand(n, batch.shape[1], h, w)
    return out.gather(3, cols)


def flip_mask(epoch: int, base: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which images of the dataset to mirror this epoch.

    alternate: each image keeps a fixed random flip and mirrors it every other epoch, so over two epochs
    every image is seen both ways (airbench's alternating flip); random: a fresh coin per image; none.
    """
    if mode == "none":
        return torch.zeros_like(base)
    if mode == "random":
        return torch.rand(base.shape, generator=generator) < 0.5
    return base ^ bool(epoch % 2)


def augment_batch(images: torch.Tensor, flips: torch.Tensor, mean, std, translate: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of uint8 NCHW images -> normalized, translated, flipped float batch (training path)."""
    x = normalize(images, mean, std)
    x = random_translate(x, translate, generator)
    return torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def tta_views(x: torch.Tensor, level: int) -> list[tuple[float, torch.Tensor]]:
    """Weighted views of a normalized batch whose averaged logits give the TTA prediction.

    0: the image; 1: the image and its mirror; 2: adds 1-pixel shifts up-left and down-right, each mirrored too.
    """
    if level == 0:
        return [(1.0, x)]
    views = [(0.5, x), (0.5, x.flip(-1))]
    if level == 1:
        return views
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., 0:h, 0:w], padded[..., 2:h + 2, 2:w + 2]]
    return [(wt * 0.5, v) for wt, v in views] + [(0.125, s) for s in shifted] + [(0.125, s.flip(-1)) for s in shifted]
