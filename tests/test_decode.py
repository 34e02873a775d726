import io
import pickle
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import decode
import transforms as T
import upload

ROOT = Path(__file__).resolve().parents[1]
RAMP_16 = np.tile(np.array([0, 1000, 65535, 30000], dtype=np.uint16), (4, 1))  # 4x4, every row the same
RAMP_I = np.tile(np.array([-100, 0, 100, 1000], dtype=np.int32), (4, 1))
RAMP_F = np.tile(np.array([-1.0, -0.5, 0.0, 0.5], dtype=np.float32), (4, 1))


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb as Image.open sees it, at no cost."""
    raw = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(raw[12:29]))  # the IHDR chunk's CRC
    return bytes(raw)


@pytest.fixture
def odd_folder(tmp_path):
    """Good files in unusual modes, unreadable files of every kind, and hidden junk that must be skipped."""
    palette = Image.fromarray(np.tile(np.array([0, 0, 1, 1], dtype=np.uint8), (4, 1)), "P")
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    files = {
        "good/gray16.png": encoded(Image.fromarray(RAMP_16), "PNG"),
        "good/gray16b.tif": encoded(Image.frombytes("I;16B", (4, 4), RAMP_16.astype(">u2").tobytes()), "TIFF"),
        "good/int32.tif": encoded(Image.fromarray(RAMP_I), "TIFF"),
        "good/float32.tif": encoded(Image.fromarray(RAMP_F), "TIFF"),
        "good/cmyk.jpg": encoded(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"),
        "good/palette.png": encoded(palette, "PNG", transparency=0),
        "bad/zero.png": b"",
        "bad/truncated.png": encoded(noise(64), "PNG")[:3000],
        "bad/truncated.jpg": encoded(noise(64), "JPEG", quality=95)[:2000],
        "bad/text.jpg": b"this is not an image\n",
        "bad/bomb.png": png_claiming(20000, 20000),  # over 2 x MAX_IMAGE_PIXELS: Pillow raises
        "bad/bomb_warning.png": png_claiming(10000, 10000),  # over MAX_IMAGE_PIXELS: Pillow only warns
        "good/._gray16.png": b"AppleDouble junk",
        ".ipynb_checkpoints/broken.png": b"",
        "__MACOSX/good/gray16.png": b"junk",
        "good/.DS_Store": b"junk",
        "good/notes.txt": b"not an image extension",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return tmp_path


def test_list_images_skips_hidden_files_and_folders(odd_folder):
    found = [str(Path(p).relative_to(odd_folder)) for p in decode.list_images(odd_folder)]
    assert found == sorted(found)
    assert set(found) == {"good/gray16.png", "good/gray16b.tif", "good/int32.tif", "good/float32.tif", "good/cmyk.jpg",
                          "good/palette.png", "bad/zero.png", "bad/truncated.png", "bad/truncated.jpg",
                          "bad/text.jpg", "bad/bomb.png", "bad/bomb_warning.png"}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_unreadable_file_is_reported_at_once(odd_folder, workers):
    paths = decode.list_images(odd_folder)
    with pytest.raises(decode.DataError) as caught:
        decode.decode_files(paths, 4, workers=workers)
    message = str(caught.value)
    assert message.startswith("6 unreadable image(s)")
    lines = {Path(p).name: [line for line in message.splitlines() if p in line] for p in paths}
    for name in ("zero.png", "truncated.png", "truncated.jpg", "text.jpg", "bomb.png", "bomb_warning.png"):
        assert len(lines[name]) == 1, name
    assert "decompression bomb" in lines["bomb.png"][0] and "decompression bomb" in lines["bomb_warning.png"][0]
    assert not any(lines[name] for name in lines if "/good/" in name)
    with pytest.raises(decode.DataError, match="6 unreadable"):
        decode.check_files(paths, workers=workers)


def test_error_list_is_capped(tmp_path):
    for i in range(25):
        (tmp_path / f"{i:02d}.png").write_bytes(b"")
    with pytest.raises(decode.DataError) as caught:
        decode.decode_files(decode.list_images(tmp_path), 4, workers=0)
    message = str(caught.value)
    assert "00.png" in message and "19.png" in message and "20.png" not in message
    assert message.endswith("... and 5 more")


def test_odd_modes_decode_to_expected_values(odd_folder):
    good = sorted(str(p) for p in (odd_folder / "good").iterdir() if not p.name.startswith(".") and p.suffix != ".txt")
    decode.check_files(good, workers=0)
    images = dict(zip((Path(p).stem for p in good), decode.decode_files(good, 4, workers=0)))
    row = {name: image[0, 0].tolist() for name, image in images.items()}  # first channel, first row
    assert row["gray16"] == row["gray16b"] == [0, 4, 255, 117]  # 65535 -> 255
    assert row["int32"] == [0, 23, 46, 255]  # min..max stretched over 0..255
    assert row["float32"] == [0, 85, 170, 255]
    assert (images["cmyk"] >= 250).all()
    assert images["palette"][:, 0, 0].tolist() == [255, 255, 255]  # transparent index composited on white
    assert images["palette"][:, 0, 3].tolist() == [200, 0, 0]


def test_order_channels_and_workers(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(150):  # several chunks, the last one partial
        Image.fromarray(rng.integers(0, 256, (8 + i % 3, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    paths = decode.list_images(tmp_path)
    images = decode.decode_files(paths, 8, workers=0)
    assert images.shape == (150, 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(decode.decode_files(paths, 8, workers=2), images)
    assert torch.equal(decode.decode_files(paths[::-1], 8, workers=2), images.flip(0))
    for i in (0, 64, 149):
        assert torch.equal(images[i], T.pil_to_uint8(Image.open(paths[i]), 8))
    gray = decode.decode_files(paths, 6, channels=1, resize="crop", workers=2)
    assert gray.shape == (150, 1, 6, 6)
    assert torch.equal(gray[5], T.pil_to_uint8(Image.open(paths[5]), 6, 1, "crop"))
    assert decode.decode_files([], 8).shape == (0, 3, 8, 8)


def test_thousands_of_files_under_a_low_descriptor_limit(tmp_path):
    """One shared-memory tensor per image needs one descriptor each and fails here; one array per chunk does not."""
    rng = np.random.default_rng(3)
    for i in range(3000):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:04d}.png", compress_level=0)
    script = ("import decode; paths = decode.list_images(%r); "
              "print(tuple(decode.decode_files(paths, 8, workers=2).shape)); decode.check_files(paths, workers=2)")
    result = subprocess.run([sys.executable, "-c", script % str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(3000, 3, 8, 8)" in result.stdout


def test_probe_images_reads_headers_and_skips_unreadable(odd_folder):
    probed = decode.probe_images(decode.list_images(odd_folder), sample=100)
    assert sorted(probed) == sorted([(4, 4, "I;16"), (4, 4, "I;16B"), (4, 4, "I"), (4, 4, "F"), (4, 4, "CMYK"),
                                     (4, 4, "P"), (64, 64, "RGB"), (64, 64, "RGB")])  # truncated: header intact
    assert decode.probe_images(decode.list_images(odd_folder), sample=3, seed=1) == \
        decode.probe_images(decode.list_images(odd_folder), sample=3, seed=1)


def test_to_rgb_scales_high_bit_depth_modes():
    images = {
        "I;16": Image.fromarray(RAMP_16),
        "I;16B": Image.frombytes("I;16B", (4, 4), RAMP_16.astype(">u2").tobytes()),
        "I;16L": Image.frombytes("I;16L", (4, 4), RAMP_16.astype("<u2").tobytes()),
        "I": Image.fromarray(RAMP_I),
        "F": Image.fromarray(RAMP_F),
    }
    expected = {"I;16": [0, 4, 255, 117], "I;16B": [0, 4, 255, 117], "I;16L": [0, 4, 255, 117],
                "I": [0, 23, 46, 255], "F": [0, 85, 170, 255]}
    for mode, image in images.items():
        assert image.mode == mode
        rgb = T.to_rgb(image)
        assert rgb.mode == "RGB" and [rgb.getpixel((x, 2)) for x in range(4)] == [(v,) * 3 for v in expected[mode]]
    nan = Image.fromarray(np.array([[np.nan, 1.0, 3.0]], dtype=np.float32))
    assert [T.to_rgb(nan).getpixel((x, 0))[0] for x in range(3)] == [0, 0, 255]


def test_upload_errors_carry_their_http_status_even_across_processes():
    with pytest.raises(upload.UploadError) as tiff:
        upload.open_upload(encoded(Image.new("RGB", (8, 8)), "TIFF"), 10**6)
    again = pickle.loads(pickle.dumps(tiff.value))  # as a LitServe worker would send it back
    assert (again.status, str(again)) == (415, str(tiff.value)) and "TIFF is not accepted" in str(again)
    with pytest.raises(upload.UploadError) as large:
        upload.open_upload(encoded(Image.new("RGB", (100, 100)), "PNG"), 99)
    assert large.value.status == 413 and "100x100 is over the limit of 99 pixels" in str(large.value)
    with pytest.raises(upload.UploadError, match="data URL must be base64") as url:
        upload.upload_bytes("data:image/png,abc")
    assert url.value.status == 400
