"""Perceptual fingerprints of images and the near-duplicate pairs they reveal, in bounded memory.

A fingerprint is a 64-bit perceptual hash (imagehash's pHash) and a 16x16 grayscale thumbnail. Two images are
near-duplicates when their hashes differ in at most HASH_BITS bits *and* their thumbnails correlate at MATCH or
more. On Fashion-MNIST's 28 px products the hash alone put 29 % of the images within 4 bits of another one (plain
look-alikes), and a correlation of 0.99 still chained look-alikes into groups of 200; a copy re-saved as JPEG,
resized, or with its brightness or contrast changed kept a correlation of 0.997 or more in 99 % of 500 tries
(benchmarks/data_checks.py measures recall on planted copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_BITS = 6  # pHash bits two near-duplicates may differ in (candidates)
MATCH = 0.995  # thumbnail correlation a candidate pair must reach to count as a near-duplicate
THUMB = 16  # thumbnail side, pixels
FINGERPRINT_SIDE = 64  # pixels: an image is reduced to about this before it is hashed (pHash works at 32)
PAIRS = 1 << 16  # candidate pairs compared at once, 128 MB of thumbnails (blank images make millions)
ROWS = 128  # hashes compared against all the others at once: ROWS x N uint64 (60 MB for 60,000) in memory


def fingerprint(image: Image.Image) -> tuple[int, np.ndarray]:
    """(pHash as an int, THUMB x THUMB uint8 grayscale thumbnail, flattened) of a loaded image."""
    import imagehash

    gray = image.convert("L")
    if min(gray.size) >= 2 * FINGERPRINT_SIDE:  # a cheap box reduction first: a full-size photo is not hashed whole
        gray = gray.reduce(min(gray.size) // FINGERPRINT_SIDE)
    bits = imagehash.phash(gray).hash.flatten()
    thumb = np.asarray(gray.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0]), thumb


@dataclass
class Fingerprints:
    """The fingerprints of a list of images, row i for image i."""

    hashes: np.ndarray  # uint64 [N]
    thumbs: np.ndarray  # uint8 [N, THUMB * THUMB]

    @classmethod
    def empty(cls, n: int) -> "Fingerprints":
        return cls(np.zeros(n, dtype=np.uint64), np.zeros((n, THUMB * THUMB), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def concat(cls, parts: list["Fingerprints"]) -> "Fingerprints":
        """The parts' rows one after another."""
        return cls(np.concatenate([p.hashes for p in parts]), np.concatenate([p.thumbs for p in parts]))

    def subset(self, index) -> "Fingerprints":
        index = np.asarray(index, dtype=np.int64)
        return Fingerprints(self.hashes[index], self.thumbs[index])

    def unit_thumbs(self) -> np.ndarray:
        """Thumbnails with mean 0 and norm 1 (a flat one stays 0), so a dot product is their correlation."""
        t = self.thumbs.astype(np.float32)
        t -= t.mean(1, keepdims=True)
        norm = np.linalg.norm(t, axis=1, keepdims=True)
        return np.divide(t, norm, out=np.zeros_like(t), where=norm > 0)


def near_pairs(a: Fingerprints, b: Fingerprints | None = None) -> np.ndarray:
    """Index pairs (i, j) of near-duplicates: i in a and j in b, or, without b, i < j both in a. int64 [K, 2]."""
    other = a if b is None else b
    unit_a = a.unit_thumbs()
    unit_b = unit_a if b is None else other.unit_thumbs()
    found = []
    for start in range(0, len(a), ROWS):
        distance = np.bitwise_count(a.hashes[start:start + ROWS, None] ^ other.hashes[None, :])
        i, j = np.nonzero(distance <= HASH_BITS)
        i += start
        if b is None:
            keep = i < j
            i, j = i[keep], j[keep]
        for k in range(0, len(i), PAIRS):
            ii, jj = i[k:k + PAIRS], j[k:k + PAIRS]
            # the same image, or a flat one (no thumbnail variation): identical hashes and thumbnails mean a copy
            same = np.all(a.thumbs[ii] == other.thumbs[jj], axis=1)
            match = same | (np.einsum("kd,kd->k", unit_a[ii], unit_b[jj]) >= MATCH)
            found.append(np.stack([ii[match], jj[match]], 1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def copy_groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """The groups of 2 or more of n images linked by pairs (connected components), largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return []
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(component[order]) != 0])
    groups = [g for g in np.split(order, starts[1:]) if len(g) > 1]
    return sorted(groups, key=len, reverse=True)
