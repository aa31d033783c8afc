"""``edgekit bench scenes``: large GeoTIFF scenes through ``predict``, peak memory against scene size.

For each scene side (default 2048, 4096 and 8192 px) a tiled, deflate-compressed RGB GeoTIFF
of random texture is written block by block (never whole in memory), then ``edgekit.api.predict``
runs on it in a fresh process, which reports its own peak resident set (``VmHWM``) and wall
time: end to end, reading, tiling, the model, merging, and writing predictions.json, the DOTA
files and the GeoJSON. Streaming holds only a batch of tiles and the detections, so the peak
must stay flat while the scene grows; the record states the ratio of the largest to the
smallest scene's peak next to the ratio of their pixel counts. Tiles per second is the
throughput. The model is an untrained detector of the given architecture (weights do not
change the cost; its detections are few and meaningless), saved as a checkpoint so that the
run is the user's command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import StageConfig, check_image_size, require

CHILD = """
import json, sys, time
from edgekit.api import PredictConfig, predict
start = time.perf_counter()
result = predict(sys.argv[1], [sys.argv[2]], PredictConfig(out=sys.argv[3], draw=False, progress=False,
                                                            score_threshold=float(sys.argv[4])))
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "detections": result.detections}))
"""


@dataclass
class ScenesSuiteConfig(StageConfig):
    """Scene sides to run, the model architecture, its tile size (the model input)."""

    sizes: list[int] = field(default_factory=lambda: [2048, 4096, 8192], metadata={"help": "scene sides in px"})
    model: str = field(default="rsdet_atto", metadata={"help": "detector architecture (untrained weights)"})
    image_size: int = field(default=256, metadata={"help": "model input = tile size"})
    score_threshold: float = 0.3
    out: str = str(Path(__file__).resolve().parent / "results")
    threads: int = 2

    def check(self) -> None:
        require(bool(self.sizes) and all(256 <= s <= 40_000 for s in self.sizes), "sizes", self.sizes,
                "scene sides in [256, 40000] px")
        check_image_size(self.image_size)
        require(self.threads >= 1, "threads", self.threads, ">= 1")


def write_scene(path: Path, side: int, seed: int = 0, block: int = 512) -> Path:
    """A side x side RGB GeoTIFF (UTM 17N, 0.3 m pixels) of random texture, written block by block."""
    import numpy as np
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": block, "blockysize": block, "compress": "deflate", "crs": "EPSG:32617",
               "transform": Affine(0.3, 0, 400000, 0, -0.3, 3300000)}
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, side, block):
            for x0 in range(0, side, block):
                h, w = min(block, side - y0), min(block, side - x0)
                dst.write(rng.integers(0, 256, (3, h, w), dtype=np.uint8), window=rasterio.windows.Window(x0, y0, w, h))
    return path


def _checkpoint(config: ScenesSuiteConfig, folder: Path) -> Path:
    import torch

    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.models import create_model

    classes = ["plane", "ship", "small-vehicle"]
    torch.manual_seed(0)
    kwargs = {"class_names": classes, "num_classes": len(classes)}
    model = create_model(config.model, **kwargs)
    return save_checkpoint(folder / "model.safetensors", model, config.model, kwargs, {"image_size": config.image_size})


def scenes_suite(config: ScenesSuiteConfig) -> dict:
    import os

    from edgekit.data.tiling import tile_windows
    from edgekit.engine.detect import TILE_OVERLAP
    from edgekit.fileio import write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    with tempfile.TemporaryDirectory(prefix="edgekit-scenes-") as tmp:
        folder = Path(tmp)
        checkpoint = _checkpoint(config, folder)
        for side in config.sizes:
            scene = write_scene(folder / f"scene_{side}.tif", side)
            tiles = len(tile_windows(side, side, config.image_size, TILE_OVERLAP))
            started = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), str(scene), str(folder / f"p{side}"),
                                  str(config.score_threshold)], capture_output=True, text=True, env=env)
            if run.returncode != 0:
                raise RuntimeError(f"predict on the {side} px scene failed: {run.stderr.strip().splitlines()[-1:]}")
            child = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append({"side": side, "megapixels": side * side / 1e6, "scene_mb_decoded": side * side * 3 / 2**20,
                         "file_mb": scene.stat().st_size / 2**20, "tiles": tiles, **child,
                         "tiles_per_s": tiles / child["seconds"], "process_seconds": time.perf_counter() - started})
            scene.unlink()
    first, last = rows[0], rows[-1]
    record = {"suite": "scenes", "config": config.to_dict(), "rows": rows,
              "pixels_ratio": last["megapixels"] / first["megapixels"],
              "peak_rss_ratio": last["peak_rss_mb"] / first["peak_rss_mb"],
              "environment": environment()}
    out = Path(config.out)
    write_json_atomic(out / "scenes_cpu.json", record)
    write_text_atomic(out / "scenes_cpu.md", markdown(record))
    return record


def markdown(record: dict) -> str:
    env = record["environment"]
    load = ", ".join(f"{v:.1f}" for v in env.get("load_average_1_5_15") or ())
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = ["# Large scenes through `predict`: peak memory and throughput", "",
             f"Machine: {env.get('cpu', '?')} ({', '.join(env.get('cpu_flags', []))}), {env.get('cores')} cores, "
             f"{record['config']['threads']} threads, load average (1/5/15 min, at the end) {load}; {versions}; "
             f"{env.get('date')}. Command: `{env.get('command', 'edgekit bench scenes')}`.", "",
             "Untrained detector (cost does not depend on the weights); random-texture GeoTIFFs, tiled and "
             "deflate-compressed; end to end in a fresh process: read, tile, model, merge, write JSON/DOTA/GeoJSON.", "",
             "| scene (px) | MP | decoded size (MB) | tiles | seconds | tiles/s | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['side']} x {r['side']} | {r['megapixels']:.0f} | {r['scene_mb_decoded']:.0f} | "
                     f"{r['tiles']} | {r['seconds']:.1f} | {r['tiles_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Pixels grow {record['pixels_ratio']:.0f}x from the smallest to the largest scene; peak RSS grows "
                  f"{record['peak_rss_ratio']:.2f}x.", ""]
    return "\n".join(lines)
