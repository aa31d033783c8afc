"""Georeferenced scenes (GeoTIFF and any raster GDAL reads): windowed tiles in, GeoJSON detections out.

A scene is read tile by tile with rasterio's windowed reads, so a 20000 x 20000 orthophoto
is never held whole: memory is one tile plus GDAL's block cache, which each read caps at
:data:`GDAL_CACHE_MB` (GDAL's default, 5% of RAM, lets the cache grow to the whole scene
as it is read; a per-read ``rasterio.Env`` rather than one held while the scene is open,
because rasterio's environments must be left in the order they were entered). Windows follow
:func:`edgekit.data.tiling.tile_windows` (the DOTA devkit's layout), so tiles of a scene and
of an image file line up the same way; tiles at the right/bottom edge are zero-padded.

Pixels become HxWx3 uint8 RGB, the form every edgekit model takes:

* 3 bands: RGB; 4 bands: RGB plus alpha (or near-infrared), the fourth dropped;
  1 band: grey, repeated to RGB; palette rasters and other band counts are refused.
* uint8 as is; uint16 scaled by the type's range, ``floor(v * 255 / 65535 + 0.5)``, the
  rule :mod:`edgekit.data.images` applies to 16-bit image files (a fixed rule, so every tile
  of a scene gets the same scaling); other types (float, int16, ...) are refused.

Pixel coordinates are continuous, (0, 0) the top-left corner of the top-left pixel, as in
DOTA labels; the raster's affine transform maps them to the map coordinates of its CRS.
Detections are written as a GeoJSON FeatureCollection in that CRS (oriented polygons, or
rectangles for horizontal boxes, with ``label`` and ``score``), named by the legacy
``crs`` member that GDAL and QGIS read (RFC 7946 only allows WGS 84). A raster without a
CRS is said so once, and its detections are written in pixel coordinates.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window as RasterWindow

from edgekit.data.tiling import Window, tile_windows
from edgekit.errors import EdgekitError
from edgekit.fileio import write_json_atomic

GDAL_CACHE_MB = 64
BAND_COUNTS = {1: "grey", 3: "RGB", 4: "RGBA"}
UINT16_TO_UINT8 = 255.0 / 65535.0


def _bounded_cache() -> rasterio.Env:
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 1024 * 1024)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class GeoScene:
    """An open raster, read window by window; use it as a context manager (or call :meth:`close`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgekitError(f"raster {self.path} not found; check the path")
        try:
            with warnings.catch_warnings(), _bounded_cache():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)  # said once below, in our words
                self.dataset = rasterio.open(self.path)
        except RasterioError as e:
            raise EdgekitError(f"cannot open raster {self.path}: {_one_line(e)}; "
                               f"the file is corrupt or not a raster GDAL reads") from None
        try:
            self._bands = self._check_bands()
        except EdgekitError:
            self.dataset.close()
            raise
        self.crs = self.dataset.crs if self.dataset.crs else None
        self.transform = self.dataset.transform
        if self.crs is None:
            warnings.warn(f"{self.path} has no CRS (not georeferenced); detections will be written "
                          f"in pixel coordinates", RuntimeWarning, stacklevel=2)

    def _check_bands(self) -> list[int]:
        ds = self.dataset
        if ds.count not in BAND_COUNTS:
            raise EdgekitError(f"{self.path} has {ds.count} bands; edgekit reads 1 (grey), 3 (RGB) or 4 (RGBA) "
                               f"band rasters: pick three with 'gdal_translate -b 1 -b 2 -b 3'")
        if ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette:
            raise EdgekitError(f"{self.path} is a palette raster; expand it to RGB first "
                               f"('gdal_translate -expand rgb')")
        dtypes = set(ds.dtypes)
        if not dtypes <= {"uint8", "uint16"} or len(dtypes) > 1:
            raise EdgekitError(f"{self.path} holds {', '.join(sorted(dtypes))} pixels; edgekit reads uint8 "
                               f"(or uint16, scaled by 255/65535): convert with 'gdal_translate -ot Byte -scale'")
        return [1] if ds.count == 1 else [1, 2, 3]

    @property
    def width(self) -> int:
        return self.dataset.width

    @property
    def height(self) -> int:
        return self.dataset.height

    def read(self, window: Window, out: np.ndarray | None = None) -> np.ndarray:
        """The pixels of ``window`` (x0, y0, x1, y1) as an HxWx3 uint8 RGB array (written into the
        top-left of ``out`` when given)."""
        x0, y0, x1, y1 = window
        try:
            with _bounded_cache():
                data = self.dataset.read(self._bands, window=RasterWindow(x0, y0, x1 - x0, y1 - y0))
        except RasterioError as e:
            raise EdgekitError(f"cannot read window {window} of {self.path}: {_one_line(e)}; "
                               f"the file is corrupt or truncated") from None
        if data.dtype == np.uint16:
            data = (data * UINT16_TO_UINT8 + 0.5).astype(np.uint8)
        h, w = data.shape[1:]
        rgb = np.empty((h, w, 3), dtype=np.uint8) if out is None else out[:h, :w]
        for k in range(3):  # band by band: ~6x faster than copying a transposed (3, H, W) view
            rgb[..., k] = data[k if len(self._bands) == 3 else 0]
        return rgb

    def windows(self, tile_size: int = 1024, overlap: int = 200) -> list[Window]:
        return tile_windows(self.height, self.width, tile_size, overlap)

    def tiles(self, tile_size: int = 1024, overlap: int = 200) -> Iterator[tuple[Window, np.ndarray]]:
        """(window, tile_size x tile_size x 3 tile) pairs, row-major; edge tiles zero-padded at the bottom/right."""
        for x0, y0, x1, y1 in self.windows(tile_size, overlap):
            full = (x1 - x0, y1 - y0) == (tile_size, tile_size)
            tile = np.empty((tile_size, tile_size, 3), np.uint8) if full else np.zeros((tile_size, tile_size, 3),
                                                                                        np.uint8)
            self.read((x0, y0, x1, y1), out=tile)
            yield (x0, y0, x1, y1), tile

    def pixel_to_map(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of continuous pixel coordinates (pixel coordinates again if there is no CRS)."""
        if self.crs is None:
            return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return pixel_to_map(self.transform, x, y)

    def close(self):
        self.dataset.close()

    def __enter__(self) -> GeoScene:
        return self

    def __exit__(self, *exc):
        self.close()


def open_scene(path: str | Path) -> GeoScene:
    """Open a raster for windowed reading (checks its bands and pixel type first)."""
    return GeoScene(path)


def pixel_to_map(transform, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Apply an affine transform (rasterio/affine ``Affine``: x' = a x + b y + c, y' = d x + e y + f)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    return a * x + b * y + c, d * x + e * y + f


def _rings(polygons: np.ndarray) -> list[list[list[float]]]:
    """Closed counter-clockwise rings (RFC 7946's winding) from [N, 4, 2] corners."""
    area = 0.5 * (polygons[:, :, 0] * np.roll(polygons[:, :, 1], -1, 1)
                  - np.roll(polygons[:, :, 0], -1, 1) * polygons[:, :, 1]).sum(1)
    polygons = np.where((area < 0)[:, None, None], polygons[:, ::-1], polygons)
    return [p.tolist() + [p[0].tolist()] for p in polygons]


def detections_geojson(labels, scores, polygons=None, boxes=None, transform=None, crs=None) -> dict:
    """A GeoJSON FeatureCollection of detections given in pixel coordinates.

    ``polygons`` [N, 8] (oriented) or ``boxes`` [N, 4] (x1, y1, x2, y2, written as
    rectangles); ``transform``/``crs`` from the scene (both None: pixel coordinates).
    """
    if (polygons is None) == (boxes is None):
        raise ValueError("give either polygons [N, 8] or boxes [N, 4]")
    if boxes is not None:
        x1, y1, x2, y2 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T
        polygons = np.stack([x1, y1, x2, y1, x2, y2, x1, y2], axis=1)
    corners = np.asarray(polygons, dtype=np.float64).reshape(-1, 4, 2)
    labels, scores = list(labels), np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(labels) == len(scores) == len(corners):
        raise ValueError(f"{len(corners)} shapes, {len(labels)} labels and {len(scores)} scores; give one each")
    if transform is not None and crs is not None:
        mx, my = pixel_to_map(transform, corners[..., 0], corners[..., 1])
        corners = np.stack([mx, my], axis=-1)
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                 "properties": {"label": str(label), "score": float(score)}}
                for ring, label, score in zip(_rings(corners), labels, scores)]
    collection = {"type": "FeatureCollection", "features": features}
    if crs is not None:
        epsg = crs.to_epsg()
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
        collection["crs"] = {"type": "name", "properties": {"name": name}}
    return collection


def write_detections_geojson(path: str | Path, scene: GeoScene, labels, scores, polygons=None, boxes=None) -> Path:
    """Write detections (pixel coordinates of ``scene``) as GeoJSON in the scene's CRS, atomically."""
    transform = scene.transform if scene.crs is not None else None
    return write_json_atomic(path, detections_geojson(labels, scores, polygons, boxes, transform, scene.crs))
