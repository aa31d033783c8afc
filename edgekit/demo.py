"""``edgekit demo``: every stage that exists, on the built-in synthetic data, with a report.

Stages: generate data -> train the atto detector -> evaluate -> predict, then the
deployment stages of :mod:`edgekit.demo_deploy` (GHOST bit search, PTQ calibration, ONNX
FP32 / INT8 / mixed-precision exports with parity and a deploy bundle, latency bench). The
report is markdown + JSON + a PNG of predictions on held-out images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgekit.config import StageConfig, require
from edgekit.data.images import load_image
from edgekit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
from edgekit.demo_deploy import deploy_stages, render_deploy
from edgekit.engine.checkpoint import load
from edgekit.engine.config import TrainConfig
from edgekit.engine.detect import detect_array
from edgekit.engine.predict_outputs import draw_detections
from edgekit.engine.train import train
from edgekit.fileio import atomic_target, check_output_dir, make_dirs, write_json_atomic, write_text_atomic
from edgekit.sysinfo import environment

FULL = {"num_train": 480, "num_val": 120, "image_size": 256, "epochs": 40, "batch_size": 8}
GRID_SCORE_THRESHOLD = 0.4  # the picture shows confident boxes; mAP uses every score
QUICK = {"num_train": 16, "num_val": 8, "image_size": 128, "epochs": 1, "batch_size": 8}


@dataclass
class DemoConfig(StageConfig):
    out: str = "demo_out"
    time_limit: float = 330.0   # training budget in seconds
    quick: bool = False         # a tiny run that checks the plumbing in about a minute
    hbb: bool = False           # horizontal boxes instead of the default oriented ones
    progress: bool = True

    def check(self) -> None:
        require(0 < self.time_limit <= 86_400, "time_limit", self.time_limit, "in (0, 86400] seconds")


def run_demo(config: DemoConfig | None = None) -> dict:
    """Run every stage on the built-in data into ``config.out``; returns the report dict
    (also written as report.json, with report.md and predictions.png)."""
    config = config or DemoConfig()
    out, time_limit, quick, progress = Path(config.out), config.time_limit, config.quick, config.progress
    check_output_dir(out)
    t0 = time.perf_counter()
    plan = QUICK if quick else FULL
    make_dirs(out)
    stages = {}

    t = time.perf_counter()
    data = out / "data"
    generate_synthetic_dataset(data, num_train=plan["num_train"], num_val=plan["num_val"],
                               image_size=plan["image_size"], seed=0)
    stages["data"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = TrainConfig(data=str(data), out=str(out / "train"), model="rsdet_atto", classes=list(SYNTHETIC_CLASSES),
                      image_size=plan["image_size"], epochs=plan["epochs"], batch_size=plan["batch_size"],
                      time_limit=0.0 if quick else time_limit, obb=not config.hbb, progress=progress)
    result = train(cfg)
    stages["train"] = time.perf_counter() - t

    t = time.perf_counter()
    model = load(result.checkpoint).model
    grid = out / "predictions.png"
    _prediction_grid(model, sorted((data / "val" / "images").iterdir())[:8], plan["image_size"],
                     list(SYNTHETIC_CLASSES), grid)
    stages["predict"] = time.perf_counter() - t

    deploy, deploy_seconds = deploy_stages(result.checkpoint, data, out / "deploy", quick=quick, quiet=not progress)
    stages.update(deploy_seconds)

    report = {
        "val": result.val, "classes": list(SYNTHETIC_CLASSES), "plan": plan, "time_limit": time_limit,
        "epochs_run": len(result.history), "history": result.history, "stage_seconds": stages,
        "total_seconds": time.perf_counter() - t0, "checkpoint": str(result.checkpoint),
        "environment": environment(), "deploy": deploy,
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_report(report))
    return report


def _prediction_grid(model, paths, image_size, classes, target: Path, columns: int = 4):
    tiles = []
    for p in paths:
        image = load_image(p)
        dets = detect_array(model, image, image_size, score_threshold=GRID_SCORE_THRESHOLD)
        tiles.append(np.asarray(draw_detections(image, dets, classes)))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    with atomic_target(target) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _environment_line(env: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return (f"Environment: `{env['command']}` on {env['cpu']} ({', '.join(env['cpu_flags'])}), {env['cores']} cores, "
            f"{env['torch_threads']} torch threads, python {env['python']}; {versions}; {env['date']}.")


def render_report(r: dict) -> str:
    val = r["val"]
    lines = [
        "# edgekit demo report", "",
        f"Synthetic aerial data ({r['plan']['num_train']} train / {r['plan']['num_val']} val images of "
        f"{r['plan']['image_size']} px, classes: {', '.join(r['classes'])}); RSDet-atto trained from scratch for "
        f"{r['epochs_run']} epochs within a {r['time_limit']:.0f} s budget.", "",
        f"**Held-out ({val['boxes']} boxes, {val['num_images']} images): DOTA mAP@.5 = {_fmt(val['dota_map50'])}, "
        f"COCO-style mAP@.5 = {val['map50']:.3f}, mAP@[.5:.95] = {val['map']:.3f}**; total time "
        f"{r['total_seconds']:.0f} s.", "",
        "| class | AP@[.5:.95] | AP@.5 | DOTA AP@.5 |", "|---|---|---|---|",
        *[f"| {name} | {_fmt(m['ap'])} | {_fmt(m['ap50'])} | {_fmt(m.get('dota_ap50'))} |"
          for name, m in val["per_class"].items()], "",
        *[f"- {key}: {text}" for key, text in val.get("definitions", {}).items() if key != "map50"], "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in r["stage_seconds"].items()], "",
        f"Predictions (score >= {GRID_SCORE_THRESHOLD}) on held-out images: `predictions.png`. "
        f"Checkpoint: `{r['checkpoint']}`.", "",
        *render_deploy(r["deploy"]),
        _environment_line(r["environment"]), "",
    ]
    return "\n".join(lines)
