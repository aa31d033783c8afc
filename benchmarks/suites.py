"""The benchmark suites ``edgekit bench SUITE`` runs, each with its config.

A suite is a function taking one of these configs and writing its result files under
``out`` (``benchmarks/results/`` by default) with the machine, versions and command. The
configs live here, apart from the suites' code, so that the command line can list them
without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.benchmarks.label_efficiency import LabelEfficiencySuiteConfig
from edgekit.benchmarks.masking import MaskingSuiteConfig
from edgekit.benchmarks.scenes import ScenesSuiteConfig
from edgekit.config import StageConfig, check_image_size, require

RESULTS = str(Path(__file__).resolve().parent / "results")


def _help(text: str):
    return field(default=None, metadata={"help": text})


@dataclass
class ModelSuiteConfig(StageConfig):
    """The committed model benchmark: the default detector (or a given checkpoint) on every
    backend; ``quick``: a one-minute CPU run at 128 px without torch.compile."""

    quick: bool = field(default=False, metadata={"help": "short run (about a minute)"})
    model: str = field(default="rsdet_atto", metadata={"help": "model name or checkpoint"})
    data: str | None = _help("DOTA split folder for mAP")
    out: str = RESULTS
    threads: int | None = _help("threads (default: every core)")

    def check(self) -> None:
        require(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1")


@dataclass
class KernelSuiteConfig(StageConfig):
    """GRN and deformable convolution on the CPU: Numba vs the eager reference, torch.compile,
    ONNX Runtime, a dense conv and the copy-bandwidth limit."""

    quick: bool = field(default=False, metadata={"help": "a few configurations, short budgets"})
    only: str | None = _help("grn | dcn: one op (a quicker run)")
    out: str = RESULTS

    def check(self) -> None:
        require(self.only in (None, "grn", "dcn"), "only", self.only, "grn | dcn")


@dataclass
class GpuKernelSuiteConfig(StageConfig):
    quick: bool = field(default=False, metadata={"help": "two GRN configurations and one DCN one"})
    plumbing_cpu: bool = field(default=False, metadata={
        "help": "run the suite's code on the CPU with the numba backend (checks the script only)"})
    out: str = RESULTS


@dataclass
class QuantizationSuiteConfig(StageConfig):
    """Accuracy vs BOPs of every quantization recipe, on scikit-learn's digits and on the
    built-in detector."""

    quick: bool = field(default=False, metadata={"help": "tiny data and seconds-long training (a smoke run)"})
    checkpoint: str | None = _help("float rsdet checkpoint to reuse (with --data) instead of training one")
    data: str | None = _help("DOTA root (train/ and val/) of --checkpoint")
    out: str = RESULTS
    tasks: list[str] | None = _help("digits and/or rsdet_atto (default both; quick: digits)")
    seed: int | None = _help("data split / synthetic seed (default: random, recorded)")
    qat_epochs: int = field(default=8, metadata={"help": "detector QAT epochs (quick: 1)"})
    qat_images: int = field(default=64, metadata={"help": "detector images per QAT epoch, drawn afresh (quick: 4)"})
    progress: bool = True

    def check(self) -> None:
        require(not self.tasks or set(self.tasks) <= {"digits", "rsdet_atto"}, "tasks", self.tasks,
                "digits and/or rsdet_atto")
        require(self.qat_epochs >= 1, "qat_epochs", self.qat_epochs, ">= 1")
        require(self.qat_images >= 1, "qat_images", self.qat_images, ">= 1")
        if self.checkpoint and not self.data:
            from edgekit.errors import EdgekitError

            raise EdgekitError("--checkpoint needs --data (the DOTA root it was trained on, with train/ and val/)")


@dataclass
class QdqSuiteConfig(StageConfig):
    """INT8 QDQ placements of the detector in ONNX Runtime against its FP32 export."""

    image_size: int = 256
    rounds: int = 20
    threads: int = field(default=2, metadata={"help": "ORT intra-op threads"})
    out: str = RESULTS

    def check(self) -> None:
        check_image_size(self.image_size)
        require(self.rounds >= 1 and self.threads >= 1, "rounds", self.rounds, ">= 1 (and --threads >= 1)")


@dataclass
class DeployFormSuiteConfig(StageConfig):
    """The deploy-form FP32 export against the training-form export in ONNX Runtime."""

    image_size: int = 256
    rounds: int = 40
    threads: int = field(default=2, metadata={"help": "ORT intra-op threads"})
    budget_s: float = 240.0
    ablations: bool = field(default=True, metadata={"help": "also time the graph with each design choice undone"})
    out: str = RESULTS

    def check(self) -> None:
        check_image_size(self.image_size)
        require(self.rounds >= 1 and self.threads >= 1, "rounds", self.rounds, ">= 1 (and --threads >= 1)")
        require(self.budget_s > 0, "budget_s", self.budget_s, "> 0 seconds")


@dataclass
class RooflineSuiteConfig(StageConfig):
    model: str = "rsdet_atto"
    image_size: int = 256
    duration: float = 5.0
    out: str = RESULTS

    def check(self) -> None:
        check_image_size(self.image_size)
        require(self.duration > 0, "duration", self.duration, "> 0 seconds")


@dataclass
class OverheadSuiteConfig(StageConfig):
    duration: float = 3.0
    out: str = RESULTS

    def check(self) -> None:
        require(self.duration > 0, "duration", self.duration, "> 0 seconds")


@dataclass
class NeonSuiteConfig(StageConfig):
    """rsdet_atto fine-tuned on real NEON tree crowns (VOC) from a synthetic-set start, from
    scratch and (optionally) from an FCMAE start, within one training budget each; scored on
    the other site's validation tile, then the quantization rows on the fine-tuned model."""

    data: str = field(default="", metadata={"help": "the NEON tree-crown folder (train/ and val/, Pascal VOC)"})
    out: str = RESULTS
    init: str | None = _help("detector checkpoint trained on the synthetic set (default: train one here)")
    arms: list[str] | None = _help("synthetic, scratch and/or fcmae (default: all three)")
    train_seconds: float = field(default=720.0, metadata={"help": "fine-tuning budget per arm, seconds"})
    start_seconds: float = field(default=330.0, metadata={"help": "budget of the synthetic and FCMAE starts"})
    unlabeled: list[str] | None = _help("more folders of unlabeled images for the FCMAE start")
    tile_size: int = 416
    overlap: int = 96
    batch_size: int = 4
    lr: float = field(default=2e-3, metadata={"help": "fine-tuning learning rate (train's default; real imagery "
                                                       "may need less)"})
    color_jitter: float = field(default=0.0, metadata={"help": "fine-tuning color jitter strength (train "
                                                                 "--color-jitter; 0: none)"})
    deformable: bool = field(default=False, metadata={"help": "deformable layers in the detector (slower on CPU)"})
    score_threshold: float = field(default=0.1, metadata={"help": "score threshold of the precision/recall rows"})
    quantize: bool = field(default=True, metadata={"help": "the quantization rows on the fine-tuned model"})
    quick: bool = field(default=False, metadata={"help": "smoke run: two tiles, one step per arm"})
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        from edgekit.benchmarks.neon import ARMS, check_neon_folder

        check_neon_folder(self.data)
        require(not self.arms or set(self.arms) <= set(ARMS), "arms", self.arms, " and/or ".join(ARMS))
        check_image_size(self.tile_size, "tile_size")
        require(0 <= self.overlap < self.tile_size, "overlap", self.overlap, "in [0, --tile-size)")
        require(self.train_seconds > 0 and self.start_seconds > 0, "train_seconds", self.train_seconds,
                "> 0 seconds (and --start-seconds too)")
        require(1 <= self.batch_size <= 256, "batch_size", self.batch_size, "an integer in [1, 256]")
        require(0 < self.lr <= 10, "lr", self.lr, "in (0, 10]")
        require(0 <= self.color_jitter < 1, "color_jitter", self.color_jitter, "in [0, 1)")
        require(0 <= self.score_threshold < 1, "score_threshold", self.score_threshold, "in [0, 1)")


@dataclass
class AccuracyControlSuiteConfig(StageConfig):
    """quantize --max-drop on the built-in detector against uniform W8A8 PTQ, with an
    8-calibration-image row, ORT quantize_static and NNCF accuracy control beside them
    (``benchmarks/accuracy_control.py``)."""

    checkpoint: str | None = _help("float rsdet checkpoint to use (with --data) instead of training one")
    data: str | None = _help("DOTA root (train/ and val/) of --checkpoint")
    bounds: list[float] | None = _help("--max-drop bounds in mAP points (default 1.0,0.5)")
    val_images: int = field(default=32, metadata={"help": "validation images of every mAP (a fixed seeded subset)"})
    calib_images: int = field(default=320, metadata={"help": "PTQ calibration images (the 8-image row is extra)"})
    quantize_calib_batches: int = field(default=16, metadata={"help": "GHOST rows: calibration batches of 2"})
    candidates: int = field(default=4, metadata={"help": "accuracy control: moves tried per step"})
    rounds: int = 20
    budget_s: float = 120.0
    threads: int = field(default=2, metadata={"help": "ORT intra-op threads"})
    train_seconds: float = field(default=330.0, metadata={"help": "training budget without --checkpoint"})
    seed: int = 0
    out: str = RESULTS

    def check(self) -> None:
        require((self.checkpoint is None) == (self.data is None), "data", self.data,
                "given with --checkpoint (its DOTA root), or neither")
        require(self.bounds is None or (bool(self.bounds) and all(b >= 0 for b in self.bounds)), "bounds",
                self.bounds, ">= 0 mAP points")
        for key in ("val_images", "calib_images", "quantize_calib_batches", "candidates", "rounds", "threads"):
            require(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")


@dataclass
class SafeDefaultsSuiteConfig(StageConfig):
    """The detector-safe defaults one at a time: each group quantize keeps at 8 bits (first
    layer, box regression outputs, score logits) lowered to 4 bits, simulated and in ONNX
    Runtime (``benchmarks/safe_defaults.py``)."""

    checkpoint: str = field(default="", metadata={"help": "float rsdet checkpoint"})
    data: str = field(default="", metadata={"help": "DOTA root (train/ and val/) of --checkpoint"})
    val_images: int = field(default=32, metadata={"help": "validation images of every mAP (a fixed seeded subset)"})
    calib_batches: int = field(default=16, metadata={"help": "calibration batches of 2"})
    out: str = RESULTS

    def check(self) -> None:
        require(Path(self.checkpoint).is_file(), "checkpoint", self.checkpoint, "a float rsdet checkpoint file")
        require(Path(self.data, "val").is_dir() and Path(self.data, "train").is_dir(), "data", self.data,
                "a DOTA root with train/ and val/")
        for key in ("val_images", "calib_batches"):
            require(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")


@dataclass
class PeersSuiteConfig(StageConfig):
    """edgekit's FP32 and INT8 exports in ONNX Runtime and OpenVINO beside ONNX Runtime's
    quantize_static and NNCF INT8, on the same calibration images, timed side by side."""

    model: str = field(default="rsdet_atto", metadata={"help": "checkpoint (trained, for mAP) or model name"})
    data: str | None = _help("DOTA split folder: the mAP column and the calibration images")
    image_size: int | None = _help("input size (default: the checkpoint's)")
    threads: int = field(default=2, metadata={"help": "intra-op threads of every runtime"})
    duration: float = field(default=10.0, metadata={"help": "seconds per row (and per row in the rounds)"})
    out: str = RESULTS

    def check(self) -> None:
        require(self.threads >= 1, "threads", self.threads, ">= 1")
        require(self.duration > 0, "duration", self.duration, "> 0 seconds")
        if self.image_size is not None:
            check_image_size(self.image_size)


SUITES = {  # name: (config, "module:function", what it measures)
    "model": (ModelSuiteConfig, "model_bench:model_suite",
              "latency, throughput, memory and accuracy of a model on every backend"),
    "kernels": (KernelSuiteConfig, "kernels:kernel_suite",
                "GRN and deformable-convolution kernels on the CPU against their baselines"),
    "kernels-gpu": (GpuKernelSuiteConfig, "kernels_gpu:gpu_kernel_suite",
                    "the CUDA kernels against torchvision and the device's copy bandwidth (needs a GPU)"),
    "quantization": (QuantizationSuiteConfig, "quantization:quantization_suite",
                     "accuracy vs BOPs of every quantization recipe (the quantization evidence)"),
    "qdq": (QdqSuiteConfig, "qdq_ort:qdq_suite", "INT8 QDQ placements in ONNX Runtime against FP32"),
    "deploy-form": (DeployFormSuiteConfig, "deploy_form:deploy_form_suite",
                    "the deploy-form FP32 ONNX graph against the training form in ONNX Runtime"),
    "roofline": (RooflineSuiteConfig, "roofline:roofline_suite",
                 "the roofline latency predictor against measured eager latency on this CPU"),
    "overhead": (OverheadSuiteConfig, "latency:overhead_suite", "the timing harness's own overhead"),
    "peers": (PeersSuiteConfig, "model_bench:peers_suite",
              "edgekit's FP32/INT8 in ONNX Runtime and OpenVINO beside quantize_static and NNCF"),
    "accuracy-control": (AccuracyControlSuiteConfig, "accuracy_control:accuracy_control_suite",
                         "quantize --max-drop against W8A8 PTQ on the built-in detector, and 8 calibration images"),
    "safe-defaults": (SafeDefaultsSuiteConfig, "safe_defaults:safe_defaults_suite",
                      "each 8-bit default of quantize (first layer, box outputs, score logits) lowered to 4 bits"),
    "neon": (NeonSuiteConfig, "neon:neon_suite",
             "rsdet_atto fine-tuned on real NEON tree crowns, scored on another site, then quantized"),
    "label-efficiency": (LabelEfficiencySuiteConfig, "label_efficiency:label_efficiency_suite",
                         "FCMAE pretraining + fine-tuning against scratch at equal total time, 10% and 100% labels"),
    "masking": (MaskingSuiteConfig, "masking:masking_suite",
                "disjoint vs random FCMAE masking: held-out loss per step and per second"),
    "scenes": (ScenesSuiteConfig, "scenes:scenes_suite",
               "large GeoTIFF scenes through predict: peak memory against scene size, tiles per second"),
}


def run_suite(name: str, config=None):
    """Run one suite (its default config unless given); returns what the suite returns."""
    config_class, target, _ = SUITES[name]
    module, function = target.split(":")
    run = getattr(importlib.import_module(f"edgekit.benchmarks.{module}"), function)
    return run(config if config is not None else config_class())
