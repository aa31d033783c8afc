"""``edgekit profile``, ``quantize`` and ``calibrate``: the quantization stage's commands."""

from __future__ import annotations

from edgekit.cli.options import add_quiet, config_from_args, int_list


def add_commands(sub) -> None:
    from edgekit.calibration.pipeline import CALIBRATION_OBSERVERS, METHODS

    p = sub.add_parser("profile", help="per-layer params, MACs, bits, BOPs and packed size of a model")
    p.add_argument("model", help="checkpoint (.safetensors) or model name (see `edgekit models`)")
    p.add_argument("--image-size", type=int, help="input side (default: the checkpoint's or 256)")
    p.add_argument("--spec", help="quant spec or qconfig JSON (default: the checkpoint's own, else float)")
    p.add_argument("--json", dest="json_out", help="also write the profile as JSON here")
    p.set_defaults(func=_profile)

    q = sub.add_parser("quantize", help="choose per-layer bit widths and build a quantized model")
    q.add_argument("checkpoint", help="float checkpoint (.safetensors) or model name (random weights)")
    q.add_argument("--method", required=True, choices=METHODS)
    q.add_argument("--bit-widths", type=lambda t: int_list(t, "--bit-widths"),
                   help="searched methods: widths the search may use (default 2,3,4,5,6,7,8)")
    q.add_argument("--threshold", type=float, help="ghost: relative weight error to stay under (default 0.01)")
    q.add_argument("--cluster-index", help="cluster: silhouette (default) | davies_bouldin | calinski_harabasz: the "
                                           "validity index that decides each layer's cluster count, hence its bits")
    q.add_argument("--metric", choices=("kmeans", "uniform"),
                   help="searched methods: weight error by k-means (ghost default) or the real uniform quantizer "
                        "(budget default)")
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--budget-bops", type=float, help="budget/sensitivity: total GBOPs")
    budget.add_argument("--budget-mb", type=float, help="budget/sensitivity: model size in MB")
    q.add_argument("--weight-bits", type=int, help="uniform: weight bits (default 8)")
    q.add_argument("--act-bits-mode", choices=("tied", "fixed"),
                   help="tied: an input gets its producing layer's weight bits (GHOST); fixed (default): --act-bits")
    q.add_argument("--act-bits", type=int, help="fixed mode: activation bits (default 8)")
    q.add_argument("--first-last-bits", type=int, help="bits of the first and last layers (default 8; 0: no policy)")
    q.add_argument("--image-size", type=int, help="input side (default: the checkpoint's or 256)")
    q.add_argument("--data", help="DOTA split folder for calibration/sensitivity (default: built-in synthetic)")
    q.add_argument("--calib-batches", type=int)
    q.add_argument("--no-conv-outputs", dest="conv_outputs", action="store_false", default=None,
                   help="leave conv outputs float in quant_spec.json (by default they get 8-bit grids, observed "
                        "through the fake-quantized model, so that ONNX Runtime runs the convs as integer kernels)")
    q.add_argument("--sens-batches", type=int,
                   help="sensitivity: batches for the estimate (default 4; fewer: noisy traces)")
    q.add_argument("--sens-method", choices=("hutchinson", "fisher"), help="sensitivity: default hutchinson")
    q.add_argument("--sens-probes", type=int, help="sensitivity: Hutchinson probes per batch (default 4)")
    q.add_argument("--sens-confidence", type=float,
                   help="sensitivity: traces are used at this many standard errors above their mean (default 2; an "
                        "upper bound, so a layer whose estimate is noise is not taken for insensitive); 0: the mean")
    q.add_argument("--qat-epochs", type=int, help="then train with guided self-distillation for this many epochs")
    q.add_argument("--qat-data", help="QAT: DOTA root holding train/ and val/")
    q.add_argument("--qat-time-limit", type=float, help="QAT: seconds")
    q.add_argument("--out", required=True, help="output folder")
    _add_bound_flags(q)
    add_quiet(q)
    q.set_defaults(func=_quantize)

    c = sub.add_parser("calibrate", help="post-training calibration: observe data, write a quant spec (JSON)")
    c.add_argument("checkpoint", help="model checkpoint written by edgekit train")
    c.add_argument("--data", required=True, help="DOTA split folder (images/ + labelTxt/) to calibrate on, or a root "
                                                 "whose train/ split is used; images are drawn at random (fixed seed)")
    c.add_argument("--batches", type=int, help="number of batches to observe (default 16)")
    c.add_argument("--batch-size", type=int, help="default 8")
    c.add_argument("--observer", help=f"activation range: {' | '.join(CALIBRATION_OBSERVERS)} | auto (each, the best "
                                      f"by validation mAP; needs validation data) (default minmax)")
    c.add_argument("--weight-bits", type=int,
                   help="2-8 (default 8); use 7 for ONNX Runtime on x86 CPUs without VNNI, whose int8 kernels "
                        "can saturate with 8-bit weights")
    c.add_argument("--act-bits", type=int, help="default 8")
    c.add_argument("--per-tensor", dest="per_channel", action="store_false", default=None,
                   help="one weight scale per layer instead of one per output channel")
    c.add_argument("--out", default="quant_spec.json", help="spec file to write (default quant_spec.json)")
    _add_bound_flags(c)
    add_quiet(c)
    c.set_defaults(func=_calibrate)


def _add_bound_flags(parser) -> None:
    from edgekit.calibration.accuracy_bound import COSTS, DEFAULT_CANDIDATES, DEFAULT_IMAGES, MEASURES

    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--max-drop", type=float,
                       help="largest mAP@[.5:.95] drop allowed, in points (x100) on the validation split: layers go "
                            "back to 8 bits, then float, best accuracy per cost first, until it holds (exit 1 if it "
                            "cannot)")
    bound.add_argument("--max-drop-relative", type=float,
                       help="the same as a fraction of the float model's mAP (0.01: 1 %%)")
    parser.add_argument("--max-drop-cost", choices=COSTS,
                        help="the cost a restored layer is charged (default bops; latency: each layer timed alone "
                             "in ONNX Runtime at each width)")
    parser.add_argument("--max-drop-images", type=int,
                        help=f"validation images per evaluation, a fixed seeded subset (default {DEFAULT_IMAGES})")
    parser.add_argument("--max-drop-candidates", type=int,
                        help=f"layers tried per step, those whose weight error drops most per cost (default "
                             f"{DEFAULT_CANDIDATES}; 0: all)")
    parser.add_argument("--max-drop-on", choices=MEASURES,
                        help="what the bound is measured on: fake-quant (default: the spec simulated in torch) or "
                             "onnxruntime (the spec's QDQ graph, as deployed; slower per step)")
    parser.add_argument("--val-data", help="validation split (images/ + labelTxt/) for --max-drop and --observer "
                                           "auto (default: the val/ split beside --data)")


def _deployed_measure(options):
    """ONNX Runtime's measure for ``--max-drop-on onnxruntime`` (export's code: the stages cannot import it)."""
    if options.max_drop_on != "onnxruntime":
        return None
    from edgekit.export.deployed_metric import onnxruntime_measure

    return onnxruntime_measure


def _layer_cost(options):
    """ONNX Runtime's per-layer latency table for ``--max-drop-cost latency`` (export's code, likewise)."""
    if options.max_drop_cost != "latency":
        return None
    from edgekit.export.layer_latency import onnxruntime_latency

    return onnxruntime_latency


def _bound_failed(record, written) -> None:
    """Exit 1 (a check failed on valid input) when the bound could not be met; the files
    of the best assignment found are written."""
    from edgekit.calibration.accuracy_bound import summary_line
    from edgekit.errors import CheckError

    if record is not None and not record["feasible"]:
        raise CheckError(f"{summary_line(record)}; the best model found is written to {written}")


def _profile(args) -> int:
    from edgekit.calibration.pipeline import ProfileConfig, profile
    from edgekit.fileio import check_output_file

    if args.json_out:
        check_output_file(args.json_out, "--json")
    report = profile(args.model, config_from_args(ProfileConfig, args))
    print(report.to_table())
    if args.json_out:
        report.to_json(args.json_out)
    return 0


def _quantize(args) -> int:
    from edgekit.calibration.pipeline import QuantizeRecipe, quantize_checkpoint

    recipe = config_from_args(QuantizeRecipe, args)
    result = quantize_checkpoint(args.checkpoint, recipe, data=args.data, out=args.out,
                                 log=lambda line: print(line, flush=True), deployed_measure=_deployed_measure(recipe),
                                 layer_cost=_layer_cost(recipe))
    t = result.totals
    seconds = result.search.seconds if result.search else 0.0
    print(f"{result.model_name}: {t['bops'] / 1e9:.3f} GBOPs, {t['size_mb']:.4f} MB, search {seconds:.2f} s "
          f"-> {result.out}")
    _bound_failed(result.accuracy, result.out)
    return 0


def _calibrate(args) -> int:
    from edgekit.calibration.pipeline import CalibrateConfig, calibrate_checkpoint

    config = config_from_args(CalibrateConfig, args)
    result = calibrate_checkpoint(args.checkpoint, args.data, config, out=args.out,
                                  log=lambda line: print(line, flush=True), deployed_measure=_deployed_measure(config),
                                  layer_cost=_layer_cost(config))
    print(f"calibrated {len(result.spec['layers'])} layers on {result.images} images ({result.observer}, "
          f"W{config.weight_bits}A{config.act_bits}) -> {result.path}")
    _bound_failed(result.accuracy, result.path)
    return 0
