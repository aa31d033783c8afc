"""``edgekit convert``, ``tile`` and ``models``: the data-set commands."""

from __future__ import annotations

import json

from edgekit.cli.options import add_quiet, config_from_args


LAYOUTS = "dota | yolo | yolo-obb | coco | voc"  # edgekit.data.convert.FORMATS, named here to start without torch


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="convert a labelled data set between layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from", dest="src_format", required=True, help=LAYOUTS)
    p.add_argument("--to", dest="dst_format", required=True, help=LAYOUTS)
    p.add_argument("--classes", help="comma-separated class list (default: DOTA v1.0's, or the source's own)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("tile", help="cut a DOTA folder's large images into overlapping tiles (DOTA devkit rule)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--tile-size", type=int)
    p.add_argument("--overlap", type=int)
    p.add_argument("--min-visible", type=float,
                   help="objects less visible than this in a tile are kept but marked difficult (default 0.7)")
    add_quiet(p)
    p.set_defaults(func=_tile)

    p = sub.add_parser("models", help="list the model names create_model knows")
    p.set_defaults(func=_models)


def _convert(args) -> int:
    from edgekit.cli.options import name_list
    from edgekit.data.convert import ConvertConfig, convert

    classes = name_list(args.classes) if args.classes else None
    summary = convert(args.src, args.dst, config_from_args(ConvertConfig, args, classes=classes))
    print(json.dumps(summary))
    return 0


def _tile(args) -> int:
    from edgekit.data.tiling import TileConfig, tile

    print(json.dumps(tile(args.src, args.dst, config_from_args(TileConfig, args))))
    return 0


def _models(args) -> int:
    from edgekit.models import list_models

    print("\n".join(list_models()))
    return 0
