"""ONNX Runtime CPU latency of edgekit's QDQ models against the FP32 graph and against
ONNX Runtime's own quantizer (a note, not a floor).

    edgekit bench qdq [--image-size 256] [--rounds 20] [--out benchmarks/results]

Exports rsdet_atto (random weights: latency does not depend on them), calibrates it once
on random batches (input and Conv output ranges), and writes:

- ``W8A8`` / ``W7A8``: ``quantize_onnx`` with conv outputs quantized, so ORT fuses every
  quantized conv into QLinearConv (7-bit weights: ORT's "reduce range" for AVX2 CPUs
  without VNNI, whose u8 x s8 kernels can saturate with 8-bit weights);
- ``W4A8 bit planes`` / ``W4A8 INT4``: 4-bit weights in the default packed storage
  (bit planes, which ORT folds into INT8 and runs as QLinearConv) and in ONNX's INT4
  (``weight_storage="native"``: the same file size, but ORT 1.32 has no integer kernel
  for it and runs DequantizeLinear + float convs);
- ``W7A8 in-only``: the same spec without output entries (edgekit's export before conv
  outputs were quantized: convs then run DequantizeLinear + float Conv);
- ``FP32 folded``: the FP32 graph with the exporter's computed zero conv biases made
  initializers (``fold_conv_biases``, which ``quantize_onnx`` applies too), so that the
  INT8 models' gain over FP32 is not just that: ORT then runs its blocked NCHWc float convs;
- ``ORT static``: ``onnxruntime.quantization.quantize_static`` (QDQ, per channel, reduce
  range, same calibration batches), the yardstick of what ORT reaches on this CPU.

The machine is shared and its load drifts, so models are timed interleaved (one run of
each per round) and compared by the median of per-round ratios to FP32. ORT's per-op
profile of FP32 and of W7A8 says where the time goes.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path

INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm",
               "DynamicQuantizeMatMul", "MatMulNBits")
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")
PROFILED = ("FP32", "FP32 folded", "W7A8")


def _session(path: Path, threads: int, optimized: Path | None = None, profile_prefix: str | None = None):
    """A CPU session at full optimization; with ``optimized`` the graph ORT ran is saved
    (at the EXTENDED level: the NCHWc layout transforms cannot be serialized)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimized else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized:
        options.optimized_model_filepath = str(optimized)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_static(fp32: Path, out: Path, batches) -> Path:
    """ORT's quantizer with the options its docs give for x86 CPUs (U8 activations, S8
    per-channel weights, reduce_range)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"images": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _op_profile(session, feed: dict, runs: int = 5, top: int = 10) -> dict:
    """{op type: mean ms per inference} of the ``top`` op types, from ORT's profiler."""
    for _ in range(runs):
        session.run(None, feed)
    path = Path(session.end_profiling())
    per_op: Counter = Counter()
    for event in json.loads(path.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / runs / 1e3
    path.unlink()
    return {"total_ms": round(sum(per_op.values()), 2),
            "top_ops_ms": {op: round(ms, 2) for op, ms in per_op.most_common(top)}}


def run(image_size: int, out_dir: Path, rounds: int = 20, threads: int = 2, calib_batches: int = 4) -> dict:
    import numpy as np
    import onnx
    import torch

    from edgekit.benchmarks.latency import measure_interleaved, ratio_of_rounds
    from edgekit.calibration.ptq import calibrate, weight_qparams
    from edgekit.fileio import write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment
    from edgekit.export.qdq import fold_conv_biases, quantize_onnx
    from edgekit.export.to_onnx import export_onnx
    from edgekit.models import create_model

    torch.manual_seed(0)
    model = create_model("rsdet_atto").eval()
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    feed = {"images": x}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("exporting and quantizing ...", flush=True)
        fp32 = export_onnx(model, tmp / "fp32.onnx", image_size=image_size)
        batches = [torch.randn(1, 3, image_size, image_size) for _ in range(calib_batches)]
        spec = calibrate(model, batches, progress=False, conv_outputs=True)  # activations once
        modules = dict(model.named_modules())
        files = {"FP32": fp32}
        for name, wb, outputs, storage in (("W8A8", 8, True, "packed"), ("W7A8", 7, True, "packed"),
                                           ("W7A8 in-only", 7, False, "packed"), ("W4A8 bit planes", 4, True, "packed"),
                                           ("W4A8 INT4", 4, True, "native")):
            variant = json.loads(json.dumps(spec))
            for path, layer in variant["layers"].items():
                layer["weight"] = weight_qparams(modules[path].weight.detach(), wb)
                if not outputs:
                    layer.pop("output", None)
            files[name] = quantize_onnx(fp32, variant, tmp / f"{name.replace(' ', '_')}.onnx", model=model,
                                        weight_storage=storage)
        folded = onnx.load(str(fp32))
        fold_conv_biases(folded)
        onnx.save(folded, str(tmp / "fp32_folded.onnx"))
        files["FP32 folded"] = tmp / "fp32_folded.onnx"
        files["ORT static"] = _ort_static(fp32, tmp / "ort_static.onnx", batches)

        rows, sessions, reference = [], {}, None
        for name, path in files.items():
            opt = tmp / f"{path.stem}.opt.onnx"
            _session(path, threads, opt)
            ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
            sessions[name] = _session(path, threads)
            y = sessions[name].run(None, feed)[1]  # scores: every level's classification logits
            reference = y if reference is None else reference
            rows.append({"model": name, "file_bytes": path.stat().st_size,
                         "integer_kernels": {k: ops[k] for k in INTEGER_OPS if ops[k]},
                         "float_compute": {k: ops[k] for k in FLOAT_COMPUTE_OPS if ops[k]},
                         "q_dq_nodes": ops["QuantizeLinear"] + ops["DequantizeLinear"],
                         "scores_mean_abs_diff_vs_fp32": float(np.abs(y - reference).mean())})
        print(f"timing {len(sessions)} models interleaved, {rounds} rounds ...", flush=True)
        # Each round runs every model once, so load drift hits all alike.
        timed = measure_interleaved({name: (lambda s=session: s.run(None, feed)) for name, session in sessions.items()},
                                    warmup=3, repeats=rounds, min_repeats=rounds, budget_s=math.inf, settle=0)
        for row in rows:
            t = timed[row["model"]]
            ratios = sorted(f / m for f, m in zip(timed["FP32"]["times_ms"], t["times_ms"]))
            row.update({"median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "min_ms": t["min_ms"],
                        "speedup_vs_fp32": ratio_of_rounds(timed["FP32"], t),
                        "speedup_p10_p90": [ratios[round(0.1 * (len(ratios) - 1))],
                                            ratios[round(0.9 * (len(ratios) - 1))]]})
        profiles = {}
        for name in PROFILED:
            session = _session(files[name], threads, profile_prefix=str(tmp / f"profile_{name}"))
            profiles[name] = _op_profile(session, feed)
    record = {"benchmark": "qdq_ort", "model": "rsdet_atto", "image_size": image_size, "batch": 1,
              "cpu_flags": _simd_flags(), "intra_op_num_threads": threads, "rounds": rounds, "machine": environment(), "results": rows,
              "op_profiles": profiles}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "qdq_ort_cpu.json", record)
    write_text_atomic(out_dir / "qdq_ort_cpu.md", _markdown(record))
    return record


def _simd_flags() -> list:
    """The SIMD flags that decide ORT's integer kernels (VNNI or not), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f)


def _markdown(record: dict) -> str:
    m = record["machine"]
    load = ", ".join(f"{v:.1f}" for v in m["load_average_1_5_15"] or ())
    lines = [f"# ONNX Runtime CPU: QDQ vs FP32 ({record['model']}, {record['image_size']} px, batch 1)", "",
             f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, load average "
             f"(1/5/15 min, at the end) {load}; onnxruntime {m['versions']['onnxruntime']}, "
             f"intra_op_num_threads={record['intra_op_num_threads']}; SIMD: {' '.join(record['cpu_flags']) or '?'}.", "",
             f"Interleaved: {record['rounds']} rounds, each runs every model once; \"vs FP32\" is the median of "
             f"the per-round ratios FP32 ms / model ms (above 1: faster than FP32). A note, not a floor: the "
             f"2-core machine is shared.", "",
             "| model | file KiB | median ms | p90 ms | vs FP32 (p10-p90) | integer kernels | float convs/matmuls | "
             "Q+DQ nodes | scores mean abs diff vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        kernels = ", ".join(f"{k} {v}" for k, v in r["integer_kernels"].items()) or "none"
        floats = ", ".join(f"{k} {v}" for k, v in r["float_compute"].items()) or "none"
        lines.append(f"| {r['model']} | {r['file_bytes'] / 1024:.0f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['speedup_vs_fp32']:.2f}x ({r['speedup_p10_p90'][0]:.2f}-{r['speedup_p10_p90'][1]:.2f}) | {kernels} | {floats} | {r['q_dq_nodes']} | "
                     f"{r['scores_mean_abs_diff_vs_fp32']:.3g} |")
    lines += ["", "Per-op kernel time (ORT profiler, ms per inference, top op types; run one after the other, "
              "not interleaved):", ""]
    for name, p in record["op_profiles"].items():
        ops = ", ".join(f"{op} {ms:.1f}" for op, ms in p["top_ops_ms"].items())
        lines.append(f"- {name}: total {p['total_ms']:.1f} ms; {ops}")
    return "\n".join(lines) + "\n"


def qdq_suite(config) -> dict:
    """The suite (a :class:`~edgekit.benchmarks.suites.QdqSuiteConfig`): writes
    ``qdq_ort_cpu.{json,md}`` under ``config.out``."""
    record = run(config.image_size, Path(config.out), rounds=config.rounds, threads=config.threads)
    print(_markdown(record))
    return record
