"""The large-scene benchmark: its config, its scene writer, and a small end-to-end run."""

import numpy as np
import pytest
import rasterio

from edgekit.benchmarks.scenes import ScenesSuiteConfig, scenes_suite, write_scene
from edgekit.errors import EdgekitError


@pytest.mark.parametrize("options", [{"sizes": []}, {"sizes": [100]}, {"image_size": 100}, {"threads": 0}])
def test_bad_options_are_one_line(options):
    with pytest.raises(EdgekitError):
        ScenesSuiteConfig(**options)


def test_scene_writer_makes_a_georeferenced_raster(tmp_path):
    path = write_scene(tmp_path / "s.tif", 700, seed=3, block=256)
    with rasterio.open(path) as ds:
        assert (ds.width, ds.height, ds.count) == (700, 700, 3) and ds.crs.to_epsg() == 32617
        pixels = ds.read()
    assert pixels.std() > 50  # random texture, every block written


@pytest.mark.slow
def test_suite_reports_flat_memory_on_small_scenes(tmp_path):
    record = scenes_suite(ScenesSuiteConfig(sizes=[512, 1024], image_size=128, out=str(tmp_path)))
    assert [r["side"] for r in record["rows"]] == [512, 1024] and record["pixels_ratio"] == 4
    assert all(r["tiles_per_s"] > 0 for r in record["rows"]) and record["peak_rss_ratio"] < 1.5
    assert (tmp_path / "scenes_cpu.json").is_file() and "peak RSS" in (tmp_path / "scenes_cpu.md").read_text()
