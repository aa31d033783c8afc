"""``edgekit demo``: every stage on the built-in synthetic data, with a report."""

from __future__ import annotations

from edgekit.cli.options import add_quiet, config_from_args


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run every stage on the built-in synthetic data and write a report")
    p.add_argument("--out", help="output folder (default demo_out)")
    p.add_argument("--time-limit", type=float, help="training budget in seconds (default 330)")
    p.add_argument("--quick", action="store_true", default=None, help="a tiny run that checks the plumbing in ~1 minute")
    p.add_argument("--hbb", action="store_true", default=None,
                   help="horizontal boxes (default: oriented boxes, scored by the DOTA devkit's Task 1 mAP)")
    add_quiet(p)
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from pathlib import Path

    from edgekit.demo import DemoConfig, run_demo

    config = config_from_args(DemoConfig, args)
    report = run_demo(config)
    val = report["val"]
    dota = "n/a" if val["dota_map50"] is None else f"{val['dota_map50']:.3f}"
    print(f"demo ({val['boxes']} boxes): DOTA mAP@.5 {dota}, mAP@.5 {val['map50']:.3f}, mAP@[.5:.95] "
          f"{val['map']:.3f} in {report['total_seconds']:.0f} s -> {Path(config.out) / 'report.md'}")
    return 0
