"""Disjoint against random masking in FCMAE pretraining: held-out reconstruction loss per
optimisation step and per second, over several seeds.

For each seed, :func:`edgekit.engine.pretrain.compare_masking` trains one FCMAE per masking
setting from the same initial weights on the same crops with the same schedule, and scores
the held-out crops (a quarter of the images, never trained on) with the same fixed random
masks. Settings: random masking with one view (the plain FCMAE baseline), random with two
independent views (the same compute per step as two disjoint views) and disjoint with two
views. The floor of the evidence: disjoint reaches random one-view masking's final held-out
loss in <= 0.7x the steps (read off the evaluation curve, linearly interpolated); the same
ratio in training seconds is reported beside it. The verdict is given per seed and on the
curves averaged over the seeds. Written: ``masking_cpu.json`` and ``.md``.
Nothing heavy is imported at module level (the command line lists the config's flags).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import StageConfig, check_image_size, require

RESULTS = str(Path(__file__).resolve().parent / "results")
FLOOR_STEP_RATIO = 0.7
SETTINGS = (("random", 1), ("random", 2), ("disjoint", 2))
BASELINE = ("random", 1)


@dataclass
class MaskingSuiteConfig(StageConfig):
    """Disjoint vs random masking: held-out FCMAE loss per step and per second, several seeds."""

    quick: bool = field(default=False, metadata={"help": "a plumbing run: 8 images, 6 steps, one seed"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "one comparison per seed"})
    steps: int = 300
    eval_every: int = 20
    num_images: int = field(default=200, metadata={"help": "synthetic images (a quarter held out)"})
    source_size: int = field(default=256, metadata={"help": "synthetic image side; crops of --input-size are cut"})
    input_size: int = 128
    crops_per_image: int = 4
    eval_crops: int = 64
    mask_ratio: float = 0.6
    batch_size: int = 8
    lr: float = 1e-3
    decoder_dim: int = 512
    threads: int = field(default=1, metadata={"help": "torch threads (the shared machine: 1)"})
    out: str = RESULTS
    progress: bool = True

    def check(self) -> None:
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
                "distinct integers, at least one")
        require(self.steps >= 2, "steps", self.steps, ">= 2")
        require(1 <= self.eval_every <= self.steps, "eval_every", self.eval_every, "in [1, --steps]")
        require(self.num_images >= 4, "num_images", self.num_images, ">= 4 (a quarter is held out)")
        check_image_size(self.source_size, "source_size")
        require(self.input_size <= self.source_size, "input_size", self.input_size,
                f"<= --source-size {self.source_size}")
        require(self.eval_crops >= 1, "eval_crops", self.eval_crops, ">= 1")
        require(self.threads >= 1, "threads", self.threads, ">= 1")
        from edgekit.engine.pretrain_config import PretrainConfig

        for masking, views in SETTINGS:  # ratio, patch vs input, decoder, batch, lr: as pretrain checks them
            PretrainConfig(data="-", **self.compare_options(0), masking=masking, views=views)

    def compare_options(self, seed: int) -> dict:
        """compare_masking's PretrainConfig options for one seed."""
        return {"model": "convnextv2_atto", "input_size": self.input_size, "crops_per_image": self.crops_per_image,
                "mask_ratio": self.mask_ratio, "batch_size": self.batch_size, "lr": self.lr, "seed": seed,
                "decoder_dim": 32 if self.quick else self.decoder_dim, "device": "cpu", "progress": self.progress}


def steps_to_reach(xs: list, losses: list, target: float) -> float | None:
    """The first x at which the piecewise-linear curve (xs, losses) reaches ``target``, or
    None when it never does."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(xs[0])
            x0, x1, l0 = xs[i - 1], xs[i], losses[i - 1]
            return float(x0 + (x1 - x0) * (l0 - target) / (l0 - loss))
    return None


def steps_to_stay(xs: list, losses: list, target: float) -> float | None:
    """The x from which the piecewise-linear curve stays at or below ``target`` to its end
    (its last crossing), or None when it ends above: unlike the first crossing, a lucky dip
    of a noisy curve does not count."""
    if losses[-1] > target:
        return None
    above = [i for i, loss in enumerate(losses) if loss > target]
    if not above:
        return float(xs[0])
    i = above[-1]
    x0, x1, l0, l1 = xs[i], xs[i + 1], losses[i], losses[i + 1]
    return float(x0 + (x1 - x0) * (l0 - target) / (l0 - l1))


def summarise(comparison: dict) -> dict:
    """Per setting: final held-out loss, steps and seconds to reach the baseline's final loss
    (first crossing, and from where the curve stays below it), as fractions of the
    baseline's steps and seconds."""
    curves = {(c["masking"], c["views"]): c for c in comparison["curves"]}
    base = curves[BASELINE]
    target, base_steps, base_seconds = base["eval_loss"][-1], base["steps"][-1], base["seconds"][-1]
    rows = {}
    for (masking, views), c in curves.items():
        step = steps_to_reach(c["steps"], c["eval_loss"], target)
        second = steps_to_reach(c["seconds"], c["eval_loss"], target)
        stay = steps_to_stay(c["steps"], c["eval_loss"], target)
        rows[f"{masking} x{views}"] = {
            "final_eval_loss": c["eval_loss"][-1], "final_train_loss": c["train_loss"][-1],
            "seconds": c["seconds"][-1], "seconds_per_step": c["seconds"][-1] / c["steps"][-1],
            "steps_to_baseline_final": step, "step_ratio": None if step is None else step / base_steps,
            "seconds_to_baseline_final": second, "seconds_ratio": None if second is None else second / base_seconds,
            "steps_to_stay_below": stay, "stay_step_ratio": None if stay is None else stay / base_steps}
    return {"baseline": f"{BASELINE[0]} x{BASELINE[1]}", "baseline_final_loss": target, "settings": rows}


def run(config: MaskingSuiteConfig) -> dict:
    import torch

    from edgekit.api import compare_masking
    from edgekit.data.synthetic import generate_synthetic_dataset
    from edgekit.fileio import write_json_atomic, write_text_atomic

    seeds = config.seeds[:1] if config.quick else config.seeds
    steps, eval_every = (6, 3) if config.quick else (config.steps, config.eval_every)
    num_images, source = (8, config.input_size) if config.quick else (config.num_images, config.source_size)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgekit_masking_"))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    runs, record = [], {}
    try:
        generate_synthetic_dataset(work, num_train=num_images, num_val=0, image_size=source, seed=0)
        for seed in seeds:
            comparison = compare_masking(str(work / "train" / "images"), settings=SETTINGS, steps=steps,
                                         eval_every=eval_every, eval_crops=config.eval_crops,
                                         warmup_steps=max(1, steps // 20), **config.compare_options(seed))
            runs.append({"seed": seed, **comparison, "summary": summarise(comparison)})
            # Written after every seed, so that a run stopped early leaves the seeds it finished.
            record = _record(config, steps, seeds, num_images, source, runs, time.perf_counter() - t0)
            write_json_atomic(out / "masking_cpu.json", record)
            write_text_atomic(out / "masking_cpu.md", markdown(record))
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(work, ignore_errors=True)
    return record


def _record(config: MaskingSuiteConfig, steps: int, seeds: list, num_images: int, source: int, runs: list,
            seconds: float) -> dict:
    from edgekit.sysinfo import environment

    return {"benchmark": "masking", "config": config.to_dict(), "steps": steps, "seeds": seeds,
            "seeds_done": [r["seed"] for r in runs], "num_images": num_images, "source_size": source,
            **_floor(runs), "runs": runs, "total_seconds": seconds, "machine": environment()}


def mean_curves(runs: list) -> dict:
    """Each setting's held-out curve (and training seconds) averaged over the seeds, as one
    comparison for :func:`summarise`: single-seed curves of a few hundred steps are noisy
    enough for one loss spike to decide a crossing, the seed mean much less so."""
    by_setting = {}
    for run_ in runs:
        for curve in run_["curves"]:
            by_setting.setdefault((curve["masking"], curve["views"]), []).append(curve)
    curves = []
    for (masking, views), group in by_setting.items():
        steps = group[0]["steps"]
        if any(c["steps"] != steps for c in group):
            raise ValueError(f"{masking} x{views}: the seeds were evaluated at different steps; no mean curve")
        def mean(key):
            return [None if any(v is None for v in values) else sum(values) / len(values)
                    for values in zip(*(c[key] for c in group))]
        curves.append({"masking": masking, "views": views, "steps": steps, "seconds": mean("seconds"),
                       "eval_loss": mean("eval_loss"), "train_loss": mean("train_loss")})
    return {"curves": curves}


def _floor(runs: list) -> dict:
    """The floor's verdict over the seeds, on the first crossing and on the sustained one,
    per seed and on the seed-mean curves."""
    fields = {"floor_step_ratio": FLOOR_STEP_RATIO}
    mean = summarise(mean_curves(runs))
    disjoint = mean["settings"]["disjoint x2"]
    fields["mean_curve_summary"] = mean
    for name, key in (("", "step_ratio"), ("stay_", "stay_step_ratio")):
        fields[f"mean_curve_{name}floor_met"] = disjoint[key] is not None and disjoint[key] <= FLOOR_STEP_RATIO
        ratios = [r["summary"]["settings"]["disjoint x2"][key] for r in runs]
        reached = [r for r in ratios if r is not None]
        fields[f"disjoint_{name}step_ratios"] = ratios
        fields[f"disjoint_{name}step_ratio_mean"] = sum(reached) / len(reached) if reached else None
        fields[f"{name}floor_met_every_seed"] = len(reached) == len(ratios) and max(reached) <= FLOOR_STEP_RATIO
    return fields


def resummarise(path) -> dict:
    """Recompute the summaries and the verdict of a written ``masking_cpu.json`` from its
    stored curves (the runs, machine and command are kept) and rewrite it and its .md."""
    import json

    from edgekit.fileio import write_json_atomic, write_text_atomic

    path = Path(path)
    record = json.loads(path.read_text())
    for run_ in record["runs"]:
        run_["summary"] = summarise(run_)
    record.update(_floor(record["runs"]))
    write_json_atomic(path, record)
    write_text_atomic(path.with_suffix(".md"), markdown(record))
    return record


def _fmt(value, spec: str) -> str:
    return "never" if value is None else format(value, spec)


def markdown(record: dict) -> str:
    m, cfg = record["machine"], record["config"]
    load = ", ".join(f"{v:.1f}" for v in m.get("load_average_1_5_15") or ())
    first = record["runs"][0]
    ratios = ", ".join(_fmt(r, ".2f") for r in record["disjoint_step_ratios"])
    stays = ", ".join(_fmt(r, ".2f") for r in record["disjoint_stay_step_ratios"])
    verdict = "met on every seed" if record["floor_met_every_seed"] else "NOT met on every seed"
    stay_verdict = "met on every seed" if record["stay_floor_met_every_seed"] else "NOT met on every seed"
    lines = [
        "# Disjoint vs random masking in FCMAE pretraining (CPU)", "",
        f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, {cfg['threads']} torch thread(s); "
        f"load average (1/5/15 min, at the end) {load}; torch {m['versions'].get('torch')}.", "",
        f"convnextv2_atto FCMAE (decoder width {first['config']['decoder_dim']}), {first['config']['input_size']} px "
        f"crops of {record['num_images']} synthetic {record['source_size']} px images ({first['train_images']} training images, held-out "
        f"images: {first['held_out_images']}, {first['eval_crops']} held-out crops scored with the same fixed random "
        f"masks), mask ratio {cfg['mask_ratio']}, patch 32, batch {cfg['batch_size']} crops, lr {cfg['lr']} with "
        f"{first['warmup_steps']} warm-up steps then cosine over {record['steps']} steps; seeds {record['seeds_done']} "
        f"(each: initial weights, crops, masks, held-out crops). Seconds: training steps only.", "",
        f"**Floor (disjoint x2 reaches random x1's final held-out loss in <= {record['floor_step_ratio']}x the steps): "
        f"{verdict}**; step ratios per seed (first crossing): {ratios}. Read from where the curve stays below "
        f"random x1's final loss to the end (a dip of a noisy curve does not count): {stays}, {stay_verdict}. "
        f"Seconds ratios are step-time ratios as much as anything: the machine's load changed during the runs.", ""]
    several = len(record["runs"]) > 1 and "mean_curve_summary" in record
    if several:
        mean = record["mean_curve_summary"]["settings"]["disjoint x2"]
        met = {True: "met", False: "NOT met"}
        def when(word, ratio):
            return "never" if ratio is None else f"{word} {ratio:.2f}x random x1's steps"

        lines += [f"**On the curves averaged over the {len(record['runs'])} seeds, disjoint x2 reaches random x1's "
                  f"final loss {when('at', mean['step_ratio'])} ({met[record['mean_curve_floor_met']]}) and stays "
                  f"below it {when('from', mean['stay_step_ratio'])} ({met[record['mean_curve_stay_floor_met']]}).**",
                  ""]
    lines += ["| seed | setting | final held-out loss | s / step | steps to random x1's final | step ratio | "
              "seconds ratio | stays below from step (ratio) |", "|---|---|---|---|---|---|---|---|"]
    summaries = [(r["seed"], r["summary"]) for r in record["runs"]]
    if several:
        summaries.append(("mean", record["mean_curve_summary"]))
    for seed, summary in summaries:
        for name, row in summary["settings"].items():
            lines.append(f"| {seed} | {name} | {row['final_eval_loss']:.4f} | {row['seconds_per_step']:.3f} | "
                         f"{_fmt(row['steps_to_baseline_final'], '.0f')} | {_fmt(row['step_ratio'], '.2f')} | "
                         f"{_fmt(row['seconds_ratio'], '.2f')} | {_fmt(row['steps_to_stay_below'], '.0f')} "
                         f"({_fmt(row['stay_step_ratio'], '.2f')}) |")
    curves = mean_curves(record["runs"])["curves"] if several else first["curves"]
    which = f"averaged over the {len(record['runs'])} seeds" if several else "of the seed"
    lines += ["", f"Held-out loss curves (step: loss) {which}:", ""]
    for c in curves:
        points = ", ".join(f"{s}: {v:.3f}" for s, v in zip(c["steps"], c["eval_loss"]))
        lines.append(f"- {c['masking']} x{c['views']}: {points}")
    return "\n".join(lines) + "\n"


def masking_suite(config) -> dict:
    """The suite (a :class:`MaskingSuiteConfig`)."""
    return run(config)
