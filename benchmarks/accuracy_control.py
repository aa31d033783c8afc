"""Accuracy control evidence: ``quantize --max-drop`` on the built-in detector against
uniform W8A8 PTQ, and what an 8-image calibration set costs.

Rows (one detector, one fixed seeded validation subset for every mAP, the subset that
``--max-drop`` itself bounds on):

- float: the checkpoint as trained;
- W8A8 PTQ (``calibrate``, minmax) on ``calib_images`` training images, and on 8;
- the starting point of accuracy control (``quantize --method ghost``) and the same with
  ``--max-drop`` for each bound: the drop reached on the written model, the steps taken;
- for each: BOPs and packed size (the profiler), and ONNX Runtime CPU latency of its ONNX
  export (median of interleaved rounds, batch 1).

mAP of the quantized rows is that of their quant spec run by ``apply_fake_quant`` (the
simulation the exports' parity checks compare the ONNX graph with), in points x100 of COCO
mAP@[.5:.95]. NNCF's and ORT ``quantize_static``'s rows are not run (NNCF is not
installed here; ORT's static quantizer needs its own calibration reader): the record says so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

EIGHT = 8
BOUNDS = (1.0, 0.5)


def _train(workdir: Path, train_seconds: float, seed: int) -> tuple[Path, Path]:
    """(checkpoint, DOTA root): the demo's plan, trained within ``train_seconds``."""
    from edgekit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
    from edgekit.demo import FULL
    from edgekit.engine.config import TrainConfig
    from edgekit.engine.train import train

    data = workdir / "data"
    generate_synthetic_dataset(data, num_train=FULL["num_train"], num_val=FULL["num_val"],
                               image_size=FULL["image_size"], seed=seed)
    result = train(TrainConfig(data=str(data), out=str(workdir / "train"), model="rsdet_atto",
                               classes=list(SYNTHETIC_CLASSES), image_size=FULL["image_size"], epochs=FULL["epochs"],
                               batch_size=FULL["batch_size"], time_limit=train_seconds, progress=False))
    return Path(result.checkpoint), data


def _export(source, fmt: str, out: Path, calibration=None) -> Path:
    from edgekit.export.pipeline import ExportConfig, export

    config = ExportConfig(format=fmt, out=str(out), calibration=None if calibration is None else str(calibration))
    return export(source, config).target


def run(config) -> dict:
    """Measure, write ``accuracy_control_cpu.json`` and ``.md`` under ``config.out``."""
    import onnxruntime as ort
    import torch

    from edgekit.benchmarks.latency import measure_interleaved
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.pipeline import CalibrateConfig, QuantizeRecipe, calibrate_checkpoint, quantize_checkpoint
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.ptq import apply_fake_quant
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment

    torch.manual_seed(config.seed)
    out = Path(config.out)
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, data = ((Path(config.checkpoint), Path(config.data)) if config.checkpoint
                            else _train(work, config.train_seconds, config.seed))
        loaded = load(checkpoint)
        size, classes = loaded.image_size, loaded.detector_classes()
        val = ab.validation_batches(data / "val", classes, size, config.val_images)
        images = sum(len(t) for _, t in val)
        baseline = ab.map_points(loaded.model, val, classes)
        log(f"float: {ab.METRIC} {baseline:.2f} on {images} validation images")
        float_profile = profile_model(loaded.model, size, model_name=loaded.name).totals
        rows = [{"row": "float (FP32)", "map": baseline, "drop": 0.0, "bops": float_profile["bops"],
                 "size_mb": float_profile["size_mb"], "onnx": _export(checkpoint, "onnx", work / "fp32")}]

        for index, (count, batches) in enumerate(((config.calib_images, -(-config.calib_images // EIGHT)),
                                                  (EIGHT, 1))):
            started = time.perf_counter()
            spec_path = work / f"ptq_{count}.json"
            result = calibrate_checkpoint(checkpoint, data / "train", CalibrateConfig(batches=batches,
                                          batch_size=EIGHT, progress=False), out=spec_path, log=log)
            metric = ab.map_points(apply_fake_quant(loaded.model, result.spec), val, classes)
            totals = profile_model(loaded.model, size, result.spec, model_name=loaded.name).totals
            row = {"row": f"W8A8 PTQ, {result.images} calibration images", "map": metric, "drop": baseline - metric,
                   "bops": totals["bops"], "size_mb": totals["size_mb"], "calibration_images": result.images,
                   "seconds": time.perf_counter() - started}
            if index == 0:  # one W8A8 graph is timed: the 8-image one has the same graph, other scales
                row["onnx"] = _export(checkpoint, "onnx-int8", work / f"int8_{count}", spec_path)
            rows.append(row)
            log(f"{row['row']}: {ab.METRIC} {metric:.2f} (drop {row['drop']:.2f})")

        for bound in (None, *(config.bounds or BOUNDS)):
            started = time.perf_counter()
            name = f"ghost + --max-drop {bound:g}" if bound is not None else "ghost (the start of accuracy control)"
            options = {"max_drop": bound, "max_drop_images": config.val_images,
                       "max_drop_candidates": config.candidates} if bound is not None else {}
            recipe = QuantizeRecipe(method="ghost", calib_batches=config.quantize_calib_batches, progress=False,
                                    **options)
            target = work / f"ghost_{bound}"
            result = quantize_checkpoint(checkpoint, recipe, data=data / "train", out=target, log=log)
            if bound is None:
                metric = ab.map_points(apply_fake_quant(loaded.model, result.spec), val, classes)
                record = None
            else:
                record = result.accuracy
                metric = record["final_metric"]
            rows.append({"row": name, "map": metric, "drop": baseline - metric, "bops": result.totals["bops"],
                         "size_mb": result.totals["size_mb"], "bound": bound,
                         "feasible": None if record is None else record["feasible"],
                         "steps": None if record is None else [
                             {k: s[k] for k in ("layer", "bits_from", "bits_to", "metric", "drop", "tried")}
                             for s in record["path"]],
                         "evaluations": None if record is None else record["evaluations"],
                         "seconds": time.perf_counter() - started,
                         "onnx": _export(target / "quantized.safetensors", "onnx-mixed", work / f"onnx_{bound}")})
            log(f"{name}: {ab.METRIC} {metric:.2f} (drop {baseline - metric:.2f}), "
                f"{result.totals['bops'] / 1e9:.1f} GBOPs, {result.totals['size_mb']:.3f} MB")

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads
        feed = {"images": torch.randn(1, 3, size, size).numpy()}
        sessions = {r["row"]: ort.InferenceSession(str(r["onnx"]), options, providers=["CPUExecutionProvider"])
                    for r in rows if "onnx" in r}
        log(f"timing {len(sessions)} ONNX graphs in ONNX Runtime, interleaved")
        timings = measure_interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                                      warmup=2, repeats=config.rounds, min_repeats=min(5, config.rounds),
                                      budget_s=config.budget_s, gap_s=0.05)
        for row in rows:
            onnx = row.pop("onnx", None)
            if onnx is not None:
                t = timings[row["row"]]
                row["ort_ms"] = {"median": round(t["median_ms"], 2), "p90": round(t["p90_ms"], 2),
                                 "rounds": t["repeats"]}
    bounded = [r for r in rows if r.get("bound") is not None]
    record = {"benchmark": "accuracy_control", "model": loaded.name, "checkpoint": str(checkpoint),
              "image_size": size, "metric": ab.METRIC, "validation_images": images, "float_map": baseline,
              "candidates_per_step": config.candidates, "quantize_calibration_images": 2 * config.quantize_calib_batches,
              "ort_threads": config.threads, "seed": config.seed, "machine": environment(), "rows": rows,
              "floor_bound_holds": all(r["drop"] <= r["bound"] + 1e-9 for r in bounded),
              "not_run": {"nncf quantize_with_accuracy_control": "not wired into this benchmark",
                          "onnxruntime quantize_static": "not wired into this benchmark",
                          "measured-latency cost": "--max-drop-cost latency is not implemented (bops, size)"},
              "log": lines}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "accuracy_control_cpu.json", record)
    write_text_atomic(out / "accuracy_control_cpu.md", markdown(record))
    return record


def markdown(record: dict) -> str:
    m = record["machine"]
    load = ", ".join(f"{v:.1f}" for v in m.get("load_average_1_5_15") or ())
    lines = [f"# Accuracy control (`quantize --max-drop`) on {record['model']} ({record['image_size']} px), CPU", "",
             f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, load average (1/5/15 min, at "
             f"the end) {load}; onnxruntime {m['versions'].get('onnxruntime')}, torch {m['versions'].get('torch')}; "
             f"ORT intra_op_num_threads={record['ort_threads']}.", "",
             f"{record['metric']} on one fixed seeded subset of {record['validation_images']} validation images "
             f"(every row; the subset `--max-drop` bounds on). Float: {record['float_map']:.2f}. Quantized rows: "
             f"their quant spec simulated by `apply_fake_quant`. GHOST rows calibrate on "
             f"{record['quantize_calibration_images']} images (time on this CPU); accuracy control tries "
             f"{record['candidates_per_step']} moves per step. Latency: ONNX Runtime CPU, batch 1, median (p90) of "
             f"interleaved rounds. **Bound held in every bounded row: {record['floor_bound_holds']}.**", "",
             "| row | mAP | drop | GBOPs | MB | ORT ms (p90) | steps | evaluations |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        ort_ms = f"{r['ort_ms']['median']:.1f} ({r['ort_ms']['p90']:.1f})" if "ort_ms" in r else "same graph as above"
        steps = "" if r.get("steps") is None else str(len(r["steps"]))
        lines.append(f"| {r['row']} | {r['map']:.2f} | {r['drop']:.2f} | {r['bops'] / 1e9:.1f} | {r['size_mb']:.3f} | "
                     f"{ort_ms} | {steps} | {r.get('evaluations') or ''} |")
    for r in record["rows"]:
        for number, s in enumerate(r.get("steps") or [], 1):
            if number == 1:
                lines += ["", f"Path of `{r['row']}`:", ""]
            lines.append(f"{number}. {s['layer']}: {s['bits_from']} -> {s['bits_to']} bits, mAP {s['metric']:.2f} "
                         f"(drop {s['drop']:.2f}; {s['tried']} moves tried)")
    lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in record["not_run"].items()) + "."]
    return "\n".join(lines) + "\n"


def accuracy_control_suite(config) -> dict:
    """The suite (a :class:`~edgekit.benchmarks.suites.AccuracyControlSuiteConfig`)."""
    return run(config)
