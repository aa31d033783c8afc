"""``edgekit calibrate``: post-training calibration of a checkpoint into a quant spec.

Registered through ``edgekit.cli.STAGE_COMMAND_MODULES``; torch is imported only when
the command runs, so ``edgekit --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.calibration.spec import OBSERVERS, check_bits
from edgekit.errors import EdgekitError

# The spec's observer names less "qat" (learned, not observed): the keys of
# observers.OBSERVERS, read from the light spec module so that the CLI starts without numpy.
OBSERVER_CHOICES = tuple(name for name in OBSERVERS if name != "qat")


def add_subcommands(sub) -> None:
    p = sub.add_parser("calibrate", help="post-training calibration: observe data, write a quant spec (JSON)")
    p.add_argument("checkpoint", help="model checkpoint written by edgekit train")
    p.add_argument("--data", required=True, help="DOTA split folder (images/ + labelTxt/) to calibrate on")
    p.add_argument("--batches", type=int, default=16, help="number of batches to observe (default 16)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--observer", default="minmax", help=f"activation range: {' | '.join(OBSERVER_CHOICES)}")
    p.add_argument("--weight-bits", dest="weight_bits", type=int, default=8,
                   help="2-8 (default 8); use 7 for ONNX Runtime on x86 CPUs without VNNI, whose int8 kernels "
                        "can saturate with 8-bit weights")
    p.add_argument("--act-bits", dest="act_bits", type=int, default=8)
    p.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="one weight scale per layer instead of one per output channel")
    p.add_argument("--out", default="quant_spec.json", help="spec file to write (default quant_spec.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    if args.observer not in OBSERVER_CHOICES:
        raise EdgekitError(f"--observer {args.observer!r} is unknown; choose one of {', '.join(OBSERVER_CHOICES)}")
    if args.batches < 1 or args.batch_size < 1:
        raise EdgekitError(f"--batches and --batch-size must be >= 1, got {args.batches} and {args.batch_size}")
    for flag, bits in (("--weight-bits", args.weight_bits), ("--act-bits", args.act_bits)):
        check_bits(bits, flag)
    from itertools import islice

    from torch.utils.data import DataLoader

    from edgekit.calibration.ptq import calibrate
    from edgekit.calibration.spec import save_spec
    from edgekit.cli import detector_classes
    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.engine.checkpoint import load_model

    model, info = load_model(args.checkpoint)
    classes = detector_classes(info, args.checkpoint)
    dataset = DetectionDataset(Path(args.data), classes, image_size=info.get("image_size", 256))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate_detection)
    batches = list(islice((images for images, _ in loader), args.batches))
    spec = calibrate(model, batches, observer=args.observer, weight_bits=args.weight_bits, act_bits=args.act_bits,
                     per_channel=args.per_channel, model_name=info.get("model"), progress=not args.quiet)
    out = save_spec(spec, args.out)
    images = sum(len(b) for b in batches)
    print(f"calibrated {len(spec['layers'])} layers on {images} images ({args.observer}, W{args.weight_bits}"
          f"A{args.act_bits}) -> {out}")
    return 0
