"""Label efficiency of FCMAE pretraining on the built-in synthetic set, at equal total time.

The suite generates the synthetic DOTA-style set, pretrains the atto encoder with FCMAE on
its training images (no labels) for ``pretrain_seconds``, then fine-tunes ``rsdet_atto``
from that encoder (``TrainConfig.init``) for ``finetune_seconds`` with a random
``label_fraction`` of the labelled training images and with all of them. The scratch arms
train the same detector from random weights on the same images for the pretraining's
measured wall time plus ``finetune_seconds``, so that each pair of arms costs the same
total time. Everything is scored on the held-out split (mAP@.5 and mAP@[.5:.95]); only the
API is called (``pretrain``, ``train``, ``evaluate``).

The floor of the evidence: at the low label fraction, pretrain + fine-tune reaches at least
scratch + 3 points mAP@.5. Written: ``label_efficiency_cpu.json`` and ``.md`` in ``out``,
with the machine, versions, load and command. No argparse here: ``edgekit bench
label-efficiency`` calls :func:`label_efficiency_suite`. Nothing heavy is imported at module
level, so that the command line can list the config's flags without torch.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import StageConfig, check_image_size, require
from edgekit.errors import EdgekitError

RESULTS = str(Path(__file__).resolve().parent / "results")
FLOOR_MAP50_POINTS = 3.0  # pretrain + fine-tune over scratch at the low label fraction, in mAP@.5 points
# --quick replaces these with a plumbing-sized run; setting any of them beside --quick is an error.
QUICK = {"num_train": 16, "num_val": 8, "image_size": 64, "pretrain_seconds": 4.0, "finetune_seconds": 4.0,
         "decoder_dim": 32}


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class LabelEfficiencySuiteConfig(StageConfig):
    """FCMAE pretraining + fine-tuning against training from scratch at equal total time, with
    a fraction of the labels and with all of them, on the built-in synthetic set."""

    quick: bool = _help("a plumbing run: 16 images of 64 px, seconds-long budgets", False)
    num_train: int = _help("synthetic training images (pretraining uses all, unlabelled)", 400)
    num_val: int = _help("synthetic held-out images (scored, never trained on)", 100)
    image_size: int = _help("image side in px (pretraining crops and detector input)", 128)
    label_fraction: float = _help("the low-label arm's share of the labelled training images", 0.1)
    pretrain_seconds: float = _help("FCMAE pretraining budget", 480.0)
    finetune_seconds: float = _help("fine-tuning budget; scratch gets the pretraining's wall time on top", 240.0)
    mask_ratio: float = 0.6
    masking: str = _help("random | disjoint (with --views >= 2)", "random")
    views: int = 1
    decoder_dim: int = 512
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 16
    lr: float = _help("detector learning rate, both arms", 2e-3)
    batch_size: int = _help("detector batch, both arms", 8)
    seed: int = 0
    full_labels: bool = _help("also run the pair of arms with every label", True)
    threads: int = _help("torch and Numba threads (the shared machine: 1)", 1)
    work: str | None = _help("folder kept for the data and runs (default: a temporary folder, deleted)")
    out: str = RESULTS
    progress: bool = True

    def check(self) -> None:
        if self.quick:
            defaults = type(self)()  # the plain defaults: quick replaces these, so setting one is a contradiction
            given = [k for k in QUICK if getattr(self, k) != getattr(defaults, k)]
            if given:
                raise EdgekitError(f"--quick sets {', '.join('--' + k.replace('_', '-') for k in given)} itself; "
                                   f"drop them or drop --quick")
        require(self.num_train >= 4, "num_train", self.num_train, ">= 4")
        require(self.num_val >= 1, "num_val", self.num_val, ">= 1")
        check_image_size(self.image_size)
        require(0 < self.label_fraction < 1, "label_fraction", self.label_fraction,
                "in (0, 1) (the full set is always run beside it)")
        require(self.low_label_images() >= 2, "label_fraction", self.label_fraction,
                f"large enough to keep 2 of --num-train {self.num_train} images")
        require(self.pretrain_seconds > 0, "pretrain_seconds", self.pretrain_seconds, "> 0")
        require(self.finetune_seconds > 0, "finetune_seconds", self.finetune_seconds, "> 0")
        require(self.threads >= 1, "threads", self.threads, ">= 1")
        from edgekit.engine.config import TrainConfig  # light: no torch

        self.pretrain_config("-", "-")  # masking, ratio, patch vs size, decoder, lr: checked as pretrain would
        TrainConfig(data="-", lr=self.lr, batch_size=self.batch_size, image_size=self.plan()["image_size"])

    def plan(self) -> dict:
        """The sizes and budgets in force (--quick's or the config's)."""
        return dict(QUICK) if self.quick else {k: getattr(self, k) for k in QUICK}

    def low_label_images(self) -> int:
        return round(self.plan()["num_train"] * self.label_fraction)

    def pretrain_config(self, data: str, out: str):
        from edgekit.engine.pretrain_config import PretrainConfig

        plan = self.plan()
        return PretrainConfig(data=data, out=out, model="convnextv2_atto", input_size=plan["image_size"],
                              crops_per_image=1, mask_ratio=self.mask_ratio, masking=self.masking, views=self.views,
                              decoder_dim=plan["decoder_dim"], epochs=100_000, batch_size=self.pretrain_batch_size,
                              lr=self.pretrain_lr, warmup_epochs=1.0, seed=self.seed, device="cpu",
                              time_limit=plan["pretrain_seconds"], progress=self.progress, reconstructions=4)


def label_subset(data: Path, target: Path, count: int, seed: int) -> list[str]:
    """A DOTA root at ``target`` whose train split holds ``count`` of ``data``'s training images
    (seeded random choice, linked, with their labels) and whose val split is ``data``'s."""
    images = sorted((data / "train" / "images").iterdir())
    chosen = sorted(random.Random(seed).sample(images, count))
    (target / "train" / "images").mkdir(parents=True)
    (target / "train" / "labelTxt").mkdir()
    for path in chosen:
        (target / "train" / "images" / path.name).symlink_to(path.resolve())
        label = data / "train" / "labelTxt" / (path.stem + ".txt")
        (target / "train" / "labelTxt" / label.name).symlink_to(label.resolve())
    (target / "val").symlink_to((data / "val").resolve(), target_is_directory=True)
    return [p.name for p in chosen]


def _threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    try:
        import numba

        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def _detector_arm(config: LabelEfficiencySuiteConfig, data: Path, out: Path, seconds: float,
                  init: Path | None) -> dict:
    from edgekit.api import EvalConfig, TrainConfig, evaluate, train
    from edgekit.data.synthetic import SYNTHETIC_CLASSES

    cfg = TrainConfig(data=str(data), out=str(out), model="rsdet_atto", classes=list(SYNTHETIC_CLASSES),
                      image_size=config.plan()["image_size"], epochs=100_000, batch_size=config.batch_size,
                      lr=config.lr, seed=config.seed, time_limit=seconds, progress=config.progress,
                      init=str(init) if init else None)
    result = train(cfg)
    metrics = evaluate(result.checkpoint, data / "val", EvalConfig(progress=False))  # the held-out split, scored from the saved checkpoint
    return {"map50": metrics.map50, "map": metrics.map, "train_seconds": result.seconds,
            "time_limit": seconds, "epochs": len(result.history),
            "images_seen": _images_seen(result.history),
            "per_class_ap50": {k: v.get("ap50") for k, v in metrics.per_class.items()}}


def _images_seen(history: list) -> int:
    return round(sum(r["images_per_s"] * r["seconds"] for r in history))


def run(config: LabelEfficiencySuiteConfig) -> dict:
    import torch

    from edgekit.api import pretrain
    from edgekit.data.synthetic import generate_synthetic_dataset
    from edgekit.fileio import write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment

    plan = config.plan()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(config.work) if config.work else Path(tempfile.mkdtemp(prefix="edgekit_label_eff_"))
    if config.work and work.exists() and any(work.iterdir()):
        raise EdgekitError(f"--work {work} is not empty; give a new or empty folder")
    old_threads = torch.get_num_threads()
    _threads(config.threads)
    t0 = time.perf_counter()
    try:
        data = work / "data"
        generate_synthetic_dataset(data, num_train=plan["num_train"], num_val=plan["num_val"],
                                   image_size=plan["image_size"], seed=config.seed)
        low = config.low_label_images()
        subsets = {config.label_fraction: work / f"labels_{low}", **({1.0: data} if config.full_labels else {})}
        chosen = label_subset(data, subsets[config.label_fraction], low, config.seed)

        t = time.perf_counter()
        pre = pretrain(config.pretrain_config(str(data / "train" / "images"), str(work / "pretrain")))
        pretrain_wall = time.perf_counter() - t
        recon = out / "label_efficiency_reconstructions.png"
        if pre.reconstructions:
            shutil.copyfile(pre.reconstructions, recon)
        arms = []
        for fraction, root in subsets.items():
            tag = f"{round(fraction * 100)}pct"
            finetune = _detector_arm(config, root, work / f"finetune_{tag}", plan["finetune_seconds"],
                                     pre.checkpoint)
            scratch = _detector_arm(config, root, work / f"scratch_{tag}", pretrain_wall + plan["finetune_seconds"],
                                    None)
            arms.append({"label_fraction": fraction, "labelled_images": low if fraction < 1 else plan["num_train"],
                         "pretrain_finetune": finetune | {"total_seconds": pretrain_wall + finetune["train_seconds"]},
                         "scratch": scratch | {"total_seconds": scratch["train_seconds"]},
                         "delta_map50_points": 100 * (finetune["map50"] - scratch["map50"]),
                         "delta_map_points": 100 * (finetune["map"] - scratch["map"])})
    finally:
        _threads(old_threads)
        if not config.work:
            shutil.rmtree(work, ignore_errors=True)
    low_arm = arms[0]
    record = {"benchmark": "label_efficiency", "config": config.to_dict(), "plan": plan,
              "low_label_images": chosen, "pretrain": {
                  "wall_seconds": pretrain_wall, "train_seconds": pre.seconds, "epochs": len(pre.history),
                  "final_loss": pre.history[-1]["loss"] if pre.history else None,
                  "loss_curve": [round(r["loss"], 4) for r in pre.history],
                  "images": pre.images, "reconstructions": recon.name if pre.reconstructions else None},
              "arms": arms, "floor_map50_points": FLOOR_MAP50_POINTS,
              "floor_met": bool(low_arm["delta_map50_points"] >= FLOOR_MAP50_POINTS),
              "shortfall_map50_points": max(0.0, FLOOR_MAP50_POINTS - low_arm["delta_map50_points"]),
              "total_seconds": time.perf_counter() - t0, "machine": environment()}
    write_json_atomic(out / "label_efficiency_cpu.json", record)
    write_text_atomic(out / "label_efficiency_cpu.md", markdown(record))
    return record


SPEED_RATIO_LIMIT = 1.5  # arms of one label fraction training this much faster or slower: not equal work


def _images_per_second(arm: dict) -> float:
    return arm["images_seen"] / max(arm["train_seconds"], 1e-9)


def unequal_speeds(record: dict) -> list[str]:
    """One line per label fraction whose two arms trained at images/s rates more than
    :data:`SPEED_RATIO_LIMIT` apart: on a shared machine "equal time" was then not equal work."""
    lines = []
    for arm in record["arms"]:
        rates = {name: _images_per_second(arm[key])
                 for name, key in (("pretrain + fine-tune", "pretrain_finetune"), ("scratch", "scratch"))}
        ratio = max(rates.values()) / max(min(rates.values()), 1e-9)
        if ratio > SPEED_RATIO_LIMIT:
            rate_text = " and ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
            lines.append(f"**Unequal speed at {arm['labelled_images']} labels**: the arms trained at {rate_text} "
                         f"images/s ({ratio:.1f}x apart): the machine's load changed between them, so equal time was "
                         f"not equal work; rerun on a quiet machine before reading this row.")
    return lines


def markdown(record: dict) -> str:
    m, plan, pre = record["machine"], record["plan"], record["pretrain"]
    cfg = record["config"]
    load = ", ".join(f"{v:.1f}" for v in m.get("load_average_1_5_15") or ())
    low = record["arms"][0]
    verdict = (f"floor (+{record['floor_map50_points']:.0f} points mAP@.5 at {low['label_fraction']:.0%} labels) met"
               if record["floor_met"] else
               f"floor (+{record['floor_map50_points']:.0f} points mAP@.5 at {low['label_fraction']:.0%} labels) NOT met: "
               f"short by {record['shortfall_map50_points']:.1f} points")
    lines = [
        "# Label efficiency of FCMAE pretraining (synthetic set, CPU)", "",
        f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, {cfg['threads']} torch thread(s) "
        f"per run; load average (1/5/15 min, at the end) {load}; torch {m['versions'].get('torch')}.", "",
        f"Data: synthetic set, {plan['num_train']} training / {plan['num_val']} held-out images of "
        f"{plan['image_size']} px (seed {cfg['seed']}). Pretraining: FCMAE on convnextv2_atto, all training images "
        f"without labels, {cfg['masking']} masking x{cfg['views']}, ratio {cfg['mask_ratio']}, decoder width "
        f"{plan['decoder_dim']}, lr {cfg['pretrain_lr']}, batch {cfg['pretrain_batch_size']}: {pre['epochs']} epochs in "
        f"{pre['wall_seconds']:.0f} s wall (budget {plan['pretrain_seconds']:.0f} s), loss "
        f"{pre['loss_curve'][0] if pre['loss_curve'] else float('nan'):.3f} -> {pre['final_loss']:.3f}. Detector: "
        f"rsdet_atto, lr {cfg['lr']}, batch {cfg['batch_size']}; fine-tuning {plan['finetune_seconds']:.0f} s from "
        f"the encoder; scratch for the pretraining's wall time + {plan['finetune_seconds']:.0f} s.", "",
        f"**{verdict}**: at {low['label_fraction']:.0%} labels pretrain + fine-tune is "
        f"{low['delta_map50_points']:+.1f} points mAP@.5 ({low['delta_map_points']:+.1f} mAP@[.5:.95]) against scratch.",
        "",
        *[line for warning in unequal_speeds(record) for line in (warning, "")],
        "| labels | arm | mAP@.5 | mAP@[.5:.95] | train s | total s | epochs | images seen | images/s |",
        "|---|---|---|---|---|---|---|---|---|"]
    for arm in record["arms"]:
        for name, key in (("pretrain + fine-tune", "pretrain_finetune"), ("scratch", "scratch")):
            a = arm[key]
            lines.append(f"| {arm['labelled_images']} ({arm['label_fraction']:.0%}) | {name} | {a['map50']:.3f} | "
                         f"{a['map']:.3f} | {a['train_seconds']:.0f} | {a['total_seconds']:.0f} | {a['epochs']} | "
                         f"{a['images_seen']} | {_images_per_second(a):.1f} |")
    lines += ["", "Total time of an arm: scratch's training; pretrain + fine-tune's pretraining wall time plus its "
              "training. Scores: the saved checkpoint (EMA weights) on the held-out split. Time limits are met by "
              "fitting whole epochs, so an arm can end a little under its budget.", ""]
    if pre.get("reconstructions"):
        lines += [f"Input / masked input / reconstruction at the end of pretraining: `{pre['reconstructions']}`.", ""]
    return "\n".join(lines)


def label_efficiency_suite(config) -> dict:
    """The suite (a :class:`LabelEfficiencySuiteConfig`)."""
    return run(config)

