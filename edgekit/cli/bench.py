"""``edgekit bench MODEL...`` (latency across backends) and ``edgekit bench SUITE`` (the
committed benchmark suites: model, kernels, kernels-gpu, quantization, qdq, roofline,
overhead)."""

from __future__ import annotations


from edgekit.cli.options import add_config_flags, config_from_args, int_list, name_list

SUITE_PREFIX = "bench "  # `edgekit bench kernels` is routed to the sub-command "bench kernels"


def route(argv: list[str]) -> list[str]:
    """``bench SUITE ...`` -> ``"bench SUITE" ...``: argparse cannot have both optional
    sub-commands and free positionals (model paths) under one verb."""
    from edgekit.benchmarks.suites import SUITES

    for i, token in enumerate(argv):
        if token.startswith("-"):
            continue
        if token == "bench" and i + 1 < len(argv) and argv[i + 1] in SUITES:
            return argv[:i] + [SUITE_PREFIX + argv[i + 1]] + argv[i + 2:]
        return argv
    return argv


def add_commands(sub) -> None:
    from edgekit.benchmarks.backends import BACKENDS  # light: no torch at import
    from edgekit.benchmarks.suites import SUITES

    p = sub.add_parser("bench", help="latency of models across backends (table, JSON, plots); or a suite: "
                                     + ", ".join(SUITES),
                       description="edgekit bench MODEL... times models; edgekit bench SUITE [options] runs one of "
                                   "the benchmark suites: " + "; ".join(f"{k}: {v[2]}" for k, v in SUITES.items()))
    p.add_argument("models", nargs="*", metavar="MODEL_OR_FILE",
                   help="edgekit checkpoint (.safetensors), model name (untrained), .onnx file, OpenVINO IR "
                        ".xml or TensorRT .engine/.plan")
    p.add_argument("--backends", type=name_list,
                   help=f"comma list of {', '.join(BACKENDS)} (default eager,compile,ort; ort-int8/ort-mixed/"
                        f"openvino-int8: edgekit's PTQ-quantized exports of a torch model; ort-static/nncf: ONNX "
                        f"Runtime's quantize_static and NNCF on the same images; unavailable ones are reported as "
                        f"skipped)")
    p.add_argument("--batch-sizes", type=lambda t: int_list(t, "--batch-sizes"), help="comma list, e.g. 1,4")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: library default)")
    p.add_argument("--duration", type=float, help="seconds timed per batch size (default 5)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before timing (default 1)")
    p.add_argument("--image-size", type=int, help="input size (default: the checkpoint's, or 256)")
    p.add_argument("--data", help="DOTA split folder (images/ + labelTxt/) to measure mAP on")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md and bench.png")
    p.add_argument("--interleave", action="store_true", default=None,
                   help="also time the batch-1 rows side by side in rounds: speed ratios against ORT FP32 and "
                        "OpenVINO FP32 that hold under a shared machine's changing load")
    p.add_argument("--no-roofline", dest="roofline", action="store_false", default=None,
                   help="skip the roofline prediction")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print B/A ratios of two results")
    p.set_defaults(func=_bench)
    for name, (config_class, _, text) in SUITES.items():
        s = sub.add_parser(SUITE_PREFIX + name, description=f"edgekit bench {name}: {text}",
                           prog=f"edgekit bench {name}")
        add_config_flags(s, config_class)
        s.set_defaults(func=_suite, suite=name)


def _bench(args) -> int:
    from edgekit.benchmarks import model_bench
    from edgekit.errors import EdgekitError

    if args.compare:
        if args.models:
            raise EdgekitError("--compare takes two result files and no models; run the benchmark and the "
                               "comparison as two commands")
        print(model_bench.compare(*args.compare))
        return 0
    result = model_bench.bench(args.models, config_from_args(model_bench.BenchConfig, args))
    print(model_bench.table(result.record))
    print("wrote " + ", ".join(str(p) for p in result.files))
    if result.failed:
        import sys

        print(f"edgekit bench: error: {len(result.failed)} of {len(result.rows)} rows failed (reasons in the table)",
              file=sys.stderr)
        return 1
    return 0


def _suite(args) -> int:
    from edgekit.benchmarks.suites import SUITES, run_suite

    run_suite(args.suite, config_from_args(SUITES[args.suite][0], args))
    return 0
