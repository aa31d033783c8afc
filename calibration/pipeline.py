"""The quantization stages as functions: ``quantize_checkpoint``, ``calibrate_checkpoint``
and ``profile``, each with one config object.

``quantize_model`` is the one recipe (bit search -> brevitas quantization -> activation
calibration -> optional QAT -> quant spec -> profile) that ``edgekit quantize``, the demo
and the quantization evidence all run. ``quantize_checkpoint`` adds what a user's run
needs around it: the checkpoint, the calibration data and the files written into ``out``:
``qconfig.json`` (the resolved per-layer bits), ``quant_spec.json`` (scales for export),
``profile.json``/``profile.txt``, ``search.json`` (method, options, per-layer errors, search
time) and ``quantized.safetensors``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgekit.calibration.accuracy_bound import SEED, BoundOptions
from edgekit.calibration.spec import MAX_BITS, MIN_BITS, OBSERVERS
from edgekit.config import StageConfig, check_image_size, flag, only_for, require
from edgekit.errors import EdgekitError

METHODS = ("ghost", "cluster", "uniform", "budget", "sensitivity")
CLUSTER_INDICES = ("silhouette", "davies_bouldin", "calinski_harabasz")
SEARCH_WIDTHS = (2, 3, 4, 5, 6, 7, 8)
CALIBRATION_OBSERVERS = tuple(name for name in OBSERVERS if name != "qat")  # "qat" is learned, not observed


def _check_widths(values, key: str) -> None:
    require(bool(values) and all(MIN_BITS <= b <= MAX_BITS for b in values), key, values,
            f"bit widths in [{MIN_BITS}, {MAX_BITS}]")


@dataclass
class QuantizeRecipe(StageConfig, BoundOptions):
    """How ``quantize`` chooses bits and builds the quantized model. Options of one method
    are None unless set; setting one for another method is an error. The ``max_drop``
    options (:class:`~edgekit.calibration.accuracy_bound.BoundOptions`) bound the mAP drop."""

    method: str = "ghost"
    bit_widths: list[int] | None = None      # searched methods: widths the search may use (default 2..8)
    threshold: float | None = None           # ghost: relative weight error to stay under (default 0.01)
    cluster_index: str | None = None         # cluster: the validity index (default silhouette)
    metric: str | None = None                # searched methods: kmeans | uniform weight error
    budget_bops: float | None = None         # budget/sensitivity: total GBOPs
    budget_mb: float | None = None           # budget/sensitivity: model size in MB
    weight_bits: int | None = None           # uniform: weight bits (default 8)
    act_bits_mode: str = "fixed"             # fixed: act_bits for every input; tied: the producer's weight bits
    act_bits: int | None = None              # fixed mode: activation bits (default 8)
    first_last_bits: int = 8                 # first and last layers (0: no special policy)
    image_size: int | None = None            # default: the checkpoint's, else 256
    calib_batches: int = 4
    conv_outputs: bool = True
    sens_batches: int | None = None          # sensitivity: batches (default 4)
    sens_method: str | None = None           # sensitivity: hutchinson | fisher
    sens_probes: int | None = None           # sensitivity: Hutchinson probes per batch (default 4)
    sens_confidence: float | None = None     # sensitivity: standard errors above the mean (default 2)
    qat_epochs: int = 0
    qat_data: str | None = None              # QAT: DOTA root with train/ and val/
    qat_time_limit: float | None = None      # QAT: seconds
    progress: bool = True

    def check(self) -> None:
        require(self.method in METHODS, "method", self.method, " | ".join(METHODS))
        only_for(self, ("threshold",), "method", ("ghost",))
        only_for(self, ("cluster_index",), "method", ("cluster",))
        only_for(self, ("bit_widths",), "method", ("ghost", "cluster", "budget", "sensitivity"))
        only_for(self, ("metric",), "method", ("ghost", "budget", "sensitivity"))
        require(self.cluster_index in (None, *CLUSTER_INDICES), "cluster_index", self.cluster_index,
                " | ".join(CLUSTER_INDICES))
        only_for(self, ("budget_bops", "budget_mb"), "method", ("budget", "sensitivity"))
        only_for(self, ("weight_bits",), "method", ("uniform",))
        only_for(self, ("sens_batches", "sens_method", "sens_probes", "sens_confidence"), "method", ("sensitivity",))
        only_for(self, ("act_bits",), "act_bits_mode", ("fixed",))
        require(self.act_bits_mode in ("fixed", "tied"), "act_bits_mode", self.act_bits_mode, "fixed | tied")
        if self.method in ("budget", "sensitivity") and (self.budget_bops is None) == (self.budget_mb is None):
            raise EdgekitError(f"--method {self.method} needs exactly one of --budget-bops G or --budget-mb M")
        for key in ("budget_bops", "budget_mb", "threshold"):
            value = getattr(self, key)
            require(value is None or value > 0, key, value, "> 0")
        if self.bit_widths is not None:
            _check_widths(self.bit_widths, "bit_widths")
        for key in ("weight_bits", "act_bits"):
            value = getattr(self, key)
            require(value is None or MIN_BITS <= value <= MAX_BITS, key, value, f"in [{MIN_BITS}, {MAX_BITS}]")
        require(self.first_last_bits == 0 or MIN_BITS <= self.first_last_bits <= MAX_BITS, "first_last_bits",
                self.first_last_bits, f"0 or in [{MIN_BITS}, {MAX_BITS}]")
        require(self.metric in (None, "kmeans", "uniform"), "metric", self.metric, "kmeans | uniform")
        require(self.sens_method in (None, "hutchinson", "fisher"), "sens_method", self.sens_method,
                "hutchinson | fisher")
        require(1 <= self.calib_batches <= 10_000, "calib_batches", self.calib_batches, "in [1, 10000]")
        for key in ("sens_batches", "sens_probes"):
            value = getattr(self, key)
            require(value is None or 1 <= value <= 10_000, key, value, "in [1, 10000]")
        require(self.sens_confidence is None or self.sens_confidence >= 0, "sens_confidence", self.sens_confidence,
                ">= 0 standard errors")
        if self.image_size is not None:
            check_image_size(self.image_size)
        require(0 <= self.qat_epochs <= 10_000, "qat_epochs", self.qat_epochs, "in [0, 10000]")
        if not self.qat_epochs and (self.qat_data is not None or self.qat_time_limit is not None):
            raise EdgekitError("--qat-data and --qat-time-limit apply only with --qat-epochs N (N >= 1)")
        require(self.qat_time_limit is None or self.qat_time_limit >= 0, "qat_time_limit", self.qat_time_limit,
                ">= 0 seconds")
        self.check_bound()
        if self.bounded and self.qat_epochs:
            raise EdgekitError("--max-drop bounds post-training quantization (it rebuilds the model per bit "
                               "assignment); drop --qat-epochs, or --max-drop")

    # Defaults of the method-specific options, applied where they apply.
    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.bit_widths or SEARCH_WIDTHS)))

    def quant_config(self):
        from edgekit.calibration.quantize import QuantConfig

        ends = self.first_last_bits or None
        act = "tied" if self.act_bits_mode == "tied" else (self.act_bits or 8)
        return QuantConfig(weight_bits=self.weight_bits or 8, act_bits=act, first_layer_bits=ends, last_layer_bits=ends)


@dataclass
class QuantizeResult:
    """What ``quantize`` built: the quantized model, its spec and figures; ``files`` when
    written to a folder."""

    qmodel: object
    spec: dict
    config: object                 # the resolved QuantConfig
    search: object | None          # SearchResult of a searched method
    profile: object                # ProfileReport of the quantized model
    qat: dict | None
    quantize_seconds: float
    model_name: str
    image_size: int
    out: Path | None = None
    files: list = field(default_factory=list)
    accuracy: dict | None = None   # the --max-drop record (accuracy_bound.bound_spec), when bounded

    @property
    def totals(self) -> dict:
        return self.profile.totals


def sensitivity_loss(model) -> Callable:
    """The task loss per batch for the Hessian/Fisher sensitivity: the detector's own loss on
    labelled batches; for a classifier, cross-entropy against labels, or against its own
    predictions when a batch has none."""
    from edgekit.calibration.distill import default_losses

    task, _ = default_losses(model)

    def loss_fn(m, batch):
        inputs, targets = batch
        outputs = m(inputs)
        if targets is None:
            targets = outputs.detach().argmax(1)
        return task(outputs, targets)

    return loss_fn


def quantize_model(model, recipe: QuantizeRecipe, batches: Callable[[int], list], *, model_name: str,
                   image_size: int, qat: Callable | None = None, log: Callable[[str], None] = lambda _: None
                   ) -> QuantizeResult:
    """The one quantization recipe. ``batches(count)`` returns ``count`` (inputs, targets)
    batches for calibration and sensitivity; ``qat(float_model, qmodel)`` trains the
    quantized model and returns qat_train's record (``recipe.qat_epochs`` says whether to)."""
    from edgekit.calibration.hq_search import config_from_search, search_bits
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.accuracy_bound import few_images_warning
    from edgekit.calibration.quantize import quant_spec_from_model

    config = recipe.quant_config()
    search = None
    if recipe.method != "uniform":
        sensitivity = None
        if recipe.method == "sensitivity":
            from edgekit.calibration.quantize import QuantConfig, quantizable_layers
            from edgekit.calibration.sensitivity import layer_sensitivity

            def sensitivity():
                return layer_sensitivity(model, sensitivity_loss(model), batches(recipe.sens_batches or 4),
                                         quantizable_layers(model, QuantConfig()), recipe.sens_method or "hutchinson",
                                         probes=recipe.sens_probes or 4, progress=recipe.progress,
                                         confidence=2.0 if recipe.sens_confidence is None else recipe.sens_confidence)
        log(f"bit search ({recipe.method}) over {len(recipe.widths)} widths ...")
        search = search_bits(model, recipe.method, recipe.widths, recipe.threshold or 0.01, recipe.metric,
                             budget_bops=None if recipe.budget_bops is None else recipe.budget_bops * 1e9,
                             budget_bytes=None if recipe.budget_mb is None else recipe.budget_mb * 1e6,
                             act_bits=config.act_bits, config=config, image_size=image_size,
                             sensitivity=sensitivity, progress=recipe.progress,
                             cluster_index=recipe.cluster_index or "silhouette")
        config = config_from_search(search, config)
        extra = f" (plus {search.sensitivity_seconds:.2f} s estimating sensitivities)" \
            if search.sensitivity_seconds else ""
        log(f"bit search took {search.seconds:.2f} s{extra}")
        if search.unused:
            log(f"not searched (the forward pass never calls them; default {config.default_bits} bits): "
                f"{', '.join(search.unused)}")
    start = time.perf_counter()
    float_model = copy.deepcopy(model) if recipe.qat_epochs else None
    calibration = [x for x, _ in batches(recipe.calib_batches)]
    warning = few_images_warning(sum(len(x) for x in calibration))
    if warning:
        log(warning)
    qmodel = build_quantized(model, config, calibration, image_size, recipe.progress)
    resolved = qmodel.quant_config
    quant_seconds = time.perf_counter() - start
    qat_record = None
    if recipe.qat_epochs:
        if qat is None:
            raise EdgekitError("the recipe asks for QAT (--qat-epochs) but no QAT data was given")
        qat_record = qat(float_model, qmodel)
        qmodel = qat_record["student"].eval()
        qat_record = {k: v for k, v in qat_record.items() if k not in ("student", "switch")}
    source, observer = ("qat", "qat") if qat_record else (recipe.method, "percentile")
    spec = quant_spec_from_model(qmodel, model_name, source=source, observer=observer)
    qmodel.quant_config = resolved
    return QuantizeResult(qmodel, spec, resolved, search, profile_model(qmodel, image_size, model_name=model_name),
                          qat_record, quant_seconds, model_name, image_size)


def build_quantized(model, config, calibration: list, image_size: int, progress: bool = False):
    """A quantized copy of ``model`` by ``config`` (a QuantConfig), its input scales
    calibrated on ``calibration`` (input tensors): the build step of :func:`quantize_model`,
    which accuracy control repeats for the bit assignment it settles on."""
    from edgekit.calibration.quantize import calibrate_activations, default_example_input, quantize

    qmodel = quantize(copy.deepcopy(model), config, example_input=default_example_input(model, image_size))
    calibrate_activations(qmodel, calibration, progress=progress)
    return qmodel


def _check_measure(options: BoundOptions, deployed_measure, layer_cost=None) -> None:
    """``--max-drop-on onnxruntime`` and the deployed measure come together, as do
    ``--max-drop-cost latency`` and the layer latency table's factory (before any work)."""
    if options.max_drop_on == "onnxruntime" and deployed_measure is None:
        raise EdgekitError("max_drop_on='onnxruntime' needs deployed_measure="
                           "edgekit.export.deployed_metric.onnxruntime_measure (the command line passes it)")
    if deployed_measure is not None and options.max_drop_on != "onnxruntime":
        raise EdgekitError("deployed_measure applies only with max_drop_on='onnxruntime' (--max-drop-on); remove it")
    if options.max_drop_cost == "latency" and layer_cost is None:
        raise EdgekitError("max_drop_cost='latency' needs layer_cost="
                           "edgekit.export.layer_latency.onnxruntime_latency (the command line passes it)")
    if layer_cost is not None and options.max_drop_cost != "latency":
        raise EdgekitError("layer_cost applies only with max_drop_cost='latency' (--max-drop-cost); remove it")


@contextlib.contextmanager
def _measure(deployed_measure, model, size: int, validation, classes):
    """The deployed measure of this run (None: fake quantization), closed afterwards."""
    measure = deployed_measure(model, size, validation, classes) if deployed_measure is not None else None
    try:
        yield measure
    finally:
        if measure is not None and hasattr(measure, "close"):
            measure.close()


def quantize_checkpoint(checkpoint, recipe: QuantizeRecipe | None = None, data=None, out=None,
                        log: Callable[[str], None] = lambda _: None, deployed_measure=None,
                        layer_cost=None) -> QuantizeResult:
    """Quantize a float checkpoint (or a registered model name: random weights) by
    ``recipe``; calibration and sensitivity batches come from ``data`` (a DOTA split, or a
    root whose train/ split is used), drawn at random with a fixed seed, or, without it,
    the built-in synthetic generator (detectors) or random images (classifiers). With
    ``recipe.max_drop``, the mAP drop on the validation split is bounded afterwards (see
    :mod:`edgekit.calibration.accuracy_bound`; ``result.accuracy`` holds the record, whose
    ``feasible`` is False when the bound could not be met), on ``deployed_measure``'s
    metric with ``recipe.max_drop_on="onnxruntime"``, with ``layer_cost``'s measured
    latencies as the cost with ``recipe.max_drop_cost="latency"``. With ``out``, writes
    the stage's files there (see the module doc)."""
    from edgekit.calibration.accuracy_bound import split_folders
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import check_output_dir

    recipe = recipe or QuantizeRecipe()
    _check_measure(recipe, deployed_measure, layer_cost)
    if recipe.qat_epochs and not recipe.qat_data:
        raise EdgekitError("--qat-epochs needs --qat-data (a DOTA root with train/ and val/)")
    if recipe.qat_epochs and out is None:
        raise EdgekitError("QAT writes its training run into the output folder: pass out (--out) with --qat-epochs")
    if out is not None:
        check_output_dir(out)
    if data is not None and not Path(data).is_dir():
        raise EdgekitError(f"--data {data} is not a folder; give a DOTA split folder (images/ + labelTxt/)")
    if recipe.qat_data is not None and not Path(recipe.qat_data).is_dir():
        raise EdgekitError(f"--qat-data {recipe.qat_data} is not a folder; give a DOTA root with train/ and val/")
    loaded = load(checkpoint)
    size = recipe.image_size or loaded.image_size
    check_image_size(size)
    model = loaded.model
    calib_split = split_folders(data)[0]
    validation = _validation(loaded, recipe, size, data, recipe.qat_data) if recipe.bounded else None

    def batches(count: int) -> list:
        return sample_batches(model, size, count, calib_split)

    qat = None
    if recipe.qat_epochs:
        from edgekit.calibration.qat import qat_train

        def qat(float_model, qmodel):
            return qat_train(float_model, qmodel, recipe.qat_data, epochs=recipe.qat_epochs,
                             time_limit=recipe.qat_time_limit or 0.0, image_size=size,
                             out=Path(out) / "qat", progress=recipe.progress)

    result = quantize_model(model, recipe, batches, model_name=loaded.name, image_size=size, qat=qat, log=log)
    _add_conv_outputs(result, recipe, loaded, calib_split)
    if validation is not None:
        with _measure(deployed_measure, model, size, validation, model.class_names) as measure:
            _bound_quantized(result, recipe, loaded, validation, calib_split, log, measure, layer_cost)
    if out is not None:
        result.out = Path(out)
        result.files = _write_quantized(result, recipe, loaded, Path(out))
    return result


def _validation(loaded, options: BoundOptions, size: int, data, qat_data=None) -> list:
    """The fixed validation batches of a run that needs them (checked before any work)."""
    from edgekit.calibration.accuracy_bound import DEFAULT_IMAGES, resolve_val_split, validation_batches

    if not _is_detector(loaded.model):
        raise EdgekitError(f"--max-drop and --observer auto measure detection mAP; {loaded.name} is not a detector")
    split = resolve_val_split(options.val_data, data, qat_data)
    return validation_batches(split, loaded.model.class_names, size, options.max_drop_images or DEFAULT_IMAGES)


def _add_conv_outputs(result: QuantizeResult, recipe: QuantizeRecipe, loaded, calib_split) -> None:
    """The deploy grids: without QAT, input grids observed by edgekit's own observer (learned
    ones are kept); then 8-bit grids on conv outputs, observed on the float tensors the
    quantized model now holds (after QAT), through its own fake quantization."""
    if not recipe.conv_outputs:
        return
    from edgekit.calibration.ptq import calibrate_conv_outputs, observe_input_grids
    from edgekit.calibration.quantize import float_view

    view = float_view(result.qmodel, loaded.name, loaded.kwargs)
    batches = [x for x, _ in sample_batches(view, result.image_size, recipe.calib_batches, calib_split)]
    if not recipe.qat_epochs:
        result.spec = observe_input_grids(view, result.spec, batches)
    result.spec = calibrate_conv_outputs(view, result.spec, batches, progress=recipe.progress)


def _bound_quantized(result: QuantizeResult, recipe: QuantizeRecipe, loaded, validation: list, calib_split,
                     log, measure=None, layer_cost=None) -> None:
    """Accuracy control on the quantized model's spec; the model of the assignment it
    settles on is rebuilt (the recipe's build step) and measured once more, so that the
    record's final figures are those of the files written. The rebuild keeps the grids the
    loop evaluated: every input scale and conv-output grid of the first model (re-observing
    them on the rebuilt one moved mAP by 0.1 point on 32 images, past a bound the loop had
    met); only the changed layers' weight scales are new."""
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.accuracy_control import bits_from_spec
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.quantize import quant_spec_from_model

    model, classes, size = loaded.model, loaded.model.class_names, result.image_size
    _, record = ab.bound_spec(model, result.spec, validation, classes, recipe, size, log, measure=measure,
                              layer_cost=layer_cost)
    if record["bits"] != bits_from_spec(result.spec):
        config = ab.config_for_bits(result.config, record["bits"])
        calibration = [x for x, _ in sample_batches(model, size, recipe.calib_batches, calib_split)]
        first, grids = result.qmodel.state_dict(), result.spec["layers"]
        result.qmodel = build_quantized(model, config, calibration, size, recipe.progress)
        state = result.qmodel.state_dict()
        kept = {k: first[k] for k in state if ".input_quant." in k and k in first and first[k].shape == state[k].shape}
        result.qmodel.load_state_dict(kept, strict=False)  # weight scales are made lazily: not all are listed yet
        result.config = result.qmodel.quant_config
        result.spec = quant_spec_from_model(result.qmodel, loaded.name, source=recipe.method, observer="percentile")
        for path, layer in result.spec["layers"].items():
            for key in ("input", "output"):  # the deploy grids the loop evaluated, at unchanged widths
                grid = grids.get(path, {}).get(key)
                if grid is not None and (layer.get(key) is None or layer[key]["bits"] == grid["bits"]):
                    layer[key] = grid
        result.profile = profile_model(result.qmodel, size, model_name=loaded.name)
        ab.recheck(record, ab.spec_metric(model, validation, classes, measure)(result.spec))
    else:
        ab.recheck(record, record["metric"])
    result.spec["accuracy_control"] = record
    result.accuracy = record
    log(ab.summary_line(record))


def _write_quantized(result: QuantizeResult, recipe: QuantizeRecipe, loaded, out: Path) -> list[Path]:
    from edgekit.calibration.quantize import save_quantized
    from edgekit.calibration.spec import save_spec
    from edgekit.fileio import write_json_atomic, write_text_atomic

    config = result.config
    record = {"method": recipe.method, "checkpoint": loaded.label, "model": loaded.name,
              "image_size": result.image_size, "recipe": recipe.to_dict(),
              "config": dataclasses.asdict(config) | {"skip": list(config.skip)}, "bits": list(recipe.widths),
              "search": result.search.to_dict() if result.search else None,
              "quantize_seconds": result.quantize_seconds, "qat": result.qat, "totals": result.totals,
              "accuracy_control": result.accuracy}
    grids = {path: layer["output"] for path, layer in result.spec["layers"].items() if layer.get("output")}
    inputs = {path: layer["input"] for path, layer in result.spec["layers"].items() if layer.get("input")}
    info = {k: v for k, v in loaded.info.items() if k not in ("quant_config", "model", "kwargs")}
    return [result.config.save(out / "qconfig.json"), save_spec(result.spec, out / "quant_spec.json"),
            write_text_atomic(out / "profile.json", result.profile.to_json() + "\n"),
            write_text_atomic(out / "profile.txt", result.profile.to_table() + "\n"),
            write_json_atomic(out / "search.json", record),
            save_quantized(out / "quantized.safetensors", result.qmodel, loaded.name, loaded.kwargs,
                           {**info, "image_size": result.image_size, "conv_output_grids": grids,
                            "input_grids": inputs})]


def _is_detector(model) -> bool:
    return hasattr(model, "loss") and hasattr(model, "class_names")


def sample_batches(model, size: int, count: int, data=None, batch_size: int = 2, seed: int = SEED) -> list:
    """``count`` (images, targets) batches: images of a DOTA split drawn at random with
    ``seed`` (the same images on every call: calibration, sensitivity and an accuracy
    control rebuild see one set), synthetic scenes from ``seed``, or random images."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    if _is_detector(model) and data is not None:
        from edgekit.data.dataset import DetectionDataset, collate_detection

        dataset = DetectionDataset(Path(data), model.class_names, image_size=size)
        chosen = rng.permutation(len(dataset))[:count * batch_size].tolist()
        return [collate_detection([dataset[i] for i in chosen[j:j + batch_size]])
                for j in range(0, len(chosen), batch_size)]
    if _is_detector(model):
        return [_synthetic_batch(rng, size, batch_size, model.class_names) for _ in range(count)]
    if data is not None:
        raise EdgekitError(f"--data applies to detectors; {type(model).__name__} calibrates on random images")
    from edgekit.calibration.quantize import default_example_input

    example = default_example_input(model, size)
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, *example.shape[1:], generator=generator), None) for _ in range(count)]


def _synthetic_batch(rng, size: int, batch_size: int, class_names) -> tuple:
    """One labelled batch of fresh synthetic scenes (objects of classes the model lacks dropped)."""
    import torch

    from edgekit.data.synthetic import synthetic_sample
    from edgekit.data.transforms import normalize, to_tensor

    index = {c: i for i, c in enumerate(class_names)}
    images, targets = [], []
    for _ in range(batch_size):
        image, annotation = synthetic_sample(rng, size)
        objs = [o for o in annotation.objects if o.label in index]
        images.append(normalize(to_tensor(image)))
        boxes = torch.tensor([o.box for o in objs], dtype=torch.float32).reshape(-1, 4).clamp(0, size)
        targets.append({"boxes": boxes, "labels": torch.tensor([index[o.label] for o in objs], dtype=torch.long)})
    return torch.stack(images), targets


# ----------------------------------------------------------------------------- calibrate


@dataclass
class CalibrateConfig(StageConfig, BoundOptions):
    """Post-training calibration: which observer (``auto``: each of
    :data:`CALIBRATION_OBSERVERS`, the best by validation mAP), how much data, which widths;
    the ``max_drop`` options bound the mAP drop (:mod:`edgekit.calibration.accuracy_bound`)."""

    observer: str = "minmax"
    batches: int = 16
    batch_size: int = 8
    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    progress: bool = True

    def check(self) -> None:
        require(self.observer in (*CALIBRATION_OBSERVERS, "auto"), "observer", self.observer,
                " | ".join((*CALIBRATION_OBSERVERS, "auto")))
        require(1 <= self.batches <= 100_000, "batches", self.batches, "in [1, 100000]")
        require(1 <= self.batch_size <= 1024, "batch_size", self.batch_size, "in [1, 1024]")
        for key in ("weight_bits", "act_bits"):
            value = getattr(self, key)
            require(MIN_BITS <= value <= MAX_BITS, key, value, f"in [{MIN_BITS}, {MAX_BITS}]")
        self.check_bound(validation=self.observer == "auto")


@dataclass
class CalibrateResult:
    spec: dict
    images: int
    path: Path | None = None
    observers: dict | None = None   # observer auto: {observer: validation mAP x100}
    accuracy: dict | None = None    # the --max-drop record, when bounded

    @property
    def observer(self) -> str:
        return self.spec["calibration"]["observer"]


def calibrate_checkpoint(checkpoint, data, config: CalibrateConfig | None = None, out=None,
                         log: Callable[[str], None] = lambda _: None, deployed_measure=None,
                         layer_cost=None) -> CalibrateResult:
    """PTQ: observe a float detector checkpoint on ``config.batches`` batches of a DOTA
    split (or a root's train/ split), drawn at random with a fixed seed, and return its
    quant spec (written to ``out``, a JSON file path, when given). ``observer="auto"``
    calibrates with each observer and keeps the best by validation mAP; ``max_drop``
    then bounds the drop (``result.accuracy``; ``feasible`` False when it could not), on
    ``deployed_measure``'s metric with ``config.max_drop_on="onnxruntime"`` (and
    ``layer_cost``'s latencies with ``config.max_drop_cost="latency"``)."""
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.ptq import apply_fake_quant, calibrate
    from edgekit.calibration.spec import save_spec
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import check_output_file

    config = config or CalibrateConfig()
    _check_measure(config, deployed_measure, layer_cost)
    if out is not None:
        check_output_file(out, "--out")
    if data is None or not Path(data).is_dir():
        raise EdgekitError(f"--data {data} is not a folder; give a DOTA split folder (images/ + labelTxt/)")
    loaded = load(checkpoint)
    classes = loaded.detector_classes()
    needs_validation = config.bounded or config.observer == "auto"
    validation = _validation(loaded, config, loaded.image_size, data) if needs_validation else None
    batches = [x for x, _ in sample_batches(loaded.model, loaded.image_size, config.batches,
                                            ab.split_folders(data)[0], config.batch_size)]
    images = sum(len(b) for b in batches)
    warning = ab.few_images_warning(images)
    if warning:
        log(warning)

    def run(observer: str) -> dict:
        return calibrate(loaded.model, batches, observer=observer, weight_bits=config.weight_bits,
                         act_bits=config.act_bits, per_channel=config.per_channel, model_name=loaded.name,
                         progress=config.progress)

    baseline = ab.map_points(loaded.model, validation, classes) if validation is not None else None
    scores = None
    if config.observer == "auto":
        scores, specs = {}, {}
        for observer in CALIBRATION_OBSERVERS:
            specs[observer] = run(observer)
            scores[observer] = ab.map_points(apply_fake_quant(loaded.model, specs[observer]), validation, classes)
            log(f"observer {observer}: {ab.METRIC} {scores[observer]:.2f} (float {baseline:.2f})")
        best = max(scores, key=scores.get)  # ties: the first in CALIBRATION_OBSERVERS
        spec = specs[best]
        spec["calibration"]["observer_search"] = {"metric": ab.METRIC, "float": baseline, "scores": scores,
                                                  "chosen": best}
        log(f"observer auto: {best}")
    else:
        spec = run(config.observer)
    record = None
    if config.bounded:
        with _measure(deployed_measure, loaded.model, loaded.image_size, validation, classes) as measure:
            spec, record = ab.bound_spec(loaded.model, spec, validation, classes, config, loaded.image_size, log,
                                         baseline=baseline, measure=measure, layer_cost=layer_cost)
        ab.recheck(record, record["metric"])  # the spec evaluated is the spec written
        log(ab.summary_line(record))
    return CalibrateResult(spec, images, save_spec(spec, out) if out is not None else None, scores, record)


# ----------------------------------------------------------------------------- profile


@dataclass
class ProfileConfig(StageConfig):
    image_size: int | None = None   # default: the checkpoint's, else 256
    spec: str | None = None         # a quant spec or qconfig JSON (default: the checkpoint's own, else float)

    def check(self) -> None:
        if self.image_size is not None:
            check_image_size(self.image_size)


def profile(source, config: ProfileConfig | None = None):
    """Per-layer params, MACs, bits, BOPs and packed size of a checkpoint or model name
    (a quantized checkpoint profiles as its float twin with its own bits)."""
    from edgekit.calibration.profiler import profile_model
    from edgekit.engine.checkpoint import load

    config = config or ProfileConfig()
    loaded = load(source, weights=False, allow_quantized=True)
    if config.spec is not None and not Path(config.spec).is_file():
        raise EdgekitError(f"{flag('spec')} {config.spec} not found; pass a quant spec or qconfig JSON written by "
                           f"edgekit")
    bits = config.spec or loaded.info.get("quant_config")
    return profile_model(loaded.model, config.image_size or loaded.image_size, bits, model_name=loaded.name)
