"""Accuracy control evidence: ``quantize --max-drop`` on the built-in detector against
uniform W8A8 PTQ, ONNX Runtime's ``quantize_static`` and NNCF's accuracy-controlled INT8.

Rows (one detector, one fixed seeded validation subset for every mAP, the subset that
``--max-drop`` itself bounds on):

- float: the checkpoint as trained;
- W8A8 PTQ (``calibrate``, minmax) on ``calib_images`` training images, and on 8 (what the
  calibration-hygiene warning prevents);
- the detector-safe default, shown by a pair: W4A8 with the first and last layers (the
  stem and the head's box/score outputs) kept at 8 bits, against every layer at 4 bits;
- the two per-layer bit choosers: GHOST's threshold rule and the cluster-validity index;
- GHOST with ``--max-drop`` for each bound, measured in simulation, in ONNX Runtime, and in
  ONNX Runtime with each layer's measured latency as the cost: the drop reached on the
  written model, the path;
- the peers (:mod:`edgekit.benchmarks.accuracy_peers`): ``quantize_static`` on the same
  calibration images, NNCF's ``quantize_with_accuracy_control`` at each bound.

mAP of edgekit's quantized rows is that of their quant spec run by ``apply_fake_quant``
(the simulation the loop bounds and the exports' parity checks compare with); every
deliverable (ONNX file, OpenVINO IR) is also run by its runtime on the same images. BOPs and
packed size from the profiler, file sizes on disk, latency of ONNX Runtime and OpenVINO
(median of interleaved rounds, batch 1), all in one run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

EIGHT = 8
BOUNDS = (1.0, 0.5)
NOT_RUN = {"real imagery (NEON)": "this suite runs on the built-in detector; the NEON model "
                                  "(benchmarks/results/neon_lr5e-4) scores mAP@.5 about 5, where bounds of "
                                  "tenths of a point measure noise"}


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


def _export(source, fmt: str, out: Path, calibration=None, storage: str | None = None) -> Path:
    from edgekit.export.pipeline import ExportConfig, export

    config = ExportConfig(format=fmt, out=str(out), calibration=None if calibration is None else str(calibration),
                          weight_storage=storage)
    return export(source, config).target


def _openvino_ir(onnx_path: Path, out: Path, row: dict) -> None:
    """The row's OpenVINO IR (timed beside the ONNX graphs), or the reason it has none."""
    from edgekit.export.openvino import convert

    from edgekit.errors import EdgekitError

    try:
        row["ir"] = convert(onnx_path, out, "int8" if row["row"] != "float (FP32)" else "fp32")
    except EdgekitError as exc:
        row["openvino_error"] = str(exc)


def run(config) -> dict:
    """Measure, write ``accuracy_control_cpu.json`` and ``.md`` under ``config.out``."""
    import torch
    from edgekit.benchmarks import accuracy_peers as peers
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.pipeline import sample_batches
    from edgekit.calibration.profiler import profile_model

    from edgekit.engine.checkpoint import load
    from edgekit.fileio import write_results
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
        size, classes, strides = loaded.image_size, loaded.detector_classes(), tuple(loaded.model.strides)
        val = ab.validation_batches(data / "val", classes, size, config.val_images)
        images = sum(len(t) for _, t in val)
        baseline = ab.map_points(loaded.model, val, classes)
        log(f"float: {ab.METRIC} {baseline:.2f} on {images} validation images")
        float_profile = profile_model(loaded.model, size, model_name=loaded.name).totals
        fp32 = _export(checkpoint, "onnx", work / "fp32")
        rows = [{"row": "float (FP32)", "tool": "torch", "map": baseline, "drop": 0.0, "bops": float_profile["bops"],
                 "size_mb": float_profile["size_mb"], "onnx": fp32}]
        _openvino_ir(fp32, work / "fp32_ir" / "model.xml", rows[0])
        rows += _ptq_rows(config, checkpoint, data, loaded, val, baseline, work, log)
        rows += _searched_rows(config, checkpoint, data, loaded, val, baseline, work, log)
        calibration = sample_batches(loaded.model, size, -(-config.calib_images // EIGHT), data / "train", EIGHT)
        rows += _peer_rows(config, fp32, rows[0].get("ir"), calibration, val, classes, strides, baseline, work, log)
        for row in rows:  # every deliverable also scored by its runtime on the same images
            if "onnx" in row:
                row["ort_map"] = peers.runtime_map(peers.ort_runner(row["onnx"], config.threads), val, classes, strides)
                row["file_mb"] = peers.file_mb(row["onnx"])
            if "ir" in row:
                row["openvino_map"] = peers.runtime_map(peers.openvino_runner(row["ir"], config.threads), val,
                                                        classes, strides)
                row.setdefault("file_mb", peers.file_mb(row["ir"]))
        for row in rows:  # the peers' rows exist only as deliverables: their runtime's mAP is their mAP
            if "map" not in row:
                row["map"] = row.get("ort_map", row.get("openvino_map"))
                row["drop"] = baseline - row["map"]
        _time_rows(rows, config, size, log)
    bounded = [r for r in rows if r.get("bound") is not None]
    record = {"benchmark": "accuracy_control", "model": loaded.name, "checkpoint": str(checkpoint),
              "image_size": size, "metric": ab.METRIC, "validation_images": images, "float_map": baseline,
              "candidates_per_step": config.candidates, "quantize_calibration_images": 2 * config.quantize_calib_batches,
              "ort_threads": config.threads, "seed": config.seed, "machine": environment(), "rows": rows,
              "floor_bound_holds": all(r["drop"] <= r["bound"] + 1e-9 for r in bounded),
              "bound_holds_deployed": all((_deployed_drop(r, baseline) or 0.0) <= r["bound"] + 1e-9 for r in bounded),
              "bound_holds_deployed_runtime_measured": all(
                  (_deployed_drop(r, baseline) or 0.0) <= r["bound"] + 1e-9 for r in bounded
                  if r.get("measured_on") != "fake-quant"),
              "comparisons": _comparisons(rows, baseline),
              "not_run": NOT_RUN,
              "log": lines}
    write_results(out, "accuracy_control_cpu", record, markdown(record))
    return record


def _ptq_rows(config, checkpoint, data, loaded, val, baseline, work, log) -> list[dict]:
    """W8A8 PTQ on ``calib_images`` and on 8 images (the hygiene row)."""
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.pipeline import CalibrateConfig, calibrate_checkpoint
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.ptq import apply_fake_quant

    rows = []
    for index, (count, batches) in enumerate(((config.calib_images, -(-config.calib_images // EIGHT)), (EIGHT, 1))):
        started = time.perf_counter()
        spec_path = work / f"ptq_{count}.json"
        result = calibrate_checkpoint(checkpoint, data / "train", CalibrateConfig(batches=batches, batch_size=EIGHT,
                                      progress=False), out=spec_path, log=log)
        metric = ab.map_points(apply_fake_quant(loaded.model, result.spec), val, loaded.detector_classes())
        totals = profile_model(loaded.model, loaded.image_size, result.spec, model_name=loaded.name).totals
        row = {"row": f"W8A8 PTQ, {result.images} calibration images", "tool": "edgekit calibrate", "map": metric,
               "drop": baseline - metric, "bops": totals["bops"], "size_mb": totals["size_mb"],
               "calibration_images": result.images, "seconds": time.perf_counter() - started}
        if index == 0:  # the 8-image graph is the same graph with other scales: scored, not timed
            row["onnx"] = _export(checkpoint, "onnx-int8", work / f"int8_{count}", spec_path)
            _openvino_ir(row["onnx"], work / f"int8_{count}_ir" / "model.xml", row)
        rows.append(row)
        log(f"{row['row']}: {ab.METRIC} {metric:.2f} (drop {row['drop']:.2f})")
    return rows


SEARCHED = (  # (row, recipe options): the detector-safe default pair, the two bit choosers, then the bounds
    ("W4A8 PTQ, first/last layers 8-bit (the default)", {"method": "uniform", "weight_bits": 4}),
    ("W4A8 PTQ, every layer 4-bit (head outputs too)", {"method": "uniform", "weight_bits": 4, "first_last_bits": 0}),
    ("cluster validity (silhouette) bits", {"method": "cluster"}),
    ("ghost (the start of accuracy control)", {"method": "ghost"}),
)


def _searched_rows(config, checkpoint, data, loaded, val, baseline, work, log) -> list[dict]:
    from edgekit.calibration import accuracy_bound as ab
    from edgekit.calibration.pipeline import QuantizeRecipe, quantize_checkpoint
    from edgekit.calibration.ptq import apply_fake_quant

    from edgekit.export.deployed_metric import onnxruntime_measure

    from edgekit.export.layer_latency import onnxruntime_latency

    plans = [(name, options, None, None, None) for name, options in SEARCHED]
    for bound in config.bounds or BOUNDS:  # bounded in simulation, in ORT, in ORT with measured latency as the cost
        on_ort = f"ghost + --max-drop {bound:g} --max-drop-on onnxruntime"
        plans += [(f"ghost + --max-drop {bound:g}", {"method": "ghost"}, bound, None, None),
                  (on_ort, {"method": "ghost"}, bound, "onnxruntime", None),
                  (f"{on_ort} --max-drop-cost latency", {"method": "ghost"}, bound, "onnxruntime", "latency")]
    rows = []
    for index, (name, options, bound, measure, cost) in enumerate(plans):
        started = time.perf_counter()
        extra = {"max_drop": bound, "max_drop_images": config.val_images, "max_drop_on": measure,
                 "max_drop_cost": cost, "max_drop_candidates": config.candidates} if bound is not None else {}
        recipe = QuantizeRecipe(calib_batches=config.quantize_calib_batches, progress=False, **options, **extra)
        target = work / f"searched_{index}"
        result = quantize_checkpoint(checkpoint, recipe, data=data / "train", out=target, log=log,
                                     deployed_measure=onnxruntime_measure if measure else None,
                                     layer_cost=onnxruntime_latency if cost == "latency" else None)
        record = result.accuracy if bound is not None else None
        metric = (record["final_metric"] if record is not None
                  else ab.map_points(apply_fake_quant(loaded.model, result.spec), val, loaded.detector_classes()))
        row = {"row": name, "tool": "edgekit quantize", "map": metric, "drop": baseline - metric,
               "bops": result.totals["bops"], "size_mb": result.totals["size_mb"], "bound": bound,
               "measured_on": None if bound is None else (measure or "fake-quant"),
               "cost_unit": None if bound is None else (cost or "bops"),
               "feasible": None if record is None else record["feasible"],
               "steps": None if record is None else [
                   {k: s[k] for k in ("layer", "bits_from", "bits_to", "metric", "drop", "tried")}
                   for s in record["path"]],
               "evaluations": None if record is None else record["evaluations"],
               "seconds": time.perf_counter() - started}
        if options["method"] == "ghost":  # the deliverables of the rows a user would ship
            row["onnx"] = _export(target / "quantized.safetensors", "onnx-mixed", work / f"onnx_{index}")
            native = _export(target / "quantized.safetensors", "onnx-mixed", work / f"native_{index}", storage="native")
            _openvino_ir(native, work / f"ir_{index}" / "model.xml", row)
        rows.append(row)
        log(f"{name}: {ab.METRIC} {metric:.2f} (drop {baseline - metric:.2f}), "
            f"{result.totals['bops'] / 1e9:.1f} GBOPs, {result.totals['size_mb']:.3f} MB")
    return rows


def _peer_rows(config, fp32, fp32_ir, calibration, val, classes, strides, baseline, work, log) -> list[dict]:
    """ONNX Runtime's quantize_static and NNCF's accuracy-controlled INT8 on the same images."""
    from edgekit.benchmarks import accuracy_peers as peers
    from edgekit.benchmarks.peers import ort_static

    images = sum(len(t) for _, t in calibration)
    started = time.perf_counter()
    static = ort_static(fp32, calibration, work / "ort_static.onnx")
    rows = [{"row": f"ORT quantize_static (QDQ per-channel MinMax, {images} calibration images)",
             "tool": "onnxruntime", "onnx": static, "seconds": time.perf_counter() - started}]
    if fp32_ir is None:
        return rows
    for bound in config.bounds or BOUNDS:
        started = time.perf_counter()
        xml, info = peers.nncf_accuracy_control(fp32_ir, calibration, val, classes, strides, bound,
                                                work / f"nncf_{bound:g}" / "model.xml")
        rows.append({"row": f"NNCF quantize_with_accuracy_control, max_drop {bound:g}", "tool": "nncf", "ir": xml,
                     "bound": bound, "nncf_validations": info["validations"],
                     "seconds": time.perf_counter() - started})
        log(f"{rows[-1]['row']}: {info['validations']} validations, {rows[-1]['seconds']:.0f} s")
    return rows


def _time_rows(rows: list[dict], config, size: int, log) -> None:
    """ORT latency of every ONNX deliverable and OpenVINO latency of every IR, interleaved in one run."""
    import numpy as np
    from edgekit.benchmarks import accuracy_peers as peers
    from edgekit.benchmarks.latency import measure_interleaved

    x = np.random.default_rng(config.seed).standard_normal((1, 3, size, size)).astype(np.float32)
    fns = {}
    for row in rows:
        if "onnx" in row:
            run = peers.ort_runner(row["onnx"], config.threads)
            fns[("ort_ms", row["row"])] = lambda run=run: run(x)
        if "ir" in row:
            run = peers.openvino_runner(row["ir"], config.threads)
            fns[("openvino_ms", row["row"])] = lambda run=run: run(x)
    log(f"timing {len(fns)} graphs (ONNX Runtime and OpenVINO), interleaved")
    timings = measure_interleaved(fns, warmup=2, repeats=config.rounds, min_repeats=min(5, config.rounds),
                                  budget_s=config.budget_s, gap_s=0.05)
    for row in rows:
        for key in ("ort_ms", "openvino_ms"):
            t = timings.get((key, row["row"]))
            if t is not None:
                row[key] = {"median": round(t["median_ms"], 2), "p90": round(t["p90_ms"], 2), "rounds": t["repeats"]}
        for key in ("onnx", "ir"):
            if key in row:
                row[key] = Path(row[key]).name


def _deployed_drop(row: dict, baseline: float) -> float | None:
    """A row's drop as its deliverable runs: OpenVINO's mAP of an IR-only row (NNCF), else
    ONNX Runtime's mAP of its ONNX file; None for a row with no deliverable."""
    value = row.get("ort_map", row.get("openvino_map"))
    return None if value is None else baseline - value


def _comparisons(rows: list[dict], baseline: float) -> list[dict]:
    """At each bound, edgekit's row against NNCF's: drop, size on disk, latency (ratios > 1: edgekit better)."""
    out = []
    for ours in (r for r in rows if r.get("bound") is not None and r["tool"] == "edgekit quantize"):
        theirs = next((r for r in rows if r.get("bound") == ours["bound"] and r["tool"] == "nncf"), None)
        if theirs is None:
            continue
        entry = {"bound": ours["bound"], "measured_on": ours["measured_on"], "cost_unit": ours.get("cost_unit", "bops"),
                 "edgekit_drop": _deployed_drop(ours, baseline),
                 "nncf_drop": _deployed_drop(theirs, baseline),
                 "edgekit_file_mb": ours.get("file_mb"), "nncf_file_mb": theirs.get("file_mb")}
        if ours.get("file_mb") and theirs.get("file_mb"):
            entry["size_ratio_nncf_over_edgekit"] = theirs["file_mb"] / ours["file_mb"]
        for key in ("ort_ms", "openvino_ms"):
            if key in ours and "openvino_ms" in theirs:
                entry[f"speed_ratio_{key}_vs_nncf_openvino"] = theirs["openvino_ms"]["median"] / ours[key]["median"]
        out.append(entry)
    return out


def _cell(value, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    return "" if value is None else fmt.format(value / scale)


def _ms(row: dict, key: str) -> str:
    t = row.get(key)
    return "" if t is None else f"{t['median']:.1f} ({t['p90']:.1f})"


def markdown(record: dict) -> str:
    m = record["machine"]
    load = ", ".join(f"{v:.1f}" for v in m.get("load_average_1_5_15") or ())
    v = m["versions"]
    lines = [f"# Accuracy control (`quantize --max-drop`) on {record['model']} ({record['image_size']} px), CPU", "",
             f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, load average (1/5/15 min, at "
             f"the end) {load}; onnxruntime {v.get('onnxruntime')}, openvino {v.get('openvino')}, nncf "
             f"{v.get('nncf')}, torch {v.get('torch')}; {record['ort_threads']} runtime threads.", "",
             f"{record['metric']} on one fixed seeded subset of {record['validation_images']} validation images "
             f"(every row; the subset `--max-drop` bounds on). Float: {record['float_map']:.2f}. "
             "Columns: `mAP`/`drop` of edgekit's rows: their quant spec simulated by `apply_fake_quant` (what the "
             "accuracy-control loop measures by default); of the peers' rows: their runtime's. `ORT mAP`/`OV mAP`: each "
             "deliverable run by ONNX Runtime / OpenVINO on the same images, decoded and NMS'd as `model.predict` "
             "does. `MB`: weights at their bit widths (edgekit's profiler); `file MB`: the deliverable on disk (ONNX "
             "file, or IR .xml + .bin). GHOST rows calibrate on "
             f"{record['quantize_calibration_images']} images; accuracy control tries {record['candidates_per_step']} "
             "moves per step. Latency: batch 1, median (p90) ms of interleaved rounds, ONNX Runtime for ONNX files, "
             "OpenVINO for IRs.", "",
             f"**Bound held in every bounded row: {record['floor_bound_holds']} (as measured by the loop / NNCF); "
             f"as deployed (runtime mAP): {record['bound_holds_deployed']}; as deployed, in the rows bounded on "
             f"their runtime (`--max-drop-on onnxruntime`, NNCF): "
             f"{record.get('bound_holds_deployed_runtime_measured')}.**", "",
             "`--max-drop-on onnxruntime` rows: the loop scores each trial's QDQ graph in ONNX Runtime (their `mAP` "
             "is that), and their ONNX deliverable is that graph (the default packed storage).", "",
             "| row | mAP | drop | ORT mAP | OV mAP | GBOPs | MB | file MB | ORT ms (p90) | OV ms (p90) | steps | evals |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        steps = "" if r.get("steps") is None else str(len(r["steps"]))
        lines.append(f"| {r['row']} | {_cell(r['map'])} | {_cell(r['drop'])} | {_cell(r.get('ort_map'))} | "
                     f"{_cell(r.get('openvino_map'))} | {_cell(r.get('bops'), '{:.1f}', 1e9)} | "
                     f"{_cell(r.get('size_mb'), '{:.3f}')} | {_cell(r.get('file_mb'), '{:.3f}')} | "
                     f"{_ms(r, 'ort_ms')} | {_ms(r, 'openvino_ms')} | {steps} | "
                     f"{r.get('evaluations') or r.get('nncf_validations') or ''} |")
    if record.get("comparisons"):
        lines += ["", "## edgekit against NNCF at the same bound", "",
                  "| bound | edgekit measured on, cost | edgekit drop (ORT) | NNCF drop (OV) | file MB edgekit / NNCF "
                  "| NNCF OV ms / edgekit ORT ms | NNCF OV ms / edgekit OV ms |", "|---|---|---|---|---|---|---|"]
        for c in record["comparisons"]:
            lines.append(f"| {c['bound']:g} | {c.get('measured_on', 'fake-quant')}, {c.get('cost_unit', 'bops')} | "
                         f"{_cell(c['edgekit_drop'])} | "
                         f"{_cell(c['nncf_drop'])} | "
                         f"{_cell(c['edgekit_file_mb'], '{:.3f}')} / {_cell(c['nncf_file_mb'], '{:.3f}')} | "
                         f"{_cell(c.get('speed_ratio_ort_ms_vs_nncf_openvino'))} | "
                         f"{_cell(c.get('speed_ratio_openvino_ms_vs_nncf_openvino'))} |")
        lines += ["", "Speed ratios above 1: edgekit's deliverable is faster than NNCF's."]
    errors = [(r["row"], r["openvino_error"]) for r in record["rows"] if r.get("openvino_error")]
    if errors:
        lines += ["", "No OpenVINO IR for: " + "; ".join(f"{name} ({why})" for name, why in errors) + "."]
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
