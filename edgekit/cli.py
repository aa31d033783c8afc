"""The ``edgekit`` command: one sub-command per pipeline stage.

User errors (:class:`EdgekitError`) print one line on stderr and exit with status 2;
nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgekit.errors import EdgekitError


def _add_train(sub):
    p = sub.add_parser("train", help="train a detector on a DOTA-format data set")
    p.add_argument("--data", help="DOTA root holding train/ and val/")
    p.add_argument("--config", help="YAML file of training options (flags override it)")
    p.add_argument("--out", help="output folder (default runs/train)")
    p.add_argument("--model", help="model name, e.g. rsdet_atto (see `edgekit models`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--time-limit", dest="time_limit", type=float, help="seconds; fits the epoch count to it")
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="last.state.pt of an interrupted run")
    p.add_argument("--no-ema", dest="ema", action="store_false", default=None)
    p.add_argument("--no-deformable", dest="deformable", action="store_false", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from edgekit.engine.config import make_config
    from edgekit.engine.train import train

    keys = ("data", "out", "model", "epochs", "batch_size", "lr", "image_size", "time_limit", "workers", "seed",
            "resume", "ema", "deformable")
    overrides = {k: getattr(args, k) for k in keys}
    if args.quiet:
        overrides["progress"] = False
    result = train(make_config(overrides, args.config))
    val = result.get("val")
    if val is None:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    print(f"mAP@[.5:.95] {val['map']:.4f}  mAP@.5 {val['map50']:.4f}  checkpoint {result['checkpoint']}")
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint on a DOTA-format split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="DOTA split folder (images/ + labelTxt/)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.engine.checkpoint import load_model
    from edgekit.engine.evaluate import evaluate
    from edgekit.fileio import write_json_atomic

    if args.batch_size < 1:
        raise EdgekitError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, info = load_model(args.checkpoint)
    classes = detector_classes(info, args.checkpoint)
    dataset = DetectionDataset(Path(args.data), classes, image_size=info.get("image_size", 256))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_detection)
    metrics = evaluate(model, loader, classes, progress=not args.quiet)
    print(format_metrics(metrics))
    if args.out:
        write_json_atomic(args.out, metrics)
    return 0


def detector_classes(info: dict, path) -> list[str]:
    classes = info.get("kwargs", {}).get("class_names")
    if not classes:
        raise EdgekitError(f"{path} is a {info.get('model')} checkpoint with no class names; eval and predict "
                           f"need a detector checkpoint written by `edgekit train`")
    return classes


def format_metrics(metrics: dict) -> str:
    lines = [f"mAP@[.5:.95] {metrics['map']:.4f}  mAP@.5 {metrics['map50']:.4f}  ({metrics['num_images']} images)"]
    lines += [f"  {name:<20} AP {_fmt(m['ap'])}  AP50 {_fmt(m['ap50'])}" for name, m in metrics["per_class"].items()]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


def _add_predict(sub):
    p = sub.add_parser("predict", help="detect objects in images (large ones are tiled)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--score-threshold", dest="score_threshold", type=float, default=0.25)
    p.add_argument("--no-draw", dest="draw", action="store_false")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from edgekit.engine.checkpoint import load_model
    from edgekit.engine.predict import predict_files

    if not 0 <= args.score_threshold <= 1:
        raise EdgekitError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    model, info = load_model(args.checkpoint)
    results = predict_files(model, detector_classes(info, args.checkpoint), [Path(p) for p in args.images], Path(args.out),
                            info.get("image_size", 256), args.score_threshold, args.draw, not args.quiet)
    total = sum(len(r["detections"]) for r in results.values())
    print(f"{total} detections in {len(results)} images -> {Path(args.out) / 'predictions.json'}")
    return 0


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a data set between DOTA, YOLO and COCO layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from", dest="src_format", required=True, help="dota | yolo | coco")
    p.add_argument("--to", dest="dst_format", required=True, help="dota | yolo | coco")
    p.add_argument("--classes", help="comma-separated class list (default: DOTA v1.0's, or the source's own)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from edgekit.data.convert import convert_dataset

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    summary = convert_dataset(Path(args.src), Path(args.dst), args.src_format, args.dst_format, classes)
    print(json.dumps(summary) if summary is not None else f"wrote {args.dst}")
    return 0


def _add_tile(sub):
    p = sub.add_parser("tile", help="cut a DOTA folder's large images into overlapping tiles (DOTA devkit rule)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--tile-size", dest="tile_size", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=200)
    p.add_argument("--min-visible", dest="min_visible", type=float, default=0.7,
                   help="objects less visible than this in a tile are kept but marked difficult")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_tile)


def _cmd_tile(args) -> int:
    from edgekit.data.tiling import tile_dataset

    if args.tile_size < 32 or not 0 <= args.overlap < args.tile_size:
        raise EdgekitError(f"need --tile-size >= 32 and 0 <= --overlap < --tile-size, got {args.tile_size}/{args.overlap}")
    summary = tile_dataset(Path(args.src), Path(args.dst), args.tile_size, args.overlap, args.min_visible,
                           progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def _add_models(sub):
    p = sub.add_parser("models", help="list the model names create_model knows")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from edgekit.models import list_models

    print("\n".join(list_models()))
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="run every stage on the built-in synthetic data and write a report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--time-limit", dest="time_limit", type=float, default=330.0,
                   help="training budget in seconds (default 330)")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the plumbing in ~1 minute")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from edgekit.demo import run_demo

    report = run_demo(Path(args.out), time_limit=args.time_limit, quick=args.quick, progress=not args.quiet)
    print(f"demo: mAP@.5 {report['val']['map50']:.3f}, mAP@[.5:.95] {report['val']['map']:.3f} in "
          f"{report['total_seconds']:.0f} s -> {Path(args.out) / 'report.md'}")
    return 0


# Stages that live in their own package register their sub-commands through a module with
# ``add_subcommands(sub)``, so this file does not grow with every stage.
STAGE_COMMAND_MODULES: tuple[str, ...] = ("edgekit.calibration.ptq_cli", "edgekit.export.cli", "edgekit.calibration.cli", "edgekit.benchmarks.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="edgekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_eval, _add_predict, _add_convert, _add_tile, _add_models):
        add(sub)
    for module in STAGE_COMMAND_MODULES:
        importlib.import_module(module).add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgekitError as exc:
        print(f"edgekit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edgekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
