"""``edgekit pretrain``: FCMAE self-supervised pretraining on unlabeled images or rasters."""

from __future__ import annotations

from edgekit.cli.options import add_config_flags, config_from_args


def add_commands(sub) -> None:
    from edgekit.engine.pretrain_config import PretrainConfig

    p = sub.add_parser("pretrain", help="FCMAE self-supervised pretraining of a ConvNeXt V2 encoder on unlabeled "
                                        "imagery (then: edgekit train --init CKPT)")
    p.add_argument("--data", nargs="+", help="folders of images or rasters (no labels; searched recursively)")
    p.add_argument("--config", help="YAML file of pretraining options (flags override it)")
    add_config_flags(p, PretrainConfig, skip=("data", "extra"))
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> int:
    from edgekit.engine.pretrain import pretrain
    from edgekit.engine.pretrain_config import PretrainConfig

    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    result = pretrain(config_from_args(PretrainConfig, args, yaml_path=args.config, data=data))
    if not result.history:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    last = result.history[-1]
    skipped = sum(result.skipped.values())
    print(f"pretrained on {result.images} images ({skipped} skipped) in {result.seconds:.0f} s, "
          f"loss {last['loss']:.4f} -> {result.checkpoint}"
          + (f"; reconstructions {result.reconstructions}" if result.reconstructions else ""))
    return 0
