"""``edgekit profile`` and ``edgekit quantize``: the quantization stage's commands.

Only argparse is imported at start-up; torch and brevitas load when a command runs.
``quantize`` writes into ``--out``: ``qconfig.json`` (the resolved per-layer bits),
``quant_spec.json`` (scales for export), ``profile.json``/``profile.txt``,
``search.json`` (method, options, per-layer errors, search time) and
``quantized.safetensors`` (rebuild with ``edgekit.calibration.quantize.load_quantized``);
with ``--qat-epochs`` the quantized model is then trained by ``calibration.qat.qat_train``
(its run folder is ``--out``/qat) and the spec and checkpoint hold the trained scales.
Calibration and sensitivity batches come from ``--data`` (a DOTA split) or, without it,
from the built-in synthetic generator (detectors) or random images (classifiers).
"""

from __future__ import annotations

import time
from pathlib import Path

from edgekit.calibration.spec import check_bits, save_spec
from edgekit.errors import EdgekitError

METHODS = ("ghost", "uniform", "budget", "sensitivity")


def add_subcommands(sub) -> None:
    p = sub.add_parser("profile", help="per-layer params, MACs, bits, BOPs and packed size of a model")
    p.add_argument("model", help="checkpoint (.safetensors) or model name (see `edgekit models`)")
    p.add_argument("--image-size", dest="image_size", type=int, help="input side (default: the checkpoint's or 256)")
    p.add_argument("--bits", help="quant spec or qconfig JSON (default: the checkpoint's own, else float)")
    p.add_argument("--json", dest="json_out", help="also write the profile as JSON here")
    p.set_defaults(func=_cmd_profile)

    q = sub.add_parser("quantize", help="choose per-layer bit widths and build a quantized model")
    q.add_argument("checkpoint", help="float checkpoint (.safetensors) or model name (random weights)")
    q.add_argument("--method", required=True, choices=METHODS)
    q.add_argument("--bits", default="2,3,4,5,6,7,8", help="bit widths the search may use (default 2..8)")
    q.add_argument("--threshold", type=float, default=0.01, help="ghost: relative weight error to stay under")
    q.add_argument("--metric", choices=("kmeans", "uniform"), help="weight error: k-means (ghost default) or the "
                                                                     "real uniform quantizer (budget default)")
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--budget-bops", dest="budget_bops", type=float, help="budget/sensitivity: total GBOPs")
    budget.add_argument("--budget-mb", dest="budget_mb", type=float, help="budget/sensitivity: model size in MB")
    q.add_argument("--weight-bits", dest="weight_bits", type=int, default=8, help="uniform: weight bits")
    q.add_argument("--act-bits", dest="act_bits", type=int, default=8, help="fixed activation bits")
    q.add_argument("--act-bits-mode", dest="act_bits_mode", choices=("tied", "fixed"), default="fixed",
                   help="tied: an input gets its producing layer's weight bits (GHOST); fixed: --act-bits")
    q.add_argument("--first-last-bits", dest="first_last_bits", type=int, default=8,
                   help="bits of the first and last layers (0: no special policy)")
    q.add_argument("--image-size", dest="image_size", type=int, help="input side (default: the checkpoint's or 256)")
    q.add_argument("--data", help="DOTA split folder for calibration/sensitivity (default: built-in synthetic)")
    q.add_argument("--calib-batches", dest="calib_batches", type=int, default=4)
    q.add_argument("--no-conv-outputs", dest="conv_outputs", action="store_false",
                   help="leave conv outputs float in quant_spec.json (by default they get 8-bit grids, observed "
                        "through the fake-quantized model, so that ONNX Runtime runs the convs as integer kernels)")
    q.add_argument("--sens-batches", dest="sens_batches", type=int, default=4,
                   help="batches for the sensitivity estimate (fewer: noisy traces that starve layers of bits)")
    q.add_argument("--sens-method", dest="sens_method", choices=("hutchinson", "fisher"), default="hutchinson")
    q.add_argument("--sens-probes", dest="sens_probes", type=int, default=4,
                   help="Hutchinson probes per batch (2 gradient passes each)")
    q.add_argument("--sens-confidence", dest="sens_confidence", type=float, default=2.0,
                   help="Hutchinson traces are used at this many standard errors above their mean (an upper "
                        "bound: a layer whose estimate is noise is not taken for insensitive); 0: the mean")
    q.add_argument("--qat-epochs", dest="qat_epochs", type=int, default=0,
                   help="then train with guided self-distillation (calibration.qat) for this many epochs")
    q.add_argument("--qat-data", dest="qat_data", help="QAT: DOTA root holding train/ and val/")
    q.add_argument("--qat-time-limit", dest="qat_time_limit", type=float, default=0.0, help="QAT: seconds")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)


def _load_float(arg: str):
    """(model, name, kwargs, info) from a checkpoint path or a registered model name."""
    path = Path(arg)
    if path.is_file():
        from edgekit.engine.checkpoint import read_checkpoint
        from edgekit.models import create_model

        state, name, kwargs, info = read_checkpoint(path)
        model = create_model(name, **kwargs)
        if "quant_config" in info:
            raise EdgekitError(f"{path} is already quantized; pass the float checkpoint it came from")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EdgekitError(f"checkpoint {path} does not match model {name}: {str(exc).splitlines()[0]}") from None
        return model.eval(), name, kwargs, info
    if path.suffix or "/" in arg:
        raise EdgekitError(f"checkpoint {arg} not found; pass an existing file or a model name (edgekit models)")
    from edgekit.models import create_model

    return create_model(arg).eval(), arg, {}, {}


def _image_size(args, info) -> int:
    size = args.image_size or info.get("image_size", 256)
    if size < 32:
        raise EdgekitError(f"--image-size must be >= 32 (ConvNeXt downsamples by 32), got {size}")
    return size


def _cmd_profile(args) -> int:
    from edgekit.calibration.profiler import profile_model

    model, name, _, info = _load_profile_target(args.model)
    bits = args.bits or info.get("quant_config")
    if args.bits and not Path(args.bits).is_file():
        raise EdgekitError(f"--bits {args.bits} not found; pass a quant spec or qconfig JSON written by edgekit")
    report = profile_model(model, _image_size(args, info), bits, model_name=name)
    print(report.to_table())
    if args.json_out:
        report.to_json(args.json_out)
    return 0


def _load_profile_target(arg: str):
    """Like _load_float, but a quantized checkpoint profiles as its float twin + its config."""
    path = Path(arg)
    if path.is_file():
        from edgekit.engine.checkpoint import read_checkpoint
        from edgekit.models import create_model

        _, name, kwargs, info = read_checkpoint(path)
        return create_model(name, **kwargs).eval(), name, kwargs, info  # MACs need shapes, not weights
    return _load_float(arg)


def _parse_bits(text: str) -> tuple:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise EdgekitError(f"--bits must be comma-separated integers such as 2,4,8, got {text!r}") from None
    if not bits:
        raise EdgekitError(f"--bits must name at least one width such as 2,4,8, got {text!r}")
    for b in bits:
        check_bits(b, f"--bits {text!r}")
    return bits


def _cmd_quantize(args) -> int:
    import copy
    import dataclasses

    from edgekit.calibration.quantize import QuantConfig
    from edgekit.fileio import write_json_atomic

    bits = _parse_bits(args.bits)
    if args.method in ("budget", "sensitivity") and args.budget_bops is None and args.budget_mb is None:
        raise EdgekitError(f"--method {args.method} needs --budget-bops G or --budget-mb M")
    if args.method in ("ghost", "uniform") and (args.budget_bops is not None or args.budget_mb is not None):
        raise EdgekitError(f"--method {args.method} takes no budget; use --method budget or sensitivity")
    for name in ("budget_bops", "budget_mb", "threshold"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise EdgekitError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.qat_epochs < 0 or (args.qat_epochs and not args.qat_data):
        raise EdgekitError("--qat-epochs needs a non-negative count and --qat-data (a DOTA root with train/ and val/)")
    if min(args.calib_batches, args.sens_batches, args.sens_probes) < 1:
        raise EdgekitError("--calib-batches, --sens-batches and --sens-probes must be >= 1")
    if not args.sens_confidence >= 0:
        raise EdgekitError(f"--sens-confidence must be >= 0 standard errors, got {args.sens_confidence}")
    first_last = args.first_last_bits or None
    act = "tied" if args.act_bits_mode == "tied" else args.act_bits
    config = QuantConfig(weight_bits=args.weight_bits, act_bits=act, first_layer_bits=first_last,
                         last_layer_bits=first_last)
    model, name, kwargs, info = _load_float(args.checkpoint)
    size = _image_size(args, info)
    out = Path(args.out)  # created only once there is something to write: a failed search leaves nothing
    progress = not args.quiet

    search = None
    if args.method != "uniform":
        from edgekit.calibration.hq_search import config_from_search, search_bits

        sensitivity = None
        if args.method == "sensitivity":
            def sensitivity():
                return _sensitivity(model, info, args, size, progress)
        print(f"bit search ({args.method}) over {len(bits)} widths ...", flush=True)
        search = search_bits(model, args.method, bits, args.threshold, args.metric,
                             budget_bops=None if args.budget_bops is None else args.budget_bops * 1e9,
                             budget_bytes=None if args.budget_mb is None else args.budget_mb * 1e6,
                             act_bits=act, config=config, image_size=size, sensitivity=sensitivity,
                             progress=progress)
        config = config_from_search(search, config)
        extra = f" (plus {search.sensitivity_seconds:.2f} s estimating sensitivities)" \
            if search.sensitivity_seconds else ""
        print(f"bit search took {search.seconds:.2f} s{extra}")
        if search.unused:
            print(f"not searched (the forward pass never calls them; default {config.default_bits} bits): "
                  f"{', '.join(search.unused)}")

    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.quantize import (calibrate_activations, quant_spec_from_model, quantize,
                                              save_quantized)

    start = time.perf_counter()
    float_model = copy.deepcopy(model) if args.qat_epochs else None
    qmodel = quantize(model, config, example_input=_example(model, size))
    resolved = qmodel.quant_config
    calibrate_activations(qmodel, (x for x, _ in _batches(model, info, args, size, args.calib_batches)),
                          progress=progress)
    quant_seconds = time.perf_counter() - start
    qat = None
    if args.qat_epochs:
        from edgekit.calibration.qat import qat_train

        qat = qat_train(float_model, qmodel, args.qat_data, epochs=args.qat_epochs, time_limit=args.qat_time_limit,
                        image_size=size, out=out / "qat", progress=progress)
        qmodel = qat["student"]
        qat = {k: v for k, v in qat.items() if k not in ("student", "switch")}
    source, observer = ("qat", "qat") if qat else (args.method, "percentile")
    spec = quant_spec_from_model(qmodel, name, source=source, observer=observer)
    if args.conv_outputs:  # observed on the float tensors the quantized model now holds (after QAT)
        from edgekit.calibration.ptq import calibrate_conv_outputs
        from edgekit.calibration.quantize import float_view

        view = float_view(qmodel, name, kwargs)
        batches = [x for x, _ in _batches(view, info, args, size, args.calib_batches)]
        spec = calibrate_conv_outputs(view, spec, batches, progress=progress)
    report = profile_model(qmodel, size, model_name=name)

    out.mkdir(parents=True, exist_ok=True)
    resolved.save(out / "qconfig.json")
    save_spec(spec, out / "quant_spec.json")
    report.to_json(out / "profile.json")
    from edgekit.fileio import write_text_atomic
    write_text_atomic(out / "profile.txt", report.to_table() + "\n")
    record = {"method": args.method, "checkpoint": args.checkpoint, "model": name, "image_size": size,
              "config": dataclasses.asdict(config) | {"skip": list(config.skip)}, "bits": list(bits),
              "search": search.to_dict() if search else None, "quantize_seconds": quant_seconds,
              "qat": qat, "totals": report.totals}
    write_json_atomic(out / "search.json", record)
    grids = {path: layer["output"] for path, layer in spec["layers"].items() if layer.get("output")}
    save_quantized(out / "quantized.safetensors", qmodel, name, kwargs,  # export_view puts the grids back
                   {**{k: v for k, v in info.items() if k != "quant_config"}, "image_size": size,
                    "conv_output_grids": grids})
    t = report.totals
    print(f"{name}: {t['bops'] / 1e9:.3f} GBOPs, {t['size_mb']:.4f} MB, "
          f"search {search.seconds if search else 0.0:.2f} s -> {out}")
    return 0


def _example(model, size: int):
    import torch

    from edgekit.calibration.quantize import default_example_input
    return torch.randn_like(default_example_input(model, size))


def _is_detector(model) -> bool:
    return hasattr(model, "loss") and hasattr(model, "class_names")


def _batches(model, info, args, size: int, count: int, batch_size: int = 2):
    """``count`` (images, targets) batches: from --data, synthetic scenes, or random images."""
    import numpy as np
    import torch

    if _is_detector(model) and args.data:
        from edgekit.data.dataset import DetectionDataset, sample_batches
        return sample_batches(DetectionDataset(Path(args.data), model.class_names, image_size=size), count, batch_size)
    if _is_detector(model):
        from edgekit.data.synthetic import synthetic_sample
        from edgekit.data.transforms import normalize, to_tensor

        rng = np.random.default_rng()
        index = {c: i for i, c in enumerate(model.class_names)}
        batches = []
        for _ in range(count):
            images, targets = [], []
            for _ in range(batch_size):
                image, annotation = synthetic_sample(rng, size)
                objs = [o for o in annotation.objects if o.label in index]
                images.append(normalize(to_tensor(image)))
                boxes = torch.tensor([o.box for o in objs], dtype=torch.float32).reshape(-1, 4).clamp(0, size)
                labels = torch.tensor([index[o.label] for o in objs], dtype=torch.long)
                targets.append({"boxes": boxes, "labels": labels})
            batches.append((torch.stack(images), targets))
        return batches
    example = _example(model, size)
    return [(torch.randn(batch_size, *example.shape[1:]), None) for _ in range(count)]


def _sensitivity(model, info, args, size: int, progress: bool) -> dict:
    """Per-layer Hessian trace (or Fisher) on the task loss: the detector's own loss on
    labelled batches; for a classifier, cross-entropy against its own predictions."""
    import torch.nn.functional as F

    from edgekit.calibration.quantize import QuantConfig, quantizable_layers
    from edgekit.calibration.sensitivity import layer_sensitivity

    def loss_fn(m, batch):
        images, targets = batch
        outputs = m(images)
        if _is_detector(m):
            return m.loss(outputs, targets)["loss"]
        return F.cross_entropy(outputs, outputs.detach().argmax(1))

    batches = _batches(model, info, args, size, args.sens_batches)
    sens = layer_sensitivity(model, loss_fn, batches, quantizable_layers(model, QuantConfig()), args.sens_method,
                             probes=args.sens_probes, progress=progress, confidence=args.sens_confidence)
    return sens
