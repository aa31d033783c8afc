"""Real imagery: rsdet_atto fine-tuned on NEON tree crowns and scored on another site.

The NEON set (DeepForest's sample data, Pascal VOC) has two training scenes from
Yellowstone and one 400 x 400 validation tile from Florida, so the score measures transfer
to a forest the model never saw, as in real use. The suite, through the stage functions:

1. converts VOC to DOTA (``convert``) and tiles the training scenes (``tile``) at the model
   input (416 px: the smallest multiple of 32 that holds the 400 px tile at native scale);
2. fine-tunes rsdet_atto (horizontal boxes) within one time budget per arm: from a start
   trained on the built-in synthetic set (``train``, or a given ``--init`` checkpoint), from
   scratch, and from an FCMAE start pretrained on the unlabeled pixels (``pretrain``: the
   training scenes, the drone photograph, any ``--unlabeled`` folders; never the val tile).
   ``train --init`` takes encoder weights, so a synthetic start hands over its backbone
   (:func:`backbone_encoder`); its neck and head, trained for other classes, start afresh;
3. scores each arm on the val tile: COCO-style mAP@.5 and mAP@[.5:.95] (``evaluate``), and
   DeepForest's box precision/recall at IoU 0.4 and 0.5 at a stated score threshold
   (:mod:`edgekit.engine.box_pr`);
4. quantizes the best arm (``quantize_checkpoint``: W8A8 and W4A8 PTQ, the budget and
   sensitivity hybrids at W4A8's BOPs, GHOST) and scores each quantized model in torch
   through its quant spec's fake quantization (what the exports compute).

This module imports no torch at import time: the suite config checks the data folder with
:func:`check_neon_folder` when the command line is parsed.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from edgekit.errors import EdgekitError

ARMS = ("synthetic", "scratch", "fcmae")
CLASSES = ["Tree"]
IOUS = (0.4, 0.5)
BITS = [2, 3, 4, 5, 6, 7, 8]
ARM_LABELS = {"synthetic": "synthetic-set start", "scratch": "from scratch", "fcmae": "FCMAE start"}


def check_neon_folder(data) -> Path:
    """The NEON folder must hold train/ and val/ splits in a VOC layout; one line otherwise."""
    root = Path(str(data)) if data else None
    if root is None or not root.is_dir():
        raise EdgekitError(f"--data {data!r} is not a folder; give the NEON tree-crown folder "
                           f"(e.g. ../shared/data/neon_trees, with train/ and val/ in Pascal VOC layout)")
    from edgekit.data.voc import LAYOUTS

    for split in ("train", "val"):
        if not any((root / split / images).is_dir() and (root / split / notes).is_dir() for images, notes in LAYOUTS):
            raise EdgekitError(f"--data {root}: no {split}/images + {split}/annotations (Pascal VOC) folders; "
                               f"give the NEON tree-crown folder")
    return root


# ---------------------------------------------------------------- data

def prepare(data: Path, work: Path, tile_size: int, overlap: int, max_tiles: int | None = None) -> dict:
    """VOC -> DOTA for both splits, training scenes tiled; returns the DOTA root and counts.
    ``max_tiles`` keeps only the first tiles (smoke runs)."""
    from edgekit.api import ConvertConfig, TileConfig, convert, tile

    voc = ConvertConfig(src_format="voc", dst_format="dota", classes=CLASSES)
    scenes = convert(data / "train", work / "dota" / "train", voc)
    val = convert(data / "val", work / "root" / "val", voc)
    tiles = tile(work / "dota" / "train", work / "tiles", TileConfig(tile_size=tile_size, overlap=overlap,
                                                                       progress=False))
    train = work / "root" / "train"
    for folder in ("images", "labelTxt"):
        (train / folder).mkdir(parents=True)
    for image in sorted((work / "tiles" / "images").iterdir())[:max_tiles]:
        os.link(image, train / "images" / image.name)
        os.link(work / "tiles" / "labelTxt" / f"{image.stem}.txt", train / "labelTxt" / f"{image.stem}.txt")
    used = len(list((train / "images").iterdir()))
    return {"root": str(work / "root"), "train_scenes": scenes["images"], "train_boxes": scenes["objects"],
            "tiles": used, "tile_size": tile_size, "overlap": overlap, "tile_boxes": tiles["objects"],
            "val_images": val["images"], "val_boxes": val["objects"]}


# ---------------------------------------------------------------- starts

def backbone_encoder(checkpoint, out: Path) -> Path:
    """A detector checkpoint's ConvNeXt V2 backbone as an encoder-only weights file, the form
    ``TrainConfig.init`` reads (``downsample_layers.*``, ``stages.*``)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint))
    encoder = {k.removeprefix("backbone."): v.contiguous() for k, v in state.items() if k.startswith("backbone.")}
    if not encoder:
        raise EdgekitError(f"--init {checkpoint}: no backbone.* weights; give a detector checkpoint (rsdet_*)")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(encoder, str(out))
    return out


def synthetic_start(work: Path, seconds: float, quick: bool, seed: int, progress: bool) -> dict:
    """rsdet_atto trained on the built-in synthetic scenes (the demo's recipe) within ``seconds``."""
    from edgekit.api import TrainConfig, train
    from edgekit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset

    n_train, n_val, size = (8, 4, 64) if quick else (480, 120, 256)
    generate_synthetic_dataset(work / "synthetic", num_train=n_train, num_val=n_val, image_size=size, seed=seed)
    run = train(TrainConfig(data=str(work / "synthetic"), out=str(work / "synthetic_run"), model="rsdet_atto",
                            classes=list(SYNTHETIC_CLASSES), image_size=size, epochs=1 if quick else 40, batch_size=8,
                            time_limit=0.0 if quick else seconds, seed=seed, progress=progress))
    return {"checkpoint": str(run.checkpoint), "seconds": run.seconds, "epochs": len(run.history),
            "synthetic_map50": run.val["map50"], "source": f"trained here: {n_train} synthetic scenes at {size} px"}


def fcmae_start(folders: list[str], work: Path, seconds: float, quick: bool, seed: int, progress: bool) -> dict:
    """The atto encoder pretrained with FCMAE on unlabeled pixels within ``seconds``."""
    from edgekit.api import PretrainConfig, pretrain

    run = pretrain(PretrainConfig(data=folders, out=str(work / "fcmae_run"), model="convnextv2_atto",
                                  input_size=64 if quick else 224, patch_size=32, crops_per_image=1 if quick else 8,
                                  epochs=1 if quick else 1000, batch_size=16, time_limit=0.0 if quick else seconds,
                                  seed=seed, progress=progress, reconstructions=0))
    return {"checkpoint": str(run.checkpoint), "seconds": run.seconds, "epochs": len(run.history),
            "images": run.images, "folders": folders}


# ---------------------------------------------------------------- arms and scores

def finetune(root: str, out: Path, init: str | None, config, seconds: float) -> dict:
    from edgekit.api import TrainConfig, train

    run = train(TrainConfig(data=root, out=str(out), model="rsdet_atto", classes=CLASSES, image_size=config.tile_size,
                            epochs=1 if config.quick else 100_000, batch_size=config.batch_size, lr=config.lr,
                            color_jitter=config.color_jitter, time_limit=0.0 if config.quick else seconds,
                            deformable=config.deformable, init=init, seed=config.seed, progress=config.progress))
    last = run.history[-1]
    return {"checkpoint": str(run.checkpoint), "seconds": run.seconds, "epochs": len(run.history),
            "final_loss": last["loss"],
            "images_per_s": last["images_per_s"]}


def predictions(model, val_dir: str, image_size: int) -> tuple[list, list]:
    """(targets, predictions) of ``model`` on a DOTA split, boxes in the images' own pixels."""
    import torch
    from torch.utils.data import DataLoader

    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.engine.evaluate import to_original_coordinates

    loader = DataLoader(DetectionDataset(Path(val_dir), CLASSES, image_size=image_size), batch_size=4,
                        collate_fn=collate_detection)
    targets, preds = [], []
    model.eval()
    with torch.no_grad():
        for images, batch in loader:
            for p, t in zip(model.predict(images, score_threshold=0.01), batch):
                preds.append(to_original_coordinates(p, t))
                targets.append({**t, "boxes": t["boxes"] / float(t["scale"])})
    return targets, preds


def score(model, val_dir: str, image_size: int, score_threshold: float) -> dict:
    """COCO-style mAP (x100) and DeepForest's box precision/recall at IoU 0.4 and 0.5 (%)."""
    from edgekit.engine.box_pr import box_precision_recall
    from edgekit.engine.evaluate import coco_map

    targets, preds = predictions(model, val_dir, image_size)
    coco = coco_map(targets, preds, CLASSES)
    out = {"map50": 100 * coco["map50"], "map": 100 * coco["map"]}
    images = [(t["boxes"].numpy(), p["boxes"].numpy(), p["scores"].numpy()) for t, p in zip(targets, preds)]
    for iou in IOUS:
        pr = box_precision_recall(images, iou_threshold=iou, score_threshold=score_threshold)
        out[f"precision@{iou}"], out[f"recall@{iou}"] = 100 * pr["precision"], 100 * pr["recall"]
        out["detections"] = pr["n_pred"]
    return out


def score_checkpoint(checkpoint: str, root: str, config) -> dict:
    """:func:`score` of a float checkpoint, with ``evaluate``'s own mAP beside it (they must agree)."""
    from edgekit.api import EvalConfig, evaluate, load

    loaded = load(checkpoint)
    row = score(loaded.model, f"{root}/val", loaded.image_size, config.score_threshold)
    api = evaluate(checkpoint, f"{root}/val", EvalConfig(progress=False))
    return {**row, "evaluate_map50": 100 * api.map50, "evaluate_map": 100 * api.map}


# ---------------------------------------------------------------- quantization

def quantization_rows(checkpoint: str, root: str, config, work: Path) -> list[dict]:
    """FP32 and the quantized variants of ``checkpoint``, each scored on the val tile."""
    from edgekit.calibration.ptq import apply_fake_quant

    from edgekit.api import QuantizeRecipe, load, profile, quantize_checkpoint

    calib = 1 if config.quick else 4
    sens = {"sens_batches": 1 if config.quick else 2, "sens_probes": 1 if config.quick else 2}
    loaded = load(checkpoint)
    totals = profile(checkpoint).totals
    rows = [{"key": "fp32", "method": "FP32", **score(loaded.model, f"{root}/val", loaded.image_size,
                                                       config.score_threshold),
             "bops": totals["bops"], "size_mb": totals["size_mb"], "seconds": 0.0, "weight_bits": None}]
    recipes = [("w8a8", "W8A8 PTQ", dict(method="uniform", weight_bits=8, act_bits=8))]
    if not config.quick:
        recipes += [("w4a8", "W4A8 PTQ (first/last layer 8-bit)", dict(method="uniform", weight_bits=4, act_bits=8)),
                    ("budget", "budget hybrid @ W4A8 BOPs, PTQ", dict(method="budget", bit_widths=BITS,
                                                                     first_last_bits=0)),
                    ("sensitivity", "sensitivity (Hessian) hybrid @ W4A8 BOPs, PTQ",
                     dict(method="sensitivity", bit_widths=BITS, first_last_bits=0, sens_method="hutchinson", **sens)),
                    ("ghost", "GHOST threshold 0.01 (tied A), PTQ", dict(method="ghost", bit_widths=BITS,
                                                                          act_bits_mode="tied"))]
    budget = None
    for key, label, options in recipes:
        if options["method"] in ("budget", "sensitivity"):
            if budget is None:
                rows.append({"key": key, "method": label, "error": "no W4A8 row to take the BOPs budget from"})
                continue
            options = {**options, "budget_bops": budget / 1e9}
        start = time.perf_counter()
        try:
            result = quantize_checkpoint(checkpoint, QuantizeRecipe(calib_batches=calib, progress=False, **options),
                                         data=f"{root}/train", out=work / "quantized" / key)
            seconds = time.perf_counter() - start
            fake = apply_fake_quant(load(checkpoint).model, result.spec)
            row = {"key": key, "method": label, **score(fake, f"{root}/val", loaded.image_size,
                                                        config.score_threshold),
                   "bops": result.totals["bops"], "size_mb": result.totals["size_mb"], "seconds": seconds,
                   "weight_bits": result.search.weight_bits if result.search is not None else None}
        except Exception as exc:  # a failed row is reported in the table, the others still run
            rows.append({"key": key, "method": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"   {label:<48} FAILED: {rows[-1]['error']}", flush=True)
            continue
        if key == "w4a8":
            budget = row["bops"]
        rows.append(row)
        print(f"   {label:<48} mAP@.5 {row['map50']:6.2f}  {row['bops'] / 1e9:8.3f} GBOPs  {seconds:.0f} s", flush=True)
    return rows


# ---------------------------------------------------------------- the suite

def _run_arm(arm: str, prep: dict, starts: dict, config, work: Path) -> dict:
    init = None
    if arm == "synthetic":
        init = str(backbone_encoder(starts["synthetic"]["checkpoint"], work / "synthetic_encoder.safetensors"))
    elif arm == "fcmae":
        init = starts["fcmae"]["checkpoint"]
    run = finetune(prep["root"], work / f"arm_{arm}", init, config, config.train_seconds)
    start_seconds = starts.get(arm, {}).get("seconds", 0.0)
    return {"arm": arm, "label": ARM_LABELS[arm], **run, "start_seconds": start_seconds,
            "total_seconds": start_seconds + run["seconds"], **score_checkpoint(run["checkpoint"], prep["root"], config)}


def neon_suite(config) -> dict:
    """The NEON real-imagery evidence (a :class:`~edgekit.benchmarks.suites.NeonSuiteConfig`):
    writes ``neon_cpu.{json,md}`` (``neon_quick.*`` for a smoke run) under ``config.out``."""
    import torch

    from edgekit.fileio import make_dirs, write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment

    data = check_neon_folder(config.data)
    out = make_dirs(config.out)
    arms = list(config.arms or ARMS)
    torch.manual_seed(config.seed)
    begin, load0 = time.perf_counter(), os.getloadavg()
    stamps = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-neon-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        prep = prepare(data, work, config.tile_size, config.overlap, max_tiles=2 if config.quick else None)
        stamps["prepare"] = time.perf_counter() - t
        starts = {}
        if "synthetic" in arms:
            if config.init:
                starts["synthetic"] = {"checkpoint": config.init, "source": f"--init {config.init}",
                                       **_recorded_run(config.init)}
            else:
                starts["synthetic"] = synthetic_start(work, config.start_seconds, config.quick, config.seed,
                                                      config.progress)
        if "fcmae" in arms:
            folders = [str(data / "train" / "images"), *[str(p) for p in [data / "unlabeled"] if p.is_dir()],
                       *(config.unlabeled or [])]
            starts["fcmae"] = fcmae_start(folders, work, config.start_seconds, config.quick, config.seed,
                                          config.progress)
        results = []
        for arm in arms:
            print(f"== NEON arm: {ARM_LABELS[arm]}", flush=True)
            results.append(_run_arm(arm, prep, starts, config, work))
            r = results[-1]
            print(f"   mAP@.5 {r['map50']:.2f}  mAP@[.5:.95] {r['map']:.2f}  P/R@0.4 {r['precision@0.4']:.1f}/"
                  f"{r['recall@0.4']:.1f}  ({r['epochs']} epochs, {r['seconds']:.0f} s)", flush=True)
        best = max(results, key=lambda r: r["map50"])
        rows = []
        if config.quantize:
            print(f"== quantization rows on the {best['label']} model", flush=True)
            t = time.perf_counter()
            rows = quantization_rows(best["checkpoint"], prep["root"], config, work)
            stamps["quantization"] = time.perf_counter() - t
        for r in results:
            r["checkpoint"] = Path(r["checkpoint"]).parent.name  # the temporary folder is gone afterwards
    for s in starts.values():
        s["checkpoint"] = s["checkpoint"] if s.get("source", "").startswith("--init") else Path(s["checkpoint"]).name
    record = {"format": "edgekit.bench-neon/1", "quick": config.quick, "config": config.to_dict(),
              "environment": environment(), "load_average_before_after": [load0, os.getloadavg()],
              "seconds": time.perf_counter() - begin, "stage_seconds": stamps, "data": prep | {"root": None},
              "starts": starts, "arms": results, "quantized_arm": best["arm"], "quantization": rows,
              "floors": floors(results), "definitions": DEFINITIONS | {
                  "pr": DEFINITIONS["pr"].format(threshold=config.score_threshold)}}
    name = "neon_quick" if config.quick else "neon_cpu"
    write_json_atomic(out / f"{name}.json", record)
    write_text_atomic(out / f"{name}.md", render_markdown(record))
    for f in record["floors"]:
        print(f"{'MET ' if f['met'] else 'MISS'} {f['floor']}: {f['detail']}")
    print(f"wrote {out / f'{name}.md'} ({record['seconds']:.0f} s)")
    return record


def _recorded_run(checkpoint: str) -> dict:
    """Seconds, epochs, data and val mAP@.5 of a given start, from the train.json beside it."""
    import json

    try:
        record = json.loads(Path(checkpoint).with_name("train.json").read_text(encoding="utf-8"))
        return {"seconds": float(record["train_seconds"]), "epochs": len(record["history"]),
                "classes": record["classes"], "synthetic_map50": (record.get("val") or {}).get("map50")}
    except (OSError, ValueError, KeyError, TypeError):
        return {"seconds": None}


DEFINITIONS = {
    "map": "COCO-style box AP (faster-coco-eval, 101-point interpolation): mAP@.5 at IoU 0.5, mAP@[.5:.95] "
           "averaged over IoU .50:.05:.95; detections above score 0.01, at most 100 per image",
    "pr": "DeepForest's box precision/recall (deepforest.evaluate.evaluate_boxes): detections with score > "
          "{threshold}, one-to-one matching by linear sum assignment on intersection area, a match counts when its "
          "IoU > the threshold; per-image means",
}


def floors(results: list[dict]) -> list[dict]:
    """The issue's floor: the synthetic (or pretrained) start reaches mAP@.5 >= 35 and beats scratch."""
    by = {r["arm"]: r for r in results}
    out = []
    for arm in ("synthetic", "fcmae"):
        if arm in by:
            r = by[arm]
            out.append({"floor": f"{ARM_LABELS[arm]}: mAP@.5 >= 35", "met": r["map50"] >= 35.0,
                        "detail": f"{r['map50']:.2f}"})
            if "scratch" in by:
                s = by["scratch"]
                out.append({"floor": f"{ARM_LABELS[arm]} > scratch (mAP@.5)", "met": r["map50"] > s["map50"],
                            "detail": f"{r['map50']:.2f} vs {s['map50']:.2f}"})
    return out


def _fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render_markdown(record: dict) -> str:
    env, cfg, d = record["environment"], record["config"], record["data"]
    lines = [f"# NEON tree crowns: rsdet_atto fine-tuned on real imagery{' (QUICK smoke run)' if record['quick'] else ''}",
             "", f"Command: `{env['command']}`", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['versions'].get('torch')} with "
             f"{env['torch_threads']} threads; load average before/after "
             f"{record['load_average_before_after'][0][0]:.1f} / {record['load_average_before_after'][1][0]:.1f} "
             f"(a machine shared with other jobs: timings include their load). Date {env['date']}. "
             f"Whole run {record['seconds'] / 60:.1f} min.", "",
             f"Data: {d['train_scenes']} training scenes (YELL, {d['train_boxes']} boxes) cut into {d['tiles']} tiles "
             f"of {d['tile_size']} px (overlap {d['overlap']}); validation: {d['val_images']} tile of another site "
             f"(OSBS, {d['val_boxes']} boxes) at native scale. Model input {cfg['tile_size']} px, batch "
             f"{cfg['batch_size']}, lr {cfg.get('lr', 2e-3):g}, color jitter {cfg.get('color_jitter', 0):g}, "
             f"deformable layers {'on' if cfg['deformable'] else 'off'}, fine-tuning budget "
             f"{cfg['train_seconds']:.0f} s per arm.", "",
             "## Arms (fine-tuned within the same budget, scored on the validation tile)", "",
             "| arm | start (s) | fine-tune (s) | epochs | mAP@.5 | mAP@[.5:.95] | P@0.4 | R@0.4 | P@0.5 | R@0.5 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["arms"]:
        lines.append(f"| {r['label']} | {_fmt(r['start_seconds'], 0)} | {r['seconds']:.0f} | {r['epochs']} | "
                     f"{r['map50']:.2f} | {r['map']:.2f} | {_fmt(r['precision@0.4'])} | {_fmt(r['recall@0.4'])} | "
                     f"{_fmt(r['precision@0.5'])} | {_fmt(r['recall@0.5'])} |")
    lines += ["", "Starts: " + "; ".join(f"{k}: {_start_note(v)}" for k, v in record["starts"].items()), ""]
    if record["quantization"]:
        lines += [f"## Quantization of the {ARM_LABELS[record['quantized_arm']]} model (PTQ, scored in torch "
                  "through each quant spec's fake quantization)", "",
                  "| recipe | mAP@.5 | mAP@[.5:.95] | P@0.4 | R@0.4 | GBOPs | size (MB) | quantize (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in record["quantization"]:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['method']} | {r['map50']:.2f} | {r['map']:.2f} | {_fmt(r['precision@0.4'])} | "
                         f"{_fmt(r['recall@0.4'])} | {r['bops'] / 1e9:.3f} | {r['size_mb']:.3f} | {r['seconds']:.0f} |")
        lines.append("")
    lines += ["## Floors", ""] + [f"- {'MET' if f['met'] else 'MISSED'}: {f['floor']} ({f['detail']})"
                                   for f in record["floors"]]
    lines += ["", "## Definitions", "", f"- mAP: {record['definitions']['map']}.",
              f"- P/R: {record['definitions']['pr']}. One validation image, so the means are that image's values.",
              "- Percentages throughout. One run per arm (seed "
              f"{cfg['seed']}): differences of a few points are within run-to-run noise at this training length.", ""]
    return "\n".join(lines)


def _start_note(start: dict) -> str:
    parts = [start.get("source") or f"FCMAE on {start.get('images')} unlabeled images"]
    if start.get("seconds") is not None:
        parts.append(f"{start['seconds']:.0f} s")
    if start.get("synthetic_map50") is not None:
        parts.append(f"synthetic mAP@.5 {100 * start['synthetic_map50']:.1f}")
    return ", ".join(parts)
