import io

import numpy as np
import pytest
import torch
from PIL import Image

import transforms as T


def test_eval_path_matches_decoded_dataset_path():
    """The serving path (PIL -> eval_transform) equals the in-memory path (uint8 dataset -> normalize)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    from_file = T.eval_transform(32, T.CIFAR10_MEAN, T.CIFAR10_STD)(Image.open(io.BytesIO(buffer.getvalue())))
    stored = torch.from_numpy(array).permute(2, 0, 1)  # how data.py keeps CIFAR-10
    assert torch.equal(from_file, T.normalize(stored, T.CIFAR10_MEAN, T.CIFAR10_STD))


def test_normalize_matches_torchvision():
    from torchvision.transforms import functional as TF

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    reference = TF.normalize(TF.to_tensor(image), T.CIFAR10_MEAN, T.CIFAR10_STD)
    assert torch.allclose(T.eval_transform(8, T.CIFAR10_MEAN, T.CIFAR10_STD)(image), reference, atol=1e-6)


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white background
    assert T.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert T.to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert T.to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    assert T.to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    assert T.pil_to_uint8(Image.new("L", (50, 20), 128), 32).shape == (3, 32, 32)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert T.to_rgb(Image.open(io.BytesIO(buffer.getvalue()))).size == (10, 20)


def test_random_translate_shifts_within_bounds():
    batch = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    generator = torch.Generator().manual_seed(0)
    shifted = T.random_translate(batch, 2, generator)
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        assert any(torch.equal(shifted[i, 0], padded[i, 0, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
    assert torch.equal(T.random_translate(batch, 0), batch)


def test_alternating_flips_cover_both_orientations():
    base = torch.tensor([True, False, True, False])
    assert torch.equal(T.flip_mask(0, base, "alternate"), base)
    assert torch.equal(T.flip_mask(1, base, "alternate"), ~base)
    assert not T.flip_mask(3, base, "none").any()


def test_augment_batch_flips_the_selected_images():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = T.augment_batch(images, torch.tensor([True, False]), (0, 0, 0), (1, 1, 1), translate=0)
    x = images.float() / 255
    assert torch.allclose(out[0], x[0].flip(-1)) and torch.allclose(out[1], x[1])


def test_tta_views_weights_sum_to_one():
    x = torch.randn(2, 3, 8, 8)
    for level in (0, 1, 2):
        views = T.tta_views(x, level)
        assert abs(sum(w for w, _ in views) - 1) < 1e-9
        assert all(v.shape == x.shape for _, v in views)


def test_rotate90_moves_whole_pixels_and_covers_the_dihedral_group():
    x = torch.arange(36.0).view(1, 1, 6, 6).repeat(64, 1, 1, 1)
    out = T.random_crop_rotate(x, 0.0, True, torch.Generator().manual_seed(0))
    views = [torch.rot90(v, k, (0, 1)) for v in (x[0, 0], x[0, 0].flip(0)) for k in range(4)]
    seen = set()
    for image in out[:, 0]:
        matches = [i for i, v in enumerate(views) if torch.allclose(image, v, atol=1e-4)]
        assert len(matches) == 1  # an exact rotation or reflection, no interpolation
        seen.add(matches[0])
    assert seen == set(range(8))


def test_random_resized_crops_zoom_in_within_the_image():
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(16, 1, 32, 32).contiguous()  # a left-to-right ramp
    out = T.random_crop_rotate(x, 0.5, False, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert (spans < 0.99).all() and (spans > 0.5 * 0.75 ** 0.5 - 0.05).all()  # a crop of >= half the area


def test_augment_batch_keeps_single_channel_images_single_channel():
    images = torch.randint(0, 255, (4, 1, 20, 20), dtype=torch.uint8)
    out = T.augment_batch(images, torch.tensor([True, False, True, False]), (0.5,), (0.5,), 2,
                          torch.Generator().manual_seed(0), crop_scale=0.7, rotate90=True)
    assert out.shape == (4, 1, 20, 20) and out.dtype == torch.float32


@pytest.mark.parametrize("resize, expected", [("squash", (8, 8)), ("crop", (8, 8)), ("pad", (8, 8))])
def test_resize_policies_make_squares(resize, expected):
    wide = Image.new("RGB", (40, 10), (200, 0, 0))
    out = T.pil_to_uint8(wide, 8, 3, resize)
    assert tuple(out.shape[1:]) == expected
    if resize == "pad":  # letterboxed: black bars above and below the red band
        assert out[0, 0, 4] == 0 and out[0, 4, 4] > 150
    else:
        assert (out[0] > 150).all()


def test_channel_stats_in_chunks_equal_the_plain_formula():
    images = torch.randint(0, 256, (700, 3, 9, 9), dtype=torch.uint8)
    index = torch.randperm(700, generator=torch.Generator().manual_seed(0))[:500]
    x = images[index].float().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = T.channel_stats(images, index, chunk=64)
    assert mean == pytest.approx(x.mean(1).tolist(), abs=1e-6) and std == pytest.approx(x.std(1).tolist(), abs=1e-6)


def test_random_erasing_blanks_one_rectangle_in_the_chosen_share_of_images():
    x = torch.ones(400, 1, 20, 30)
    out = T.random_erase(x, 0.5, torch.Generator().manual_seed(0))
    erased = out.eq(0)
    hit = erased.flatten(1).any(1)
    assert 150 < hit.sum() < 250  # about half the images
    share = erased.flatten(1).float().mean(1)[hit]
    assert share.min() >= 0.01 and share.max() <= 0.34  # a fiftieth to a third of the area (rounded)
    rows, cols = erased[hit][:, 0].any(2), erased[hit][:, 0].any(1)  # one rectangle: its rows x its columns
    assert torch.equal(erased[hit][:, 0], rows.unsqueeze(2) & cols.unsqueeze(1))
    assert torch.equal(out[~hit], x[~hit])
    assert torch.equal(T.random_erase(x, 0.0), x)


def test_progressive_resizing_rises_to_the_full_size_and_ends_there():
    sizes = [T.progressive_size(e, 12, 224, 0.6) for e in range(12)]
    assert sizes[0] == 128 and sizes[-3:] == [224] * 3  # about 0.6 x 224 first; the last quarter at full size
    assert sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)
    assert [T.progressive_size(e, 4, 32, 0.5) for e in range(4)] == [16, 24, 24, 32]  # small images: multiples of 8
    assert T.progressive_size(0, 1, 224, 0.5) == 224  # a one-epoch run trains at the size it serves
    assert [T.progressive_size(e, 12, 224, 0.0) for e in range(12)] == [224] * 12  # off
