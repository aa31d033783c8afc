"""CPU kernel benchmark suite: GRN and deformable convolution, Numba vs the baselines.

Run ``edgekit bench kernels`` (``--quick`` for a short run, which writes
``kernels_cpu_quick.*``, and ``--only grn|dcn`` for one op, which writes
``kernels_cpu_grn.*``/``kernels_cpu_dcn.*``, so neither replaces the full result). One run
measures, side by side on this machine:

- GRN at the input of every ConvNeXt V2 atto and nano stage (224 and 512 px, batch 1
  and 8, channels_last float32): Numba, the eager reference, ``torch.compile`` of the
  reference, and the copy-bandwidth limit (GRN must read the tensor twice and write it
  once; the limit is that traffic at the measured copy bandwidth).
- Deformable convolution (DCNv2: mask and bias) 64->64 and 128->128, 3x3, 64x64 and
  128x128 maps, batch 1 and 4: Numba forward and backward, the torch reference,
  ONNX Runtime's DeformConv (CPU EP, 2 intra-op threads) and a dense ``F.conv2d``.

It writes ``benchmarks/results/kernels_cpu.json`` and ``.md`` with the machine, versions,
command and date, and each target of ``targets.json`` as met / not met with the measured ratio.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgekit.benchmarks.devices import copy_bandwidth
from edgekit.benchmarks.latency import measure, measure_interleaved, ratio_of_rounds
from edgekit.benchmarks.targets import evaluate_target, load_targets
from edgekit.errors import EdgekitError
from edgekit.fileio import write_json_atomic, write_text_atomic
from edgekit.sysinfo import environment, last_level_cache_bytes
from edgekit.kernels.output_pool import OUTPUTS

RESULTS = Path(__file__).resolve().parent / "results"
STAGE_DIMS = {"atto": (40, 80, 160, 320), "nano": (80, 160, 320, 640)}
STAGE_SIZES = {224: (56, 28, 14, 7), 512: (128, 64, 32, 16)}
GRN_BATCHES = (1, 8)
DCN_CHANNELS, DCN_SIZES, DCN_BATCHES = (64, 128), (64, 128), (1, 4)
THREADS = 2

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- GRN


def grn_cases(quick: bool):
    for model, dims in STAGE_DIMS.items():
        for res, sizes in STAGE_SIZES.items():
            for batch in GRN_BATCHES:
                for stage, (dim, size) in enumerate(zip(dims, sizes)):
                    if quick and not ((model, res, batch, stage) in {("atto", 224, 1, 0), ("atto", 224, 1, 3),
                                                                       ("nano", 512, 8, 0)}):
                        continue
                    yield {"model": model, "resolution": res, "batch": batch, "stage": stage, "dim": dim,
                           "size": size}


def _grn_fresh_output(x, gamma, beta):
    """The numba GRN with its output pool bypassed: a freshly allocated output, as eager
    and torch.compile get."""
    from edgekit.kernels import numba_cpu
    with OUTPUTS.bypassed():
        return numba_cpu.grn(x, gamma, beta)


def compiled_grn(device: str = "cpu", static_shapes: bool = False):
    """``torch.compile`` of the reference, or (None, the error) where it does not work here.

    ``static_shapes``: one specialised graph per shape (what a deployed model of fixed
    input size gets), with the recompile limit raised for the suite's shapes and a hit of
    it an error, not a silent fall back to eager. Otherwise torch's default, which turns
    to dynamic-shape code after the second shape."""
    from edgekit.models.grn import grn_reference
    try:
        if static_shapes:
            import torch._dynamo.config as dynamo_config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 128)
            dynamo_config.fail_on_recompile_limit_hit = True
        fn = torch.compile(grn_reference, dynamic=False if static_shapes else None)
        x = torch.randn(1, 4, 4, 8, device=device)
        with torch.no_grad():
            fn(x, torch.ones(8, device=device), torch.zeros(8, device=device))
        return fn, None
    except Exception as exc:  # any failure is a result to record, not a crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def bench_grn(quick: bool, bandwidth: float, llc: int | None) -> dict:
    from edgekit.kernels import numba_cpu
    from edgekit.models.grn import grn_reference
    compiled, compile_error = compiled_grn()
    rows = []
    for case in grn_cases(quick):
        shape = (case["batch"], case["size"], case["size"], case["dim"])
        x = torch.randn(shape)
        gamma, beta = torch.randn(case["dim"]), torch.randn(case["dim"])
        nbytes = x.numel() * x.element_size()
        budget = 0.5 if quick else 1.5
        row = dict(case, shape=list(shape), bytes=nbytes, larger_than_llc=bool(llc and nbytes > llc))
        fns = {"numba": lambda: numba_cpu.grn(x, gamma, beta), "eager": lambda: grn_reference(x, gamma, beta)}
        if nbytes >= OUTPUTS.min_bytes and OUTPUTS.capacity >= nbytes:  # the pool serves this output
            fns["numba_fresh_output"] = lambda: _grn_fresh_output(x, gamma, beta)
        with torch.no_grad():
            if compiled is not None:
                try:
                    compiled(x, gamma, beta)  # a new shape may recompile: not part of the timing
                    fns["compile"] = lambda: compiled(x, gamma, beta)
                except Exception as exc:
                    row["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            # No gap: after a sleep the 2-core VM runs a sub-millisecond kernel 2-4x slower for a few
            # calls; two untimed calls per turn let the previous function's threads settle instead.
            row.update(measure_interleaved(fns, budget_s=budget * len(fns), repeats=30, settle=2, calls=3))
        t = row["numba"]["median_ms"]
        row["limit_ms"] = 3 * nbytes / bandwidth * 1e3
        row["bandwidth_fraction"] = row["limit_ms"] / t
        if "numba_fresh_output" in row:
            row["fresh_output_bandwidth_fraction"] = row["limit_ms"] / row["numba_fresh_output"]["median_ms"]
        row["speedup_vs_eager"] = ratio_of_rounds(row["eager"], row["numba"])
        if "compile" in row:
            row["speedup_vs_compile"] = ratio_of_rounds(row["compile"], row["numba"])
        rows.append(row)
        log(f"GRN {case['model']} {case['resolution']}px b{case['batch']} stage {case['stage']} {shape}: "
            f"numba {t:.3f} ms, eager {row['eager']['median_ms']:.3f} ms, "
            f"compile {row.get('compile', {}).get('median_ms', float('nan')):.3f} ms, "
            f"limit {row['limit_ms']:.3f} ms")
    return {"rows": rows, "compile_error": compile_error}


# ------------------------------------------------------------ deformable convolution


def ort_deform_session(x, weight, bias, offset, mask):
    """An ONNX Runtime session running one DeformConv (opset 19) on the CPU EP."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    c_out, _, kh, kw = weight.shape
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape))
           for n, t in (("X", x), ("offset", offset), ("mask", mask))]
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    inits = [onnx.numpy_helper.from_array(weight.numpy(), "W"), onnx.numpy_helper.from_array(bias.numpy(), "B")]
    node = helper.make_node("DeformConv", ["X", "W", "offset", "B", "mask"], ["Y"], kernel_shape=[kh, kw],
                            pads=[kh // 2, kw // 2, kh // 2, kw // 2], strides=[1, 1], dilations=[1, 1],
                            group=1, offset_group=1)
    model = helper.make_model(helper.make_graph([node], "deform", ins, [out], inits),
                              opset_imports=[helper.make_opsetid("", 19)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"X": x.numpy(), "offset": offset.numpy(), "mask": mask.numpy()}
    return lambda: sess.run(None, feeds)


def no_grad(fn):
    """``fn`` run under ``torch.no_grad()`` (inference timings beside a backward)."""
    def run():
        with torch.no_grad():
            return fn()
    return run


def dcn_cases(quick: bool):
    for c in DCN_CHANNELS:
        for size in DCN_SIZES:
            for batch in DCN_BATCHES:
                if quick and (c, size, batch) != (64, 64, 1):
                    continue
                yield {"channels": c, "size": size, "batch": batch}


def bench_dcn(quick: bool) -> list[dict]:
    from edgekit.kernels import numba_cpu
    from edgekit.models.deform import deform_conv2d_reference
    rows = []
    for case in dcn_cases(quick):
        c, s, b = case["channels"], case["size"], case["batch"]
        x = torch.randn(b, c, s, s)
        offset = torch.randn(b, 18, s, s)
        mask = torch.rand(b, 9, s, s)
        weight = torch.randn(c, c, 3, 3) / math.sqrt(9 * c)
        bias = torch.randn(c)
        args = (x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
        big = c * s * s * b >= 128 * 128 * 128
        budget = 0.5 if quick else (4.0 if big else 2.0)
        opts = dict(budget_s=budget, repeats=20, warmup=1)
        row = dict(case, kernel=[3, 3], modulated=True)
        leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias, mask)]
        out = numba_cpu.deform_conv2d(*leaves[:4], (1, 1), (1, 1), (1, 1), leaves[4])
        grad = torch.randn_like(out)
        # Side by side (one round runs each once): the ratios are medians of per-round ratios.
        fns = {"numba_forward": no_grad(lambda: numba_cpu.deform_conv2d(*args)),
               "numba_backward": lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True),
               "dense_conv": no_grad(lambda: F.conv2d(x, weight, bias, padding=1))}
        try:
            fns["ort_deformconv"] = ort_deform_session(x, weight, bias, offset, mask)
        except Exception as exc:
            row["ort_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        row.update(measure_interleaved(fns, **dict(opts, budget_s=budget * len(fns)), gap_s=0.1))
        del out
        with torch.no_grad():  # 2-10x slower than the rest: timed on its own
            row["torch_reference_forward"] = measure(lambda: deform_conv2d_reference(*args), **opts)
        if not quick:
            ref_out = deform_conv2d_reference(*leaves[:4], (1, 1), (1, 1), (1, 1), leaves[4])
            row["torch_reference_backward"] = measure(
                lambda: torch.autograd.grad(ref_out, leaves, grad, retain_graph=True), **opts)
            del ref_out
        fwd = row["numba_forward"]["median_ms"]
        row["numba_vs_reference"] = row["torch_reference_forward"]["median_ms"] / fwd
        if "ort_deformconv" in row:
            row["speedup_vs_ort"] = ratio_of_rounds(row["ort_deformconv"], row["numba_forward"])
            row["ort_over_dense"] = ratio_of_rounds(row["ort_deformconv"], row["dense_conv"])
        row["ratio_to_dense"] = ratio_of_rounds(row["numba_forward"], row["dense_conv"])
        row["backward_over_forward"] = ratio_of_rounds(row["numba_backward"], row["numba_forward"])
        rows.append(row)
        log(f"DCN {c}->{c} {s}x{s} b{b}: numba fwd {fwd:.2f} ms bwd {row['numba_backward']['median_ms']:.2f} ms, "
            f"ref {row['torch_reference_forward']['median_ms']:.2f} ms, "
            f"ORT {row.get('ort_deformconv', {}).get('median_ms', float('nan')):.2f} ms, "
            f"dense {row['dense_conv']['median_ms']:.2f} ms")
    return rows


# --------------------------------------------------------------------------- floors


def evaluate_floors(grn: dict, dcn: list[dict]) -> list[dict]:
    """Each target of ``targets.json`` over every configuration it applies to."""
    values = {
        "grn_vs_eager": [r["speedup_vs_eager"] for r in grn["rows"]],
        "grn_vs_compile": [r["speedup_vs_compile"] for r in grn["rows"] if "speedup_vs_compile" in r],
        "grn_bandwidth": [r["bandwidth_fraction"] for r in grn["rows"] if r["larger_than_llc"]],
        "dcn_vs_ort": [r["speedup_vs_ort"] for r in dcn if "speedup_vs_ort" in r],
        "dcn_vs_dense": [r["ratio_to_dense"] for r in dcn],
        "dcn_bwd_vs_fwd": [r["backward_over_forward"] for r in dcn],
    }
    return [evaluate_target(t, values[t["key"]]) for t in load_targets("kernels_cpu")]


# ------------------------------------------------------------------------- reports


def _ms(m: dict | None) -> str:
    return "—" if not m else f"{m['median_ms']:.3f}"


def _flag_noisy(record: dict) -> list[str]:
    spreads = [m["spread"] for r in record["grn"]["rows"] for k, m in r.items()
               if isinstance(m, dict) and "spread" in m]
    spreads += [m["spread"] for r in record["dcn"] for m in r.values() if isinstance(m, dict) and "spread" in m]
    noisy = sum(s > 1.3 for s in spreads)
    load0 = record["machine"]["load_average_1_5_15"]
    load1 = record["load_average_at_end"]
    lines = [f"- Load average (1/5/15 min) at start {load0}, at end {load1}; {noisy} of {len(spreads)} "
             f"measurements had p90/median > 1.3."]
    cores = record["machine"]["cores"] or 1
    if (load0 and load0[0] > 0.5 * cores) or noisy > len(spreads) // 10:
        lines.append("- **The machine was shared and noisy during this run** (other jobs on the same cores): "
                     "absolute times are pessimistic and ratios between implementations measured at different "
                     "moments carry that noise.")
    return lines


def markdown(record: dict) -> str:
    m = record["machine"]
    v = m["versions"]
    lines = [
        "# CPU kernel benchmarks (GRN, deformable convolution)",
        "",
        f"Written by `{m['command']}` on {m['date']}.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, last-level cache {m['last_level_cache_bytes']} bytes, "
        f"{m['platform']}; torch threads {m['torch_threads']}, numba threads {record['numba_threads']} "
        f"(threading layer {record['numba_threading_layer']}).",
        f"- Versions: python {m['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Copy bandwidth (read+write, {record['copy']['bytes'] >> 20} MiB copy): "
        f"{record['copy']['gb_per_s']:.2f} GB/s.",
        *_flag_noisy(record),
        *_pool_line(record),
        "- Times are medians in ms (the JSON also has p90, min, repeats and every round's time). "
        "Each configuration's implementations are timed interleaved (every round runs each once), and "
        "the ratios are medians of the per-round ratios, so load that changes between rounds cancels; "
        "the DCN torch reference is timed on its own.",
        "",
        "## Floors",
        "",
        "| floor | met | worst | geomean | best | configs met |",
        "|---|---|---|---|---|---|",
    ]
    for f in record["floors"]:
        met = {True: "met", False: "**not met**", None: "not measured"}[f["met"]]
        fmt = (lambda x: "—" if x is None else f"{x:.2f}")
        lines.append(f"| {f['description']} | {met} | {fmt(f['worst'])} | {fmt(f['geomean'])} | {fmt(f['best'])} "
                     f"| {f['configs_met']}/{f['configs']} |")
    missed = [f for f in record["floors"] if f["met"] is False]
    if missed:
        lines += ["", "Floors not met (by how much at the worst configuration, and why):", ""]
        why_not_met = {t["key"]: t["why_not_met"] for t in load_targets("kernels_cpu")}
        for f in missed:
            short = (f["threshold"] / f["worst"]) if f["comparison"] == ">=" else (f["worst"] / f["threshold"])
            why = why_not_met.get(f["floor"]) or "see the table below."
            if f["floor"] == "grn_vs_eager":
                why += _grn_eager_bound(record["grn"]["rows"], f["threshold"])
            lines.append(f"- {f['description']}: worst {f['worst']:.2f} vs {f['threshold']} "
                         f"({short:.2f}x short); {why}")
    if record["grn"]["compile_error"]:
        lines += ["", f"torch.compile failed here: `{record['grn']['compile_error']}`"]
    if record["grn"]["rows"]:
        lines += _grn_table(record["grn"]["rows"], record.get("output_pool"))
    if record["dcn"]:
        lines += _dcn_table(record["dcn"])
    return "\n".join(lines) + "\n"


def _pool_line(record: dict) -> list[str]:
    """The numba output pool's setting (results written before it existed have none)."""
    pool = record.get("output_pool")
    if not pool:
        return []
    return [f"- numba output pool: outputs of {pool['min_bytes'] >> 20} MiB or more reuse freed blocks, "
            f"at most {pool['capacity_bytes'] >> 20} MiB kept (`EDGEKIT_OUTPUT_POOL_MB`)."]


def _grn_eager_bound(rows: list[dict], threshold: float) -> str:
    """How many of the configurations that miss the eager floor have an eager reference
    within ``threshold`` times the copy limit (column eager / limit)."""
    missed = [r for r in rows if r["speedup_vs_eager"] < threshold]
    if not missed:
        return ""
    bound = sum(_eager_over_limit(r) < threshold for r in missed)
    return (f" Of the {len(missed)} configurations that miss it, {bound} have an eager reference within "
            f"{threshold:g}x of the DRAM copy limit (column eager / limit): there {threshold:g}x eager means "
            f"beating that limit.")


def _eager_over_limit(row: dict) -> float:
    """The eager reference's median over the copy limit (derived from the row, so results
    written before this column existed render it too)."""
    return row["eager"]["median_ms"] / row["limit_ms"]


def _table_head(title: str, columns: str) -> list[str]:
    """A markdown section heading and table header; ``columns`` separated by commas."""
    names = [c.strip() for c in columns.split(",")]
    return ["", f"## {title}", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def _grn_table(rows: list[dict], pool: dict | None) -> list[str]:
    lines = _table_head("GRN (channels_last float32)", "model, px, batch, stage, shape, MiB, numba, eager, compile, "
                        "limit, x eager, x compile, of limit, > LLC, eager / limit")
    for r in rows:
        sc = r.get("speedup_vs_compile")
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['stage']} | {'x'.join(map(str, r['shape']))} "
            f"| {r['bytes'] / 2**20:.2f} | {_ms(r['numba'])} | {_ms(r['eager'])} | {_ms(r.get('compile'))} "
            f"| {r['limit_ms']:.3f} | {r['speedup_vs_eager']:.1f} | {'—' if sc is None else f'{sc:.2f}'} "
            f"| {r['bandwidth_fraction']:.0%} | {'yes' if r['larger_than_llc'] else 'no'} "
            f"| {_ratio(_eager_over_limit(r))} |")
    lines += ["", "eager / limit: the eager reference's time over three passes at the measured (DRAM) copy "
              "bandwidth. Where it is below 8, 8x eager asks for a GRN faster than that limit, which only a "
              "tensor served from cache allows."]
    pooled = [r for r in rows if "numba_fresh_output" in r]
    if pooled and pool:
        lines += ["", f"numba writes outputs of {pool['min_bytes'] / 2**20:g} MiB or more into a freed block of its "
                  "output pool "
                  "(`edgekit.kernels.output_pool`), where eager and torch.compile get fresh pages from the OS. "
                  "The same kernel into a fresh output, timed in the same rounds:"]
        lines += [f"- {'x'.join(map(str, r['shape']))}: {_ms(r['numba_fresh_output'])} ms, "
                  f"{r['fresh_output_bandwidth_fraction']:.0%} of the limit (pooled {r['bandwidth_fraction']:.0%})"
                  for r in pooled]
    return lines


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _dcn_table(rows: list[dict]) -> list[str]:
    lines = _table_head("Deformable convolution (DCNv2 with mask and bias, 3x3, stride 1, pad 1, float32)",
                        "C->C, map, batch, numba fwd, numba bwd, reference fwd, reference bwd, ORT DeformConv, "
                        "dense conv, x reference, x ORT, / dense, bwd / fwd, ORT / dense")
    for r in rows:
        so = r.get("speedup_vs_ort")
        lines.append(
            f"| {r['channels']}->{r['channels']} | {r['size']}x{r['size']} | {r['batch']} | {_ms(r['numba_forward'])} "
            f"| {_ms(r['numba_backward'])} | {_ms(r['torch_reference_forward'])} "
            f"| {_ms(r.get('torch_reference_backward'))} | {_ms(r.get('ort_deformconv'))} | {_ms(r['dense_conv'])} "
            f"| {r['numba_vs_reference']:.2f} | {'—' if so is None else f'{so:.2f}'} | {r['ratio_to_dense']:.2f} "
            f"| {r['backward_over_forward']:.2f} | {_ratio(r.get('ort_over_dense'))} |")
    lines += ["", "ORT / dense: ONNX Runtime's DeformConv time over the dense conv's. Our forward meets "
              "1.5x ORT only at or below (ORT / dense) / 1.5 times the dense conv, and it runs the dense "
              "conv's GEMM (the same FLOPs) plus the sampling, so where that bound is near 1 the floor "
              "asks for a GEMM faster than oneDNN's own."]
    errors = [f"- {r['channels']}ch {r['size']}px b{r['batch']}: {r['ort_error']}" for r in rows
              if "ort_error" in r]
    if errors:
        lines += ["", "ONNX Runtime errors:", *errors]
    return lines


def kernel_suite(config) -> dict:
    """The CPU kernel suite (a :class:`~edgekit.benchmarks.suites.KernelSuiteConfig`); returns
    the record written to ``kernels_cpu*.{json,md}`` under ``config.out``."""
    args, out = config, Path(config.out)
    torch.set_num_threads(THREADS)
    import numba

    from edgekit.kernels import numba_cpu
    reason = numba_cpu.unavailable_reason()
    if reason:
        raise EdgekitError(f"the numba backend is unavailable: {reason}")
    try:
        pool = {"min_bytes": OUTPUTS.min_bytes, "capacity_bytes": OUTPUTS.capacity}
    except ValueError as exc:
        raise EdgekitError(str(exc)) from None
    record = {"machine": environment(), "quick": args.quick, "only": args.only, "output_pool": pool}
    log("warming up (first use compiles the Numba kernels)...")
    t0 = time.perf_counter()
    if args.only != "dcn":
        numba_cpu.grn(torch.randn(1, 8, 8, 8), torch.ones(8), torch.zeros(8))  # the serial build
        numba_cpu.grn(torch.randn(8, 64, 64, 8), torch.ones(8), torch.zeros(8))  # the parallel build
    if args.only != "grn":
        xd = torch.randn(1, 4, 8, 8, requires_grad=True)
        numba_cpu.deform_conv2d(xd, torch.zeros(1, 18, 8, 8), torch.randn(4, 4, 3, 3), torch.zeros(4), (1, 1),
                                (1, 1), (1, 1), torch.ones(1, 9, 8, 8)).sum().backward()
    record["numba_warmup_s"] = time.perf_counter() - t0
    record["numba_threads"] = numba.get_num_threads()
    record["numba_threading_layer"] = numba.threading_layer()
    log("copy bandwidth...")
    record["copy"] = copy_bandwidth(64 if args.quick else 256)
    record["grn"] = ({"rows": [], "compile_error": None} if args.only == "dcn" else
                     bench_grn(args.quick, record["copy"]["gb_per_s"] * 1e9, last_level_cache_bytes()))
    record["dcn"] = [] if args.only == "grn" else bench_dcn(args.quick)
    record["floors"] = evaluate_floors(record["grn"], record["dcn"])
    record["load_average_at_end"] = os.getloadavg()
    stem = "kernels_cpu" + ("_quick" if args.quick else "") + (f"_{args.only}" if args.only else "")
    write_json_atomic(out / f"{stem}.json", record)
    write_text_atomic(out / f"{stem}.md", markdown(record))
    log(f"wrote {out / stem}.json and .md")
    for f in record["floors"]:
        if f["configs"]:
            log(f"  {f['description']}: {'met' if f['met'] else 'NOT met'} (worst {f['worst']:.2f}, geomean "
                f"{f['geomean']:.2f}, {f['configs_met']}/{f['configs']} configs)")
    return record


