"""The export stage as a function: ``export(checkpoint, ExportConfig) -> ExportResult``.

Checkpoint -> ONNX (fp32, fp16, int8/mixed QDQ, end-to-end NMS), a TensorRT engine or an OpenVINO IR,
validated right after it is written. Every option is checked when the config is made,
and the checkpoint-dependent ones before anything heavy starts; artefacts are built in a
hidden staging folder beside ``out`` and moved in only when complete, so ``out`` never
holds a half-written file. Parity (see :mod:`edgekit.export.parity`) runs after every
export unless ``parity=False``; its report is ``parity.json``. A failed parity check
raises :class:`ParityError` (exit status 1 from the CLI): the artefacts stay, for
inspection, and no bundle is written. A quantized ONNX or OpenVINO export also gets a
placement report, ``<stem>.placement.json`` (:mod:`edgekit.export.placement`): which layers
the runtime runs on integer kernels, which in float, and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import StageConfig, check_image_size, flag, only_for, require
from edgekit.errors import EdgekitError

FORMATS = {  # format: (file stem, parity precision)
    "onnx": ("model", "fp32"),
    "onnx-fp16": ("model_fp16", "fp16"),
    "onnx-int8": ("model_int8", "int8"),
    "onnx-mixed": ("model_mixed", "mixed"),
    "tensorrt": ("model", None),  # fp16 engine, or int8 from calibration
    "openvino": ("openvino", "fp32"),  # OpenVINO IR (.xml + .bin), see export/openvino.py
    "openvino-fp16": ("openvino_fp16", "fp16"),
    "openvino-int8": ("openvino_int8", "int8"),
}
OPENVINO_FORMATS = ("openvino", "openvino-fp16", "openvino-int8")
INT8_FORMATS = ("onnx-int8", "openvino-int8")
QUANTIZED_FORMATS = ("onnx-int8", "onnx-mixed", "tensorrt", "openvino-int8")
ONNX_QUANTIZED_FORMATS = ("onnx-int8", "onnx-mixed")
DEFORM_MODES = ("native", "decompose")
PARITY_BATCH = 2


@dataclass
class ExportConfig(StageConfig):
    """What to export and how to check it. The NMS options apply with ``nms`` or a bundle
    (the bundle's ``infer.py`` runs NMS with them); calibration and weight storage apply to
    the quantized formats."""

    format: str = "onnx"
    out: str = "runs/export"
    image_size: int | None = None          # default: the checkpoint's
    nms: bool = False                      # end-to-end graph: detections [M, 7] after NMS
    score_threshold: float | None = None   # NMS / bundle (default 0.25)
    iou_threshold: float | None = None     # NMS / bundle (default 0.6)
    max_detections: int | None = None      # NMS / bundle (default 100)
    deform: str = "native"                 # native (ONNX DeformConv) | decompose (standard ops)
    form: str = "deploy"                   # deploy (channels-first blocks, fused ops) | training (as trained)
    calibration: str | dict | None = None  # quant spec: a JSON path or the spec itself
    weight_storage: str | None = None      # packed (bit planes below 8 bits) | native (ONNX INT4/INT8)
    data: str | None = None                # DOTA split: also compare torch vs exported mAP on it
    bundle: str | None = None              # also write a deploy bundle folder here
    parity: bool = True
    sqnr: bool = False                     # per-layer SQNR of a quantized export, written to sqnr.json

    def check(self) -> None:
        require(self.format in FORMATS, "format", self.format, " | ".join(FORMATS))
        require(self.deform in DEFORM_MODES, "deform", self.deform, " | ".join(DEFORM_MODES))
        require(self.form in ("deploy", "training"), "form", self.form, "deploy | training")
        if not (self.nms or self.bundle):
            for key in ("score_threshold", "iou_threshold", "max_detections"):
                if getattr(self, key) is not None:
                    raise EdgekitError(f"--{key.replace('_', '-')} applies with --nms or --bundle (the thresholds "
                                       f"of the graph's or the bundle's NMS); add one of them or remove it")
        require(self.score_threshold is None or 0 <= self.score_threshold <= 1, "score_threshold",
                self.score_threshold, "in [0, 1]")
        require(self.iou_threshold is None or 0 < self.iou_threshold <= 1, "iou_threshold", self.iou_threshold,
                "in (0, 1]")
        require(self.max_detections is None or 1 <= self.max_detections <= 100_000, "max_detections",
                self.max_detections, "an integer in [1, 100000]")
        if self.image_size is not None:
            check_image_size(self.image_size)
        only_for(self, ("calibration", "weight_storage"), "format", QUANTIZED_FORMATS)
        require(self.weight_storage in (None, "packed", "native"), "weight_storage", self.weight_storage,
                "packed | native")
        if self.weight_storage == "packed" and self.format in ("tensorrt", "openvino-int8"):
            reader = "TensorRT's ONNX parser" if self.format == "tensorrt" else "OpenVINO's ONNX frontend"
            raise EdgekitError(f"--weight-storage packed needs BitShift, which {reader} lacks; "
                               f"use --weight-storage native (the default for {self.format})")
        if self.format in OPENVINO_FORMATS:
            for key in ("nms", "bundle", "data"):
                if getattr(self, key):
                    raise EdgekitError(f"{flag(key)} applies to the ONNX formats (it runs ONNX Runtime), not --format "
                                       f"{self.format}; remove it (edgekit bench --backends openvino --data measures "
                                       f"an IR's mAP)")
        if self.sqnr and self.format not in ("onnx-int8", "onnx-mixed"):
            raise EdgekitError("--sqnr debugs quantized exports: use it with --format onnx-int8 or onnx-mixed")
        if self.sqnr and not self.parity:
            raise EdgekitError("--sqnr needs the parity run; remove --no-parity")

    @property
    def nms_options(self) -> dict:
        return {"score_threshold": 0.25 if self.score_threshold is None else self.score_threshold,
                "iou_threshold": 0.6 if self.iou_threshold is None else self.iou_threshold,
                "max_detections": 100 if self.max_detections is None else self.max_detections}

    @property
    def storage(self) -> str:
        return self.weight_storage or ("native" if self.format in ("tensorrt", "openvino-int8") else "packed")


@dataclass
class ExportResult:
    out: Path
    target: Path                     # the deliverable: ONNX file or engine
    files: list = field(default_factory=list)
    parity: dict | None = None       # the parity report (None with parity=False)
    bundle: Path | None = None
    precision: str = "fp32"
    placement: dict | None = None    # quantized ONNX / OpenVINO: what runs in integer (export/placement.py)


def _check_paths(config: ExportConfig) -> None:
    from edgekit.fileio import check_output_dir

    if config.data and not Path(config.data).is_dir():
        raise EdgekitError(f"--data {config.data} is not a folder; give a DOTA split folder (images/ + labelTxt/)")
    check_output_dir(config.out)
    if config.bundle:
        from edgekit.export.bundle import check_destination

        check_destination(config.bundle)


def _load_spec(config: ExportConfig) -> dict | None:
    from edgekit.calibration.spec import load_spec, validate_spec
    from edgekit.export.qdq import spec_precision

    if config.calibration is None:
        return None
    where = config.calibration if isinstance(config.calibration, str) else "--calibration"
    spec = load_spec(config.calibration) if isinstance(config.calibration, str) \
        else validate_spec(config.calibration, "--calibration")
    if not spec["layers"]:
        raise EdgekitError(f"{where} quantizes no layer; an export from it would be a float graph under a "
                           f"quantized name: calibrate again (edgekit calibrate) or export --format onnx")
    if config.format in INT8_FORMATS and spec_precision(spec) != "int8":
        low = sorted({e["weight"]["bits"] for e in spec["layers"].values()})
        raise EdgekitError(f"{where} has layers below int8 (weight bits {low}, or activations under 8 bits); "
                           f"--format {config.format} takes 7- or 8-bit weights and 8-bit activations, use --format "
                           f"onnx-mixed")
    if config.format == "tensorrt":
        narrow = sorted({grid["bits"] for layer in spec["layers"].values()
                         for grid in (layer.get("input"), layer.get("output")) if grid and grid["bits"] < 8})
        if narrow:
            raise EdgekitError(f"{where} has {'/'.join(map(str, narrow))}-bit activations; TensorRT quantizes "
                               f"activations to 8 bits only: use --format onnx-mixed (ONNX Runtime), or re-quantize "
                               f"with 8-bit activations (edgekit quantize --act-bits-mode fixed)")
    return spec


def _check_spec_fits(spec: dict, model, where) -> None:
    """A spec made for another model names layers this one lacks: refuse it by name."""
    modules = dict(model.named_modules())
    foreign = [path for path in spec["layers"] if path not in modules]
    if foreign:
        raise EdgekitError(f"{where} names layers this model lacks (e.g. {', '.join(foreign[:3])}); it was made for "
                           f"another model: calibrate this checkpoint (edgekit calibrate)")


def _model_and_spec(source, config: ExportConfig, spec):
    """(LoadedModel with float weights, the spec or None): a quantized checkpoint (edgekit
    quantize) carries its own spec; ``calibration`` (``spec``) overrides it."""
    from edgekit.engine.checkpoint import LoadedModel, load, read_checkpoint

    if isinstance(source, LoadedModel):
        loaded = source
    elif Path(source).is_file() and "quant_config" in read_checkpoint(source)[3]:
        from edgekit.calibration.quantize import export_view

        model, info, own_spec = export_view(source)
        loaded = LoadedModel(model, info["model"], info["kwargs"], info, Path(source))
        if spec is None:
            if config.format in INT8_FORMATS:
                from edgekit.export.qdq import spec_precision

                if spec_precision(own_spec) != "int8":
                    raise EdgekitError(f"{source} is quantized below int8; use --format onnx-mixed")
            spec = own_spec
    else:
        loaded = load(source)
    if config.format in ("onnx-int8", "onnx-mixed", "openvino-int8") and spec is None:
        raise EdgekitError(f"--format {config.format} needs --calibration SPEC.json (write one with edgekit "
                           f"calibrate) or a quantized checkpoint (edgekit quantize)")
    if spec is not None:
        _check_spec_fits(spec, loaded.model, config.calibration if isinstance(config.calibration, str)
                         else loaded.label)
    return loaded, spec


def _parity_inputs(data, classes, image_size: int):
    """A batch of real letterboxed images when ``data`` is given, else fresh random ones."""
    import torch

    if data:
        from edgekit.data.dataset import DetectionDataset

        dataset = DetectionDataset(Path(data), classes, image_size=image_size)
        return torch.stack([dataset[i][0] for i in range(min(PARITY_BATCH, len(dataset)))])
    return torch.randn(PARITY_BATCH, 3, image_size, image_size)


def _export_graphs(loaded, config: ExportConfig, spec, stage: Path, image_size: int) -> dict:
    """Write the format's files into ``stage``; return {"final": deliverable ONNX, "raw": boxes/scores
    ONNX, "float": the float graph QDQ was made from, "precision": the graph's precision for
    parity, "engine": build info (tensorrt only)}. Only "final" (and the engine) are kept."""
    from edgekit.export.to_onnx import export_onnx

    stem, precision = FORMATS[config.format]
    engine_precision = None
    if config.format == "tensorrt":
        from edgekit.export.tensorrt import tensorrt_version

        # TensorRT 11 takes FP16 only from the graph; 10 builds FP16 from an FP32 graph with its flag.
        engine_precision = "int8" if spec else "fp16"
        onnx_precision = "fp16" if engine_precision == "fp16" and tensorrt_version()[0] >= 11 else "fp32"
        low_bits = spec and any(e["weight"]["bits"] < 8 for e in spec["layers"].values())
        precision = ("mixed" if low_bits else "int8") if spec else onnx_precision
    else:  # OpenVINO stores fp16 weights itself (compress_to_fp16), from the fp32 graph
        onnx_precision = "fp16" if precision == "fp16" and config.format not in OPENVINO_FORMATS else "fp32"
    meta = {"checkpoint": Path(loaded.label).name, "export_format": config.format}
    raw = stage / f"{stem}.raw.onnx"
    float_graph = stage / f"{stem}.float.onnx" if spec is not None else raw
    from edgekit.calibration.fp16_safety import export_pins, pinned_fp32, pins_record

    # Layers whose FP16 run overflows or loses accuracy stay float32: in an FP16 graph itself, and
    # for TensorRT 10's FP16 flag on an FP32 graph as layer precision constraints (build_engine).
    pins = export_pins(loaded.model, image_size, config.data) if "fp16" in (onnx_precision, engine_precision) \
        else None
    if pins is not None:
        meta["fp16_safety"] = {**pins_record(pins), "pinned_in": "graph" if onnx_precision == "fp16"
                               else "tensorrt layer precision constraints"}
    with pinned_fp32(loaded.model, pins.pin_fp32 if pins is not None and onnx_precision == "fp16" else ()):
        export_onnx(loaded.model, float_graph, image_size=image_size, precision=onnx_precision,
                    deform=config.deform, model_name=loaded.name, metadata=meta, form=config.form)
    if spec is not None:
        from edgekit.export.qdq import quantize_onnx

        quantize_onnx(float_graph, spec, raw, model=loaded.model, weight_storage=config.storage)
    final = stage / f"{stem}.onnx"
    if config.nms:
        from edgekit.export.end2end import make_end2end

        make_end2end(raw, final, **config.nms_options)
    else:
        os.replace(raw, final)
        raw = final
    result = {"final": final, "raw": raw, "float": float_graph, "precision": precision}
    if config.format in OPENVINO_FORMATS:  # the IR is the deliverable; the ONNX it came from is an intermediate
        from edgekit.export.openvino import convert

        result["final"] = convert(final, stage / f"{stem}.xml", precision)
    if config.format == "tensorrt":
        from edgekit.export.tensorrt import build_engine

        constrain = pins.pin_fp32 if pins is not None and onnx_precision == "fp32" else ()
        result["engine"] = build_engine(final, stage / f"{stem}.engine", precision=engine_precision,
                                        fp32_layers=constrain)
    return result


def _parity(loaded, graphs: dict, config: ExportConfig, classes, image_size: int, spec, inputs) -> dict:
    from edgekit.export.parity import check_end2end, check_fake_quant, check_parity, map_difference

    precision = graphs["precision"]
    if config.format in OPENVINO_FORMATS:
        from edgekit.export.openvino import check_ir_parity

        return check_ir_parity(loaded.model, graphs["final"], inputs, precision, spec)
    if spec is not None:  # judged against the spec's fake-quant model; the float comparison is information
        report = check_fake_quant(loaded.model, graphs["raw"], inputs, spec, precision, raise_on_failure=False)
    else:
        report = check_parity(loaded.model, graphs["raw"], inputs, precision, raise_on_failure=False)
    report["onnx"] = graphs["final"].name
    if config.nms:
        report["nms"] = check_end2end(graphs["raw"], graphs["final"], inputs)
        report["passed"] = report["passed"] and report["nms"]["passed"]
    if config.data:
        report["map"] = map_difference(loaded.model, graphs["final"], config.data, classes, image_size)
        report["map"]["max_map_drop"] = report["tolerance"]["max_map_drop"]
        report["passed"] = report["passed"] and report["map"]["map_drop"] <= report["tolerance"]["max_map_drop"]
    if "engine" in graphs:
        report["tensorrt"] = "engine built; parity checked on the ONNX graph it was built from (ONNX Runtime CPU)"
    return report


def _placement(config: ExportConfig, graphs: dict, spec) -> dict | None:
    """Where the quantized export runs in integer and where in float (export/placement.py)."""
    if config.format in ONNX_QUANTIZED_FORMATS:
        from edgekit.export.placement import placement_report

        return placement_report(graphs["final"], spec)
    if config.format == "openvino-int8":
        from edgekit.export.placement import openvino_placement_report

        return openvino_placement_report(graphs["final"], graphs["raw"], spec)
    return None


def _bundle_options(config: ExportConfig, classes, image_size: int) -> dict:
    """The bundle runs like the export: same thresholds; tiles overlap by a quarter tile at most."""
    return {"class_names": classes, "image_size": image_size, **config.nms_options,
            "tile_overlap": min(64, image_size // 4), "pre_nms_top_k": 1000}


def export(source, config: ExportConfig | None = None) -> ExportResult:
    """Export a checkpoint (path, or a :class:`~edgekit.engine.checkpoint.LoadedModel`) as
    ``config`` says; raises :class:`ParityError` when the export fails parity (artefacts
    kept in ``config.out``, no bundle)."""
    from edgekit.export.parity import ParityError, layer_sqnr, summary_line
    from edgekit.fileio import move_into, staging_folder, write_json_atomic

    config = config or ExportConfig()
    _check_paths(config)
    spec = _load_spec(config)
    if config.format == "tensorrt":
        from edgekit.export.tensorrt import require_tensorrt

        require_tensorrt()
    if config.format in OPENVINO_FORMATS:
        from edgekit.export.openvino import require_openvino

        require_openvino()
    loaded, spec = _model_and_spec(source, config, spec)
    classes = loaded.detector_classes()
    image_size = config.image_size or loaded.image_size
    check_image_size(image_size)
    if config.bundle:  # the bundle's own checks, before the export rather than after it
        from edgekit.export.bundle import bundle_config

        bundle_config({"fp32": "model.onnx"}, normalisation=None, default_model=None,
                      **_bundle_options(config, classes, image_size))
    out = Path(config.out)
    with staging_folder(out) as stage:
        graphs = _export_graphs(loaded, config, spec, stage, image_size)
        report = None
        if config.parity:
            inputs = _parity_inputs(config.data, classes, image_size)
            report = _parity(loaded, graphs, config, classes, image_size, spec, inputs)
            if config.sqnr:
                write_json_atomic(stage / "sqnr.json", layer_sqnr(loaded.model, graphs["raw"], inputs,
                                                                  float_onnx=graphs["float"]))
            report["format"] = config.format
        placement = _placement(config, graphs, spec)
        if placement is not None:
            write_json_atomic(stage / f"{graphs['final'].stem}.placement.json", placement)
        for key in ("raw", "float"):  # intermediates: parity, SQNR and placement have used them
            if graphs[key] != graphs["final"]:
                graphs[key].unlink(missing_ok=True)
        if report is not None:
            # One parity file per format, so that exports of several formats into one folder keep theirs.
            write_json_atomic(stage / f"{graphs['final'].stem}.parity.json", report)
        moved = move_into(stage, out)
    final = out / graphs["final"].name
    target = out / Path(graphs["engine"]["engine"]).name if "engine" in graphs else final
    result = ExportResult(out, target, moved, report, precision=graphs["precision"], placement=placement)
    if report is not None and not report["passed"]:
        raise ParityError(f"{summary_line(report)} (files kept in {out} for inspection, details in "
                          f"{graphs['final'].stem}.parity.json{'; no bundle written' if config.bundle else ''})",
                          result=result)
    if config.bundle:  # only a validated export is packed for deployment
        from edgekit.export.bundle import write_bundle

        result.bundle = write_bundle(config.bundle, {graphs["precision"]: final}, parity_report=report,
                                     **_bundle_options(config, classes, image_size))
    return result
