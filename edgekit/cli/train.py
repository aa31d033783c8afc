"""``edgekit train``, ``eval`` and ``predict``: flags -> config -> stage function -> print."""

from __future__ import annotations

from edgekit.cli.options import add_quiet, config_from_args


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a detector on a DOTA-format data set")
    p.add_argument("--data", help="DOTA root holding train/ and val/")
    p.add_argument("--config", help="YAML file of training options (flags override it)")
    p.add_argument("--out", help="output folder (default runs/train)")
    p.add_argument("--model", help="model name, e.g. rsdet_atto (see `edgekit models`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--time-limit", type=float, help="seconds; fits the epoch count to it")
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="last.state.pt of an interrupted run")
    p.add_argument("--init", help="start weights: an FCMAE checkpoint (edgekit pretrain's last.safetensors or an "
                                  "official *_fcmae.pt) for the backbone, or a detector checkpoint of the same model "
                                  "(every tensor that fits; class- and box-type-specific layers start fresh)")
    p.add_argument("--no-ema", dest="ema", action="store_false", default=None)
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no flips or 90-degree turns of the training images")
    p.add_argument("--color-jitter", type=float,
                   help="photometric augmentation strength in [0, 1): brightness, contrast and saturation factors "
                        "in [1-s, 1+s], hue turned by up to s x 36 degrees (default 0: none); helps a model "
                        "trained on one site or sensor transfer to another")
    p.add_argument("--no-deformable", dest="deformable", action="store_false", default=None)
    p.add_argument("--obb", action="store_true", default=None,
                   help="oriented boxes: train the angle head on the labels' polygons (rotated boxes out)")
    add_quiet(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="COCO mAP of a checkpoint on a DOTA-format split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="DOTA split folder (images/ + labelTxt/)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", dest="json_out", help="write the metrics as JSON here")
    add_quiet(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="detect objects in images and GeoTIFF scenes (large ones are tiled)")
    p.add_argument("images", nargs="+", help="image files, rasters (GeoTIFF: streamed, GeoJSON out) or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="output folder (default runs/predict)")
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--no-draw", dest="draw", action="store_false", default=None)
    p.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles of a large image (default 64)")
    p.add_argument("--batch-size", type=int, help="tiles per model call (default 8)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="skip images whose out/records/<stem>.json exists (continue a stopped run; under torchrun "
                        "each worker takes every WORLD_SIZE-th image)")
    add_quiet(p)
    p.set_defaults(func=_predict)


def _train(args) -> int:
    from edgekit.engine.config import TrainConfig
    from edgekit.engine.train import train

    result = train(config_from_args(TrainConfig, args, yaml_path=args.config))
    if result.val is None:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    val = result.val
    print(f"{val['boxes']} boxes: mAP@[.5:.95] {val['map']:.4f}  mAP@.5 {val['map50']:.4f} (COCO-style)  "
          f"DOTA mAP@.5 {_format(val['dota_map50'])} (VOC07)  checkpoint {result.checkpoint}")
    return 0


def _format(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _eval(args) -> int:
    from edgekit.engine.evaluate import EvalConfig, evaluate

    metrics = evaluate(args.checkpoint, args.data, config_from_args(EvalConfig, args), out=args.json_out)
    print(metrics.table())
    return 0


def _predict(args) -> int:
    from edgekit.engine.predict import PredictConfig, predict

    result = predict(args.checkpoint, args.images, config_from_args(PredictConfig, args))
    import sys

    if result.submission is None and not result.failed:  # a torchrun worker other than the first: it merges
        return 0
    skipped = f", {result.skipped} done before" if result.skipped else ""
    print(f"{result.detections} detections in {len(result.images)} images{skipped} -> "
          f"{result.out / 'predictions.json'} (DOTA submission files in {result.submission})")
    for note in result.notes:
        print(f"edgekit predict: note: {note}", file=sys.stderr)
    if result.failed:
        for path, reason in result.failed.items():
            print(f"edgekit predict: skipped {path}: {reason}", file=sys.stderr)
        print(f"edgekit predict: error: {len(result.failed)} of {len(result.failed) + len(result.images)} images "
              f"could not be read (listed above); the others' results are in {result.out / 'predictions.json'}",
              file=sys.stderr)
        return 2
    return 0
