"""Photometric augmentation: the color matrix against PIL's ImageEnhance, the hue turn's
invariants, and the data set's use of it (boxes untouched, letterbox padding untouched)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from edgekit.data.dataset import DetectionDataset
from edgekit.data.dota import DotaAnnotation, DotaObject, write_dota_labels
from edgekit.data.images import save_image
from edgekit.data.transforms import color_jitter_matrix, random_color_jitter
from edgekit.engine.config import TrainConfig
from edgekit.errors import EdgekitError

LUMA = np.array([0.299, 0.587, 0.114])


def apply(matrix_offset, image):
    m, t = (x.numpy() for x in matrix_offset)
    return image.reshape(-1, 3) @ m.T + t


def test_matrix_matches_pil_enhance_without_hue(rng):
    """PIL's Color, Contrast and Brightness enhancers, one after another, are the reference. They
    truncate to uint8 after each step, so PIL is up to 1 + 1.5 + 1 levels below: hence the one-sided
    tolerance. Pixels and factors keep every step inside [0, 255], so nothing clips."""
    image = rng.integers(100, 157, (24, 24, 3)).astype(np.uint8)
    b, c, s = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
    pil = Image.fromarray(image)
    pil = ImageEnhance.Brightness(ImageEnhance.Contrast(ImageEnhance.Color(pil).enhance(s)).enhance(c)).enhance(b)
    # PIL's Contrast blends with the rounded mean of the "L" image (ITU-R 601-2 luma).
    mean_luma = float(int(np.asarray(Image.fromarray(image).convert("L"), dtype=np.float64).mean() + 0.5))
    ours = apply(color_jitter_matrix(b, c, s, 0.0, mean_luma), image.astype(np.float64))
    gap = ours - np.asarray(pil, dtype=np.float64).reshape(-1, 3)
    assert gap.min() > -1.0 and gap.max() < 3.5, (gap.min(), gap.max(), (b, c, s))


def test_hue_turn_keeps_luma_and_greys_and_a_full_turn_is_identity(rng):
    pixels = rng.uniform(0, 255, (500, 3))
    turned = apply(color_jitter_matrix(1, 1, 1, rng.uniform(-math.pi, math.pi), 0.0), pixels)
    np.testing.assert_allclose(turned @ LUMA, pixels @ LUMA, atol=1e-9)  # a hue turn moves chroma only
    greys = np.repeat(rng.uniform(0, 255, (50, 1)), 3, axis=1)
    np.testing.assert_allclose(apply(color_jitter_matrix(1, 1, 1, 1.0, 0.0), greys), greys, atol=1e-9)
    np.testing.assert_allclose(apply(color_jitter_matrix(1, 1, 1, 2 * math.pi, 0.0), pixels), pixels, atol=1e-9)
    assert np.abs(turned - pixels).max() > 1  # and it does move colors


def test_saturation_zero_gives_grey_and_contrast_zero_gives_the_mean(rng):
    pixels = rng.uniform(0, 255, (100, 3))
    grey = apply(color_jitter_matrix(1, 1, 0, 0.0, 0.0), pixels)
    np.testing.assert_allclose(grey, np.repeat((pixels @ LUMA)[:, None], 3, axis=1), atol=1e-9)
    flat = apply(color_jitter_matrix(1, 0, 1, 0.0, 77.0), pixels)
    np.testing.assert_allclose(flat, 77.0, atol=1e-9)


def test_random_jitter_stays_uint8_within_strength(rng):
    image = torch.from_numpy(rng.integers(0, 256, (3, 32, 40), dtype=np.uint8))
    assert torch.equal(random_color_jitter(image, 0.0), image)
    out = random_color_jitter(image, 0.5)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    # On a flat grey image hue, saturation and contrast change nothing: what is left is the
    # brightness factor, which must be drawn from [1 - s, 1 + s] and spread over it.
    strength, level = 0.3, int(rng.integers(80, 160))
    grey = torch.full((3, 4, 4), level, dtype=torch.uint8)
    factors = []
    for _ in range(200):
        flat = random_color_jitter(grey, strength)
        assert (flat == flat[0, 0, 0]).all()  # still flat and still grey
        factors.append(float(flat[0, 0, 0]) / level)
    half_step = 0.5 / level
    assert min(factors) >= 1 - strength - half_step and max(factors) <= 1 + strength + half_step
    assert min(factors) < 1 - 0.8 * strength and max(factors) > 1 + 0.8 * strength


def _one_image_set(root, rng, size=(48, 32)):
    h, w = size
    image = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    save_image(root / "images" / "a.png", image)
    write_dota_labels(root / "labelTxt" / "a.txt",
                      DotaAnnotation([DotaObject((4, 4, 20, 4, 20, 30, 4, 30), "ship")]))


def test_dataset_jitters_pixels_not_boxes_nor_padding(tmp_path, rng):
    """Each jittered sample is one of the 8 flips/turns of the plain sample: the same box, the same
    letterbox padding (zeros), other pixel values."""
    _one_image_set(tmp_path, rng)  # 48 x 32: letterboxed to 64 with padding columns
    plain = DetectionDataset(tmp_path, ["ship"], image_size=64, augment=True)
    jittered = DetectionDataset(tmp_path, ["ship"], image_size=64, augment=True, color_jitter=0.6)
    by_box = {}
    for _ in range(200):  # all 8 seen but for a chance of 8 x (7/8)^200 = 2e-11
        image, target = plain[0]
        by_box[tuple(target["boxes"][0].tolist())] = image
    assert len(by_box) == 8  # the box is asymmetric: each flip/turn gives its own
    for _ in range(12):
        b, target = jittered[0]
        a = by_box[tuple(target["boxes"][0].tolist())]
        padding = (a == a.amin((1, 2), keepdim=True)).all(0)  # letterbox zeros normalise to each channel's minimum
        assert 0 < padding.sum() < padding.numel() and torch.equal(a[:, padding], b[:, padding])
        assert (a[:, ~padding] - b[:, ~padding]).abs().max() > 0.05


def test_color_jitter_needs_augment_and_a_strength_below_one(tmp_path, rng):
    _one_image_set(tmp_path, rng)
    with pytest.raises(EdgekitError, match="augment"):
        DetectionDataset(tmp_path, ["ship"], image_size=64, color_jitter=0.3)
    with pytest.raises(EdgekitError, match="augment"):
        TrainConfig(data="x", color_jitter=0.3, augment=False)
    for bad in (-0.1, 1.0):
        with pytest.raises(EdgekitError, match="color-jitter"):
            TrainConfig(data="x", color_jitter=bad)
