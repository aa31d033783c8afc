"""GeoTIFF scenes: the real NEON tile's georeferencing (checked against its own TIFF tags), exact
window coverage, bounded memory on a 20000 x 20000 scene, band/dtype rules, GeoJSON, bad files."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.transform import Affine

from edgekit.data.geo import detections_geojson, open_scene, pixel_to_map, write_detections_geojson
from edgekit.data.images import load_image
from edgekit.errors import EdgekitError

OSBS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "neon_trees" / "val" / "images" / "OSBS_029.tif"
MODEL_PIXEL_SCALE, MODEL_TIEPOINT = 33550, 33922  # GeoTIFF tags


def tiff_georeference(path):
    """(origin x, origin y, pixel width, pixel height) from the GeoTIFF tags, read by PIL, not GDAL."""
    with Image.open(path) as image:
        scale, tie = image.tag_v2[MODEL_PIXEL_SCALE], image.tag_v2[MODEL_TIEPOINT]
    i, j, _, x, y, _ = tie
    return x - i * scale[0], y + j * scale[1], scale[0], scale[1]


def test_osbs_pixel_to_utm_matches_the_tiff_tags(rng):
    x0, y0, sx, sy = tiff_georeference(OSBS)
    assert (sx, sy) == pytest.approx((0.1, 0.1))  # the README: 0.1 m pixels
    with open_scene(OSBS) as scene:
        assert scene.crs.to_epsg() == 32617  # WGS 84 / UTM zone 17N
        assert (scene.width, scene.height) == (400, 400)
        cols, rows = rng.uniform(0, 400, 50), rng.uniform(0, 400, 50)
        east, north = scene.pixel_to_map(cols, rows)
    np.testing.assert_allclose(east, x0 + cols * sx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(north, y0 - rows * sy, rtol=0, atol=1e-6)
    # The corner of the last pixel: 40 m east and south of the origin.
    assert pixel_to_map(scene.transform, 400, 400) == pytest.approx((x0 + 40.0, y0 - 40.0), abs=1e-6)


def test_osbs_windows_cover_the_scene_exactly():
    reference = load_image(OSBS)  # PIL's reading of the same file
    with open_scene(OSBS) as scene:
        for tile_size, overlap in ((128, 32), (150, 0), (200, 0), (400, 10), (512, 100)):
            covered = np.zeros((400, 400), dtype=int)
            for (x0, y0, x1, y1), tile in scene.tiles(tile_size, overlap):
                assert tile.shape == (tile_size, tile_size, 3) and tile.dtype == np.uint8
                np.testing.assert_array_equal(tile[:y1 - y0, :x1 - x0], reference[y0:y1, x0:x1])
                assert not tile[y1 - y0:].any() and not tile[:, x1 - x0:].any()  # zero padding only
                covered[y0:y1, x0:x1] += 1
            assert covered.min() >= 1  # every pixel is in some window
            if 400 % tile_size == 0 and overlap == 0:
                assert covered.max() == 1  # an exact partition


# Run in a fresh interpreter so that memory earlier tests left resident in this worker cannot hide a
# read, and sampled from VmRSS rather than read from VmHWM: the kernel's high-water mark (and its reset
# through /proc/self/clear_refs) did not move on every CI machine.
PEAK_RSS_SCRIPT = r"""
import json, sys, threading, time
from edgekit.data.geo import open_scene

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

def peak_growth(work):
    start, peak, done = rss(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - start)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss() - start), result

def iterate():
    with open_scene(sys.argv[1]) as scene:
        return sum(1 for _ in scene.tiles(1024, 0))

def read_large():  # one 4096 x 4096 window (48 MiB), held long enough for the sampler to see it
    with open_scene(sys.argv[1]) as scene:
        data = scene.read((0, 0, 4096, 4096))
        time.sleep(0.2)
        return int(data[0, 0, 0])

growth, windows = peak_growth(iterate)
large, _ = peak_growth(read_large)
print(json.dumps({"growth": growth, "windows": windows, "large": large}))
"""


def _peak_rss_growth_in_fresh_process(path: Path) -> dict:
    """Peak RSS growth (bytes) of a fresh process while it tiles the scene, and while it reads one large window."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to sample resident memory")
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory):
    """A 20000 x 20000 RGB GeoTIFF, tiled and deflate-compressed (small on disk), with marked blocks."""
    path = tmp_path_factory.mktemp("geo") / "big.tif"
    size, block = 20000, 512
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": block, "blockysize": block, "compress": "deflate", "crs": "EPSG:32617",
               "transform": Affine(0.5, 0, 400000, 0, -0.5, 3300000), "sparse_ok": True}
    marks = {}
    with rasterio.open(path, "w", **profile) as dst:
        for k in range(0, size // block, 3):  # a diagonal of marked blocks; the rest stays empty (zeros)
            x0 = y0 = k * block
            values = (np.arange(3)[:, None, None] * 40 + k + np.arange(block)[None, :, None]) % 251 + 1
            data = np.broadcast_to(values, (3, block, block)).astype(np.uint8)
            dst.write(data, window=rasterio.windows.Window(x0, y0, block, block))
            marks[(x0, y0)] = data.transpose(1, 2, 0)
    assert path.stat().st_size < 5_000_000
    return path, size, marks


def test_big_scene_is_read_with_bounded_memory(big_scene):
    path, size, marks = big_scene
    scene_bytes = size * size * 3
    seen = {"windows": 0, "marked": 0}
    with open_scene(path) as scene:  # every window in place: the marked blocks land where they were written
        for (x0, y0, x1, y1), tile in scene.tiles(1024, 0):
            seen["windows"] += 1
            for (mx, my), data in marks.items():
                if x0 <= mx < x1 and y0 <= my < y1:
                    h, w = data.shape[:2]
                    np.testing.assert_array_equal(tile[my - y0:my - y0 + h, mx - x0:mx - x0 + w], data)
                    seen["marked"] += 1
    assert seen["windows"] == math.ceil(size / 1024) ** 2 and seen["marked"] == len(marks)

    measured = _peak_rss_growth_in_fresh_process(path)
    print(f"peak RSS growth {measured['growth'] / 2**20:.1f} MiB while reading a {scene_bytes / 2**20:.0f} MiB "
          f"scene; {measured['large'] / 2**20:.1f} MiB for one 48 MiB window")
    assert measured["windows"] == seen["windows"]
    # The instrument first: one 4096 x 4096 window must raise the sampled peak by about its 48 MiB,
    # or this machine's /proc does not report resident memory and nothing can be concluded here.
    if measured["large"] < 40 * 2**20:
        pytest.skip(f"VmRSS does not follow allocations here (a 48 MiB read showed "
                    f"{measured['large'] / 2**20:.1f} MiB): resident memory cannot be measured")
    # Tiling the whole scene stays far below a fifth of it.
    assert measured["growth"] < 200 * 2**20 < scene_bytes / 5


def _write(path, data, **extra):
    count, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": data.dtype.name}
    profile.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def test_grey_rgba_and_uint16(tmp_path, rng):
    crs = {"crs": "EPSG:4326", "transform": Affine(1e-5, 0, 10, 0, -1e-5, 50)}
    grey = rng.integers(0, 256, (1, 30, 40), dtype=np.uint8)
    with open_scene(_write(tmp_path / "grey.tif", grey, **crs)) as scene:
        np.testing.assert_array_equal(scene.read((0, 0, 40, 30)), np.repeat(grey[0][..., None], 3, axis=2))
    rgba = rng.integers(0, 256, (4, 30, 40), dtype=np.uint8)
    with open_scene(_write(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES", **crs)) as scene:
        np.testing.assert_array_equal(scene.read((5, 6, 25, 30)), rgba[:3, 6:30, 5:25].transpose(1, 2, 0))
    # 16-bit grey: the same 8-bit pixels as edgekit.data.images gives for the file through PIL.
    deep = rng.integers(0, 65536, (1, 30, 40), dtype=np.uint16)
    path = _write(tmp_path / "deep.tif", deep, **crs)
    with open_scene(path) as scene:
        np.testing.assert_array_equal(scene.read((0, 0, 40, 30)), load_image(path))
    with open_scene(_write(tmp_path / "rgb16.tif", np.full((3, 4, 4), 65535, np.uint16), **crs)) as scene:
        assert (scene.read((0, 0, 4, 4)) == 255).all()


@pytest.mark.parametrize("data,message", [
    (np.zeros((2, 8, 8), np.uint8), r"has 2 bands; edgekit reads 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\)"),
    (np.zeros((5, 8, 8), np.uint8), "has 5 bands"),
    (np.zeros((3, 8, 8), np.float32), "holds float32 pixels"),
    (np.zeros((1, 8, 8), np.int16), "holds int16 pixels"),
])
def test_unsupported_rasters_are_one_line(tmp_path, data, message):
    path = _write(tmp_path / "x.tif", data, crs="EPSG:4326", transform=Affine.identity())
    with pytest.raises(EdgekitError, match=message) as info:
        open_scene(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_palette_is_refused(tmp_path):
    path = tmp_path / "palette.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8", photometric="palette",
                       crs="EPSG:4326", transform=Affine(1, 0, 5, 0, -1, 50)) as dst:
        dst.write(np.zeros((1, 4, 4), np.uint8))
        dst.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 0, 255, 255)})
    with pytest.raises(EdgekitError, match="palette raster"):
        open_scene(path)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(EdgekitError, match="not found"):
        open_scene(tmp_path / "none.tif")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(EdgekitError, match=r"cannot open raster .*junk.tif: .*corrupt") as info:
        open_scene(junk)
    assert "\n" not in str(info.value)
    # A real tiled GeoTIFF cut short: it opens, and the missing tiles fail on read, with one line.
    good = _write(tmp_path / "good.tif", np.full((3, 512, 512), 7, np.uint8), tiled=True, blockxsize=256,
                  blockysize=256, compress="deflate", crs="EPSG:4326", transform=Affine.identity())
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(EdgekitError, match=r"cut.tif.*(corrupt|truncated)") as info:
        with open_scene(cut) as scene:
            for _ in scene.tiles(256, 0):
                pass
    assert "\n" not in str(info.value)


def test_no_crs_is_said_once_and_gives_pixel_coordinates(tmp_path):
    path = _write(tmp_path / "plain.tif", np.zeros((3, 20, 30), np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_scene(path) as scene:
            list(scene.tiles(16, 4))
            out = write_detections_geojson(tmp_path / "d.geojson", scene, ["car"], [0.5], boxes=[[1, 2, 11, 7]])
    ours = [w for w in caught if "no CRS" in str(w.message)]
    assert len(ours) == 1 and str(path) in str(ours[0].message) and "\n" not in str(ours[0].message)
    data = json.loads(out.read_text())
    assert "crs" not in data
    ring = data["features"][0]["geometry"]["coordinates"][0]
    assert shapely.Polygon(ring).equals(shapely.box(1, 2, 11, 7))


def test_geojson_of_osbs_detections(tmp_path, rng):
    x0, y0, sx, sy = tiff_georeference(OSBS)
    n = 7
    centre, size, angle = rng.uniform(50, 350, (n, 2)), rng.uniform(5, 40, (n, 2)), rng.uniform(-3, 3, n)
    u = np.stack([np.cos(angle), np.sin(angle)], 1)
    v = np.stack([-np.sin(angle), np.cos(angle)], 1)
    polys = np.stack([centre + a * size[:, :1] / 2 * u + b * size[:, 1:] / 2 * v
                      for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))], 1).reshape(n, 8)
    scores = rng.random(n)
    with open_scene(OSBS) as scene:
        out = write_detections_geojson(tmp_path / "trees.geojson", scene, ["Tree"] * n, scores, polygons=polys)
        boxes = detections_geojson(["Tree"], [0.7], boxes=[[10, 20, 30, 50]], transform=scene.transform,
                                   crs=scene.crs)
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection" and data["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32617"
    for feature, poly, score in zip(data["features"], polys, scores):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert feature["properties"] == {"label": "Tree", "score": pytest.approx(score)}
        assert len(ring) == 5 and (ring[0] == ring[-1]).all()
        expected = np.stack([x0 + poly[0::2] * sx, y0 - poly[1::2] * sy], 1)
        assert shapely.Polygon(ring).equals_exact(shapely.Polygon(expected), 1e-6) or \
            shapely.Polygon(ring).equals_exact(shapely.Polygon(expected[::-1]), 1e-6)
        assert shapely.Polygon(ring).exterior.is_ccw  # RFC 7946 winding
        assert shapely.Polygon(ring).area == pytest.approx(shapely.Polygon(poly.reshape(4, 2)).area * sx * sy)
    ring = boxes["features"][0]["geometry"]["coordinates"][0]
    assert shapely.Polygon(ring).equals(shapely.box(x0 + 1, y0 - 5, x0 + 3, y0 - 2))
    with pytest.raises(ValueError, match="one each"):
        detections_geojson(["a", "b"], [0.5], boxes=[[0, 0, 1, 1]])


def test_scenes_close_in_any_order():
    first, second = open_scene(OSBS), open_scene(OSBS)
    first.close()
    assert second.read((0, 0, 8, 8)).shape == (8, 8, 3)
    second.close()
