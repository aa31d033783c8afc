"""``edgekit bench``: latency of models across backends, the Ultralytics-style table, JSON and plots.

Registered through ``edgekit.cli.STAGE_COMMAND_MODULES``; torch and the benchmark modules
are imported only when the command runs, so ``edgekit --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError


def add_subcommands(sub) -> None:
    p = sub.add_parser("bench", help="latency benchmark across backends (table, JSON, plots)")
    p.add_argument("models", nargs="*", metavar="MODEL_OR_FILE",
                   help="edgekit checkpoint (.safetensors), model name (untrained), .onnx file or TensorRT "
                        ".engine/.plan")
    from edgekit.benchmarks.backends import BACKENDS  # light: no torch at import

    p.add_argument("--backends", default="eager,compile,ort",
                   help=f"comma list of {', '.join(BACKENDS)} (ort-int8/ort-mixed: PTQ-quantized exports of a "
                        f"torch model; unavailable ones are reported as skipped)")
    p.add_argument("--batch-sizes", dest="batch_sizes", default="1", help="comma list, e.g. 1,4")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: library default)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds timed per batch size (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before timing (default 1)")
    p.add_argument("--image-size", dest="image_size", type=int, help="input size (default: the checkpoint's, or 256)")
    p.add_argument("--data", help="DOTA split folder (images/ + labelTxt/) to measure mAP on")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md and bench.png")
    p.add_argument("--no-roofline", dest="roofline", action="store_false", help="skip the roofline prediction")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print B/A ratios of two results")
    p.set_defaults(func=run)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EdgekitError(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise EdgekitError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def parse_backends(text: str) -> tuple[str, ...]:
    from edgekit.benchmarks.backends import BACKENDS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in BACKENDS]
    if not names or unknown:
        raise EdgekitError(f"--backends: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(BACKENDS)}")
    return names


def run(args) -> int:
    from edgekit.benchmarks import model_bench

    if args.compare:
        if args.models:
            raise EdgekitError("--compare takes two result files and no models; run the benchmark and the "
                               "comparison as two commands")
        print(model_bench.compare(*args.compare))
        return 0
    if not args.models:
        raise EdgekitError("name at least one model: a checkpoint, a model name (see `edgekit models`) or an .onnx file")
    backends = parse_backends(args.backends)
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if args.threads is not None and args.threads < 1:
        raise EdgekitError(f"--threads must be >= 1, got {args.threads}")
    if args.duration <= 0 or args.warmup < 0:
        raise EdgekitError(f"--duration must be > 0 and --warmup >= 0, got {args.duration} and {args.warmup}")
    if args.image_size is not None and args.image_size < 32:
        raise EdgekitError(f"--image-size must be >= 32, got {args.image_size}")
    out = Path(args.out)
    record = model_bench.bench(args.models, backends=backends, batch_sizes=batch_sizes, threads=args.threads,
                               duration=args.duration, warmup=args.warmup, data=Path(args.data) if args.data else None,
                               out=out, image_size=args.image_size, roofline=args.roofline)
    print(model_bench.table(record))
    paths = model_bench.write_outputs(record, out, "bench")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
