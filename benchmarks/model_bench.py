"""Model benchmark: every (model, backend) row with latency, throughput, memory, accuracy.

``edgekit bench MODEL...`` calls :func:`bench`; ``edgekit bench model`` runs
:func:`model_suite`, the committed benchmark. A row holds the Ultralytics columns (format, status, size MB, mAP, ms/img, FPS) and the
full record: the batch-1 latency block (model only), throughput per batch size, MLPerf
SingleStream p90 and Offline throughput, first-inference and session-creation time,
peak host RSS, and the end-to-end pipeline (letterbox + normalise, inference, decoding
and NMS) timed apart from the model.

The suite's ``quick`` mode runs the default detector (rsdet_atto, untrained, at 128 px
to keep it short; the full run uses 256 px) on eager and ONNX Runtime FP32 / INT8 / mixed (the full
run adds torch.compile and the GPU backends, which skip themselves on a CPU machine) and writes
``benchmarks/results/model_cpu.{json,md,png}`` (``model_gpu.*`` on a GPU machine), with the
roofline prediction for this CPU beside the measured eager latency and the device table's
predictions. Otherwise it is the full run: the model may be a trained checkpoint and the
data a validation split, for the mAP column and the accuracy plots.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import StageConfig, check_image_size, require
from edgekit.errors import EdgekitError
from edgekit.fileio import read_json

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_FORMAT = "edgekit.bench/1"
DEFAULT_STRIDES = (8, 16, 32)  # RSDet's; used to decode outputs of a bare .onnx detector


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ModelSource:
    """What the user named: a torch model (checkpoint or registry name) and/or an ONNX file."""

    name: str
    model: object | None = None
    onnx: Path | None = None
    size_bytes: int | None = None
    image_size: int = 256
    class_names: list | None = None
    strides: tuple = DEFAULT_STRIDES
    engine: Path | None = None  # a serialized TensorRT engine (.engine/.plan)
    ir: Path | None = None      # an OpenVINO IR (.xml)


def resolve_source(item: str, image_size: int | None = None) -> ModelSource:
    """A checkpoint file, an .onnx file or a model name -> :class:`ModelSource`."""
    path = Path(item)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise EdgekitError(f"ONNX file {item} not found")
        from edgekit.export.to_onnx import read_metadata

        meta = read_metadata(path)  # what edgekit export wrote (classes, input size, strides); {} otherwise
        size = (meta.get("input_size") or [None])[0]
        return ModelSource(path.stem, onnx=path, size_bytes=path.stat().st_size, image_size=image_size or size or 256,
                           class_names=meta.get("classes"), strides=tuple(meta.get("strides") or DEFAULT_STRIDES))
    if path.suffix == ".xml":
        if not path.is_file():
            raise EdgekitError(f"OpenVINO IR {item} not found")
        size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.with_suffix(".bin").is_file()
                                      else 0)
        return ModelSource(path.stem, ir=path, size_bytes=size, image_size=image_size or 256)
    if path.suffix in (".engine", ".plan"):
        if not path.is_file():
            raise EdgekitError(f"TensorRT engine {item} not found")
        return ModelSource(path.stem, engine=path, size_bytes=path.stat().st_size, image_size=image_size or 256)
    from edgekit.engine.checkpoint import load

    loaded = load(item)
    model = loaded.model
    size = path.stat().st_size if loaded.path else sum(t.numel() * t.element_size()
                                                       for t in (*model.parameters(), *model.buffers()))
    return ModelSource(path.stem if loaded.path else item, model=model, size_bytes=size,
                       image_size=image_size or loaded.image_size, class_names=loaded.class_names,
                       strides=tuple(getattr(model, "strides", DEFAULT_STRIDES)))


def decode_outputs(flat: list, strides):
    """Runner outputs -> (boxes [B, P, 4] or rotated boxes [B, P, 5], scores [B, P, K]) before
    NMS, or None when the outputs are neither a raw dense head (3 maps per level, 4 for an
    oriented head: eager, TorchScript export) nor decoded ``boxes``/``rboxes`` and ``scores``
    (the export stage's graphs); e.g. an end-to-end graph with NMS inside, or a classifier."""
    from edgekit.models.detect_post import decode_predictions
    from edgekit.models.obb_post import decode_rotated_predictions

    n = len(strides)
    maps = [list(flat[k * n:(k + 1) * n]) for k in range(len(flat) // n)] if len(flat) % n == 0 else []
    if len(maps) == 3:
        return decode_predictions(tuple(maps), strides)
    if len(maps) == 4:
        return decode_rotated_predictions(tuple(maps), strides)
    if len(flat) == 2 and flat[0].ndim == 3 and flat[0].shape[-1] in (4, 5) and flat[1].ndim == 3:
        return flat[0], flat[1]
    return None


def postprocess_decoded(shapes, scores, score_threshold: float, image_size) -> list[dict]:
    """Class-aware NMS of decoded outputs: rotated when the boxes have 5 columns."""
    from edgekit.models.detect_post import postprocess
    from edgekit.models.obb_post import postprocess_rotated

    nms = postprocess_rotated if shapes.shape[-1] == 5 else postprocess
    return nms(shapes, scores, score_threshold, image_size=image_size)


def detections(runner, images, strides, score_threshold: float = 0.01) -> list[dict] | None:
    decoded = decode_outputs(runner(images), strides)
    if decoded is None:
        return None
    return postprocess_decoded(*decoded, score_threshold, image_size=images.shape[-2:])


def accuracy(runner, source: ModelSource, data: Path, batch_size: int = 8) -> dict:
    """mAP of a runner's detections on a DOTA-format split (images/ + labelTxt/):
    :func:`edgekit.engine.evaluate.detection_metrics`, rotated boxes when the runner gives them."""
    from torch.utils.data import DataLoader

    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.engine.evaluate import detection_metrics, target_in_original, to_original_coordinates

    if not source.class_names:
        return {"map": None, "map50": None, "reason": "no class names (pass the checkpoint, not only the .onnx)"}
    dataset = DetectionDataset(data, source.class_names, image_size=source.image_size)
    preds, targets, oriented = [], [], False
    bs = runner.fixed_batch or batch_size
    for images, tgts in DataLoader(dataset, batch_size=bs, collate_fn=collate_detection):
        if runner.fixed_batch and images.shape[0] != runner.fixed_batch:
            break  # a static-batch graph cannot run the last partial batch
        dets = detections(runner, images, source.strides)
        if dets is None:
            return {"map": None, "map50": None, "reason": "outputs are not a raw detector head"}
        for p, t in zip(dets, tgts):
            oriented = "rboxes" in p
            preds.append(to_original_coordinates(p, t))
            targets.append(target_in_original(t))
    m = detection_metrics(targets, preds, source.class_names, oriented)
    return {"map": m["map"], "map50": m["map50"], "dota_map50": m["dota_map50"], "boxes": m["boxes"],
            "num_images": m["num_images"]}


def end_to_end(runner, source: ModelSource, timing: dict) -> dict:
    """Pre-processing + inference + decoding/NMS on a random uint8 image of 1.5x the model
    size (so the letterbox resizes), each stage timed in the same calls."""
    import numpy as np
    import torch

    from edgekit.benchmarks.latency import time_stages
    from edgekit.data.transforms import to_model_input

    size = source.image_size
    probe = runner(torch.zeros(1, 3, size, size))
    if decode_outputs(probe, source.strides) is None:
        return {"status": "skipped", "reason": "outputs are not a raw detector head (decode stage unknown)"}
    rng = np.random.default_rng()
    big = int(size * 1.5)

    def make_input():
        return rng.integers(0, 256, (big, big, 3), dtype=np.uint8)

    def decode_nms(flat):
        return postprocess_decoded(*decode_outputs(flat, source.strides), 0.05, image_size=(size, size))

    stages = [("preprocess", lambda img: to_model_input(img, size)[0][None]), ("inference", runner),
              ("decode_nms", decode_nms)]
    with torch.inference_mode():
        result = time_stages(stages, make_input, **timing)
    for block in (result["end_to_end"], *result["stages"].values()):
        block.pop("values", None)  # the model-only block keeps its values; these keep stats
    return {"status": "ok", **result}


MIXED_FLOAT_PREFIXES = ("head.",)  # "mixed": these layers stay float (the detection head's outputs)
CALIBRATION_BATCHES = 4


def calibration_batches(source: ModelSource, data: Path | None) -> list:
    """The calibration images of every quantized row, edgekit's and the peers': images of
    the accuracy split when given (so the measured mAP is that of a properly calibrated
    model), else synthetic scenes; one seed, so every tool sees the same images."""
    from edgekit.calibration.pipeline import sample_batches

    return sample_batches(source.model, source.image_size, CALIBRATION_BATCHES,
                          data if source.class_names else None, 4)


def prepare_onnx(source: ModelSource, backend: str, onnx_dir: Path, data: Path | None) -> tuple[Path, dict | None]:
    """(the .onnx file an ONNX Runtime row of a torch model runs, its quant spec or None):
    the FP32 export (made once per source and size), or its QDQ version from PTQ (min-max)
    calibration with the weight width edgekit recommends for this CPU (7 bits without
    VNNI): every layer PTQ quantizes by default at INT8 ("ort-int8"), or all of those but
    the detection head ("ort-mixed"). A QDQ graph and its spec made earlier in the same
    folder are reused (the OpenVINO INT8 row runs the ort-int8 graph)."""
    from edgekit.benchmarks.backends import QUANTIZED_BACKENDS
    from edgekit.export.to_onnx import export_onnx
    from edgekit.fileio import write_json_atomic

    size = source.image_size
    fp32 = onnx_dir / f"{source.name}_{size}_fp32.onnx"
    if not fp32.is_file():
        export_onnx(source.model, fp32, image_size=size)
    if backend not in QUANTIZED_BACKENDS:
        return fp32, None
    from edgekit.benchmarks.peers import int8_weight_bits
    from edgekit.calibration.ptq import calibrate
    from edgekit.export.qdq import quantize_onnx

    kind = "mixed" if backend == "ort-mixed" else "int8"
    out = onnx_dir / f"{source.name}_{size}_{kind}.onnx"
    spec_file = out.with_suffix(".spec.json")
    if out.is_file() and spec_file.is_file():
        return out, read_json(spec_file, "bench:", "delete the bench's onnx folder")
    spec = calibrate(source.model, calibration_batches(source, data), model_name=source.name, progress=False,
                     weight_bits=int8_weight_bits())
    if kind == "mixed":
        spec["layers"] = {k: v for k, v in spec["layers"].items() if not k.startswith(MIXED_FLOAT_PREFIXES)}
    quantize_onnx(fp32, spec, out, model=source.model)
    write_json_atomic(spec_file, spec)
    return out, spec


def prepare_file(source: ModelSource, backend: str, onnx_dir: Path, data: Path | None) -> tuple[Path, dict | None]:
    """(the file a runtime row runs, edgekit's quant spec or None): :func:`prepare_onnx` for
    ONNX Runtime; its graphs as OpenVINO IRs; the peers' INT8 models (benchmarks/peers.py)."""
    from edgekit.benchmarks import peers
    from edgekit.export.openvino import convert

    name = f"{source.name}_{source.image_size}"
    if backend == "ort-static":
        out = onnx_dir / f"{name}_ort_static.onnx"
        return (out if out.is_file() else peers.ort_static(prepare_onnx(source, "ort", onnx_dir, data)[0],
                                                           calibration_batches(source, data), out)), None
    if backend == "openvino" and source.model is None:  # a given .onnx file
        return convert(source.onnx, onnx_dir / f"{source.onnx.stem}_openvino.xml"), None
    if backend in ("openvino", "nncf"):
        xml = onnx_dir / f"{name}_openvino_fp32.xml"
        if not xml.is_file():
            convert(prepare_onnx(source, "ort", onnx_dir, data)[0], xml)
        if backend == "openvino":
            return xml, None
        out = onnx_dir / f"{name}_nncf.xml"
        return (out if out.is_file() else peers.nncf_int8(xml, calibration_batches(source, data), out)), None
    if backend == "openvino-int8":
        qdq, spec = prepare_onnx(source, "ort-int8", onnx_dir, data)
        xml = onnx_dir / f"{name}_openvino_int8.xml"
        return (xml if xml.is_file() else convert(qdq, xml, "int8")), spec
    return prepare_onnx(source, backend, onnx_dir, data)


def bench_row(source: ModelSource, backend: str, *, batch_sizes=(1,), threads=None, duration=5.0, warmup=1.0,
              data: Path | None = None, onnx_dir: Path, e2e: bool = True, min_count: int = 10,
              keep: list | None = None) -> dict:
    """One table row: build the runner (or record why not), time it, measure accuracy.
    With ``keep`` (a list), a row that ran leaves ``(row, runner)`` there, open, for the
    interleaved timing; the caller closes it."""
    import torch

    from edgekit.benchmarks.backends import (ONNX_BACKENDS, OPENVINO_BACKENDS, PEER_BACKENDS, QUANTIZED_BACKENDS,
                                             Skipped, _one_line, make_runner, missing_provider)
    from edgekit.benchmarks.latency import reset_peak_rss, torch_threads

    row = {"model": source.name, "backend": backend, "threads": threads}
    size = source.image_size
    onnx_path = source.ir if backend in OPENVINO_BACKENDS else source.onnx
    if backend in QUANTIZED_BACKENDS + PEER_BACKENDS and source.model is None:
        return {**row, "format": backend, "status": "skipped",
                "reason": "quantizes a torch model's export; a given model file runs as it is under 'ort' or "
                          "'openvino'"}
    if backend in ONNX_BACKENDS and (missing := missing_provider(backend)) is not None:
        return {**row, "format": missing.format, "status": missing.status, "reason": missing.reason}
    if backend in OPENVINO_BACKENDS and backend != "openvino" and source.ir is not None:
        return {**row, "format": backend, "status": "skipped", "reason": "quantizes a torch model's export"}
    file_backend = backend in ONNX_BACKENDS + OPENVINO_BACKENDS
    if file_backend and (source.model is not None or (backend == "openvino" and source.onnx is not None)):
        t = time.perf_counter()
        try:
            if backend in OPENVINO_BACKENDS:
                from edgekit.export.openvino import require_openvino

                require_openvino()
            onnx_path, spec = prepare_file(source, backend, onnx_dir, data)
        except EdgekitError as exc:  # OpenVINO missing, or a graph it cannot convert: the row says so
            return {**row, "format": backend, "status": "skipped" if "not installed" in str(exc) else "failed",
                    "reason": str(exc)}
        except Exception as exc:  # the export or quantization failing is this row's result
            return {**row, "format": backend, "status": "failed", "reason": f"preparation: {_one_line(exc)}"}
        row["prepare_s"] = time.perf_counter() - t
        if spec is not None:
            from edgekit.benchmarks.roofline import profile_layers

            costs = profile_layers(source.model, torch.zeros(1, 3, size, size), spec)
            row["bops"] = sum(c.bops() for c in costs)
            row["quantized_layers"] = len(spec["layers"])
    with torch_threads(threads):
        reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        runner = make_runner(backend, model=source.model, threads=threads, example=torch.zeros(1, 3, size, size),
                             onnx_path=source.engine if backend == "tensorrt" else onnx_path)
        if isinstance(runner, Skipped):
            return {**row, "format": runner.format, "status": runner.status, "reason": runner.reason}
        try:
            _time_runner(row, runner, source, onnx_path, batch_sizes, (duration, warmup, min_count), data, e2e)
        finally:
            if keep is not None and row["status"] == "ok" and row.get("batch") == 1:
                keep.append((row, runner))
            else:
                runner.close()
    return row


def _time_runner(row, runner, source, onnx_path, batch_sizes, budget, data, e2e) -> None:
    """Fill ``row`` with what ``runner`` measures: latency per batch size, end-to-end,
    memory and accuracy."""
    import torch

    from edgekit.benchmarks.backends import ONNX_BACKENDS, OPENVINO_BACKENDS, _one_line
    from edgekit.benchmarks.latency import mlperf_summary, peak_rss_bytes, throughput, time_callable

    duration, warmup, min_count = budget
    row.update(format=runner.format, precision=runner.precision, status="ok", session_ms=runner.session_ms)
    path_size = onnx_path.stat().st_size if row["backend"] in ONNX_BACKENDS and onnx_path else source.size_bytes
    if row["backend"] in OPENVINO_BACKENDS and onnx_path:  # the IR: .xml + .bin
        path_size = sum(p.stat().st_size for p in (onnx_path, onnx_path.with_suffix(".bin")) if p.is_file())
    row["size_mb"] = path_size / 1e6 if path_size else None
    size = source.image_size
    by_batch, skipped_batches = {}, {}
    try:
        for b in batch_sizes:
            if runner.fixed_batch and b != runner.fixed_batch:
                skipped_batches[b] = f"graph has a static batch of {runner.fixed_batch}"
                continue
            x = torch.randn(b, 3, size, size)
            timing = time_callable(lambda: runner(x), warmup_s=warmup, duration_s=duration, min_count=min_count,
                                   sync=runner.sync)
            by_batch[b] = timing
            log(f"  {source.name} {row['backend']} batch {b}: mean {timing.latency['mean']:.2f} ms "
                f"({timing.latency['count']} calls)")
    except Exception as exc:  # a backend failing while running is this row's result too
        row.update(status="failed", reason=_one_line(exc))
        if not by_batch:
            return
    if not by_batch:  # every requested batch size was skipped: nothing timed, say why
        row.update(status="skipped", skipped_batches=skipped_batches,
                   reason=f"no requested batch size runs: {'; '.join(sorted(set(skipped_batches.values())))} "
                          f"(asked for {', '.join(map(str, batch_sizes))})")
        return
    single = by_batch[min(by_batch)]
    row["latency"] = single.latency
    row["batch"] = min(by_batch)
    row["first_ms"] = single.first_ms
    row["ms_per_img"] = single.latency["mean"] / row["batch"]
    row["fps"] = 1e3 / row["ms_per_img"]
    row["throughput"] = {str(b): {**throughput(t.latency, b),
                                  "latency": {k: v for k, v in t.latency.items() if k != "values"}}
                         for b, t in by_batch.items()}
    row["skipped_batches"] = skipped_batches
    row["mlperf"] = mlperf_summary({b: t.latency for b, t in by_batch.items()})
    if single.latency.get("warning"):
        row["warning"] = single.latency["warning"]
    if e2e:
        row["end_to_end"] = end_to_end(runner, source, {"warmup_s": min(warmup, 0.5), "duration_s": duration,
                                                        "min_count": min_count})
    row["peak_rss_mb"] = peak_rss_bytes() / 1e6
    if torch.cuda.is_available():
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
    if data is not None:
        row["accuracy"] = accuracy(runner, source, data)


@dataclass
class BenchConfig(StageConfig):
    """What ``bench`` measures: every model x backend, per batch size."""

    backends: list[str] = field(default_factory=lambda: ["eager", "compile", "ort"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None      # torch and ONNX Runtime intra-op threads (default: the libraries')
    duration: float = 5.0           # seconds timed per batch size
    warmup: float = 1.0             # seconds of warm-up before timing
    min_count: int = 10             # timed calls at least, whatever the duration
    image_size: int | None = None   # default: each model's own, else 256
    data: str | None = None         # DOTA split for the mAP column
    out: str | None = None          # folder for bench.{json,md,png} and the exports it makes
    roofline: bool = True
    interleave: bool = False        # also time the batch-1 rows side by side, in rounds (ratios under shared load)

    def check(self) -> None:
        from edgekit.benchmarks.backends import BACKENDS

        unknown = [b for b in self.backends if b not in BACKENDS]
        require(bool(self.backends) and not unknown, "backends", self.backends, f"names from {', '.join(BACKENDS)}")
        require(bool(self.batch_sizes) and min(self.batch_sizes) >= 1 and max(self.batch_sizes) <= 1024,
                "batch_sizes", self.batch_sizes, "integers in [1, 1024]")
        require(self.threads is None or 1 <= self.threads <= 1024, "threads", self.threads, "in [1, 1024]")
        require(0 < self.duration <= 3600, "duration", self.duration, "in (0, 3600] seconds")
        require(0 <= self.warmup <= 600, "warmup", self.warmup, "in [0, 600] seconds")
        require(1 <= self.min_count <= 100_000, "min_count", self.min_count, "in [1, 100000]")
        if self.image_size is not None:
            check_image_size(self.image_size)


@dataclass
class BenchResult:
    """The benchmark record (rows, machine, settings) and the files written from it."""

    record: dict
    files: list = field(default_factory=list)

    @property
    def rows(self) -> list:
        return self.record["rows"]

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def measured(self) -> list:
        return [r for r in self.rows if r["status"] == "ok"]


def bench(models, config: BenchConfig | None = None) -> BenchResult:
    """Benchmark every model x backend (checkpoints, model names, .onnx files or TensorRT
    engines); with ``config.out``, writes bench.{json,md,png} and keeps the exports there.
    Rows that fail or are skipped say why; nothing measured at all is an error."""
    from edgekit.fileio import check_output_dir
    from edgekit.sysinfo import environment

    config = config or BenchConfig()
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if not models:
        raise EdgekitError("name at least one model: a checkpoint, a model name (see `edgekit models`) or an .onnx "
                           "file")
    data = Path(config.data) if config.data else None
    if data is not None and not data.is_dir():
        raise EdgekitError(f"--data {data} is not a folder; pass a DOTA split folder with images/ and labelTxt/")
    out = Path(config.out) if config.out else None
    if out is not None:
        check_output_dir(out)
    sources = [resolve_source(str(i), config.image_size) for i in models]
    rows, kept = [], [] if config.interleave else None
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        onnx_dir = out / "onnx" if out else Path(tmp)  # exports are kept beside a CLI run's results
        onnx_dir.mkdir(parents=True, exist_ok=True)
        try:
            for s in sources:
                for b in config.backends:
                    log(f"bench {s.name} [{b}]")
                    rows.append(bench_row(s, b, batch_sizes=tuple(config.batch_sizes), threads=config.threads,
                                          duration=config.duration, warmup=config.warmup, data=data,
                                          onnx_dir=onnx_dir, min_count=config.min_count, keep=kept))
            interleaved = interleaved_section(kept, sources, config) if kept else None
        finally:
            for _, runner in kept or ():
                runner.close()
    settings = {"backends": list(config.backends), "batch_sizes": list(config.batch_sizes), "threads": config.threads,
                "duration_s": config.duration, "warmup_s": config.warmup, "min_count": config.min_count,
                "image_size": config.image_size, "data": config.data, "interleave": config.interleave}
    record = {"format": BENCH_FORMAT, "machine": environment(), "settings": settings, "rows": rows}
    if interleaved:
        record["interleaved"] = interleaved
    if config.roofline:
        record["roofline"] = roofline_section(sources, rows)
    for row in rows:
        row.setdefault("bops", _row_bops(row, record.get("roofline", {})))
    result = BenchResult(record)
    if out is not None:
        result.files = write_outputs(record, out, "bench")
    if not result.measured:
        reasons = "; ".join(f"{r['model']} [{r['backend']}]: {r.get('reason', r['status'])}" for r in rows)
        raise EdgekitError(f"no measurement succeeded ({reasons[:300]}){' (record in ' + str(out) + ')' if out else ''}")
    return result


INTERLEAVE_GAP_S = 0.05  # between calls: the previous runtime's spinning threads go idle (benchmarks/latency.py)
# each interleaved row's speed is given against these rows of its model (the peers' rows too,
# so that edgekit's INT8 is compared with theirs in the same rounds)
RATIO_REFERENCES = ("ort", "openvino", "ort-static", "nncf")
REFERENCE_NAMES = {"ort": "ORT FP32", "openvino": "OpenVINO FP32", "ort-static": "ORT quantize_static",
                   "nncf": "NNCF INT8"}


def interleaved_section(kept: list, sources: list[ModelSource], config: BenchConfig) -> dict:
    """Every kept batch-1 runner timed side by side in rounds (:func:`measure_interleaved`),
    each row's speed against the ORT FP32 and OpenVINO FP32 rows of its model as the median
    of per-round ratios: a load change on the shared machine hits every row alike."""
    import torch

    from edgekit.benchmarks.latency import measure_interleaved, ratio_of_rounds, torch_threads

    inputs = {s.name: torch.randn(1, 3, s.image_size, s.image_size) for s in sources}
    fns = {f"{row['model']} [{row['backend']}]": (lambda r=runner, x=inputs[row["model"]]: r(x))
           for row, runner in kept}
    log(f"interleaved timing: {len(fns)} rows, up to {INTERLEAVE_ROUNDS} rounds")
    with torch_threads(config.threads), torch.inference_mode():
        timed = measure_interleaved(fns, warmup=2, repeats=INTERLEAVE_ROUNDS, min_repeats=10,
                                    budget_s=config.duration * len(fns), settle=1, gap_s=INTERLEAVE_GAP_S)
    rows = []
    for row, _ in kept:
        key = f"{row['model']} [{row['backend']}]"
        entry = {"model": row["model"], "backend": row["backend"], "format": row["format"], **timed[key],
                 "speed_vs": {}}
        for ref in RATIO_REFERENCES:
            ref_key = f"{row['model']} [{ref}]"
            if ref_key in timed:  # above 1: faster than the reference
                entry["speed_vs"][ref] = ratio_of_rounds(timed[ref_key], timed[key])
        row["interleaved_median_ms"] = timed[key]["median_ms"]
        rows.append(entry)
    return {"rounds": rows[0]["repeats"] if rows else 0, "gap_s": INTERLEAVE_GAP_S, "threads": config.threads,
            "batch": 1, "rows": rows}


INTERLEAVE_ROUNDS = 200


def _row_bops(row: dict, roof: dict):
    """Float rows of a torch source: BOPs from the layer profile (quantized rows carry their
    own, from their quant spec; a given quantized .onnx has none)."""
    per_model = roof.get("models", {}).get(row["model"], {})
    return per_model.get("bops") if row.get("precision", "fp32") == "fp32" else None


def roofline_section(sources: list[ModelSource], rows: list[dict]) -> dict:
    """Predicted vs measured eager latency on this CPU, and predictions for every device."""
    import torch

    from edgekit.benchmarks.devices import DEVICES, ci_cpu
    from edgekit.benchmarks.roofline import predict_all, profile_layers, validate_on_cpu

    cpu = ci_cpu(threads=rows[0].get("threads") if rows else None)
    out = {"cpu": cpu.to_dict(), "models": {}}
    for s in sources:
        if s.model is None:
            continue
        x = torch.zeros(1, 3, s.image_size, s.image_size)
        eager = next((r for r in rows if r["model"] == s.name and r["backend"] == "eager" and r["status"] == "ok"
                      and r.get("batch") == 1), None)
        measured = eager["latency"]["mean"] if eager else None
        v = validate_on_cpu(s.model, x, measured, device=cpu, repeats=3)
        pred = v["predicted"]
        out["models"][s.name] = {
            "bops": pred["bops"], "flops": pred["flops"], "cpu_predicted": pred, "cpu_measured_eager_ms": measured,
            "measured_over_predicted": measured / pred["total_ms"] if measured else None,
            "cpu_by_layer_type": v["by_layer_type"], "top_layers_predicted": v["top_layers_predicted"],
            "devices": predict_all(profile_layers(s.model, x), list(DEVICES.values()))}
        gpu = _gpu_validation(s, rows, profile_layers(s.model, x))
        if gpu:
            out["models"][s.name]["gpu"] = gpu
    return out


def _gpu_validation(source: ModelSource, rows: list[dict], costs) -> dict | None:
    """Predicted (the table entry of this GPU) vs measured eager-cuda latency, on a GPU machine."""
    import torch

    from edgekit.benchmarks.devices import match_gpu
    from edgekit.benchmarks.roofline import predict

    row = next((r for r in rows if r["model"] == source.name and r["backend"] == "eager-cuda"
                and r["status"] == "ok" and r.get("batch") == 1), None)
    if row is None or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    device = match_gpu(name)
    if device is None:
        return {"cuda_device": name, "reason": "no table entry for this GPU in benchmarks/devices.py"}
    pred = predict(costs, device, "fp32")
    pred.pop("layers")
    measured = row["latency"]["mean"]
    return {"cuda_device": name, "table_entry": device.key, "predicted": pred, "measured_eager_cuda_ms": measured,
            "measured_over_predicted": measured / pred["total_ms"]}


# ----------------------------------------------------------------------------- reporting


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def table(record: dict) -> str:
    """The Ultralytics-style table: format, status, size, mAP, ms/img, FPS."""
    lines = [f"{'model':<16} {'format':<40} {'status':<8} {'size MB':>8} {'mAP50-95':>9} {'ms/img':>9} {'FPS':>8}"]
    for r in record["rows"]:
        acc = (r.get("accuracy") or {}).get("map")
        lines.append(f"{r['model'][:16]:<16} {r.get('format', r['backend'])[:40]:<40} {r['status']:<8} "
                     f"{_f(r.get('size_mb'), '{:.1f}'):>8} {_f(acc, '{:.4f}'):>9} {_f(r.get('ms_per_img')):>9} "
                     f"{_f(r.get('fps'), '{:.1f}'):>8}")
        if r["status"] != "ok" and r.get("reason"):
            lines.append(f"{'':<16} -> {r['reason']}")
        if r.get("warning"):
            lines.append(f"{'':<16} !! {r['warning']}")
    for r in (record.get("interleaved") or {}).get("rows", []):
        vs = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speed_vs"].items())
        lines.append(f"side by side: {r['model'][:16]:<16} {r['format'][:40]:<40} median {r['median_ms']:.2f} ms"
                     f"{' (' + vs + ')' if vs else ''}")
    return "\n".join(lines)


def markdown(record: dict) -> str:
    m = record["machine"]
    s = record["settings"]
    lines = ["# Model latency benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average "
             f"{m['load_average_1_5_15']}; {m['platform']}; versions {m['versions']}; {m['date']}.", "",
             f"Command: `{m['command']}`", "",
             f"Settings: backends {s['backends']}, batch sizes {s['batch_sizes']}, image size "
             f"{s.get('image_size') or 'per model'}, threads {s['threads']}, {s['duration_s']} s per measurement "
             f"(at least {s.get('min_count', 10)} calls) after {s['warmup_s']} s warm-up.", "",
             "ms/img is model-only (a random float tensor in, raw outputs out); the end-to-end table adds "
             "letterbox + normalisation of a 1.5x-size uint8 image and decoding + NMS (score > 0.05; an "
             "untrained model passes many boxes to NMS).", "",
             "| model | format | status | size MB | mAP50-95 | ms/img (mean) | p50 | p90 | p99 | CV | FPS | first call ms "
             "| session ms | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lat = r.get("latency") or {}
        pct = lat.get("percentiles", {})
        acc = (r.get("accuracy") or {}).get("map")
        lines.append(f"| {r['model']} | {r.get('format', r['backend'])} | {r['status']} | {_f(r.get('size_mb'), '{:.1f}')} "
                     f"| {_f(acc, '{:.4f}')} | {_f(r.get('ms_per_img'))} | {_f(pct.get('p50'))} | {_f(pct.get('p90'))} "
                     f"| {_f(pct.get('p99'))} | {_f(lat.get('cv'), '{:.1%}')} | {_f(r.get('fps'), '{:.1f}')} "
                     f"| {_f(r.get('first_ms'), '{:.1f}')} | {_f(r.get('session_ms'), '{:.1f}')} "
                     f"| {_f(r.get('peak_rss_mb'), '{:.0f}')} |")
    notes = [f"- {r['model']} / {r.get('format', r['backend'])}: {r['reason']}" for r in record["rows"]
             if r.get("reason")] + [f"- {r['model']} / {r.get('format')}: {r['warning']}" for r in record["rows"]
                                   if r.get("warning")]
    if notes:
        lines += ["", "Skipped, failed and unstable rows:", "", *notes]
    lines += ["", "## Throughput, MLPerf-style scenarios and end-to-end time", "",
              "| model | format | batch | ms/batch | images/s | SingleStream p90 ms | Offline samples/s |",
              "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        for b, t in (r.get("throughput") or {}).items():
            lines.append(f"| {r['model']} | {r['format']} | {b} | {_f(t['ms_per_batch'])} | {_f(t['images_per_s'], '{:.1f}')} "
                         f"| {_f(r['mlperf']['single_stream_p90_ms'])} | {_f(r['mlperf']['offline_samples_per_s'], '{:.1f}')} |")
    lines += ["", "| model | format | end-to-end mean ms | preprocess | inference | decode + NMS |", "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        e = r.get("end_to_end") or {}
        if e.get("status") == "ok":
            st = e["stages"]
            lines.append(f"| {r['model']} | {r['format']} | {_f(e['end_to_end']['mean'])} | {_f(st['preprocess']['mean'])} "
                         f"| {_f(st['inference']['mean'])} | {_f(st['decode_nms']['mean'])} |")
    lines += interleaved_markdown(record)
    roof = record.get("roofline")
    if roof:
        cpu = roof["cpu"]
        lines += ["", "## Roofline: predicted vs measured on this CPU", "",
                  f"CPU roofline: peak FP32 {_f(cpu['fp32_tflops'] and cpu['fp32_tflops'] * 1e3, '{:.0f}')} GFLOP/s "
                  f"({cpu['derived'].get('fp32_tflops')}), copy bandwidth {_f(cpu['bandwidth_gbs'], '{:.1f}')} GB/s "
                  f"(measured), per-layer overhead {cpu['launch_us']:.1f} µs (measured).", "",
                  "| model | GFLOPs | predicted ms (FP32) | measured eager ms | measured / predicted |", "|---|---|---|---|---|"]
        for name, mm in roof["models"].items():
            lines.append(f"| {name} | {mm['flops'] / 1e9:.2f} | {_f(mm['cpu_predicted']['total_ms'])} "
                         f"| {_f(mm['cpu_measured_eager_ms'])} | {_f(mm['measured_over_predicted'])} |")
        for name, mm in roof["models"].items():
            g = mm.get("gpu")
            if g and g.get("predicted"):
                lines += ["", f"GPU {g['cuda_device']} (table entry {g['table_entry']}): predicted "
                              f"{g['predicted']['total_ms']:.3f} ms (FP32 roofline), measured eager CUDA "
                              f"{g['measured_eager_cuda_ms']:.3f} ms, measured / predicted "
                              f"{g['measured_over_predicted']:.2f}."]
        for name, mm in roof["models"].items():
            lines += ["", f"{name} per layer type on this CPU (measured with forward hooks, exclusive of children):",
                      "", "| layer type | layers | predicted ms | measured ms | measured / predicted |",
                      "|---|---|---|---|---|"]
            for t, row in mm.get("cpu_by_layer_type", {}).items():
                lines.append(f"| {t} | {row['layers']} | {row['predicted_ms']:.3f} | {row['measured_ms']:.3f} "
                             f"| {_f(row['measured_over_predicted'])} |")
        for name, mm in roof["models"].items():
            lines += ["", f"Predicted latency of {name} at batch 1 on other devices (roofline, **predicted**, not "
                          "measured):", "", "| device | precision | predicted ms | why no figure |", "|---|---|---|---|"]
            for d in mm["devices"]:
                lines.append(f"| {d['device_name']} | {d['precision']} | {_f(d['total_ms'], '{:.3f}')} "
                             f"| {d.get('reason', '')} |")
        from edgekit.benchmarks.devices import DEVICES, device_table_markdown
        lines += ["", "Device figures and sources:", "", device_table_markdown(list(DEVICES.values()))]
    return "\n".join(lines) + "\n"


def interleaved_markdown(record: dict) -> list[str]:
    """The side-by-side table: per row, median and p90 of the rounds, speed against ORT FP32,
    OpenVINO FP32 and the INT8 peers (median of per-round ratios), and the row's mAP."""
    inter = record.get("interleaved")
    if not inter:
        return []
    accuracy_of = {(r["model"], r["backend"]): r.get("accuracy") or {} for r in record["rows"]}
    references = [ref for ref in RATIO_REFERENCES if any(ref in r["speed_vs"] for r in inter["rows"])]
    lines = ["", "## Side by side (interleaved rounds)", "",
             f"Every row above that ran at batch 1 was timed again in {inter['rounds']} rounds, each round running "
             f"every row once ({inter['gap_s']} s gap and one untimed call before each timed one, threads "
             f"{inter['threads']}); 'speed vs X' is the median over rounds of X's time / the row's time (above 1: "
             f"faster than X).", "",
             "| model | format | median ms | p90 ms | spread | " + "".join(
                 f"speed vs {REFERENCE_NAMES[ref]} | " for ref in references)
             + "mAP50-95 | mAP50 |", "|---|---|---|---|---|" + "---|" * (len(references) + 2)]
    for r in inter["rows"]:
        acc = accuracy_of.get((r["model"], r["backend"]), {})
        speeds = "".join(_f(r["speed_vs"].get(ref), "{:.2f}x") + " | " for ref in references)
        lines.append(f"| {r['model']} | {r['format']} | {_f(r['median_ms'])} | {_f(r['p90_ms'])} "
                     f"| {_f(r['spread'])} | {speeds}{_f(acc.get('map'), '{:.4f}')} "
                     f"| {_f(acc.get('map50'), '{:.4f}')} |")
    return lines


def compare(a_path: str, b_path: str) -> str:
    """Ratios B/A per matching (model, format) row: ms/img, p90, FPS."""
    a, b = (_load_record(p) for p in (a_path, b_path))
    index = {(r["model"], r.get("format")): r for r in a["rows"] if r["status"] == "ok"}
    lines = [f"B = {b_path} vs A = {a_path} (ratio < 1 on ms means B is faster)",
             f"{'model':<16} {'format':<40} {'ms/img B/A':>11} {'p90 B/A':>9} {'FPS B/A':>9}"]
    matched = 0
    for r in b["rows"]:
        ra = index.get((r["model"], r.get("format")))
        if ra is None or r["status"] != "ok":
            continue
        matched += 1
        p90 = r["latency"]["percentiles"]["p90"] / ra["latency"]["percentiles"]["p90"]
        lines.append(f"{r['model'][:16]:<16} {r['format'][:40]:<40} {r['ms_per_img'] / ra['ms_per_img']:>11.3f} "
                     f"{p90:>9.3f} {r['fps'] / ra['fps']:>9.3f}")
    if not matched:
        raise EdgekitError(f"{a_path} and {b_path} have no successful rows with the same model and format to compare")
    return "\n".join(lines)


def _load_record(path: str) -> dict:
    record = read_json(path, "--compare:", "pass a file written by edgekit bench")
    if not isinstance(record, dict) or record.get("format") != BENCH_FORMAT or not isinstance(record.get("rows"), list):
        raise EdgekitError(f"--compare: {path} is not an edgekit bench result (format {BENCH_FORMAT!r}); pass a file "
                           f"written by edgekit bench")
    return record


def write_outputs(record: dict, out: Path, stem: str) -> list[Path]:
    """JSON + markdown + PNG, each written through a temporary name."""
    from edgekit.benchmarks.plots import plot_record
    from edgekit.fileio import write_json_atomic, write_text_atomic

    paths = [write_json_atomic(out / f"{stem}.json", record), write_text_atomic(out / f"{stem}.md", markdown(record))]
    png = plot_record(record, out / f"{stem}.png")
    return paths + ([png] if png else [])


def model_suite(config) -> BenchResult:
    """The committed model benchmark (a :class:`~edgekit.benchmarks.suites.ModelSuiteConfig`):
    writes ``model_cpu.{json,md,png}`` (``model_gpu.*`` on a GPU machine) under ``config.out``."""
    import os

    import torch

    threads = config.threads or os.cpu_count()
    if config.quick:
        settings = BenchConfig(backends=["eager", "ort", "ort-int8", "ort-mixed"], batch_sizes=[1, 2], duration=1.0,
                               warmup=0.5, image_size=128, min_count=3, threads=threads, data=config.data)
    else:
        settings = BenchConfig(backends=["eager", "compile", "ort", "ort-int8", "ort-mixed", "eager-cuda",
                                         "cuda-graph", "ort-cuda", "ort-trt", "tensorrt"],
                               batch_sizes=[1, 4, 8], duration=10.0, warmup=2.0, threads=threads, data=config.data)
    result = bench([config.model], settings)
    result.record["settings"]["mode"] = "quick" if config.quick else "full"
    stem = "model_gpu" if torch.cuda.is_available() else "model_cpu"  # the GPU rows only run on a GPU machine
    result.files = write_outputs(result.record, Path(config.out), stem)
    return result


PEER_BACKENDS_RUN = ["ort", "ort-int8", "openvino", "openvino-int8", "ort-static", "nncf"]
FLOORS = (  # (what, row, reference row, least speed ratio): ratios from the interleaved rounds
    ("edgekit INT8 in ONNX Runtime >= 1.8x ONNX Runtime FP32 speed (a floor for CPUs with VNNI)", "ort-int8", "ort",
     1.8),
    ("edgekit INT8 in ONNX Runtime at least as fast as ONNX Runtime quantize_static", "ort-int8", "ort-static", 1.0),
    ("edgekit INT8 in ONNX Runtime at least as fast as NNCF INT8 in OpenVINO", "ort-int8", "nncf", 1.0),
    ("OpenVINO FP32 >= ONNX Runtime FP32 speed", "openvino", "ort", 1.0),
    ("OpenVINO INT8 >= 1.8x OpenVINO FP32 speed", "openvino-int8", "openvino", 1.8),
)
ACCURACY_FLOORS = (  # (what, row, reference row, most mAP@[.5:.95] points the row may lose against it)
    ("edgekit INT8 in ONNX Runtime within 0.5 point of FP32", "ort-int8", "ort", 0.5),
    ("edgekit INT8 in ONNX Runtime at least as accurate as quantize_static", "ort-int8", "ort-static", 0.0),
    ("edgekit INT8 in ONNX Runtime at least as accurate as NNCF INT8", "ort-int8", "nncf", 0.0),
)


def _accuracy_floors(rows: list[dict]) -> list[dict]:
    """Each accuracy floor: mAP@[.5:.95] points the row loses against its reference (negative:
    it gains), from the rows' own validation mAP."""
    maps = {r["backend"]: (r.get("accuracy") or {}).get("map") for r in rows if r.get("status") == "ok"}
    floors = []
    for what, row, ref, most in ACCURACY_FLOORS:
        lost = None if maps.get(row) is None or maps.get(ref) is None else 100 * (maps[ref] - maps[row])
        floors.append({"floor": what, "row": row, "reference": ref, "most": most, "points_lost": lost,
                       "met": lost is not None and lost <= most})
    return floors


def peers_suite(config) -> BenchResult:
    """``edgekit bench peers`` (a :class:`~edgekit.benchmarks.suites.PeersSuiteConfig`): FP32
    and edgekit's INT8 in ONNX Runtime and OpenVINO beside ONNX Runtime's quantize_static and
    NNCF, batch 1, timed side by side, mAP on the same split; writes ``peers_cpu.{json,md}``
    with the floors' ratios (met or by how much not)."""
    from edgekit.benchmarks.peers import VNNI_FLAGS, has_vnni, int8_weight_bits, openvino_profile
    from edgekit.fileio import write_json_atomic, write_text_atomic

    with tempfile.TemporaryDirectory(prefix="edgekit-peers-") as tmp:  # the models, kept for the profiles
        settings = BenchConfig(backends=PEER_BACKENDS_RUN, batch_sizes=[1], threads=config.threads,
                               duration=config.duration, warmup=2.0, image_size=config.image_size, data=config.data,
                               interleave=True, roofline=False, out=tmp)
        result = bench([config.model], settings)
        record = result.record
        size = resolve_source(config.model, config.image_size).image_size
        record["openvino_profile"] = {
            xml.stem: openvino_profile(xml, size, config.threads) for xml in sorted(Path(tmp, "onnx").glob("*.xml"))}
    record["settings"]["mode"] = "peers"
    speed = {(r["model"], r["backend"]): r["speed_vs"] for r in record["interleaved"]["rows"]}
    floors = []
    for what, row, ref, least in FLOORS:
        ratio = next((v.get(ref) for (_, b), v in speed.items() if b == row), None)
        floors.append({"floor": what, "row": row, "reference": ref, "least": least, "measured": ratio,
                       "met": ratio is not None and ratio >= least,
                       "short_by": None if ratio is None or ratio >= least else least / ratio})
    record["floors"] = floors
    record["accuracy_floors"] = _accuracy_floors(record["rows"])
    record["int8"] = {"vnni": has_vnni(), "edgekit_weight_bits": int8_weight_bits(), "vnni_flags": list(VNNI_FLAGS),
                      "ort_static_reduce_range": not has_vnni()}
    out = Path(config.out)
    lines = ["# Peers: edgekit's exports in ONNX Runtime and OpenVINO beside ONNX Runtime quantize_static and NNCF",
             "", f"CPU {record['machine']['cpu']}, flags {', '.join(record['machine']['cpu_flags']) or 'unknown'}: "
             + ("VNNI present." if has_vnni() else
                f"no VNNI ({', '.join(VNNI_FLAGS)} absent): the u8 x s8 integer kernels sum pairs in int16 and "
                f"saturate with full 8-bit weights, so edgekit's INT8 spec uses {int8_weight_bits()}-bit weights "
                f"and quantize_static its reduce_range (7-bit weights); NNCF applies its own overflow fix."),
             "", "Floors (speed ratios: median of per-round ratios in the side-by-side table below):", ""]
    for f in floors:
        got = "not measured" if f["measured"] is None else f"{f['measured']:.2f}x"
        verdict = "met" if f["met"] else ("not measured" if f["measured"] is None else
                                          f"NOT met: {f['least']:.2f}x needed, short by a factor {f['short_by']:.2f}")
        lines.append(f"- {f['floor']}: {got} ({verdict})")
    for f in record["accuracy_floors"]:
        got = "not measured" if f["points_lost"] is None else f"{f['points_lost']:+.2f} points lost"
        verdict = "met" if f["met"] else ("not measured" if f["points_lost"] is None else
                                          f"NOT met: at most {f['most']:.1f} allowed")
        lines.append(f"- {f['floor']} (mAP@[.5:.95]): {got} ({verdict})")
    lines += ["", "OpenVINO per-op time (PERF_COUNT counters, ms per batch-1 inference summed by node type, the IRs "
              "one after the other, not interleaved) and the kernels its convolutions ran:", ""]
    for name, prof in record["openvino_profile"].items():
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(prof["by_type_ms"].items())[:10])
        kernels = "; ".join(f"{t}: " + ", ".join(f"{k} x{n}" for k, n in kinds.items())
                            for t, kinds in prof["kernels"].items())
        lines.append(f"- {name}: total {prof['total_ms']:.1f} ms; {top}. Kernels: {kernels}")
    text = "\n".join(lines) + "\n\n" + markdown(record).split("\n", 1)[1]
    result.files = [write_json_atomic(out / "peers_cpu.json", record), write_text_atomic(out / "peers_cpu.md", text)]
    return result
