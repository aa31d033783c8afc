"""Detector-safe defaults, one row per choice: what each part that quantize keeps at 8 bits
by default costs when it goes to 4 bits like the rest.

Start: the default W4A8 PTQ spec of the checkpoint (``quantize --method uniform
--weight-bits 4``: the first layer and the layers that write the outputs at 8 bits, found
by tracing, :func:`edgekit.calibration.quantize.trace_layers`). Each row lowers one group of
those layers to 4 bits (their weight grids redone as the accuracy-control loop redoes them,
:func:`~edgekit.calibration.accuracy_bound.spec_for_bits`) and is scored twice on the same
seeded validation subset: simulated (torch fake quantization) and deployed (its QDQ graph in
ONNX Runtime, :mod:`edgekit.export.deployed_metric`). Decoding (box and angle decoding, NMS)
and the GRN and LayerNorm statistics have no row: no edgekit export quantizes them (the QDQ
rewrite puts Q/DQ pairs only on the inputs and weights of convolutions and linear layers), so
they run in float in every deliverable.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _groups(first: set, last: set) -> list[tuple[str, set]]:
    """(row, layers lowered to 4 bits): each protected group alone, then all of them."""
    box = {p for p in last if p.endswith(("box_out", "angle_out"))}
    scores = last - box
    rows = [("the default: first layer and output layers 8-bit", set()),
            (f"first layer 4-bit ({', '.join(sorted(first))})", set(first)),
            (f"box regression outputs 4-bit ({', '.join(sorted(box))})", box),
            (f"score logits 4-bit ({', '.join(sorted(scores))})", scores),
            ("every layer 4-bit", set(first) | set(last))]
    return [(name, layers) for name, layers in rows if layers or name.startswith("the default")]


def run(config) -> dict:
    """Measure, write ``safe_defaults_cpu.json`` and ``.md`` under ``config.out``."""
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.accuracy_control import bits_from_spec
    from edgekit.calibration.pipeline import QuantizeRecipe, quantize_checkpoint
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.quantize import default_example_input, quantizable_layers, trace_layers
    from edgekit.engine.checkpoint import load
    from edgekit.export.deployed_metric import OnnxRuntimeMeasure
    from edgekit.fileio import write_results
    from edgekit.sysinfo import environment

    started = time.perf_counter()
    loaded = load(config.checkpoint)
    model, size, classes = loaded.model, loaded.image_size, loaded.detector_classes()
    data = Path(config.data)
    val = ab.validation_batches(data / "val", classes, size, config.val_images)
    baseline = ab.map_points(model, val, classes)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = QuantizeRecipe(method="uniform", weight_bits=4, calib_batches=config.calib_batches, progress=False)
        spec = quantize_checkpoint(config.checkpoint, recipe, data=data / "train", out=Path(tmp) / "q").spec
    graph = trace_layers(model, quantizable_layers(model), default_example_input(model, size))
    bits = bits_from_spec(spec)
    deployed = OnnxRuntimeMeasure(model, size, val, classes)
    rows = []
    try:
        for name, lowered in _groups(set(graph.first), set(graph.last)):
            variant = ab.spec_for_bits(spec, model, {**bits, **{p: 4 for p in lowered}})
            simulated = ab.spec_metric(model, val, classes)(variant)
            measured = deployed(variant)
            totals = profile_model(model, size, variant, model_name=loaded.name).totals
            rows.append({"row": name, "lowered": sorted(lowered), "map": simulated, "drop": baseline - simulated,
                         "ort_map": measured, "ort_drop": baseline - measured, "bops": totals["bops"],
                         "size_mb": totals["size_mb"]})
            print(f"{name}: {ab.METRIC} {simulated:.2f} simulated, {measured:.2f} in ONNX Runtime", flush=True)
    finally:
        deployed.close()
    record = {"benchmark": "safe_defaults", "model": loaded.name, "checkpoint": str(config.checkpoint),
              "image_size": size, "metric": ab.METRIC, "validation_images": sum(len(t) for _, t in val),
              "float_map": baseline, "calibration_images": 2 * config.calib_batches, "rows": rows,
              "first_layers": sorted(graph.first), "output_layers": sorted(graph.last),
              "seconds": time.perf_counter() - started, "machine": environment()}
    write_results(config.out, "safe_defaults_cpu", record, markdown(record))
    return record


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [f"# Detector-safe defaults on {record['model']} ({record['image_size']} px): what each 8-bit "
             "default buys", "",
             f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores; "
             f"{record['seconds'] / 60:.1f} min.", "",
             f"W4A8 PTQ ({record['calibration_images']} calibration images); {record['metric']} on a fixed seeded "
             f"subset of {record['validation_images']} validation images, float {record['float_map']:.2f}. "
             "`mAP`: the spec simulated in torch; `ORT mAP`: its QDQ graph run by ONNX Runtime. Each row lowers "
             "one group of the layers the default keeps at 8 bits to 4 bits; the rest stays as the default.", "",
             "| row | mAP | drop | ORT mAP | ORT drop | GBOPs | MB |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['row']} | {r['map']:.2f} | {r['drop']:.2f} | {r['ort_map']:.2f} | {r['ort_drop']:.2f} | "
                     f"{r['bops'] / 1e9:.1f} | {r['size_mb']:.3f} |")
    lines += ["", "No row for decoding (box/angle decoding, NMS) or the GRN and LayerNorm statistics: no edgekit "
              "export quantizes them (Q/DQ pairs only on convolution and linear inputs and weights), so they are "
              "float in every deliverable.", "",
              "One validation subset and one calibration draw: differences of a few tenths of a point are within "
              "the noise of 32 images."]
    return "\n".join(lines) + "\n"


def safe_defaults_suite(config) -> dict:
    """The suite (a :class:`~edgekit.benchmarks.suites.SafeDefaultsSuiteConfig`)."""
    return run(config)
