"""Accuracy control in the quantize and calibrate stages: ``--max-drop`` wired to
:func:`~edgekit.calibration.accuracy_control.restore_until_bound`.

What a stage hands over is its quant spec, the one file export reads. The model of a bit
assignment is that spec with the changed layers' weight grids redone at their new width
(per channel, abs-max, as PTQ and brevitas start them) and float layers left out,
simulated by :func:`~edgekit.calibration.ptq.apply_fake_quant` on the float model: what
the exported QDQ graph computes, and cheap (no re-calibration per trial; the activation
grids stay as calibrated). The metric is COCO mAP@[.5:.95] in points (x100) on a fixed,
seeded subset of the validation split, so that every trial sees the same images.

A move raises a layer below 8 bits to 8, and an 8-bit layer to float (NNCF's and AIMET's
"revert to higher precision"); with ``candidates`` the loop tries only that many moves per
step, those whose weight-error drop per unit cost is largest (all moves: ``candidates=0``).

``max_drop_on="onnxruntime"`` scores each spec as deployed instead: its QDQ graph run by
ONNX Runtime (:mod:`edgekit.export.deployed_metric`, handed in by the caller as
``deployed_measure``: this package cannot import the export package, which reads its
specs). Slower per trial, but the bound then holds for the file a user ships: the
simulation and the deployed graph differ by tenths of a point on small validation sets.

``max_drop_cost="latency"`` prices moves by each layer's latency measured alone in ONNX
Runtime at each width (:mod:`edgekit.export.layer_latency`, handed in as ``layer_cost``
for the same reason); the seconds per layer and width go into the record.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from edgekit.config import flag, require
from edgekit.errors import EdgekitError

SEED = 0                     # calibration images and the validation subset are drawn with it
FEW_IMAGES = 300             # fewer calibration images than this: a warning (Ultralytics' 8-image pitfall)
COSTS = ("bops", "size", "latency")
MEASURES = ("fake-quant", "onnxruntime")
DEFAULT_IMAGES = 64
DEFAULT_CANDIDATES = 8
METRIC = "mAP@[.5:.95] x100"


@dataclasses.dataclass
class BoundOptions:
    """The ``--max-drop`` options that ``quantize`` and ``calibrate`` share (a mixin of
    their configs). ``max_drop``: absolute mAP@[.5:.95] points; ``max_drop_relative``: a
    fraction of the float model's mAP (0.01 = 1 %)."""

    max_drop: float | None = None
    max_drop_relative: float | None = None
    max_drop_cost: str | None = None         # bops (default) | size | latency (measured in ONNX Runtime)
    max_drop_images: int | None = None       # validation images per evaluation (default 64)
    max_drop_candidates: int | None = None   # moves tried per step (default 8; 0: every move)
    val_data: str | None = None              # validation split (default: the val/ split beside --data)
    max_drop_on: str | None = None           # fake-quant (default: torch simulation) | onnxruntime (deployed)

    @property
    def bounded(self) -> bool:
        return self.max_drop is not None or self.max_drop_relative is not None

    def check_bound(self, validation: bool = False) -> None:
        """The options' own rules; ``validation``: the stage reads validation data anyway
        (``calibrate --observer auto``), so --val-data and --max-drop-images apply."""
        if self.max_drop is not None and self.max_drop_relative is not None:
            raise EdgekitError("give one of --max-drop (mAP points) and --max-drop-relative (a fraction), not both")
        require(self.max_drop is None or self.max_drop >= 0, "max_drop", self.max_drop,
                ">= 0 (mAP@[.5:.95] points the quantized model may lose)")
        require(self.max_drop_relative is None or 0 <= self.max_drop_relative < 1, "max_drop_relative",
                self.max_drop_relative, "in [0, 1) (a fraction of the float model's mAP)")
        if not self.bounded:
            loop_only = ("max_drop_cost", "max_drop_candidates", "max_drop_on")
            for key in loop_only if validation else (*loop_only, "val_data", "max_drop_images"):
                if getattr(self, key) is not None:
                    raise EdgekitError(f"{flag(key)} applies only with --max-drop or --max-drop-relative; remove it")
        require(self.max_drop_cost in (None, *COSTS), "max_drop_cost", self.max_drop_cost, " | ".join(COSTS))
        require(self.max_drop_on in (None, *MEASURES), "max_drop_on", self.max_drop_on, " | ".join(MEASURES))
        require(self.max_drop_images is None or 1 <= self.max_drop_images <= 100_000, "max_drop_images",
                self.max_drop_images, "in [1, 100000]")
        require(self.max_drop_candidates is None or 0 <= self.max_drop_candidates <= 100_000, "max_drop_candidates",
                self.max_drop_candidates, "in [0, 100000] (0: every move)")


# ----------------------------------------------------------------------------- data


def split_folders(data) -> tuple[Path | None, Path | None]:
    """(calibration split, validation split or None) of ``--data``: a DOTA root holding
    train/ gives (train/, val/); a split folder gives itself and the val/ beside it."""
    if data is None:
        return None, None
    data = Path(data)
    if not (data / "images").is_dir() and (data / "train").is_dir():
        val = data / "val"
        return data / "train", val if val.is_dir() else None
    sibling = data.parent / "val"
    return data, sibling if sibling.is_dir() and sibling.resolve() != data.resolve() else None


def resolve_val_split(val_data=None, data=None, qat_data=None) -> Path:
    """The validation split of a bounded run: ``--val-data``, else the val/ split beside
    ``--data``, else ``--qat-data``'s val/; none: one line saying what to pass."""
    if val_data is not None:
        if not Path(val_data).is_dir():
            raise EdgekitError(f"--val-data {val_data} is not a folder; give a DOTA split folder (images/ + labelTxt/)")
        return Path(val_data)
    found = split_folders(data)[1]
    if found is None and qat_data is not None and (Path(qat_data) / "val").is_dir():
        found = Path(qat_data) / "val"
    if found is None:
        raise EdgekitError("--max-drop needs labelled validation data: pass --val-data SPLIT (images/ + labelTxt/), "
                           "or --data ROOT/train with a ROOT/val beside it")
    return found


def validation_batches(split, classes, image_size: int, max_images: int, batch_size: int = 8) -> list:
    """A fixed subset (``max_images``, drawn with :data:`SEED`) of the split as collated
    (images, targets) batches, loaded once; a split without a labelled object of the
    model's classes is refused (its mAP would be a meaningless 0)."""
    import numpy as np

    from edgekit.data.dataset import DetectionDataset, collate_detection

    dataset = DetectionDataset(Path(split), classes, image_size=image_size, preload=False)  # only the subset loads
    if not sum(len(labels) for labels in dataset.labels):
        raise EdgekitError(f"{split}: no labelled object of the model's classes ({', '.join(classes)}) in this "
                           f"validation split; --max-drop needs ground truth (check labelTxt/ and the class names)")
    order = np.random.default_rng(SEED).permutation(len(dataset))[:max_images]
    chosen = sorted(int(i) for i in order)
    return [collate_detection([dataset[i] for i in chosen[j:j + batch_size]])
            for j in range(0, len(chosen), batch_size)]


def map_points(model, batches, classes) -> float:
    """COCO mAP@[.5:.95] x100 of ``model`` on the validation batches."""
    from edgekit.engine.evaluate import evaluate_model

    return 100.0 * evaluate_model(model, batches, list(classes), progress=False)["map"]


def few_images_warning(images: int) -> str | None:
    """The hygiene line for a calibration set of ``images`` images, or None."""
    if images >= FEW_IMAGES:
        return None
    return (f"warning: calibrating on {images} images (fewer than {FEW_IMAGES}); activation ranges from so few "
            f"images are unreliable and can ruin a detector's INT8 accuracy: raise --calib-batches/--batches")


# ----------------------------------------------------------------------------- the loop


def spec_for_bits(spec: dict, model, bits: dict) -> dict:
    """``spec`` with each layer at ``bits[layer]``: a changed width gets a fresh per-channel
    weight grid; :data:`~edgekit.calibration.accuracy_control.FLOAT` drops the layer."""
    from edgekit.calibration.accuracy_control import FLOAT
    from edgekit.calibration.ptq import weight_qparams

    modules = dict(model.named_modules())
    out = copy.deepcopy(spec)
    for path, width in bits.items():
        if width == FLOAT:
            out["layers"].pop(path, None)
        elif width != out["layers"][path]["weight"]["bits"]:
            per_channel = len(set(out["layers"][path]["weight"]["scale"])) > 1
            out["layers"][path]["weight"] = weight_qparams(modules[path].weight.detach(), width, per_channel)
    return out


def _ladders(bits: dict, measured) -> dict:
    """Below 8 bits: to 8, then float; 8 bits: to float. Only layers the forward pass runs
    (the cost of another is unknown, and moving it changes nothing)."""
    from edgekit.calibration.accuracy_control import FLOAT

    return {path: ((8, FLOAT) if b < 8 else (FLOAT,)) for path, b in bits.items() if path in measured}


def config_for_bits(resolved, bits: dict):
    """The resolved QuantConfig of a quantized model with weights at ``bits``: float layers
    skipped and left out of the per-layer activation bits (activations stay as they were)."""
    from edgekit.calibration.accuracy_control import FLOAT, quant_config_for

    config = quant_config_for(bits, resolved)
    if isinstance(config.act_bits, dict):
        config = dataclasses.replace(config, act_bits={p: b for p, b in config.act_bits.items()
                                                       if bits.get(p) != FLOAT})
    return config


def _weight_error_proxy(model, bits: dict):
    """``proxy(layer, from, to)``: the drop in relative weight error (MSE / mean square
    weight, per-channel uniform quantizer) the move buys; float has none."""
    from edgekit.calibration.accuracy_control import FLOAT
    from edgekit.calibration.hq_search import uniform_mse

    modules = dict(model.named_modules())
    cache = {}

    def error(layer, width) -> float:
        if width == FLOAT:
            return 0.0
        if (layer, width) not in cache:
            w = modules[layer].weight.detach()
            cache[layer, width] = uniform_mse(w, width) / max(float(w.pow(2).mean()), 1e-30)
        return cache[layer, width]

    return lambda layer, b_from, b_to: error(layer, b_from) - error(layer, b_to)


def spec_metric(model, batches, classes, measure=None):
    """``spec -> mAP points``: ``measure`` (a deployed measure) or the spec's fake
    quantization of ``model`` in torch."""
    from edgekit.calibration.ptq import apply_fake_quant

    if measure is not None:
        return measure
    return lambda spec: map_points(apply_fake_quant(model, spec), batches, classes)


def measured_by(options: BoundOptions) -> str:
    """What the record says the bound was measured on."""
    return ("ONNX Runtime (the spec's QDQ graph)" if options.max_drop_on == "onnxruntime"
            else "torch fake quantization (apply_fake_quant)")


def bound_spec(model, spec: dict, batches: list, classes, options: BoundOptions, image_size: int,
               log=lambda _: None, baseline: float | None = None, measure=None,
               layer_cost=None) -> tuple[dict, dict]:
    """Run the accuracy-control loop on ``spec`` for the float ``model``; returns (the spec
    of the chosen assignment with the record under ``accuracy_control``, the record).
    ``measure``: ``spec -> mAP points`` (default: :func:`spec_metric`'s fake quantization).
    ``layer_cost``: with the latency cost, ``(model, spec, image_size, ladders, log) ->
    (cost, measurements for the record)``.

    The record: metric, baseline (float) and quantized mAP, the bound, each step (layer,
    bits before/after, mAP and drop after it, cost), the stop reason, feasibility."""
    from edgekit.calibration.accuracy_control import bits_from_spec, bops_cost, restore_until_bound, size_cost
    from edgekit.calibration.profiler import measure_layers

    relative = options.max_drop_relative is not None
    bound = options.max_drop_relative if relative else options.max_drop
    kind = options.max_drop_cost or "bops"
    if layer_cost is not None and kind != "latency":  # checked before any evaluation
        raise EdgekitError("layer_cost applies only with max_drop_cost='latency' (--max-drop-cost); remove it")
    if kind == "latency" and layer_cost is None:
        raise EdgekitError("max_drop_cost='latency' needs layer_cost (edgekit.export.layer_latency)")
    start = bits_from_spec(spec)
    if not start:
        raise EdgekitError("the quant spec has no quantized layer; nothing to bound")
    if baseline is None:
        baseline = map_points(model, batches, classes)
    ladders = _ladders(start, measure_layers(model, image_size))
    table = None
    if kind == "latency":
        cost, table = layer_cost(model, spec, image_size, ladders, log)
    else:
        cost = bops_cost(model, image_size) if kind == "bops" else size_cost(model, image_size)
    count = DEFAULT_CANDIDATES if options.max_drop_candidates is None else options.max_drop_candidates
    trials, score = [], spec_metric(model, batches, classes, measure)

    def evaluate(bits: dict) -> float:
        value = score(spec_for_bits(spec, model, bits))
        trials.append(value)
        return value

    unit = "%" if relative else " points"
    shown = bound * 100 if relative else bound
    log(f"accuracy control: float {METRIC} {baseline:.2f} on {sum(len(t) for _, t in batches)} validation images; "
        f"bound: drop <= {shown:g}{unit}, measured by {measured_by(options)}")
    result = restore_until_bound(start, evaluate, cost, ladders, bound, baseline, relative=relative,
                                 proxy=_weight_error_proxy(model, start) if count else None, top_n=count or None)
    for number, step in enumerate(result.path, 1):
        log(f"  step {number}: {step.layer} {step.bits_from} -> {step.bits_to} bits: {METRIC} {step.metric:.2f} "
            f"(drop {step.drop * 100 if relative else step.drop:.3g}{unit}, tried {step.tried})")
    record = {"metric_name": METRIC, "measured_by": measured_by(options), "cost_unit": kind,
              "validation_images": sum(len(t) for _, t in batches),
              "candidates_per_step": count or "all", **result.to_dict()}
    if table is not None:
        record["latency"] = table  # seconds per layer and width alone in ONNX Runtime, and their spread
    chosen = spec_for_bits(spec, model, result.bits)
    chosen["accuracy_control"] = record
    return chosen, record


def recheck(record: dict, metric: float) -> dict:
    """Add the metric of the model actually written (``final_metric``, ``final_drop``) and
    judge ``feasible`` by it."""
    drop = (record["baseline"] - metric) / record["baseline"] if record["relative"] else record["baseline"] - metric
    record["final_metric"], record["final_drop"] = metric, drop
    if record["feasible"] and drop > record["max_drop"]:
        record["stop"] += "; the rebuilt model misses it"
    record["feasible"] = drop <= record["max_drop"]
    return record


def summary_line(record: dict) -> str:
    """One line: the bound held (or not) and the drop reached."""
    relative = record["relative"]

    def fmt(drop):
        return f"{drop * 100:.3g}% of the float mAP" if relative else f"{drop:.3g} mAP points"

    drop = record.get("final_drop", record["drop"])
    bound = fmt(record["max_drop"])
    if record["feasible"]:
        return (f"accuracy bound met: drop {fmt(drop)} <= {bound} after {record['steps_applied']} "
                f"step(s) ({record['evaluations']} evaluations)")
    return (f"accuracy bound not met: the best drop reached is {fmt(drop)} > {bound} "
            f"({record['stop']}, {record['evaluations']} evaluations)")
