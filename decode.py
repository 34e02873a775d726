"""Turn the image files of a folder into uint8 arrays, robustly: bounded memory, and every unreadable file reported
by path."""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fingerprint import FINGERPRINT_SIDE, Fingerprints, fingerprint
from transforms import draft, pil_to_uint8

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Files per worker item. A worker sends back one pickled numpy array per chunk: a torch tensor per image would
# travel as shared memory holding an open file descriptor each, and thousands of them exhaust `ulimit -n`.
CHUNK = 64
LISTED_ERRORS = 20


class DataError(RuntimeError):
    """The data is missing or not what was expected; the message names the folder or file."""


def iter_images(folder: Path) -> Iterator[str]:
    """Image files under folder, recursively, lazily, in walk order, skipping hidden files/folders and __MACOSX."""
    for parent, dirs, files in os.walk(folder):
        # Pruned in place so os.walk never descends into .git, .ipynb_checkpoints or macOS zip junk.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
        yield from (os.path.join(parent, f) for f in files
                    if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[str]:
    """Image files under folder, recursively, sorted (iter_images)."""
    return sorted(iter_images(folder))


@contextlib.contextmanager
def bombs_refused():
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; a folder file that large is refused too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(path: str, size: int | None = None) -> Image.Image:
    """Open and fully load one file (a large JPEG decoded at a reduced scale when the model's `size` is given: see
    transforms.draft); raises DataError naming the file for any failure (bombs, truncation, zero bytes...)."""
    try:
        with bombs_refused():
            with Image.open(path) as image:
                if size:
                    draft(image, size)
                image.load()
                return image
    except Exception as e:  # anything a decoder raises, including DecompressionBombError (not an OSError)
        raise DataError(f"cannot read image {path}: {e or type(e).__name__}") from None


class UnreadableImages(DataError):
    """Files that could not be decoded: one error listing the first of them and how many more there are; .errors
    holds a line per file."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        listed = "\n  ".join(errors[:LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - LISTED_ERRORS} more" if len(errors) > LISTED_ERRORS else ""
        super().__init__(f"{len(errors)} unreadable image(s):\n  {listed}{more}")


class _Chunks(torch.utils.data.Dataset):
    """Item i: files [i * CHUNK, (i + 1) * CHUNK) as (start, uint8 array [n, C, S, S], error messages, and with
    prints the files' Fingerprints, else None)."""

    def __init__(self, paths: list[str], size: int, channels: int, resize: str, prints: bool = False):
        self.paths, self.size, self.channels, self.resize, self.prints = paths, size, channels, resize, prints

    def __len__(self) -> int:
        return -(-len(self.paths) // CHUNK)

    def __getitem__(self, i: int):
        start = i * CHUNK
        paths = self.paths[start:start + CHUNK]
        array = np.zeros((len(paths), self.channels, self.size, self.size), dtype=np.uint8)
        prints = Fingerprints.empty(len(paths)) if self.prints else None
        errors = []
        for j, path in enumerate(paths):
            try:
                image = open_image(path, self.size)  # a large JPEG drafted to the model's size (as the server does)
                if prints is not None:
                    # a JPEG drafted below FINGERPRINT_SIDE (the 1 px of check_files) is opened again for the hash
                    large = image if self.size >= FINGERPRINT_SIDE or image.format != "JPEG" else \
                        open_image(path, FINGERPRINT_SIDE)
                    prints.hashes[j], prints.thumbs[j] = fingerprint(large)
                array[j] = pil_to_uint8(image, self.size, self.channels, self.resize).numpy()
            except DataError as e:
                errors.append(str(e))
            except Exception as e:  # a mode that cannot be converted, a resize that fails
                errors.append(f"cannot read image {path}: {e or type(e).__name__}")
        return start, array, errors, prints


def _unchanged(item):
    # DataLoader's default would turn the numpy array into a shared-memory tensor, bringing the descriptors back.
    return item


def decode_files(paths: list[str], size: int, channels: int = 3, resize: str = "squash", workers: int = 2,
                 desc: str = "decode", prints: Fingerprints | None = None) -> torch.Tensor:
    """uint8 tensor [N, channels, size, size] in the order of paths; one DataError listing every unreadable file.
    prints (Fingerprints.empty(len(paths))), when given, is filled with the files' fingerprints on the way."""
    chunks = _Chunks(paths, size, channels, resize, prints is not None)
    # Filled in place: a list of per-image tensors plus torch.stack would hold every image twice.
    images = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=min(workers, len(chunks)),
                                         collate_fn=_unchanged)
    errors = []
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False) as progress:
        for start, array, chunk_errors, chunk_prints in loader:
            images[start:start + len(array)] = torch.from_numpy(array)
            if prints is not None:
                prints.hashes[start:start + len(array)] = chunk_prints.hashes
                prints.thumbs[start:start + len(array)] = chunk_prints.thumbs
            errors += chunk_errors
            progress.update(len(array))
    if errors:
        raise UnreadableImages(errors)
    return images


def check_files(paths: list[str], workers: int = 2, channels: int = 3, resize: str = "squash",
                prints: Fingerprints | None = None) -> None:
    """Fully decode every file, so a streamed training run learns of every unreadable one now, not mid-epoch.

    Each file goes through the same open, convert and resize steps as training, down to a 1x1 pixel that is
    thrown away: the same parallel, descriptor-safe path as decode_files at almost no memory.
    """
    decode_files(paths, 1, channels, resize, workers=workers, desc="check images", prints=prints)


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
