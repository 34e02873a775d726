"""The one definition of preprocessing and augmentation, shared by training, evaluation and serving."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# Per-channel statistics of the CIFAR-10 training set; other datasets compute their own (channel_stats).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


REDUCIBLE_MODES = ("L", "RGB", "CMYK", "YCbCr", "I", "F")  # box-averaging their values is right (no palette, no alpha)


def draft(image: Image.Image, size: int) -> Image.Image:
    """A JPEG not yet decoded set to decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, far cheaper than a full
    decode) while its short side stays at least twice `size`; a no-op for other formats and for a loaded image.
    Every path of this repo that opens a file (training folders, uploads, predict, evaluate) drafts before loading,
    and pil_to_uint8 drafts an image still unloaded, so they all see the same pixels. An image the caller has
    already loaded (or converted) is decoded whole: close, but not the same pixels, for a large JPEG."""
    if min(image.size) >= 4 * size:
        image.draft(None, (2 * size, 2 * size))
    return image


def shrink(image: Image.Image, size: int) -> Image.Image:
    """A large image box-reduced by a whole factor while its short side stays at least twice `size`, before any colour
    work: converting and compositing a 16-megapixel photo costs far more than the final resize needs."""
    factor = min(image.size) // (2 * size)
    return image.reduce(factor) if factor >= 2 and image.mode in REDUCIBLE_MODES else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (16-bit, CMYK, palette, alpha, grayscale) as 8-bit RGB, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit grayscale: scale to 8 bits instead of letting convert() clip at 255. In numpy, because
        # Image.point refuses I;16B/I;16L/I;16N. 16-bit spans 0..65535; I and F have no fixed range, so their own
        # min..max is stretched over 0..255 (non-finite floats become the minimum).
        values = np.asarray(image).astype(np.float32)
        if image.mode.startswith("I;16"):
            values *= 255 / 65535
        else:
            finite = np.isfinite(values)
            lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
            values = (np.where(finite, values, lo) - lo) * (255 / max(hi - lo, 1e-12))
        image = Image.fromarray(np.rint(values).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite onto white so transparent regions do not turn into black noise.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, resize: str = "squash") -> Image.Image:
    """size x size by the resize policy: squash (stretch the whole image), crop (centre square of the short side)
    or pad (whole image, letterboxed with black)."""
    if image.size == (size, size):
        return image
    if resize == "crop":
        return ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    if resize == "pad":
        return ImageOps.pad(image, (size, size), Image.Resampling.BILINEAR, color=0)
    return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)


def pil_to_uint8(image: Image.Image, size: int, channels: int = 3, resize: str = "squash") -> torch.Tensor:
    """RGB (or grayscale when channels is 1), fitted to size x size by the resize policy, as a CxHxW uint8 tensor:
    what the datasets store and the server feeds."""
    image = to_rgb(shrink(draft(image, size), size))
    if channels == 1:
        image = image.convert("L")
    image = fit_square(image, size, resize)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, channels).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (3xHxW or Nx3xHxW) to float, scaled to [0, 1] and standardized per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _eval(image: Image.Image, size: int, mean, std, channels: int, resize: str) -> torch.Tensor:
    return normalize(pil_to_uint8(image, size, channels, resize), mean, std)


def _train(image: Image.Image, size: int, mean, std, translate: int, flip: bool, channels: int, resize: str,
           crop_scale: float, rotate90: bool, erase: float) -> torch.Tensor:
    x = pil_to_uint8(image, size, channels, resize).unsqueeze(0)
    flips = torch.rand(1) < 0.5 if flip else torch.zeros(1, dtype=torch.bool)
    return augment_batch(x, flips, mean, std, translate, None, crop_scale, rotate90, erase).squeeze(0)


# partials of module-level functions, not closures: data-loader workers started by spawn must pickle them
def eval_transform(size: int, mean, std, channels: int = 3, resize: str = "squash"):
    """PIL image -> normalized float tensor; the evaluation and serving path."""
    return functools.partial(_eval, size=size, mean=mean, std=std, channels=channels, resize=resize)


def train_transform(size: int, mean, std, translate: int, flip: bool, channels: int = 3, resize: str = "squash",
                    crop_scale: float = 0.0, rotate90: bool = False, erase: float = 0.0):
    """PIL image -> augmented, normalized tensor; the per-image path for streamed image folders (random flips)."""
    return functools.partial(_train, size=size, mean=mean, std=std, translate=translate, flip=flip,
                             channels=channels, resize=resize, crop_scale=crop_scale, rotate90=rotate90, erase=erase)


def channel_stats(images: torch.Tensor, index: torch.Tensor | None = None,
                  chunk: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW images (those at index, when given), in [0, 1] units.

    Summed chunk by chunk in float64: a float copy of 10,000 images at 160 px alone would be 3 GB.
    """
    total = squares = n = 0
    parts = images.split(chunk) if index is None else (images[i] for i in index.split(chunk))
    for part in parts:
        x = part.double().transpose(0, 1).reshape(images.shape[1], -1) / 255
        total, squares, n = total + x.sum(1), squares + (x * x).sum(1), n + x.shape[1]
    mean = total / n
    std = ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())


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


# cos and sin of 0, 90, 180 and 270 degrees, exact, so rotations move whole pixels
_COS = torch.tensor([1.0, 0.0, -1.0, 0.0])
_SIN = torch.tensor([0.0, 1.0, 0.0, -1.0])


def random_crop_rotate(batch: torch.Tensor, crop_scale: float, rotate90: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-resized crops (a share of the area in [crop_scale, 1], aspect 3:4 to 4:3, resized back to full size)
    and, with rotate90, a random multiple of 90 degrees and a random vertical flip: one grid_sample for the batch."""
    n = batch.shape[0]
    sx, sy, tx, ty = torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
    if crop_scale:
        area = torch.empty(n).uniform_(crop_scale, 1.0, generator=generator)
        ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
        sx, sy = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        tx = (1 - sx) * (2 * torch.rand(n, generator=generator) - 1)
        ty = (1 - sy) * (2 * torch.rand(n, generator=generator) - 1)
    linear = torch.diag_embed(torch.stack([sx, sy], 1))
    if rotate90:
        k = torch.randint(0, 4, (n,), generator=generator)
        vflip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        rotation = torch.stack([torch.stack([_COS[k], -_SIN[k] * vflip], 1), torch.stack([_SIN[k], _COS[k] * vflip], 1)], 1)
        linear = linear @ rotation
    theta = torch.cat([linear, torch.stack([tx, ty], 1).unsqueeze(2)], 2).to(batch.device, batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_erase(batch: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing (Zhong et al.): with probability p an image gets one rectangle of 2-33% of its area, aspect
    ratio 0.3-3.3, set to 0 (the mean, after normalization); NCHW float, as torchvision's RandomErasing per image."""
    if p == 0:
        return batch
    n, _, h, w = batch.shape
    area = torch.empty(n).uniform_(0.02, 0.33, generator=generator) * h * w
    ratio = torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=generator).exp()
    eh = (area * ratio).sqrt().round().clamp(1, h)
    ew = (area / ratio).sqrt().round().clamp(1, w)
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).floor()
    on = torch.rand(n, generator=generator) < p
    top, left, eh, ew, on = (t.to(batch.device).view(-1, 1, 1) for t in (top, left, eh, ew, on))
    rows = torch.arange(h, device=batch.device).view(1, h, 1)
    cols = torch.arange(w, device=batch.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & on
    return batch.masked_fill(inside.unsqueeze(1), 0.0)


def augment_batch(images: torch.Tensor, flips: torch.Tensor, mean, std, translate: int,
                  generator: torch.Generator | None = None, crop_scale: float = 0.0, rotate90: bool = False,
                  erase: float = 0.0) -> torch.Tensor:
    """A batch of uint8 NCHW images -> normalized, cropped/rotated, translated, flipped, partly erased float batch
    (training path)."""
    x = normalize(images, mean, std)
    if crop_scale or rotate90:
        x = random_crop_rotate(x, crop_scale, rotate90, generator)
    x = random_translate(x, translate, generator)
    x = torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return random_erase(x, erase, generator)


PROGRESSIVE_RAMP = 0.75  # progressive resizing: the share of the epochs whose size rises; the rest train at full size
SIZE_STEP = 32  # the stride of the backbones: sizes in between pay for pixels the last stage cannot use


def progressive_size(epoch: int, epochs: int, size: int, start: float) -> int:
    """The training input size of epoch (0-based) of `epochs` under progressive resizing (fast.ai; EfficientNetV2):
    from `start` times `size` at the first epoch up to `size` for the last quarter (the last epoch at least),
    rounded to a multiple of 32 (of 8, and at least 16 px, for small images); 0 for start means off. Cheaper early
    epochs; the net ends trained at the size it serves."""
    ramp = min(math.ceil(PROGRESSIVE_RAMP * epochs), epochs - 1)  # the last epoch, at least, at full size
    if not start or epoch >= ramp:
        return size
    step = SIZE_STEP if size >= 4 * SIZE_STEP else 8
    wanted = size * (start + (1 - start) * epoch / ramp)
    return int(min(size, max(step, 16, round(wanted / step) * step)))


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
