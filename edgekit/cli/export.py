"""``edgekit export``: checkpoint -> ONNX / TensorRT / OpenVINO IR, validated right after it is written."""

from __future__ import annotations

from edgekit.cli.options import config_from_args


def add_commands(sub) -> None:
    from edgekit.export.pipeline import DEFORM_MODES, FORMATS

    p = sub.add_parser("export", help="export a checkpoint to ONNX / TensorRT / OpenVINO IR and check runtime parity")
    p.add_argument("checkpoint", help="edgekit checkpoint (.safetensors) written by edgekit train or quantize")
    p.add_argument("--format", required=True, help=" | ".join(FORMATS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument("--nms", action="store_true", default=None,
                   help="end-to-end graph: output detections [M, 7] after NMS")
    p.add_argument("--score-threshold", type=float, help="--nms / --bundle: default 0.25")
    p.add_argument("--iou-threshold", type=float, help="--nms / --bundle: default 0.6")
    p.add_argument("--max-detections", type=int, help="--nms / --bundle: default 100")
    p.add_argument("--deform", help=" | ".join(DEFORM_MODES) + " (default native: ONNX DeformConv)")
    p.add_argument("--form", help="deploy (default: channels-first ConvNeXt blocks, Gelu, fused GRN; parity-checked "
                                  "against the model) | training (the graph as the model is written)")
    p.add_argument("--calibration", help="quant spec JSON (edgekit calibrate / quantize) for onnx-int8, onnx-mixed, "
                                         "tensorrt, openvino-int8")
    p.add_argument("--weight-storage",
                   help="packed (bit planes below 8 bits: the file follows the bits; default) | native (ONNX "
                        "INT4/INT8 only; the default for tensorrt, whose parser has no BitShift; ONNX Runtime "
                        "runs INT4 as DequantizeLinear + float Conv, slower than packed on CPU)")
    p.add_argument("--data", help="DOTA split folder: also compare torch vs exported mAP on it")
    p.add_argument("--bundle", help="also write a deploy bundle folder here")
    p.add_argument("--no-parity", dest="parity", action="store_false", default=None, help="skip the parity check")
    p.add_argument("--sqnr", action="store_true", default=None,
                   help="debug quantized exports: per-layer SQNR (dB) against torch, written to sqnr.json")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from edgekit.export.parity import summary_line
    from edgekit.export.pipeline import ExportConfig, export

    config = config_from_args(ExportConfig, args)
    result = export(args.checkpoint, config)
    weights = result.target.with_suffix(".bin")  # an OpenVINO IR keeps its weights beside the .xml
    size = result.target.stat().st_size + (weights.stat().st_size if result.target.suffix == ".xml" else 0)
    print(f"exported {config.format} -> {result.target} ({size / 1e6:.1f} MB, {len(result.files)} files)")
    print(summary_line(result.parity) if result.parity is not None else "parity: skipped (--no-parity)")
    if result.placement is not None:
        from edgekit.export.placement import summary_line as placement_line

        print(f"{placement_line(result.placement)} (details in {result.target.stem}.placement.json)")
    if result.bundle:
        print(f"bundle -> {result.bundle}")
    return 0
