"""GPU kernel suite: the CUDA backends against torch, torch.compile, torchvision and the copy limit.

Run ``edgekit bench kernels-gpu`` on a machine with a CUDA GPU
(``--quick`` for a short run, which writes ``kernels_gpu_quick.*``). One run measures,
side by side on the GPU, float32, inference (no gradient):

- GRN at the input of every ConvNeXt V2 atto and nano stage (224 and 512 px, batch 1, 8
  and 64, channels_last): each CUDA backend (``cuda``: the CUDA C++ kernels, ``numba-cuda``),
  the eager reference, ``torch.compile`` of it, and the copy limit: GRN reads the tensor
  twice and writes it once, at the device-to-device copy bandwidth measured in the run.
- Deformable convolution (DCNv2: mask and bias) 64, 128 and 256 channels, 3x3, 64x64 and
  128x128 maps, batch 1, 4 and 16: each CUDA backend, torchvision's CUDA
  ``deform_conv2d``, the torch reference and a dense ``F.conv2d`` (cuDNN) of the same shape.

Every timed output is also compared with a float64 reference on the GPU (relative error
in the tables). TF32 is switched off for matmul and cuDNN, so every implementation
computes in float32. Times are medians of CUDA-event-timed blocks of back-to-back calls
(at least ~2 ms per block), after warm-up; small tensors stay in L2 between calls, as
they would between two layers of a network. The GPU targets of ``targets.json`` (GRN
against the copy bandwidth on tensors larger than L2; DCN against torchvision) are
evaluated per backend. Results: ``benchmarks/results/kernels_gpu.{json,md}`` with the device, versions,
command and date.

Without a CUDA GPU it stops with a one-line error (exit 2). ``--plumbing-cpu`` runs the
same code on the CPU with the ``numba`` backend standing in for the GPU ones and writes
``kernels_gpu_plumbing.*``: a check of this script, not GPU figures (the tests use it).

Status: written without a GPU (none was lent to the development sessions so far); the
first GPU session runs it through ``scripts/gpu_session.sh``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgekit.benchmarks.latency import round_summary
from edgekit.benchmarks.targets import evaluate_target, load_targets
from edgekit.errors import CheckError, EdgekitError
from edgekit.fileio import write_json_atomic, write_text_atomic
from edgekit.sysinfo import environment
from edgekit.benchmarks.kernels import STAGE_DIMS, STAGE_SIZES, compiled_grn, log

RESULTS = Path(__file__).resolve().parent / "results"
GPU_BACKENDS = ("cuda", "numba-cuda")
GRN_BATCHES = (1, 8, 64)
DCN_CHANNELS, DCN_SIZES, DCN_BATCHES = (64, 128, 256), (64, 128), (1, 4, 16)
ERROR_FLAG = 1e-4  # float32 against float64: anything above this is a wrong result, not rounding


# ------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _elapsed_ms(device: str, fn, calls: int) -> float:
    """Milliseconds for ``calls`` back-to-back calls: CUDA events on the GPU (the launches
    queue while the device works, as in a network), a host clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3


def time_op(fn, device: str, *, warmup: int = 3, repeats: int = 25, block_ms: float = 2.0,
            max_calls: int = 200) -> dict:
    """Median (and spread) of per-call times over ``repeats`` blocks of calls, each block
    long enough (``block_ms``) that event resolution and launch jitter do not matter."""
    for _ in range(warmup):
        fn()
    _sync(device)
    one = max(_elapsed_ms(device, fn, 1), 1e-3)
    calls = max(1, min(max_calls, math.ceil(block_ms / one)))
    record = round_summary([_elapsed_ms(device, fn, calls) / calls for _ in range(repeats)])
    record["calls_per_block"] = calls
    return record


def copy_bandwidth(device: str, quick: bool) -> dict:
    """Device-to-device copy, bytes read plus bytes written per second."""
    n = (64 if quick else 256) << 20 >> 2
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        n = max(n, min(1 << 30, free // 4) >> 2)  # a copy far larger than L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_op(lambda: dst.copy_(src), device, repeats=10)
    return {"bytes": 4 * n, "copy": t, "gb_per_s": 2 * 4 * n / (t["median_ms"] * 1e-3) / 1e9}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error over the largest reference magnitude."""
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- GRN


QUICK_GRN = {"cuda": {("atto", 224, 1, 3), ("nano", 512, 64, 0)}, "cpu": {("atto", 224, 1, 3), ("atto", 224, 8, 3)}}
QUICK_DCN = {"cuda": (64, 64, 4), "cpu": (64, 64, 1)}


def grn_cases(quick: bool, device: str = "cuda"):
    for model, dims in STAGE_DIMS.items():
        for res, sizes in STAGE_SIZES.items():
            for batch in GRN_BATCHES:
                for stage, (dim, size) in enumerate(zip(dims, sizes)):
                    if quick and (model, res, batch, stage) not in QUICK_GRN[device]:
                        continue
                    yield {"model": model, "resolution": res, "batch": batch, "stage": stage, "dim": dim,
                           "size": size}


def bench_grn(device: str, ours: tuple[str, ...], quick: bool, bandwidth: float, cache_bytes: int | None) -> dict:
    from edgekit import ops
    from edgekit.models.grn import grn_reference
    compiled, compile_error = compiled_grn(device, static_shapes=True)
    rows = []
    for case in grn_cases(quick, device):
        shape = (case["batch"], case["size"], case["size"], case["dim"])
        x = torch.randn(shape, device=device)
        gamma, beta = torch.randn(case["dim"], device=device), torch.randn(case["dim"], device=device)
        nbytes = x.numel() * x.element_size()
        fns = {name: (lambda name=name: ops.grn(x, gamma, beta, backend=name)) for name in ours}
        fns["eager"] = lambda: grn_reference(x, gamma, beta)
        if compiled is not None:
            fns["compile"] = lambda: compiled(x, gamma, beta)
        ref = grn_reference(x.double(), gamma.double(), beta.double())
        row = dict(case, shape=list(shape), bytes=nbytes, larger_than_cache=bool(cache_bytes and nbytes > cache_bytes),
                   limit_ms=3 * nbytes / bandwidth * 1e3, times={}, errors={})
        with torch.no_grad():
            _check_and_time(row, fns, ref, device)
        del ref
        row["bandwidth_fraction"] = {n: row["limit_ms"] / row["times"][n]["median_ms"] for n in ours
                                     if n in row["times"]}
        row["speedup_vs_eager"] = {n: _ratio(row["times"], "eager", n) for n in ours}
        row["speedup_vs_compile"] = {n: _ratio(row["times"], "compile", n) for n in ours}
        rows.append(row)
        log(f"GRN {case['model']} {case['resolution']}px b{case['batch']} stage {case['stage']} {shape}: "
            + ", ".join(f"{n} {t['median_ms']:.4f} ms" for n, t in row["times"].items())
            + f", limit {row['limit_ms']:.4f} ms")
    return {"rows": rows, "compile_error": compile_error}


def _check_and_time(row: dict, fns: dict, ref: torch.Tensor | None, device: str) -> None:
    """Each implementation's error against ``ref`` (when given) and its time, into ``row``.
    A failure (a kernel that does not compile on this GPU, out of memory) is recorded in
    ``row["failures"]`` and the others still run: one broken backend must not cost a GPU
    session's other results."""
    for name, fn in fns.items():
        try:
            if ref is not None:
                row["errors"][name] = _rel_err(fn(), ref)
            row["times"][name] = time_op(fn, device)
        except Exception as exc:  # recorded and reported, the run goes on
            first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
            row.setdefault("failures", {})[name] = f"{type(exc).__name__}: {first_line}"
            log(f"  {name} failed: {row['failures'][name]}")
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()


def _ratio(times: dict, slower: str, faster: str) -> float | None:
    """times[slower] / times[faster] (medians), None when either is missing."""
    if slower not in times or faster not in times:
        return None
    return times[slower]["median_ms"] / times[faster]["median_ms"]


# ------------------------------------------------------------ deformable convolution


def dcn_cases(quick: bool, device: str = "cuda"):
    for c in DCN_CHANNELS:
        for size in DCN_SIZES:
            for batch in DCN_BATCHES:
                if quick and (c, size, batch) != QUICK_DCN[device]:
                    continue
                yield {"channels": c, "size": size, "batch": batch}


def torchvision_deform_conv2d():
    """torchvision's ``deform_conv2d`` (None, reason when torchvision is missing)."""
    try:
        from torchvision.ops import deform_conv2d
    except Exception as exc:  # ImportError, or a torch/torchvision version mismatch
        return None, f"torchvision cannot be imported ({type(exc).__name__}: {exc})"
    return deform_conv2d, None


def bench_dcn(device: str, ours: tuple[str, ...], quick: bool) -> dict:
    from edgekit import ops
    from edgekit.models.deform import deform_conv2d_reference
    tv, tv_error = torchvision_deform_conv2d()
    rows = []
    for case in dcn_cases(quick, device):
        b, c, s = case["batch"], case["channels"], case["size"]
        x = torch.randn(b, c, s, s, device=device)
        offset = torch.randn(b, 18, s, s, device=device)
        mask = torch.rand(b, 9, s, s, device=device)
        weight = torch.randn(c, c, 3, 3, device=device) / math.sqrt(9 * c)
        bias = torch.randn(c, device=device)
        args = (x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
        fns = {name: (lambda name=name: ops.deform_conv2d(*args, backend=name)) for name in ours}
        if tv is not None:
            fns["torchvision"] = lambda: tv(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
        fns["reference"] = lambda: deform_conv2d_reference(*args)
        ref = deform_conv2d_reference(*(t.double() for t in (x, offset, weight, bias)), (1, 1), (1, 1), (1, 1),
                                      mask.double())
        row = dict(case, times={}, errors={})
        with torch.no_grad():
            _check_and_time(row, fns, ref, device)
            del ref
            _check_and_time(row, {"dense": lambda: F.conv2d(x, weight, bias, padding=1)}, None, device)
        row["speedup_vs_torchvision"] = {n: _ratio(row["times"], "torchvision", n) for n in ours}
        row["ratio_to_dense"] = {n: _ratio(row["times"], n, "dense") for n in ours}
        rows.append(row)
        log(f"DCN {c}->{c} {s}x{s} b{b}: " + ", ".join(f"{n} {t['median_ms']:.4f} ms" for n, t in row["times"].items()))
    return {"rows": rows, "torchvision_error": tv_error}


# ------------------------------------------------------------------------- floors


def evaluate_floors(record: dict) -> list[dict]:
    """The GPU targets of ``targets.json``, per backend: met only if met on every configuration."""
    out = []
    for name in record["backends"]:
        values = {"grn_bandwidth": [r["bandwidth_fraction"][name] for r in record["grn"]["rows"]
                                    if r["larger_than_cache"] and name in r["bandwidth_fraction"]],
                  "dcn_vs_torchvision": [r["speedup_vs_torchvision"][name] for r in record["dcn"]["rows"]
                                         if r["speedup_vs_torchvision"].get(name) is not None]}
        out += [evaluate_target(t, values[t["key"]], backend=name) for t in load_targets("kernels_gpu")]
    return out


# ------------------------------------------------------------------------- reports


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"name": "CPU (plumbing check: not a GPU result)"}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "multiprocessors": p.multi_processor_count, "memory_bytes": p.total_memory,
            "l2_cache_bytes": getattr(p, "L2_cache_size", None), "capability": f"{p.major}.{p.minor}",
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for dist in ("torchvision", "cupy-cuda12x", "cupy-cuda13x", "numba-cuda", "numba"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def markdown(record: dict) -> str:
    m, d = record["machine"], record["device"]
    plumbing = record["device_type"] != "cuda"
    lines = ["# GPU kernel benchmarks (GRN, deformable convolution)", ""]
    if plumbing:
        lines += ["**Plumbing check on the CPU (`--plumbing-cpu`): the numba backend stands in for the GPU ones. "
                  "These are not GPU results.**", ""]
    lines += [f"Written by `{m['command']}` on {m['date']}.", "",
              f"- Device: {d['name']}" + ("" if plumbing else
                                           f", {d['multiprocessors']} SMs, L2 {d['l2_cache_bytes']} bytes, "
                                           f"{d['memory_bytes'] / 2**30:.0f} GiB, compute capability "
                                           f"{d['capability']}, CUDA {d['torch_cuda']}, cuDNN {d['cudnn']}") + ".",
              f"- Versions: python {m['python']}, torch {m['versions']['torch']}, "
              + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".",
              f"- Backends timed: {', '.join(record['backends'])}; unavailable: "
              + (", ".join(f"{k} ({v})" for k, v in record["unavailable"].items()) or "none") + ".",
              f"- Copy bandwidth (read + write, {record['copy']['bytes'] >> 20} MiB copy): "
              f"{record['copy']['gb_per_s']:.1f} GB/s." + ("" if plumbing else " TF32 off for matmul and cuDNN."),
              "- Times in ms: medians of event-timed blocks of back-to-back calls. err: largest absolute error "
              "over the largest value of a float64 reference; above "
              f"{ERROR_FLAG:g} is marked **wrong**.", "", "## Floors", "",
              "| floor | met | worst | geomean | best | configs met |", "|---|---|---|---|---|---|"]
    fmt = (lambda v: "—" if v is None else f"{v:.2f}")
    for f in record["floors"]:
        met = {True: "met", False: "**not met**", None: "not measured"}[f["met"]]
        lines.append(f"| {f['description']} | {met} | {fmt(f['worst'])} | {fmt(f['geomean'])} | {fmt(f['best'])} "
                     f"| {f['configs_met']}/{f['configs']} |")
    for key, err in (("compile_error", record["grn"]["compile_error"]),
                     ("torchvision", record["dcn"]["torchvision_error"])):
        if err:
            lines += ["", f"{'torch.compile' if key == 'compile_error' else 'torchvision'} could not run: `{err}`"]
    failures = _failures(record)
    if failures:
        lines += ["", "Failures (the implementation raised; its cells say **failed**):", ""]
        lines += [f"- {where}: {what}" for where, what in failures]
    lines += _grn_table(record)
    lines += _dcn_table(record)
    return "\n".join(lines) + "\n"


def _failures(record: dict) -> list[tuple[str, str]]:
    out = []
    for op in ("grn", "dcn"):
        for r in record[op]["rows"]:
            where = (f"GRN {'x'.join(map(str, r['shape']))}" if op == "grn" else
                     f"DCN {r['channels']}ch {r['size']}x{r['size']} b{r['batch']}")
            out += [(f"{where} {name}", msg) for name, msg in r.get("failures", {}).items()]
    return out


def _time_cells(row: dict, names: list[str]) -> list[str]:
    cells = []
    for n in names:
        if n in row.get("failures", {}):
            cells.append("**failed**")
            continue
        if n not in row["times"]:
            cells.append("—")
            continue
        err = row["errors"].get(n)
        flag = " **wrong**" if err is not None and not err <= ERROR_FLAG else ""
        cells.append(f"{row['times'][n]['median_ms']:.4f}" + flag)
    return cells


def _grn_table(record: dict) -> list[str]:
    ours = record["backends"]
    names = list(ours) + ["eager", "compile"]
    head = ["model", "px", "batch", "stage", "shape", "MiB", *names, "limit",
            *(f"{n} of limit" for n in ours), *(f"{n} x eager" for n in ours), *(f"{n} x compile" for n in ours),
            "worst err", "> L2"]
    lines = ["", "## GRN (channels_last float32)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["grn"]["rows"]:
        lines.append("| " + " | ".join([
            r["model"], str(r["resolution"]), str(r["batch"]), str(r["stage"]), "x".join(map(str, r["shape"])),
            f"{r['bytes'] / 2**20:.2f}", *_time_cells(r, names), f"{r['limit_ms']:.4f}",
            *(_fmt_percent(r["bandwidth_fraction"].get(n)) for n in ours),
            *(_fmt_ratio(r["speedup_vs_eager"][n]) for n in ours),
            *(_fmt_ratio(r["speedup_vs_compile"][n]) for n in ours),
            _worst_error(r), "yes" if r["larger_than_cache"] else "no"]) + " |")
    return lines


def _fmt_ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def _worst_error(row: dict) -> str:
    return f"{max(row['errors'].values()):.1e}" if row["errors"] else "—"


def _fmt_percent(v) -> str:
    return "—" if v is None else f"{v:.0%}"


def _dcn_table(record: dict) -> list[str]:
    ours = record["backends"]
    names = list(ours) + ["torchvision", "reference", "dense"]
    head = ["C->C", "map", "batch", *names, *(f"{n} x torchvision" for n in ours), *(f"{n} / dense" for n in ours),
            "worst err"]
    lines = ["", "## Deformable convolution (DCNv2 with mask and bias, 3x3, stride 1, pad 1, float32)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["dcn"]["rows"]:
        lines.append("| " + " | ".join([
            f"{r['channels']}->{r['channels']}", f"{r['size']}x{r['size']}", str(r["batch"]), *_time_cells(r, names),
            *(_fmt_ratio(r["speedup_vs_torchvision"][n]) for n in ours),
            *(_fmt_ratio(r["ratio_to_dense"][n]) for n in ours), _worst_error(r)]) + " |")
    return lines


# --------------------------------------------------------------------------- main


def _backends(device: str) -> tuple[tuple[str, ...], dict]:
    from edgekit.kernels import dispatch
    candidates = GPU_BACKENDS if device == "cuda" else ("numba",)
    reasons = {n: dispatch.unavailable_reason(n) for n in candidates}
    return tuple(n for n in candidates if reasons[n] is None), {n: r for n, r in reasons.items() if r}


def gpu_kernel_suite(config) -> dict:
    """The GPU kernel suite (a :class:`~edgekit.benchmarks.suites.GpuKernelSuiteConfig`);
    returns the record written to ``kernels_gpu*.{json,md}``; raises :class:`CheckError`
    when a kernel's output is wrong or an implementation failed (the report is written)."""
    args, out = config, Path(config.out)
    device = "cpu" if args.plumbing_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgekitError(f"no CUDA GPU visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}); "
                           "this suite times the GPU kernels (--plumbing-cpu checks the script on the CPU)")
    ours, unavailable = _backends(device)
    if not ours:
        raise EdgekitError("no edgekit GPU backend can run here: "
                           + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    record = {"machine": environment(), "device": device_info(device), "device_type": device,
              "versions": _versions(), "quick": args.quick, "backends": list(ours), "unavailable": unavailable}
    log("copy bandwidth...")
    record["copy"] = copy_bandwidth(device, args.quick)
    cache = record["device"].get("l2_cache_bytes") if device == "cuda" else None
    stem = "kernels_gpu" + ("_plumbing" if args.plumbing_cpu else "") + ("_quick" if args.quick else "")
    record["grn"] = bench_grn(device, ours, args.quick, record["copy"]["gb_per_s"] * 1e9, cache)
    write_json_atomic(out / f"{stem}.partial.json", record)  # the GRN half survives a crash in the DCN half
    record["dcn"] = bench_dcn(device, ours, args.quick)
    record["floors"] = evaluate_floors(record)
    write_json_atomic(out / f"{stem}.json", record)
    (out / f"{stem}.partial.json").unlink()
    write_text_atomic(out / f"{stem}.md", markdown(record))
    log(f"wrote {out / stem}.json and .md")
    wrong = [(op, n) for op in ("grn", "dcn") for r in record[op]["rows"] for n, e in r["errors"].items()
             if not e <= ERROR_FLAG]
    for f in record["floors"]:
        log(f"  {f['description']}: {({True: 'met', False: 'NOT met', None: 'not measured'})[f['met']]}"
            + ("" if f["worst"] is None else f" (worst {f['worst']:.2f}, {f['configs_met']}/{f['configs']} configs)"))
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} timed outputs differ from the float64 reference by more than {ERROR_FLAG:g}: "
                        + ", ".join(sorted({f'{op}/{n}' for op, n in wrong})))
    failures = _failures(record)
    if failures:
        problems.append(f"{len(failures)} implementation runs failed (listed in the report)")
    if problems:
        raise CheckError("; ".join(problems) + f" (report: {out / stem}.md)")
    return record


