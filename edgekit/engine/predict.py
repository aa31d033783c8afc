"""Inference on image files and raster scenes: detections out as JSON, DOTA submission
files and drawn images, and as GeoJSON in the map's CRS for georeferenced rasters.

Each image's result is also written on its own as ``out/records/<stem>.json`` as soon as it
is done: ``resume`` skips images whose record is there (a run stopped half-way, or a
worker that died, continues where it was), and under ``torchrun`` each worker takes every
``WORLD_SIZE``-th image and the first one merges all records into the outputs. torchrun is
the scale-out engine because it is already edgekit's (training's DDP) and needs no other
runtime: the work is one independent task per scene, with nothing to exchange but the end
of the run, and torchrun's ``--nnodes`` spreads it over machines, its ``--max-restarts``
restarts a failed worker, which ``resume`` then lets skip what was done.

Image files (PNG, JPEG, BMP, plain TIFF) are decoded whole; rasters (GeoTIFF and anything
else rasterio reads: ``RASTER_SUFFIXES``) are streamed window by window through
:func:`edgekit.engine.detect.detect_scene`, so a 20000 x 20000 scene is never held in
memory; such a scene is drawn only when it is at most ``DRAW_LIMIT`` pixels on a side.
The detection core is :mod:`edgekit.engine.detect`, the writers
:mod:`edgekit.engine.predict_outputs`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from edgekit.config import StageConfig, require
from edgekit.data.images import list_images, load_image
from edgekit.engine.detect import TILE_OVERLAP, detect_array, detect_scene, is_oriented
from edgekit.engine.predict_outputs import (detections_to_json, dota_submission_lines, draw_detections,
                                            write_dota_submission)
from edgekit.errors import EdgekitError
from edgekit.fileio import atomic_target, write_json_atomic

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt")
DRAW_LIMIT = 8192  # pixels on the longer side: a drawn scene is decoded whole

@dataclass
class PredictConfig(StageConfig):
    out: str = "runs/predict"
    score_threshold: float = 0.25
    iou_threshold: float = 0.6
    draw: bool = True          # also write <image>_pred.png with the boxes drawn
    resume: bool = False       # skip images whose out/records/<stem>.json exists (a restarted run)
    tile_overlap: int = TILE_OVERLAP  # pixels shared by neighbouring tiles of a large image
    batch_size: int = 8        # tiles per model call
    progress: bool = True

    def check(self) -> None:
        require(0 <= self.score_threshold <= 1, "score_threshold", self.score_threshold, "in [0, 1]")
        require(0 < self.iou_threshold <= 1, "iou_threshold", self.iou_threshold, "in (0, 1]")
        require(0 <= self.tile_overlap <= 1024, "tile_overlap", self.tile_overlap, "pixels in [0, 1024]")
        require(1 <= self.batch_size <= 1024, "batch_size", self.batch_size, "an integer in [1, 1024]")


@dataclass
class PredictResult:
    """Per image file: its size and detections; ``failed``: files that could not be read
    (with the reason), skipped so that one bad file does not lose the others' results;
    ``notes``: what the user should know once (a raster without a CRS, a scene not drawn)."""

    out: Path
    images: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    submission: Path | None = None   # the DOTA submission folder
    skipped: int = 0                 # images already done (resume)

    @property
    def detections(self) -> int:
        return sum(len(r["detections"]) for r in self.images.values())


def predict(checkpoint, images, config: PredictConfig | None = None) -> PredictResult:
    """Detect objects in image files, rasters and folders with a detector checkpoint; writes
    ``out/predictions.json``, ``out/dota/Task{1,2}_<class>.txt``, drawn PNGs and (rasters
    with a CRS) ``out/<stem>.geojson`` for every image that could be read."""
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import check_output_dir, remove_if_empty

    config = config or PredictConfig()
    out = check_output_dir(config.out)
    paths = _expand([Path(p) for p in ([images] if isinstance(images, (str, Path)) else images)])
    loaded = load(checkpoint)
    classes = loaded.detector_classes()
    existed = out.exists()
    try:
        return _predict_files(loaded.model, classes, paths, out, loaded.image_size, config)
    except BaseException:
        if not existed:
            remove_if_empty(out)
        raise


def _predict_files(model, class_names: list[str], paths: list[Path], out_dir: Path, image_size: int,
                   config: PredictConfig) -> PredictResult:
    from edgekit.engine import distributed as dist

    rank, world = dist.init_distributed()
    result = PredictResult(out_dir)
    # Two inputs with one stem (a.png, a.jpg, or two folders) must not overwrite each other.
    stems = [p.stem for p in paths]
    stems = [stem if stems.count(stem) == 1 else f"{stem}_{i}" for i, stem in enumerate(stems)]
    mine = [i for i in range(len(paths)) if i % world == rank]
    for index in tqdm(mine, desc="predict", disable=not (config.progress and rank == 0)):
        path, record_path = paths[index], out_dir / "records" / f"{stems[index]}.json"
        if config.resume and _read_record(record_path, path) is not None:
            result.skipped += 1
            continue
        try:
            record = _predict_one(model, class_names, path, stems[index], out_dir, image_size, config, result)
        except EdgekitError as exc:
            record = {"error": str(exc)}
        write_json_atomic(record_path, {"source": str(path), **record})
    dist.barrier()  # every worker's records are on disk
    if rank == 0:
        _merge_records(result, class_names, paths, stems, is_oriented(model))
    dist.cleanup()
    return result


def _read_record(record_path: Path, source: Path) -> dict | None:
    """A finished image's record (None if absent, unreadable, of another file, or a failure)."""
    import json

    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("source") != str(source) or "error" in record:
        return None
    return record


def _merge_records(result: PredictResult, class_names, paths, stems, oriented: bool) -> None:
    """predictions.json and the DOTA files from every image's record, in input order."""
    import json

    submission: dict[str, list[str]] = {}
    for path, stem in zip(paths, stems):
        record_path = result.out / "records" / f"{stem}.json"
        record = _read_record(record_path, path)
        if record is None:
            try:
                result.failed[str(path)] = json.loads(record_path.read_text()).get("error", "no result")
            except (OSError, ValueError):
                result.failed[str(path)] = "no result (its worker did not finish)"
            continue
        record.pop("source")
        result.images[str(path)] = record
        for name, lines in dota_submission_lines(stem, record["detections"]).items():
            submission.setdefault(name, []).extend(lines)
    if result.images:
        result.submission = write_dota_submission(result.out / "dota", submission, class_names, oriented)
        write_json_atomic(result.out / "predictions.json", result.images)
    elif result.failed:
        from edgekit.fileio import remove_if_empty

        for stem in stems:  # nothing to resume from: leave no failure records behind
            (result.out / "records" / f"{stem}.json").unlink(missing_ok=True)
        remove_if_empty(result.out / "records")
        first = next(iter(result.failed.values()))
        raise EdgekitError(f"no image could be read ({len(result.failed)} failed; first: {first})")


def _predict_one(model, class_names, path: Path, stem: str, out_dir: Path, image_size: int,
                 config: PredictConfig, result: PredictResult) -> dict:
    """Detect in one file, write its drawing (and GeoJSON), return its predictions.json record."""
    options = dict(tile_overlap=config.tile_overlap, batch_size=config.batch_size,
                   score_threshold=config.score_threshold, iou_threshold=config.iou_threshold)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        image = load_image(path)
        dets = detect_array(model, image, image_size, **options)
        record = {"width": image.shape[1], "height": image.shape[0]}
    else:
        from edgekit.data.geo import open_scene, write_detections_geojson
        from edgekit.engine.predict_outputs import polygons_of

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            scene = open_scene(path)
        result.notes += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        with scene:
            dets = detect_scene(model, scene, image_size, progress=config.progress, **options)
            record = {"width": scene.width, "height": scene.height, "crs": scene.crs.to_string() if scene.crs else None}
            if scene.crs is not None:
                polygons = polygons_of(dets)
                shapes = {"polygons": polygons} if polygons is not None else {"boxes": dets["boxes"].numpy()}
                labels = [class_names[int(k)] for k in dets["labels"].tolist()]
                record["geojson"] = str(write_detections_geojson(out_dir / f"{stem}.geojson", scene, labels,
                                                                 dets["scores"].numpy(), **shapes))
            image = None
            if config.draw and max(scene.width, scene.height) <= DRAW_LIMIT:
                image = scene.read((0, 0, scene.width, scene.height))
            elif config.draw:
                result.notes.append(f"{path} is {scene.width} x {scene.height} px: not drawn (over {DRAW_LIMIT} px)")
    if config.draw and image is not None:
        with atomic_target(out_dir / f"{stem}_pred.png") as tmp:
            draw_detections(image, dets, class_names).save(tmp, format="PNG")
    record["detections"] = detections_to_json(dets, class_names)
    return record


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to the images inside them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += list_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise EdgekitError(f"image {p} not found")
    if not files:
        raise EdgekitError(f"no images found in {', '.join(map(str, paths))}")
    return files
