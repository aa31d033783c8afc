"""Image loading/saving: conversions to RGB uint8 and one-line errors for bad files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.data.images import image_size, list_images, load_image, save_image
from edgekit.errors import EdgekitError

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_example"
needs_example = pytest.mark.skipif(not EXAMPLE.is_dir(), reason=f"real DOTA sample data not found at {EXAMPLE}")


@needs_example
def test_real_images_load():
    for name, (h, w) in {"P0706.png": (1182, 1111), "P1888.png": (557, 712)}.items():
        path = EXAMPLE / "images" / name
        a = load_image(path)
        assert a.shape == (h, w, 3) and a.dtype == np.uint8
        assert image_size(path) == (h, w)
        np.testing.assert_array_equal(a, np.asarray(Image.open(path).convert("RGB")))


def test_large_images_allowed():
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 20000 * 20000


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_modes_convert_to_rgb(tmp_path, mode):
    rng = np.random.default_rng()
    if mode == "I;16":
        src = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
        Image.fromarray(src).save(tmp_path / "x.png")
        a = load_image(tmp_path / "x.png")
        np.testing.assert_array_equal(a[..., 0], np.round(src / 65535 * 255).astype(np.uint8))
    else:
        rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
        Image.fromarray(rgb).convert(mode).save(tmp_path / "x.png")
        a = load_image(tmp_path / "x.png")
        np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "x.png").convert("RGB")))
    assert a.shape == (7, 9, 3) and a.dtype == np.uint8


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_save_round_trip_lossless(tmp_path, suffix):
    a = np.random.default_rng().integers(0, 256, (13, 17, 3), dtype=np.uint8)
    path = save_image(tmp_path / f"sub/x{suffix}", a)
    np.testing.assert_array_equal(load_image(path), a)
    assert [p.name for p in list_images(tmp_path / "sub")] == [f"x{suffix}"]


def _bad_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    return ["truncated.png", "text.png", "empty.png", "missing.png"]


def test_bad_files_one_line_error(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(EdgekitError) as e:
            load_image(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_save_rejects_unknown_suffix_and_bad_arrays(tmp_path):
    with pytest.raises(EdgekitError, match="suffix"):
        save_image(tmp_path / "x.unknown", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        save_image(tmp_path / "x.png", np.zeros((2, 2, 3), np.float32))
