"""ONNX Runtime CPU latency of a QDQ model against its FP32 graph (a note, not a floor).

    python -m edgekit.benchmarks.qdq_ort [--image-size 256] [--out benchmarks/results]

Exports rsdet_atto (random weights: latency does not depend on them), calibrates it on
random batches, writes W8A8, W7A8 (ORT's "reduce range" for AVX2 CPUs without VNNI) and
W4A8 QDQ files, and times each with ORT's full optimizations. Also records file sizes
and which integer kernels ORT's optimizer produced, so that "INT8 is slower" can be read
against "ORT fell back to float kernels".
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

VARIANTS = (("W8A8", 8), ("W7A8", 7), ("W4A8", 4))  # weight bits; activations are 8-bit
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits")


def _session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimized else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(image_size: int, out_dir: Path, calib_batches: int = 2) -> dict:
    import numpy as np
    import onnx
    import torch

    from edgekit.benchmarks.harness import machine_info, measure, write_atomic, write_json
    from edgekit.calibration.ptq import calibrate, weight_qparams
    from edgekit.export.qdq import quantize_onnx
    from edgekit.export.to_onnx import export_onnx
    from edgekit.models import create_model

    torch.manual_seed(0)
    model = create_model("rsdet_atto").eval()
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(model, tmp / "fp32.onnx", image_size=image_size)
        batches = [torch.randn(1, 3, image_size, image_size) for _ in range(calib_batches)]
        spec = calibrate(model, batches, progress=False)  # activations once; weights per variant
        modules = dict(model.named_modules())
        files = {"FP32": fp32}
        for name, wb in VARIANTS:
            for path, layer in spec["layers"].items():
                layer["weight"] = weight_qparams(modules[path].weight.detach(), wb)
            files[name] = quantize_onnx(fp32, spec, tmp / f"{name}.onnx", model=model)
        for name, path in files.items():
            _session(path, tmp / f"{name}.opt.onnx")  # the optimized graph, to count kernels
            ops = Counter(n.op_type for n in onnx.load(str(tmp / f"{name}.opt.onnx")).graph.node)
            session = _session(path)
            timing = measure(lambda s=session: s.run(None, {"images": x}), warmup=3, repeats=30, budget_s=10.0)
            rows.append({"model": name, "file_bytes": path.stat().st_size, **timing,
                         "integer_kernels": {k: ops[k] for k in INTEGER_OPS if ops[k]},
                         "float_convs": ops["Conv"] + ops["FusedConv"]})
    record = {"benchmark": "qdq_ort", "model": "rsdet_atto", "image_size": image_size, "batch": 1,
              "machine": machine_info(), "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "qdq_ort_cpu.json", record)
    write_atomic(out_dir / "qdq_ort_cpu.md", _markdown(record))
    return record


def _markdown(record: dict) -> str:
    m = record["machine"]
    base = next(r["median_ms"] for r in record["results"] if r["model"] == "FP32")
    lines = [f"# ONNX Runtime CPU: QDQ vs FP32 ({record['model']}, {record['image_size']} px, batch 1)", "",
             f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, load average "
             f"{m['load_average_1_5_15']}; onnxruntime {m['versions']['onnxruntime']}.", "",
             "A note, not a floor: on a shared 2-core machine the times are noisy (see p90).", "",
             "| model | file KiB | median ms | p90 ms | vs FP32 | integer kernels | float convs |",
             "|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        kernels = ", ".join(f"{k} {v}" for k, v in r["integer_kernels"].items()) or "none"
        lines.append(f"| {r['model']} | {r['file_bytes'] / 1024:.0f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{base / r['median_ms']:.2f}x | {kernels} | {r['float_convs']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", dest="image_size", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    record = run(args.image_size, Path(args.out))
    print(_markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
