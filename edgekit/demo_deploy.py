"""The demo's deployment stages: quantize -> calibrate -> export (parity, bundle) -> bench.

Each stage runs the real ``edgekit`` sub-command, exactly as a user would type it, and the
demo reads back the files the command wrote. So the demo exercises the same code paths,
checks and error handling as the CLI, and the report quotes the commands' own results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgekit.errors import EdgekitError

# ONNX Runtime's x86 int8 kernels without VNNI can saturate with 8-bit weights; the
# calibrate command recommends 7-bit weights there (see `edgekit calibrate --help`).
PTQ_WEIGHT_BITS = 7
CALIBRATION_BATCHES = 8


def run_command(argv: list[str]) -> None:
    """Run one ``edgekit`` sub-command in-process; a failure stops the demo with its command line."""
    from edgekit.cli import main

    code = main(argv)
    if code != 0:
        raise EdgekitError(f"demo stage `edgekit {' '.join(argv)}` failed with exit status {code}")


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def deploy_stages(checkpoint: Path, data: Path, out: Path, *, quick: bool, quiet: bool) -> tuple[dict, dict]:
    """Run every deployment stage on ``checkpoint``; returns (results, stage seconds)."""
    quiet_flag = ["--quiet"] if quiet else []
    ckpt, val, train = str(checkpoint), str(data / "val"), str(data / "train")
    results, seconds = {}, {}

    def stage(name: str, argv: list[str]) -> None:
        t = time.perf_counter()
        run_command(argv)
        seconds[name] = time.perf_counter() - t
        results.setdefault("commands", {})[name] = "edgekit " + " ".join(argv)

    stage("profile", ["profile", ckpt, "--json", str(out / "profile_fp32.json")])
    results["fp32_profile"] = _read(out / "profile_fp32.json")["totals"]

    ghost = out / "ghost"
    stage("quantize", ["quantize", ckpt, "--method", "ghost", "--act-bits-mode", "tied", "--data", train,
                       "--out", str(ghost), *quiet_flag])
    results["ghost"] = _read(ghost / "search.json")

    spec = out / "ptq_spec.json"
    stage("calibrate", ["calibrate", ckpt, "--data", train, "--batches", str(2 if quick else CALIBRATION_BATCHES),
                        "--observer", "percentile", "--weight-bits", str(PTQ_WEIGHT_BITS), "--out", str(spec),
                        *quiet_flag])

    exports = {"fp32": ("onnx", []), "int8": ("onnx-int8", ["--calibration", str(spec)]),
               "ghost": ("onnx-mixed", ["--calibration", str(ghost / "quant_spec.json")])}
    bundle = out / "bundle"
    results["exports"] = {}
    for name, (fmt, extra) in exports.items():
        target = out / f"onnx_{name}"
        bundle_args = ["--bundle", str(bundle)] if name == "fp32" else []
        stage(f"export {name}", ["export", ckpt, "--format", fmt, "--out", str(target), "--data", val,
                                 *extra, *bundle_args])
        parity = _read(target / "parity.json")
        results["exports"][name] = {"file": str(target / parity["onnx"]), "parity": parity,
                                    "size_mb": (target / parity["onnx"]).stat().st_size / 1e6}
    results["bundle"] = str(bundle)

    # The checkpoint's "ort" row is the FP32 export; the quantized files run as written.
    quantized = [results["exports"][name]["file"] for name in ("int8", "ghost")]
    bench = out / "bench"
    stage("bench", ["bench", ckpt, *quantized, "--backends", "eager,ort", "--duration", "1" if quick else "4",
                    "--threads", "2", "--data", val, "--no-roofline", "--out", str(bench)])
    results["bench"] = _read(bench / "bench.json")
    return results, seconds


def _map_cell(parity: dict) -> str:
    m = parity.get("map")
    if not m:
        return "n/a"
    return f"{m['torch']['map50']:.3f} -> {m['onnx']['map50']:.3f}"


def render_deploy(r: dict) -> list[str]:
    """The report's deployment section: bits, exports with parity, latency."""
    fp32, ghost = r["fp32_profile"], r["ghost"]
    search = ghost.get("search") or {}
    lines = ["## Deployment", "",
             f"GHOST bit search (threshold rule, activations tied to weights) took {search.get('seconds', 0):.2f} s: "
             f"{ghost['totals']['bops'] / 1e9:.1f} GBOPs and {ghost['totals']['size_mb']:.2f} MB against FP32's "
             f"{fp32['bops'] / 1e9:.1f} GBOPs and {fp32['size_mb']:.2f} MB (no QAT in the demo: `edgekit quantize "
             f"--qat-epochs N` adds it).", "",
             "| export | file MB | parity | max abs err (scores) | cosine (scores) | mAP@.5 torch -> ONNX Runtime |",
             "|---|---|---|---|---|---|"]
    for name, export in r["exports"].items():
        p = export["parity"]
        scores = p["outputs"].get("scores", next(iter(p["outputs"].values())))
        lines.append(f"| {name} ({p['precision']}) | {export['size_mb']:.2f} | "
                     f"{'passed' if p['passed'] else 'FAILED'} | {scores['max_abs_err']:.2g} | {scores['cosine']:.6f} | "
                     f"{_map_cell(p)} |")
    lines += ["", f"Deploy bundle (ONNX + labels + preprocessing + torch-free `infer.py`): `{r['bundle']}`.", "",
              "| model | backend | ms/img | FPS | mAP@.5 |", "|---|---|---|---|---|"]
    for row in r["bench"]["rows"]:
        if row.get("status") != "ok":
            continue
        acc = (row.get("accuracy") or {}).get("map50")
        lines.append(f"| {row['model']} | {row['format']} | {row['ms_per_img']:.1f} | {row['fps']:.1f} | "
                     f"{'n/a' if acc is None else f'{acc:.3f}'} |")
    lines += ["", "Commands the demo ran:", "", *[f"- `{c}`" for c in r["commands"].values()], ""]
    return lines
