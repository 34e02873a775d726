"""Turn image files into uint8 arrays, robustly: folders with bounded memory and every unreadable file reported by
path; uploads to the servers checked before decoding, each refusal with its HTTP status."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from transforms import pil_to_uint8

UPLOAD_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP")  # what the servers decode; MPO: many cameras' JPEG
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Files per worker item. A worker sends back one pickled numpy array per chunk: a torch tensor per image would
# travel as shared memory holding an open file descriptor each, and thousands of them exhaust `ulimit -n`.
CHUNK = 64
LISTED_ERRORS = 20


class DataError(RuntimeError):
    """The data is missing or not what was expected; the message names the folder or file."""


def list_images(folder: Path) -> list[str]:
    """Image files under folder, recursively, sorted, skipping hidden files/folders and __MACOSX."""
    paths = []
    for parent, dirs, files in os.walk(folder):
        # Pruned in place so os.walk never descends into .git, .ipynb_checkpoints or macOS zip junk.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
        paths += [os.path.join(parent, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(paths)


@contextlib.contextmanager
def bombs_refused():
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; a folder file that large is refused too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(path: str) -> Image.Image:
    """Open and fully load one file; raises DataError naming the file for any failure (bombs, truncation, zero bytes...)."""
    try:
        with bombs_refused():
            with Image.open(path) as image:
                image.load()
                return image
    except Exception as e:  # anything a decoder raises, including DecompressionBombError (not an OSError)
        raise DataError(f"cannot read image {path}: {e or type(e).__name__}") from None


def unreadable(errors: list[str]) -> DataError:
    """One error listing the first unreadable files and how many more there are."""
    listed = "\n  ".join(errors[:LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - LISTED_ERRORS} more" if len(errors) > LISTED_ERRORS else ""
    return DataError(f"{len(errors)} unreadable image(s):\n  {listed}{more}")


class UploadError(ValueError):
    """An uploaded image the servers refuse; `status` is the HTTP status that says why (400, 413 or 415)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # intact across processes (LitServe's workers)
        return UploadError, (self.status, str(self))


def upload_bytes(text: str) -> bytes:
    """The image file in a base64 string (a data:image/...;base64, prefix is fine)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise UploadError(400, "a data URL must be base64-encoded: data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, "the image is not valid base64 (standard alphabet, with padding)") from None


def _upload_error(e: Exception, what: str) -> UploadError:
    # PIL reports pixel bombs as DecompressionBombError and oversized PNG text chunks as "... too large" ValueErrors.
    if isinstance(e, Image.DecompressionBombError) or (isinstance(e, ValueError) and "too large" in str(e)):
        return UploadError(413, f"image too large: {e}")
    return UploadError(400, f"{what}: {e or type(e).__name__}")


def open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded file, decoded; its format and pixel count checked from the header before any pixel is decoded."""
    if not data:
        raise UploadError(400, "the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UploadError(400, "the data is not an image: send a PNG, JPEG, BMP, GIF or WebP file") from None
    except Exception as e:  # a malformed header: PIL raises SyntaxError, ValueError, struct.error, ...
        raise _upload_error(e, "cannot read the image header") from None
    if image.format not in UPLOAD_FORMATS:
        raise UploadError(415, f"image format {image.format} is not accepted: send PNG, JPEG, BMP, GIF or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(413, f"image too large: {width}x{height} is over the limit of {max_pixels} pixels")
    try:
        image.load()  # GIF and WebP: the first frame
    except Exception as e:  # truncated or corrupt pixel data
        raise _upload_error(e, f"cannot decode the {image.format} image") from None
    return image


def preprocess_upload(data: bytes, meta: dict, max_pixels: int) -> torch.Tensor:
    """An uploaded file -> CxHxW uint8 tensor, by the shared evaluation pipeline (transforms.pil_to_uint8) with the
    checkpoint's size, channels and resize policy; UploadError (with its HTTP status) for an image it refuses."""
    image = open_upload(data, max_pixels)
    try:
        return pil_to_uint8(image, meta["image_size"], meta["channels"], meta["resize"])
    except Exception as e:  # broken EXIF or an unusual mode that cannot be converted
        raise UploadError(400, f"cannot convert the image to RGB: {e or type(e).__name__}") from None


class _Chunks(torch.utils.data.Dataset):
    """Item i: files [i * CHUNK, (i + 1) * CHUNK) as (start, uint8 array [n, C, S, S], error messages)."""

    def __init__(self, paths: list[str], size: int, channels: int, resize: str):
        self.paths, self.size, self.channels, self.resize = paths, size, channels, resize

    def __len__(self) -> int:
        return -(-len(self.paths) // CHUNK)

    def __getitem__(self, i: int):
        start = i * CHUNK
        paths = self.paths[start:start + CHUNK]
        array = np.zeros((len(paths), self.channels, self.size, self.size), dtype=np.uint8)
        errors = []
        for j, path in enumerate(paths):
            try:
                array[j] = pil_to_uint8(open_image(path), self.size, self.channels, self.resize).numpy()
            except DataError as e:
                errors.append(str(e))
            except Exception as e:  # a mode that cannot be converted, a resize that fails
                errors.append(f"cannot read image {path}: {e or type(e).__name__}")
        return start, array, errors


def _unchanged(item):
    # DataLoader's default would turn the numpy array into a shared-memory tensor, bringing the descriptors back.
    return item


def decode_files(paths: list[str], size: int, channels: int = 3, resize: str = "squash", workers: int = 2,
                 desc: str = "decode") -> torch.Tensor:
    """uint8 tensor [N, channels, size, size] in the order of paths; one DataError listing every unreadable file."""
    chunks = _Chunks(paths, size, channels, resize)
    # Filled in place: a list of per-image tensors plus torch.stack would hold every image twice.
    images = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=min(workers, len(chunks)),
                                         collate_fn=_unchanged)
    errors = []
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False) as progress:
        for start, array, chunk_errors in loader:
            images[start:start + len(array)] = torch.from_numpy(array)
            errors += chunk_errors
            progress.update(len(array))
    if errors:
        raise unreadable(errors)
    return images


def check_files(paths: list[str], workers: int = 2, channels: int = 3, resize: str = "squash") -> None:
    """Fully decode every file, so a streamed training run learns of every unreadable one now, not mid-epoch.

    Each file goes through the same open, convert and resize steps as training, down to a 1x1 pixel that is
    thrown away: the same parallel, descriptor-safe path as decode_files at almost no memory.
    """
    decode_files(paths, 1, channels, resize, workers=workers, desc="check images")


def probe_images(paths: list[str], sample: int = 256, seed: int = 0) -> list[tuple[int, int, str]]:
    """(width, height, mode) of a seeded random sample of files, from headers only; unreadable ones skipped."""
    found = []
    for path in random.Random(seed).sample(paths, min(sample, len(paths))):
        try:
            with bombs_refused(), Image.open(path) as image:
                found.append((image.width, image.height, image.mode))
        except Exception:  # decode_files or check_files reports it, by path
            continue
    return found
