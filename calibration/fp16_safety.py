"""Which layers are unsafe in FP16: run the float model on calibration batches and, layer by
layer, compare with the same layer run in half precision.

Every module that computes (a leaf, or a module with parameters of its own such as a
deformable conv holding its offset conv) gets forward hooks. Per call the hooks record
the largest |output| in float32 and re-run the layer twice on the input rounded to
float16: a float16 copy, and the float32 layer itself (the reference). Comparing the two
on the same rounded input measures what the layer's own float16 arithmetic loses, which
is what pinning it to FP32 would win back (error inherited from a rounded input is not
the layer's to fix). A layer is pinned when

- its float32 output already exceeds the float16 range (|x| > 65504) or is inf/NaN, or
- its float16 run gives inf/NaN where the reference is finite (an internal overflow), or
- its float16 run's relative error ``||y16 - y32|| / ||y32||`` exceeds ``rel_tol``, or
- its input (another layer's output) does not fit float16: it must read it in float32.

The FP16 export (``export.to_onnx._half``) runs pinned layers in float32 and keeps their
outputs float32 up to the next float16 layer, so a value past the float16 range travels
from a pinned producer to a pinned consumer without ever being float16.

GRN is run in float16 the way a generic FP16 runtime runs its graph (squares, sum, sqrt,
all float16: the known TensorRT-FP16 ConvNeXt V2 failure), not through edgekit's own GRN,
which keeps its L2 reduction in float32 whatever the input dtype and so would never show
the overflow the exported graph of another toolchain meets. A container module (a block,
a stage) is reported only where its output overflows while none of the modules inside it
did: the overflow is then made by its own ops, such as a residual sum.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import torch

from edgekit.errors import EdgekitError

FP16_MAX = 65504.0


def _tensors(obj):
    """The tensors inside an output or argument structure (tuples, lists, dicts), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _map_float(obj, fn):
    """``obj`` with ``fn`` applied to every floating-point tensor inside it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_map_float(item, fn) for item in obj)
    if isinstance(obj, list):
        return [_map_float(item, fn) for item in obj]
    if isinstance(obj, dict):
        return {key: _map_float(item, fn) for key, item in obj.items()}
    return obj


def grn_float16(module, x: torch.Tensor) -> torch.Tensor:
    """The GRN formula with every op in float16 (what a generic FP16 graph computes)."""
    from edgekit.models.grn import _LAYOUTS

    spatial, channel, shape = _LAYOUTS[module.data_format]
    x = x.half()
    gamma, beta = module.gamma.reshape(shape).half(), module.beta.reshape(shape).half()
    sum_sq = (x * x).sum(dim=spatial, keepdim=True, dtype=torch.float16)
    gx = torch.sqrt(sum_sq)
    nx = gx / (gx.mean(dim=channel, keepdim=True) + module.eps)
    return gamma * (x * nx) + beta + x


def _float16_runner(module):
    """A callable running ``module`` in float16 on float16 arguments."""
    from edgekit.models.grn import GRN

    if isinstance(module, GRN):
        return lambda args, kwargs: grn_float16(module, *args, **kwargs)
    half = copy.deepcopy(module).half()
    return lambda args, kwargs: half(*args, **kwargs)


def _relative_error(approx, reference) -> float:
    """||approx - reference|| / ||reference|| over all output tensors (float64)."""
    diff = ref = 0.0
    for a, r in zip(_tensors(approx), _tensors(reference)):
        if not r.is_floating_point():
            continue
        r = r.double()
        diff += float((a.double() - r).pow(2).sum())
        ref += float(r.pow(2).sum())
    if diff == 0.0:
        return 0.0
    return math.sqrt(diff / ref) if ref > 0 else math.inf


@dataclasses.dataclass
class _Record:
    max_abs: float = 0.0
    overflow: bool = False
    rel_err: float | None = None
    reasons: list = dataclasses.field(default_factory=list)
    checked: bool = False
    calls: int = 0
    upstream: bool = False   # its input overflows float16: it must run in float32 to see it at all

    def flag(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclasses.dataclass
class Fp16SafetyReport:
    """``layers``: ``{path: {"max_abs", "overflow", "fp16_rel_err", "pin_fp32", "why"}}``
    (``fp16_rel_err`` None where the layer could not run in float16 here or its float16
    error is unbounded: an overflow); ``pin_fp32``: the paths to keep in FP32."""

    layers: dict
    pin_fp32: list
    rel_tol: float
    batches: int

    def to_dict(self) -> dict:
        return {"format": "edgekit.fp16-safety/1", "rel_tol": self.rel_tol, "batches": self.batches,
                "fp16_max": FP16_MAX, "pin_fp32": list(self.pin_fp32), "layers": self.layers}

    def save(self, path):
        from edgekit.fileio import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def check_fp16_safety(model, batches, rel_tol: float = 1e-2, progress: bool = False) -> Fp16SafetyReport:
    """Run ``model`` (float32, eval, no grad) on ``batches`` (each a tensor or a tuple of
    positional arguments) and report which layers are unsafe in FP16 (see the module doc).

    Every compute layer is reported; containers only where they create an overflow.
    """
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not rel_tol > 0:
        raise EdgekitError(f"rel_tol must be a positive number, got {rel_tol!r}")
    names = {module: path for path, module in model.named_modules()}
    computing = {m for m in names if not list(m.children()) or list(m.parameters(recurse=False))}
    records = {m: _Record() for m in names}
    runners, saved, busy = {}, {}, [False]

    def pre(module, args, kwargs):
        if not busy[0] and module in computing:
            clone = lambda t: t.detach().clone()  # noqa: E731 -- in-place layers would change their own input
            saved.setdefault(module, []).append((_map_float(args, clone), _map_float(kwargs, clone)))

    def post(module, args, kwargs, output):
        if busy[0]:
            return
        record = records[module]
        record.calls += 1
        outs = [t for t in _tensors(output) if t.is_floating_point()]
        peak = max((float(t.detach().abs().max()) for t in outs if t.numel()), default=0.0)
        record.max_abs = max(record.max_abs, peak) if math.isfinite(peak) else math.inf
        if not all(bool(torch.isfinite(t).all()) for t in outs):
            record.overflow = True
            record.flag("inf/NaN in the float32 output already")
        elif peak > FP16_MAX:
            record.overflow = True
            record.flag(f"float32 output reaches |x| = {peak:.4g} > {FP16_MAX:g}, the float16 maximum")
        if module in computing:
            _compare(module, *saved[module].pop(), output)

    def _compare(module, args, kwargs, output):
        record = records[module]
        args16, kwargs16 = _map_float(args, torch.Tensor.half), _map_float(kwargs, torch.Tensor.half)
        busy[0] = True
        try:
            reference = module(*_map_float(args16, torch.Tensor.float), **_map_float(kwargs16, torch.Tensor.float))
            if module not in runners:
                runners[module] = _float16_runner(module)
            half = runners[module](args16, kwargs16)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            record.flag(f"not checked: the layer does not run in float16 here ({type(exc).__name__})")
            return
        finally:
            busy[0] = False
        record.checked = True
        finite_ref = all(bool(torch.isfinite(t).all()) for t in _tensors(reference) if t.is_floating_point())
        if not finite_ref:
            record.upstream = True
            record.flag("its input does not fit float16 (the overflow is upstream); pinned so that it reads it in "
                        "float32, not compared")
            return
        finite_half = all(bool(torch.isfinite(t).all()) for t in _tensors(half) if t.is_floating_point())
        if not finite_half:
            record.overflow = True
            record.rel_err = math.inf
            record.flag("the float16 run overflows inside the layer (inf/NaN where float32 is finite)")
            return
        err = _relative_error(_map_float(half, torch.Tensor.float), reference)
        record.rel_err = err if record.rel_err is None else max(record.rel_err, err)

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()
    count = 0
    items = batches
    if progress:
        from tqdm import tqdm
        items = tqdm(batches, desc="fp16 safety", unit="batch")
    try:
        with torch.no_grad():
            for batch in items:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise EdgekitError("fp16 safety: no calibration batches given; pass at least one input batch")
    return _report(names, computing, records, rel_tol, count)


def _report(names: dict, computing: set, records: dict, rel_tol: float, count: int) -> Fp16SafetyReport:
    layers = {}
    for module, path in names.items():
        record = records[module]
        if module not in computing:
            inner = any(records[m].overflow for m in module.modules() if m is not module)
            if not record.overflow or inner:
                continue
            record.flag("made by the module's own ops (e.g. a residual sum), not by a layer inside")
        elif not record.calls:
            record.flag("not called on these batches")
        elif record.checked and not record.overflow and record.rel_err is not None and record.rel_err > rel_tol:
            record.flag(f"float16 relative error {record.rel_err:.3g} > tolerance {rel_tol:g}")
        pin = record.overflow or record.upstream or (record.rel_err is not None and record.rel_err > rel_tol)
        rel = record.rel_err if record.rel_err is not None and math.isfinite(record.rel_err) else None
        layers[path] = {"max_abs": record.max_abs if math.isfinite(record.max_abs) else None,
                        "overflow": record.overflow, "fp16_rel_err": rel, "pin_fp32": pin,
                        "why": "; ".join(record.reasons)}
    return Fp16SafetyReport(layers, [p for p, e in layers.items() if e["pin_fp32"]], rel_tol, count)


# ----------------------------------------------------------------------------- export

FP32_MARK = "edgekit_fp32"  # a module attribute the FP16 exporter reads: keep this layer in float32
EXPORT_BATCHES = 1  # float16 convolutions are slow on a CPU: two batches of two 256-px images took 83 s here


@contextlib.contextmanager
def pinned_fp32(model, paths):
    """Mark the modules at ``paths`` (:data:`FP32_MARK`) for the duration; the FP16
    exporter (``export.to_onnx.to_precision``) keeps marked layers in float32."""
    modules = dict(model.named_modules())
    unknown = [p for p in paths if p not in modules]
    if unknown:
        raise EdgekitError(f"fp16 pins name modules the model lacks: {', '.join(unknown[:3])}")
    marked = [modules[p] for p in paths]
    for module in marked:
        setattr(module, FP32_MARK, True)
    try:
        yield marked
    finally:
        for module in marked:
            if hasattr(module, FP32_MARK):
                delattr(module, FP32_MARK)


def export_pins(model, image_size: int, data=None, rel_tol: float = 1e-2) -> Fp16SafetyReport:
    """The FP16 safety check an FP16 export runs: :data:`EXPORT_BATCHES` batches of the
    calibration images (``data``, a DOTA split, else the built-in synthetic scenes; drawn
    as ``quantize`` draws them)."""
    from edgekit.calibration.pipeline import sample_batches

    batches = [x for x, _ in sample_batches(model, image_size, EXPORT_BATCHES, data)]
    return check_fp16_safety(model, batches, rel_tol=rel_tol)


def pins_record(report: Fp16SafetyReport) -> dict:
    """What the export metadata records: the pinned layers and why."""
    return {"pin_fp32": list(report.pin_fp32), "rel_tol": report.rel_tol, "batches": report.batches,
            "why": {p: report.layers[p]["why"] for p in report.pin_fp32}}
