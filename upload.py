"""Images uploaded to the servers, checked before decoding: each refusal carries the HTTP status that says why."""

from __future__ import annotations

import base64
import binascii
import io

import torch
from PIL import Image, UnidentifiedImageError

from transforms import draft, pil_to_uint8

UPLOAD_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP")  # what the servers decode; MPO: many cameras' JPEG


class UploadError(ValueError):
    """An uploaded image the servers refuse; `status` is the HTTP status that says why (400, 413 or 415)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # intact across processes (LitServe's workers)
        return UploadError, (self.status, str(self))


def upload_bytes(text: str) -> bytes:
    """The image file in a base64 string (a data:image/...;base64, prefix is fine; line breaks and spaces, as
    `base64 FILE` writes them, too)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise UploadError(400, "a data URL must be base64-encoded: data:image/<type>;base64,<data>")
    text = "".join(text.split())
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
    """An uploaded file opened, its format and pixel count checked from the header; no pixel is decoded yet
    (decode_upload does that)."""
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
    return image


def check_request_pixels(images: list[Image.Image], budget: int) -> None:
    """All of one request's images together, from their headers: the decoding a request may cost is bounded."""
    total = sum(image.size[0] * image.size[1] for image in images)
    if total > budget:
        raise UploadError(413, f"the request's images hold {total} pixels in all, over the limit of {budget} "
                               "(CATER_MAX_REQUEST_PIXELS): send fewer or smaller images per request")


def decode_upload(image: Image.Image, meta: dict) -> torch.Tensor:
    """An opened upload -> CxHxW uint8 tensor, by the shared evaluation pipeline (transforms.pil_to_uint8) with the
    checkpoint's size, channels and resize policy; UploadError (with its HTTP status) for an image it refuses."""
    try:
        draft(image, meta["image_size"])
        image.load()  # GIF and WebP: the first frame
    except Exception as e:  # truncated or corrupt pixel data
        raise _upload_error(e, f"cannot decode the {image.format} image") from None
    try:
        return pil_to_uint8(image, meta["image_size"], meta["channels"], meta["resize"])
    except Exception as e:  # broken EXIF or an unusual mode that cannot be converted
        raise UploadError(400, f"cannot convert the image to RGB: {e or type(e).__name__}") from None


def preprocess_upload(data: bytes, meta: dict, max_pixels: int) -> torch.Tensor:
    """An uploaded file -> CxHxW uint8 tensor (open_upload, then decode_upload)."""
    return decode_upload(open_upload(data, max_pixels), meta)
