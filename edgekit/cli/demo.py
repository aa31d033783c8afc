"""``edgekit demo``: every stage on the built-in synthetic data, with a report."""

from __future__ import annotations

from edgekit.cli.options import add_quiet, config_from_args


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run every stage on the built-in synthetic data and write a report")
    p.add_argument("--out", help="output folder (default demo_out)")
    p.add_argument("--time-limit", type=float, help="training budget in seconds (default 330)")
    p.add_argument("--quick", action="store_true", default=None, help="a tiny run that checks the plumbing in ~1 minute")
    add_quiet(p)
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from pathlib import Path

    from edgekit.demo import DemoConfig, run_demo

    config = config_from_args(DemoConfig, args)
    report = run_demo(config)
    print(f"demo: mAP@.5 {report['val']['map50']:.3f}, mAP@[.5:.95] {report['val']['map']:.3f} in "
          f"{report['total_seconds']:.0f} s -> {Path(config.out) / 'report.md'}")
    return 0
