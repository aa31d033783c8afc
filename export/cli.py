"""``edgekit export``: checkpoint -> ONNX (fp32, fp16, int8/mixed QDQ, end-to-end NMS) or a
TensorRT engine, validated right after it is written.

Registered through ``edgekit.cli.STAGE_COMMAND_MODULES``; torch, onnx and the exporters
are imported only when the command runs. Every option is checked before anything heavy
starts; artefacts are built in a hidden staging folder beside ``--out`` and moved in only
when complete, so ``--out`` never holds a half-written file. Parity (see
:mod:`edgekit.export.parity`) runs after every export unless ``--no-parity``; its report
is ``parity.json`` and a failure exits with status 1 (the artefacts stay, for inspection;
no bundle is written). :func:`export_checkpoint` is the same stage as a Python function.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.errors import EdgekitError

FORMATS = {  # format: (file stem, parity precision)
    "onnx": ("model", "fp32"),
    "onnx-fp16": ("model_fp16", "fp16"),
    "onnx-int8": ("model_int8", "int8"),
    "onnx-mixed": ("model_mixed", "mixed"),
    "tensorrt": ("model", None),  # fp16 engine, or int8 from --calibration
}
DEFORM_MODES = ("native", "decompose")
PARITY_BATCH = 2


def add_subcommands(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX / TensorRT and check runtime parity")
    p.add_argument("checkpoint", help="edgekit checkpoint (.safetensors) written by edgekit train")
    p.add_argument("--format", required=True, help=" | ".join(FORMATS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", dest="image_size", help="input size (default: the checkpoint's)")
    p.add_argument("--nms", action="store_true", help="end-to-end graph: output detections [M, 7] after NMS")
    p.add_argument("--score-threshold", dest="score_threshold", default="0.25")
    p.add_argument("--iou-threshold", dest="iou_threshold", default="0.6")
    p.add_argument("--max-detections", dest="max_detections", default="100")
    p.add_argument("--deform", default="native", help="native (ONNX DeformConv) | decompose (standard ops)")
    p.add_argument("--calibration", help="quant spec JSON (edgekit calibrate / quantize) for int8, mixed, tensorrt")
    p.add_argument("--weight-storage", dest="weight_storage", default=None,
                   help="packed (bit planes below 8 bits: the file follows the bits; default) | native (ONNX "
                        "INT4/INT8 only; the default for tensorrt, whose parser has no BitShift)")
    p.add_argument("--data", help="DOTA split folder: also compare torch vs exported mAP on it")
    p.add_argument("--bundle", help="also write a deploy bundle folder here")
    p.add_argument("--no-parity", dest="parity", action="store_false", help="skip the parity check")
    p.add_argument("--sqnr", action="store_true",
                   help="debug quantized exports: per-layer SQNR (dB) against torch, written to sqnr.json")
    p.set_defaults(func=run_export)


def _number(value: str, flag: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise EdgekitError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def check_options(args, quantized_checkpoint: bool = False) -> dict:
    """Every user-facing check that needs no model: one line per problem, before any work.
    A quantized checkpoint (edgekit quantize) carries its own spec; --calibration overrides it."""
    if args.format not in FORMATS:
        raise EdgekitError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.deform not in DEFORM_MODES:
        raise EdgekitError(f"unknown --deform {args.deform!r}; choose one of {', '.join(DEFORM_MODES)}")
    opts = {"score_threshold": _number(args.score_threshold, "--score-threshold"),
            "iou_threshold": _number(args.iou_threshold, "--iou-threshold"),
            "max_detections": _number(args.max_detections, "--max-detections", int),
            "image_size": None if args.image_size is None else _number(args.image_size, "--image-size", int)}
    if not 0 <= opts["score_threshold"] <= 1:
        raise EdgekitError(f"--score-threshold must be in [0, 1], got {opts['score_threshold']}")
    if not 0 < opts["iou_threshold"] <= 1:
        raise EdgekitError(f"--iou-threshold must be in (0, 1], got {opts['iou_threshold']}")
    if opts["max_detections"] < 1:
        raise EdgekitError(f"--max-detections must be >= 1, got {opts['max_detections']}")
    size = opts["image_size"]
    if size is not None and (size < 32 or size % 32):
        raise EdgekitError(f"--image-size must be a positive multiple of 32 (the backbone's stride), got {size}")
    quantized = args.format in ("onnx-int8", "onnx-mixed")
    if quantized and not args.calibration and not quantized_checkpoint:
        raise EdgekitError(f"--format {args.format} needs --calibration SPEC.json (write one with edgekit calibrate) "
                           f"or a quantized checkpoint (edgekit quantize)")
    if args.sqnr and not args.calibration:
        raise EdgekitError("--sqnr debugs quantized exports; give --calibration SPEC.json (onnx-int8, onnx-mixed)")
    if args.calibration and args.format in ("onnx", "onnx-fp16"):
        raise EdgekitError(f"--calibration applies to onnx-int8, onnx-mixed and tensorrt, not --format {args.format}")
    storage = getattr(args, "weight_storage", None)
    if storage not in (None, "packed", "native"):
        raise EdgekitError(f"unknown --weight-storage {storage!r}; choose packed or native")
    if storage is not None and args.format in ("onnx", "onnx-fp16"):
        raise EdgekitError(f"--weight-storage applies to onnx-int8, onnx-mixed and tensorrt, not --format {args.format}")
    if storage == "packed" and args.format == "tensorrt":
        raise EdgekitError("--weight-storage packed needs BitShift, which TensorRT's ONNX parser lacks; "
                           "use --weight-storage native (the default for tensorrt)")
    opts["weight_storage"] = storage or ("native" if args.format == "tensorrt" else "packed")
    if args.data and not Path(args.data).is_dir():
        raise EdgekitError(f"--data {args.data} is not a folder; give a DOTA split folder (images/ + labelTxt/)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"--out {out} exists and is not a folder; choose a folder path")
    if args.bundle:
        from edgekit.export.bundle import check_destination

        check_destination(args.bundle)
    opts["spec"] = _load_spec(args) if args.calibration else None
    if args.format == "tensorrt" and opts["spec"]:
        narrow = sorted({grid["bits"] for layer in opts["spec"]["layers"].values()
                         for grid in (layer.get("input"), layer.get("output")) if grid and grid["bits"] < 8})
        if narrow:
            raise EdgekitError(f"{args.calibration} has {'/'.join(map(str, narrow))}-bit activations; TensorRT "
                               f"quantizes activations to 8 bits only: use --format onnx-mixed (ONNX Runtime), or "
                               f"re-quantize with 8-bit activations (edgekit quantize --act-bits-mode fixed)")
    if args.format == "tensorrt":
        from edgekit.export.tensorrt import require_tensorrt

        require_tensorrt()
    return opts


def _load_spec(args) -> dict:
    from edgekit.calibration.spec import load_spec
    from edgekit.export.qdq import spec_precision

    spec = load_spec(args.calibration)
    if args.format == "onnx-int8" and spec_precision(spec) != "int8":
        low = sorted({e["weight"]["bits"] for e in spec["layers"].values()})
        raise EdgekitError(f"{args.calibration} has layers below int8 (weight bits {low}, or activations under 8 "
                           f"bits); --format onnx-int8 takes 7- or 8-bit weights and 8-bit activations, "
                           f"use --format onnx-mixed")
    return spec


def _parity_inputs(data, classes, image_size: int):
    """A batch of real letterboxed images when --data is given, else fresh random ones."""
    import torch

    if data:
        from edgekit.data.dataset import DetectionDataset

        dataset = DetectionDataset(Path(data), classes, image_size=image_size)
        return torch.stack([dataset[i][0] for i in range(min(PARITY_BATCH, len(dataset)))])
    return torch.randn(PARITY_BATCH, 3, image_size, image_size)


def _export_graphs(model, info, args, opts, stage: Path, image_size: int) -> dict:
    """Write the format's files into ``stage``; return {"final": deliverable ONNX, "raw": boxes/scores
    ONNX, "float": the float graph QDQ was made from, "precision": the graph's precision for
    parity, "engine": build info (tensorrt only)}. Only "final" (and the engine) are kept."""
    from edgekit.export.to_onnx import export_onnx

    stem, precision = FORMATS[args.format]  # the graph's precision, as parity judges it
    engine_precision = None
    if args.format == "tensorrt":
        from edgekit.export.tensorrt import tensorrt_version

        # TensorRT 11 takes FP16 only from the graph; 10 builds FP16 from an FP32 graph with its flag.
        engine_precision = "int8" if opts["spec"] else "fp16"
        onnx_precision = "fp16" if engine_precision == "fp16" and tensorrt_version()[0] >= 11 else "fp32"
        low_bits = opts["spec"] and any(e["weight"]["bits"] < 8 for e in opts["spec"]["layers"].values())
        precision = ("mixed" if low_bits else "int8") if opts["spec"] else onnx_precision
    else:
        onnx_precision = "fp16" if precision == "fp16" else "fp32"
    meta = {"checkpoint": Path(args.checkpoint).name, "export_format": args.format}
    raw = stage / f"{stem}.raw.onnx"
    float_graph = stage / f"{stem}.float.onnx" if opts["spec"] is not None else raw
    export_onnx(model, float_graph, image_size=image_size, precision=onnx_precision, deform=args.deform,
                model_name=info.get("model"), metadata=meta)
    if opts["spec"] is not None:
        from edgekit.export.qdq import quantize_onnx

        quantize_onnx(float_graph, opts["spec"], raw, model=model, weight_storage=opts["weight_storage"])
    final = stage / f"{stem}.onnx"
    if args.nms:
        from edgekit.export.end2end import make_end2end

        make_end2end(raw, final, score_threshold=opts["score_threshold"], iou_threshold=opts["iou_threshold"],
                     max_detections=opts["max_detections"])
    else:
        os.replace(raw, final)
        raw = final
    result = {"final": final, "raw": raw, "float": float_graph, "precision": precision}
    if args.format == "tensorrt":
        from edgekit.export.tensorrt import build_engine

        result["engine"] = build_engine(final, stage / f"{stem}.engine", precision=engine_precision)
    return result


def _parity(model, graphs: dict, args, classes, image_size: int, spec: dict | None = None) -> dict:
    from edgekit.export.parity import check_end2end, check_fake_quant, check_parity, map_difference

    precision = graphs["precision"]
    inputs = _parity_inputs(args.data, classes, image_size)
    if spec is not None:  # judged against the spec's fake-quant model; the float comparison is information
        report = check_fake_quant(model, graphs["raw"], inputs, spec, precision, raise_on_failure=False)
    else:
        report = check_parity(model, graphs["raw"], inputs, precision, raise_on_failure=False)
    report["onnx"] = graphs["final"].name
    if args.nms:
        report["nms"] = check_end2end(graphs["raw"], graphs["final"], inputs)
        report["passed"] = report["passed"] and report["nms"]["passed"]
    if args.data:
        report["map"] = map_difference(model, graphs["final"], args.data, classes, image_size)
        report["map"]["max_map_drop"] = report["tolerance"]["max_map_drop"]
        report["passed"] = report["passed"] and report["map"]["map_drop"] <= report["tolerance"]["max_map_drop"]
    if "engine" in graphs:
        report["tensorrt"] = "engine built; parity checked on the ONNX graph it was built from (ONNX Runtime CPU)"
    return report


def _bundle_options(opts: dict, classes, image_size: int) -> dict:
    """The bundle runs like the export: same thresholds; tiles overlap by a quarter tile at most."""
    return {"class_names": classes, "image_size": image_size, "score_threshold": opts["score_threshold"],
            "iou_threshold": opts["iou_threshold"], "max_detections": opts["max_detections"],
            "tile_overlap": min(64, image_size // 4), "pre_nms_top_k": 1000}


def _move_into(stage: Path, out: Path) -> list[Path]:
    """Move every finished file from the staging folder into ``out`` (one rename each)."""
    out.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in sorted(stage.iterdir()):
        os.replace(path, out / path.name)
        moved.append(out / path.name)
    return moved


def export_checkpoint(checkpoint, out, *, format: str = "onnx", image_size: int | None = None, nms: bool = False,
                      score_threshold: float = 0.25, iou_threshold: float = 0.6, max_detections: int = 100,
                      deform: str = "native", calibration=None, data=None, bundle=None, parity: bool = True,
                      sqnr: bool = False) -> dict:
    """The Python API of ``edgekit export`` (same options, same checks, same files).

    Returns {"out", "files", "target" (the deliverable: ONNX file or engine), "parity"
    (the report, None with ``parity=False``), "bundle"}; raises :class:`ParityError`
    (artefacts kept, no bundle) when the export fails parity.
    """
    import argparse

    from edgekit.export.parity import ParityError

    def text(value):
        return None if value is None else str(value)

    args = argparse.Namespace(
        checkpoint=str(checkpoint), out=str(out), format=format, image_size=text(image_size), nms=nms,
        score_threshold=text(score_threshold), iou_threshold=text(iou_threshold), max_detections=text(max_detections),
        deform=deform, calibration=text(calibration), data=text(data), bundle=text(bundle), parity=parity, sqnr=sqnr)
    result = _export(args)
    if result["parity"] is not None and not result["parity"]["passed"]:
        raise ParityError(_failure_line(result, args))
    return result


def _failure_line(result: dict, args) -> str:
    from edgekit.export.parity import summary_line

    return (f"{summary_line(result['parity'])} (files kept in {result['out']} for inspection, details in "
            f"parity.json{'; no bundle written' if args.bundle else ''})")


def run_export(args) -> int:
    from edgekit.export.parity import ParityError, summary_line

    result = _export(args)
    target, report = result["target"], result["parity"]
    print(f"exported {args.format} -> {target} ({target.stat().st_size / 1e6:.1f} MB, {len(result['files'])} files)")
    if report is not None and not report["passed"]:
        raise ParityError(_failure_line(result, args))
    print(summary_line(report) if report is not None else "parity: skipped (--no-parity)")
    if result["bundle"]:
        print(f"bundle -> {result['bundle']}")
    return 0


def _export(args) -> dict:
    """Checks, export into a staging folder, parity, move into --out, bundle if parity passed."""
    import shutil

    from edgekit.cli import detector_classes
    from edgekit.engine.checkpoint import load_model, read_checkpoint
    from edgekit.fileio import write_json_atomic

    try:
        quantized_checkpoint = "quant_config" in read_checkpoint(args.checkpoint)[3]
    except EdgekitError:  # missing or corrupt: reported after the option checks, by load_model
        quantized_checkpoint = False
    opts = check_options(args, quantized_checkpoint)
    if quantized_checkpoint:
        from edgekit.calibration.quantize import export_view

        model, info, own_spec = export_view(args.checkpoint)
        if opts["spec"] is None:
            if args.format == "onnx-int8":
                from edgekit.export.qdq import spec_precision

                if spec_precision(own_spec) != "int8":
                    raise EdgekitError(f"{args.checkpoint} is quantized below int8; use --format onnx-mixed")
            opts["spec"] = own_spec
    else:
        model, info = load_model(args.checkpoint)
    classes = detector_classes(info, args.checkpoint)
    image_size = opts["image_size"] or int(info.get("image_size", 256))
    if image_size < 32 or image_size % 32:
        raise EdgekitError(f"{args.checkpoint} was trained at {image_size} px, not a multiple of 32; "
                           f"pass --image-size")
    if args.bundle:  # the bundle's own checks, before the export rather than after it
        from edgekit.export.bundle import bundle_config

        bundle_config({"fp32": "model.onnx"}, normalisation=None, default_model=None,
                      **_bundle_options(opts, classes, image_size))
    out = Path(args.out)
    stage = out.parent / f".{out.name}.partial{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        graphs = _export_graphs(model, info, args, opts, stage, image_size)
        report = _parity(model, graphs, args, classes, image_size, opts["spec"]) if args.parity else None
        if args.sqnr:
            from edgekit.export.parity import layer_sqnr

            write_json_atomic(stage / "sqnr.json", layer_sqnr(model, graphs["raw"], _parity_inputs(
                args.data, classes, image_size), float_onnx=graphs["float"]))
        for key in ("raw", "float"):  # intermediates: parity and SQNR have used them
            if graphs[key] != graphs["final"]:
                graphs[key].unlink(missing_ok=True)
        if report is not None:
            write_json_atomic(stage / "parity.json", report)
        moved = _move_into(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    final = out / graphs["final"].name
    target = out / Path(graphs["engine"]["engine"]).name if "engine" in graphs else final
    bundle = None
    if args.bundle and (report is None or report["passed"]):  # only a validated export is packed for deployment
        from edgekit.export.bundle import write_bundle

        bundle = write_bundle(args.bundle, {graphs["precision"]: final}, parity_report=report,
                              **_bundle_options(opts, classes, image_size))
    return {"out": out, "files": moved, "target": target, "parity": report, "bundle": bundle}
