"""Quantization evidence: accuracy vs BOPs of every quantization recipe, on scikit-learn's
digits (real data, a tiny ConvNeXt V2 classifier) and on the built-in detector (rsdet_atto
on synthetic scenes), with the targets of ``targets.json`` checked.

    edgekit bench quantization [--quick] [--checkpoint CKPT --data DOTA_ROOT]

Writes ``benchmarks/results/quantization.{md,json,png}`` (``--out`` elsewhere). Every row
starts from the same float model and runs :func:`edgekit.calibration.pipeline.quantize_model`,
the recipe ``edgekit quantize`` runs, from a :class:`QuantizeRecipe` per row.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

BITS = (2, 3, 4, 5, 6, 7, 8)
GHOST_THRESHOLD = 0.01


@dataclasses.dataclass(frozen=True)
class Row:
    """One recipe: uniform widths (weight_bits/act_bits) or a search method, then PTQ or QAT."""
    key: str
    label: str
    method: str | None = None        # None: float; uniform, ghost, budget, sensitivity
    weight_bits: int = 8
    act_bits: int | str = 8
    qat: bool = False
    ends: int | None = 8             # first/last layer bits (None: the same widths as every other layer)
    budget_of: str = "w4a8_ptq"      # hybrid rows: the uniform row whose BOPs are the budget
    sensitivity: str = "hutchinson"  # sensitivity rows: hutchinson (Hessian trace) or fisher


# Uniform rows keep the first and last layers at 8 bits (the usual deployment recipe)
# unless marked "every layer"; hybrid rows search every layer, ends included, under the
# BOPs of their uniform row. The W3A8 block repeats the comparison where uniform widths
# cost real accuracy: every layer at 3 bits (at W4A8, even with 4-bit ends, the demo
# detector loses 1.5-1.8 points, leaving a hybrid no room to win by the targeted 2 points
# without beating FP32).
ROWS = (
    Row("fp32", "FP32"),
    Row("w8a8_ptq", "W8A8 PTQ", "uniform", 8, 8),
    Row("w8a8_qat", "W8A8 QAT", "uniform", 8, 8, qat=True),
    Row("w4a8_ptq", "W4A8 PTQ", "uniform", 4, 8),
    Row("w4a8_qat", "W4A8 QAT", "uniform", 4, 8, qat=True),
    Row("w4a8_all_ptq", "W4A8 PTQ, every layer 4-bit", "uniform", 4, 8, ends=None),
    Row("w4a4_qat", "W4A4 QAT", "uniform", 4, 4, qat=True),
    Row("ghost_qat", f"GHOST threshold {GHOST_THRESHOLD} (tied A) + QAT", "ghost", act_bits="tied", qat=True),
    Row("budget_qat", "budget hybrid @ W4A8 BOPs + QAT", "budget", qat=True, ends=None),
    Row("sensitivity_qat", "sensitivity (Hessian) hybrid @ W4A8 BOPs + QAT", "sensitivity", qat=True, ends=None),
    Row("fisher_qat", "sensitivity (Fisher) hybrid @ W4A8 BOPs + QAT", "sensitivity", qat=True, ends=None,
        sensitivity="fisher"),
    Row("w3a8_ptq", "W3A8 PTQ", "uniform", 3, 8),
    Row("w3a8_all_ptq", "W3A8 PTQ, every layer 3-bit", "uniform", 3, 8, ends=None),
    Row("w3a8_all_qat", "W3A8 QAT, every layer 3-bit", "uniform", 3, 8, qat=True, ends=None),
    Row("budget3_qat", "budget hybrid @ every-layer W3A8 BOPs + QAT", "budget", qat=True, ends=None,
        budget_of="w3a8_all_ptq"),
    Row("sensitivity3_qat", "sensitivity (Hessian) hybrid @ every-layer W3A8 BOPs + QAT", "sensitivity", qat=True,
        ends=None, budget_of="w3a8_all_ptq"),
    Row("fisher3_qat", "sensitivity (Fisher) hybrid @ every-layer W3A8 BOPs + QAT", "sensitivity", qat=True,
        ends=None, sensitivity="fisher", budget_of="w3a8_all_ptq"),
)


# ---------------------------------------------------------------- tasks

def _tiny_convnext(num_classes: int = 10, dims=(32, 64), depth: int = 2):
    """ConvNeXt V2 pieces (Block with GRN, channels-first LayerNorm) at 8x8 input: the
    official stem (4x4 stride 4) would leave 2x2 pixels, so a 3x3 stem keeps the grid.
    GRN runs on the torch backend: at this size a JIT compile would eat the training time."""
    import torch.nn as nn

    from edgekit.models.convnextv2 import Block
    from edgekit.models.layers import LayerNorm

    class TinyConvNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, dims[0], 3, padding=1), LayerNorm(dims[0], data_format="channels_first"))
            self.downsample = nn.Sequential(LayerNorm(dims[0], data_format="channels_first"),
                                            nn.Conv2d(dims[0], dims[1], 2, stride=2))
            self.stages = nn.ModuleList([nn.Sequential(*(Block(d, grn_backend="torch") for _ in range(depth))) for d in dims])
            self.norm = nn.LayerNorm(dims[1])
            self.head = nn.Linear(dims[1], num_classes)

        def forward(self, x):
            x = self.stages[1](self.downsample(self.stages[0](self.stem(x))))
            return self.head(self.norm(x.mean((2, 3))))

    return TinyConvNeXt()


class DigitsTask:
    """scikit-learn's digits (1797 real 8x8 scans): a stratified 75/25 split, top-1 in %."""
    name, metric, metric_label, image_size = "digits", "top1", "top-1 %", 8

    def __init__(self, quick: bool, seed: int, train_epochs: int, qat_epochs: int):
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor((digits.images / 16.0 - 0.5) / 0.5, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.long)
        tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=seed)
        if quick:
            tr, te = tr[:160], te[:96]
        self.x_train, self.y_train, self.x_test, self.y_test = x[tr], y[tr], x[te], y[te]
        self.train_epochs, self.qat_epochs, self.quick = train_epochs, qat_epochs, quick
        self.qat_batch = 16 if quick else 64
        self.qat_images = (1 if quick else 4) * self.qat_batch
        self.data_note = f"sklearn digits: {len(tr)} train / {len(te)} test images (8x8, real)"

    def train_float(self, progress: bool):
        import torch
        import torch.nn.functional as F

        model = _tiny_convnext(depth=1 if self.quick else 2)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        start = time.perf_counter()
        for _ in range(self.train_epochs):
            model.train()
            for idx in torch.randperm(len(self.y_train)).split(64):
                loss = F.cross_entropy(model(self.x_train[idx]), self.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        if progress:
            print(f"digits: float training {self.train_epochs} epochs in {time.perf_counter() - start:.1f} s",
                  flush=True)
        return model.eval(), {"epochs": self.train_epochs, "seconds": time.perf_counter() - start}

    def evaluate(self, model) -> dict:
        import torch

        model.eval()
        with torch.no_grad():
            pred = model(self.x_test).argmax(1)
        return {"top1": 100.0 * float((pred == self.y_test).float().mean())}

    def batches(self, count: int, batch_size: int | None = None) -> list:
        import torch
        batch_size = batch_size or self.qat_batch
        idx = torch.randperm(len(self.y_train))[:count * batch_size].split(batch_size)
        return [(self.x_train[i], self.y_train[i]) for i in idx]

    def qat_data(self):
        from torch.utils.data import TensorDataset
        data = TensorDataset(self.x_train, self.y_train)
        return _resampled(data, self.qat_images), None

    qat_lr = 5e-4


class DetectorTask:
    """rsdet_atto on the built-in synthetic scenes (or a given checkpoint + DOTA root);
    mAP@[.5:.95] and mAP@.5 in points on the val split."""
    name, metric, metric_label = "rsdet_atto", "map", "mAP x100"

    def __init__(self, quick: bool, seed: int, workdir: Path, train_seconds: float, qat_epochs: int,
                 qat_images: int, checkpoint: str | None = None, data: str | None = None):
        from edgekit.data.synthetic import generate_synthetic_dataset

        self.quick, self.train_seconds, self.qat_epochs, self.checkpoint = quick, train_seconds, qat_epochs, checkpoint
        self.qat_images = qat_images
        if data is None:
            n_train, n_val, self.image_size = (8, 4, 64) if quick else (200, 48, 96)
            data = workdir / "synthetic"
            generate_synthetic_dataset(data, num_train=n_train, num_val=n_val, image_size=self.image_size, seed=seed)
            self.data_note = f"built-in synthetic scenes: {n_train} train / {n_val} val at {self.image_size} px"
        else:
            self.image_size = None  # from the checkpoint
            self.data_note = f"DOTA root {data}"
        self.data, self.workdir = Path(data), workdir

    def train_float(self, progress: bool):
        from edgekit.engine.checkpoint import load_model

        start = time.perf_counter()
        if not self.checkpoint:
            from edgekit.data.synthetic import SYNTHETIC_CLASSES
            from edgekit.engine.config import TrainConfig
            from edgekit.engine.train import train

            cfg = TrainConfig(data=str(self.data), out=str(self.workdir / "train"), model="rsdet_atto",
                              classes=list(SYNTHETIC_CLASSES), image_size=self.image_size,
                              epochs=1 if self.quick else 60, batch_size=8,
                              time_limit=0.0 if self.quick else self.train_seconds, progress=progress)
            self.checkpoint = train(cfg).checkpoint
        model, info = load_model(self.checkpoint)
        self.image_size = self.image_size or int(info.get("image_size", 256))
        self.classes = list(model.class_names)
        self._loaders()
        return model.eval(), {"checkpoint": str(self.checkpoint), "seconds": time.perf_counter() - start}

    def _loaders(self):
        from torch.utils.data import DataLoader

        from edgekit.data.dataset import DetectionDataset, collate_detection
        from edgekit.engine.train import split_dirs

        train_dir, val_dir = split_dirs(str(self.data))
        self.train_set = DetectionDataset(train_dir, self.classes, image_size=self.image_size, augment=True)
        self.calib_set = DetectionDataset(train_dir, self.classes, image_size=self.image_size, augment=False)
        self.val_loader = DataLoader(DetectionDataset(val_dir, self.classes, image_size=self.image_size),
                                     batch_size=8, collate_fn=collate_detection)

    def evaluate(self, model) -> dict:
        from edgekit.engine.evaluate import evaluate_model

        r = evaluate_model(model, self.val_loader, self.classes, progress=False)
        return {"map": 100.0 * r["map"], "map50": 100.0 * r["map50"]}

    def batches(self, count: int, batch_size: int = 4) -> list:
        from edgekit.data.dataset import sample_batches
        return sample_batches(self.calib_set, count, batch_size)

    def qat_data(self):
        from edgekit.data.dataset import collate_detection
        return _resampled(self.train_set, self.qat_images), collate_detection

    qat_lr, qat_batch = 1e-4, 8


# ---------------------------------------------------------------- rows

def _resampled(data, size: int):
    """``size`` items drawn afresh from ``data`` at every access: qat_train's time limit
    acts between epochs, so short epochs let a few-second budget hold on a slow model."""
    import torch
    from torch.utils.data import Dataset

    class Resampled(Dataset):
        def __len__(self):
            return min(size, len(data))

        def __getitem__(self, index):
            return data[int(torch.randint(len(data), ()))]

    return Resampled()


def recipe_for(row: Row, budget_bops: float | None, opts, qat_epochs: int):
    """The :class:`QuantizeRecipe` a row stands for: the same recipe ``edgekit quantize`` runs."""
    from edgekit.calibration.pipeline import QuantizeRecipe

    searched, budgeted, sensitivity = row.method != "uniform", row.method in ("budget", "sensitivity"), \
        row.method == "sensitivity"
    tied = row.act_bits == "tied"
    return QuantizeRecipe(
        method=row.method, bit_widths=list(BITS) if searched else None,
        threshold=GHOST_THRESHOLD if row.method == "ghost" else None,
        budget_bops=budget_bops / 1e9 if budgeted else None,
        weight_bits=row.weight_bits if not searched else None, act_bits_mode="tied" if tied else "fixed",
        act_bits=None if tied else row.act_bits, first_last_bits=row.ends or 0, calib_batches=opts.calib_batches,
        sens_method=row.sensitivity if sensitivity else None, sens_batches=opts.sens_batches if sensitivity else None,
        sens_probes=opts.sens_probes if sensitivity else None, qat_epochs=qat_epochs if row.qat else 0,
        progress=False)


def run_row(task, row: Row, float_model, budget_bops: float | None, opts, workdir: Path) -> dict:
    """Quantize ``float_model`` by ``row`` through the pipeline's one recipe; measure it."""
    from edgekit.calibration.pipeline import quantize_model
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.ptq import apply_fake_quant

    record = {"key": row.key, "method": row.label, "search_seconds": 0.0, "sensitivity_seconds": 0.0,
              "qat_seconds": 0.0, "weight_bits": None}
    if row.method is None:
        report = profile_model(float_model, task.image_size)
        return {**record, **task.evaluate(float_model), "bops": report.totals["bops"],
                "size_mb": report.totals["size_mb"]}

    def qat(teacher, qmodel):
        from edgekit.calibration.qat import qat_train

        data, collate = task.qat_data()
        return qat_train(teacher, qmodel, data, epochs=task.qat_epochs, lr=task.qat_lr, batch_size=task.qat_batch,
                         image_size=task.image_size, out=workdir / row.key, progress=False, collate_fn=collate,
                         model_name=task.name)

    result = quantize_model(float_model, recipe_for(row, budget_bops, opts, task.qat_epochs), task.batches, model_name=task.name,
                            image_size=task.image_size, qat=qat)
    if result.search is not None:
        record.update(search_seconds=result.search.seconds, sensitivity_seconds=result.search.sensitivity_seconds,
                      weight_bits=result.search.weight_bits,
                      budget_bops=None if row.method == "ghost" else budget_bops)
    if result.qat:
        record.update(qat_seconds=result.qat["qat_seconds"], qat_epochs=len(result.qat["history"]), distillation=True)
    # Scored and profiled through the quant spec (what export computes): the spec's fake
    # quantization gives the brevitas model's outputs (checked equal) at a quarter of the time.
    report = profile_model(float_model, task.image_size, result.spec)
    return {**record, **task.evaluate(apply_fake_quant(float_model, result.spec)), "bops": report.totals["bops"],
            "size_mb": report.totals["size_mb"]}


def run_task(task, opts, workdir: Path) -> dict:
    print(f"== {task.name}: training the float model", flush=True)
    float_model, training = task.train_float(not opts.quiet)
    rows, bops = [], {}
    for row in ROWS:
        budget = bops.get(row.budget_of) if row.method in ("budget", "sensitivity") else None
        if row.method in ("budget", "sensitivity") and budget is None:
            raise RuntimeError(f"hybrid row {row.key} needs the {row.budget_of} row first (its BOPs are the budget)")
        t = time.perf_counter()
        rec = run_row(task, row, float_model, budget, opts, workdir)
        rec["wall_seconds"] = time.perf_counter() - t
        bops[row.key] = rec["bops"]
        rows.append(rec)
        print(f"   {row.label:<44} {task.metric_label} {rec[task.metric]:7.2f}  {rec['bops'] / 1e9:9.4f} GBOPs  "
              f"{rec['size_mb']:.4f} MB  search {rec['search_seconds'] + rec['sensitivity_seconds']:.1f} s  "
              f"QAT {rec['qat_seconds']:.1f} s", flush=True)
    return {"task": task.name, "metric": task.metric, "metric_label": task.metric_label, "data": task.data_note,
            "image_size": task.image_size, "float_training": training, "rows": rows,
            "qat_recipe": {"epochs": task.qat_epochs, "images_per_epoch": task.qat_images,
                           "batch_size": task.qat_batch, "lr": task.qat_lr},
            "floors": check_floors(rows, task.metric, task.name == "rsdet_atto")}


# ---------------------------------------------------------------- floors

def check_floors(rows: list, metric: str, search_floor: bool) -> list:
    """The targets of ``targets.json`` (in points: percentage points of top-1 or of mAP x 100),
    each with met, the margin (>= 0 when met; < 0: the miss) and the figures."""
    from edgekit.benchmarks.targets import load_targets

    targets = load_targets("quantization")
    HYBRID_DROP_MAX, HYBRID_GAIN_MIN = targets["hybrid_drop_max"], targets["hybrid_gain_min"]
    W8A8_PTQ_DROP_MAX, SEARCH_SECONDS_MAX = targets["w8a8_ptq_drop_max"], targets["search_seconds_max"]
    by = {r["key"]: r for r in rows}
    fp32, w4a8 = by["fp32"][metric], by["w4a8_qat"][metric]
    floors = []

    def add(name, margin, detail):
        floors.append({"floor": name, "met": bool(margin >= 0), "margin": margin, "detail": detail})

    add("W8A8 PTQ loses <= 1 point", W8A8_PTQ_DROP_MAX - (fp32 - by["w8a8_ptq"][metric]),
        f"FP32 {fp32:.2f}, W8A8 PTQ {by['w8a8_ptq'][metric]:.2f}")
    budget = by["w4a8_ptq"]["bops"]
    for key in ("budget_qat", "sensitivity_qat", "fisher_qat", "ghost_qat"):
        r = by[key]
        within = r["bops"] <= budget * (1 + 1e-9)
        if key == "ghost_qat" and not within:
            continue  # GHOST's threshold sets its own BOPs; it is a hybrid at the budget only if it lands under it
        over = 0.0 if within else -(r["bops"] / budget - 1) * 100
        add(f"{r['method']}: BOPs <= W4A8", over, f"{r['bops'] / 1e9:.4f} vs {budget / 1e9:.4f} GBOPs")
        add(f"{r['method']}: >= FP32 - {HYBRID_DROP_MAX} points", r[metric] - (fp32 - HYBRID_DROP_MAX),
            f"{r[metric]:.2f} vs FP32 {fp32:.2f}")
        add(f"{r['method']}: beats W4A8 QAT by >= {HYBRID_GAIN_MIN} points", r[metric] - (w4a8 + HYBRID_GAIN_MIN),
            f"{r[metric]:.2f} vs W4A8 QAT {w4a8:.2f}")
    w3a8 = by["w3a8_all_qat"][metric]
    # Beyond the targets: the same test where uniform bits cost accuracy.
    for key in ("budget3_qat", "sensitivity3_qat", "fisher3_qat"):
        r = by[key]
        add(f"(beyond the targets) {r['method']}: beats every-layer W3A8 QAT by >= {HYBRID_GAIN_MIN} points",
            r[metric] - (w3a8 + HYBRID_GAIN_MIN), f"{r[metric]:.2f} vs {w3a8:.2f} "
            f"({r['bops'] / 1e9:.4f} vs {by['w3a8_all_ptq']['bops'] / 1e9:.4f} GBOPs)")
    if search_floor:
        for key in ("ghost_qat", "budget_qat", "sensitivity_qat", "fisher_qat"):
            r = by[key]
            seconds = r["search_seconds"] + r["sensitivity_seconds"]
            add(f"{r['method']}: bit search <= {SEARCH_SECONDS_MAX:.0f} s", SEARCH_SECONDS_MAX - seconds,
                f"{seconds:.2f} s (sensitivity estimate {r['sensitivity_seconds']:.2f} s included)")
    return floors


# ---------------------------------------------------------------- report

def render_markdown(record: dict) -> str:
    env = record["environment"]
    versions = env["versions"]
    lines = ["# Quantization evidence", "",
             f"Command: `{env['command']}`  ", f"Machine: {env['cpu']} ({', '.join(env['cpu_flags'])}), "
             f"{env['cores']} CPUs ({env['torch_threads']} torch threads), {env['machine']}; python {env['python']}, "
             f"torch {versions['torch']}, brevitas {versions['brevitas']}, scikit-learn {versions['scikit-learn']}; "
             f"{env['date']}  ",
             f"Load average (1 min) at start {record['load'][0]:.2f}, at end {record['load'][1]:.2f}; "
             f"total {record['seconds']:.0f} s. {record['note']}", ""]
    for t in record["tasks"]:
        extra = " | mAP@.5 x100" if t["metric"] == "map" else ""
        lines += [f"## {t['task']} ({t['data']}, {t['image_size']} px, {t['torch_threads']} torch thread(s))", ""]
        if "qat_recipe" in t:
            q = t["qat_recipe"]
            lines += [f"QAT rows: {q['epochs']} epochs of {q['images_per_epoch']} images drawn afresh, batch "
                      f"{q['batch_size']}, lr {q['lr']:g}.", ""]
        lines += [f"| method | {t['metric_label']}{extra} | GBOPs | size MB | search s | QAT s |",
                  "|---|---:|" + ("---:|" if extra else "") + "---:|---:|---:|---:|"]
        for r in t["rows"]:
            search = r["search_seconds"] + r["sensitivity_seconds"]
            m50 = f" | {r['map50']:.2f}" if extra else ""
            lines.append(f"| {r['method']} | {r[t['metric']]:.2f}{m50} | {r['bops'] / 1e9:.4f} | {r['size_mb']:.4f} | "
                         f"{search:.2f} | {r['qat_seconds']:.1f} |")
        lines += ["", "| floor | met | margin (points; < 0 = miss) | figures |", "|---|---|---:|---|"]
        for f in t["floors"]:
            lines.append(f"| {f['floor']} | {'yes' if f['met'] else 'NO'} | {f['margin']:+.2f} | {f['detail']} |")
        lines.append("")
    lines += ["Sensitivity rows: Hessian traces by Hutchinson's estimator (4 batches x 4 probes, finite-difference "
              "Hessian-vector products) taken at 2 standard errors above their mean (calibration.sensitivity), or "
              "the empirical Fisher diagonal on the same batches.", "",
              "Search s: the bit search (plus the Hessian-trace or Fisher estimate for the sensitivity rows); QAT s: "
              "qat_train's wall time (GQSD + OST distillation from the FP32 model, a fixed number of short epochs, so "
              "accuracy does not depend on the machine's load). BOPs = MACs x "
              "b_w x b_a (float layers at 32 x 32), size = packed weights + float parameters "
              "(calibration.profiler). Accuracy is one run of each recipe, so differences of a point or two "
              "on the small val/test sets are within noise.", ""]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekit.fileio import temp_path

    tasks = record["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for r in t["rows"]:
            marker = "o" if r["key"] == "fp32" else ("s" if r["qat_seconds"] else "^")
            ax.scatter(r["bops"] / 1e9, r[t["metric"]], marker=marker)
            ax.annotate(r["method"].split(" (")[0].replace(" + QAT", "+QAT"), (r["bops"] / 1e9, r[t["metric"]]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("GBOPs (log)")
        ax.set_ylabel(t["metric_label"])
        ax.set_title(f"{t['task']}: accuracy vs BOPs")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = temp_path(path)
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def quantization_suite(config) -> dict:
    """The quantization evidence (a :class:`~edgekit.benchmarks.suites.QuantizationSuiteConfig`):
    writes ``quantization.{md,json,png}`` under ``config.out``; returns the record."""
    import types

    import numpy as np
    import torch

    from edgekit.fileio import make_dirs, write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment

    seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(2**31))
    torch.manual_seed(seed)
    calib, sens_batches, probes = (2, 1, 1) if config.quick else (2, 4, 4)
    opts = types.SimpleNamespace(calib_batches=calib, sens_batches=sens_batches, sens_probes=probes,
                                 quiet=not config.progress)
    names = config.tasks or (["digits"] if config.quick else ["digits", "rsdet_atto"])
    out = make_dirs(config.out)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    print(f"seed {seed}", flush=True)
    tasks = []
    with tempfile.TemporaryDirectory(prefix="edgekit-qbench-") as tmp:
        workdir = Path(tmp)
        for name in names:
            threads = torch.get_num_threads()
            if name == "digits":
                # One thread: a model this small spends 2 threads' time waiting on each other.
                torch.set_num_threads(1)
                task = DigitsTask(config.quick, seed, *((2, 1) if config.quick else (12, 6)))
            else:
                task = DetectorTask(config.quick, seed, workdir / "det", 0.0 if config.quick else 200.0,
                                    1 if config.quick else config.qat_epochs, 4 if config.quick else config.qat_images,
                                    checkpoint=config.checkpoint, data=config.data)
            tasks.append({**run_task(task, opts, workdir / name), "torch_threads": torch.get_num_threads()})
            torch.set_num_threads(threads)
    record = {"format": "edgekit.bench-quantization/1", "quick": config.quick, "seed": seed, "config": config.to_dict(),
              "environment": environment(), "load": [load0, os.getloadavg()[0]],
              "seconds": time.perf_counter() - start, "tasks": tasks,
              "note": ("QUICK smoke run: tiny data and ~1 s trainings; the figures say nothing about accuracy."
                       if config.quick else "Shared 2-core machine: timings include other users' load.")}
    write_json_atomic(out / "quantization.json", record)
    write_text_atomic(out / "quantization.md", render_markdown(record))
    plot(record, out / "quantization.png")
    for t in tasks:
        for f in t["floors"]:
            print(f"[{t['task']}] {'MET ' if f['met'] else 'MISS'} {f['floor']}: margin {f['margin']:+.2f} "
                  f"({f['detail']})")
    print(f"wrote {out / 'quantization.md'} ({record['seconds']:.0f} s)")
    return record
