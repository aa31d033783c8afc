"""The pretraining stage's config, apart from the engine so that the command line can list
its flags without importing torch (the checks that need the model code import it then)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import StageConfig, check_image_size, flag, require
from edgekit.errors import EdgekitError

EXTRA_KEYS = ("drop_path_rate", "grn_backend")  # FCMAE keywords a config may pass through


@dataclass
class PretrainConfig(StageConfig):
    data: str | list[str] = ""         # folder(s) of unlabeled images or rasters, searched recursively
    out: str = "runs/pretrain"
    model: str = "convnextv2_atto"     # the encoder to pretrain (a convnextv2_* name)
    input_size: int = 224              # crop side in pixels, cut at native resolution
    crops_per_image: int = 0           # crops per image per epoch; 0: as many as fit side by side
    mask_ratio: float = 0.6
    patch_size: int = 32               # a multiple of 32 that divides input_size
    masking: str = "random"            # random | disjoint (views with non-overlapping masks)
    views: int = 1                     # masked views per crop
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    grn_stats: str = "sample"          # sample | batch (the official MinkowskiGRN's pooling)
    epochs: int = 100
    batch_size: int = 16               # crops per step (each seen in `views` masked views)
    lr: float = 1e-3                   # absolute; the official 1.5e-4 * batch / 256 assumes batches of thousands
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0             # 0: no clipping (the official recipe has none)
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    workers: int = 0
    device: str = "auto"               # auto (a GPU when there is one), cpu, cuda or cuda:N
    time_limit: float = 0.0            # seconds; 0: no limit
    resume: str | None = None          # a last.state.pt to continue from
    progress: bool = True
    reconstructions: int = 4           # images in reconstructions.png; 0: none
    extra: dict = field(default_factory=dict)  # further FCMAE keywords (drop_path_rate, grn_backend)

    @property
    def folders(self) -> list[Path]:
        return [Path(d) for d in ([self.data] if isinstance(self.data, str) else self.data)]

    def check(self) -> None:
        from edgekit.models.fcmae import ENCODER_STRIDE, GRN_STATS, fcmae_encoder_size
        from edgekit.models.masking import MASKINGS, mask_grid, max_disjoint_views

        require(bool(self.data) and all(str(d) for d in self.folders), "data", self.data,
                "one or more folders of images")
        fcmae_encoder_size(self.model)
        check_image_size(self.input_size, "input_size")
        require(0.0 < self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "in (0, 1), e.g. 0.6")
        require(self.patch_size >= ENCODER_STRIDE and self.patch_size % ENCODER_STRIDE == 0, "patch_size",
                self.patch_size, f"a multiple of the encoder stride {ENCODER_STRIDE}")
        require(self.input_size % self.patch_size == 0, "patch_size", self.patch_size,
                f"a divisor of --input-size {self.input_size}")
        grid = mask_grid(self.input_size, self.patch_size, self.mask_ratio, where=flag("mask_ratio"))
        require(self.masking in MASKINGS, "masking", self.masking, " or ".join(MASKINGS))
        require(1 <= self.views <= 64, "views", self.views, "an integer in [1, 64]")
        if self.masking == "disjoint" and self.views < 2:
            raise EdgekitError(f"--masking disjoint needs --views >= 2 (up to "
                               f"{max_disjoint_views(grid[0] * grid[1], self.mask_ratio)} stay disjoint at "
                               f"--mask-ratio {self.mask_ratio}); with one view it is random masking")
        require(self.grn_stats in GRN_STATS, "grn_stats", self.grn_stats, " or ".join(GRN_STATS))
        require(self.crops_per_image >= 0, "crops_per_image", self.crops_per_image, ">= 0 (0: automatic)")
        require(self.decoder_dim >= 1, "decoder_dim", self.decoder_dim, ">= 1")
        require(self.decoder_depth >= 0, "decoder_depth", self.decoder_depth, ">= 0")
        require(1 <= self.epochs <= 100_000, "epochs", self.epochs, "an integer in [1, 100000]")
        require(1 <= self.batch_size <= 4096, "batch_size", self.batch_size, "an integer in [1, 4096]")
        require(0 < self.lr <= 10, "lr", self.lr, "in (0, 10]")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, ">= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0: no clipping)")
        require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", self.device,
                "auto, cpu, cuda or cuda:N")
        require(0 <= self.workers <= 256, "workers", self.workers, "an integer in [0, 256]")
        require(self.time_limit >= 0, "time_limit", self.time_limit, ">= 0 seconds")
        unknown = sorted(set(self.extra) - set(EXTRA_KEYS))
        require(not unknown, "extra", self.extra, f"a mapping of {' and '.join(EXTRA_KEYS)} only (unknown: {unknown})")
        require(0 <= self.reconstructions <= 64, "reconstructions", self.reconstructions, "an integer in [0, 64]")

    def model_kwargs(self) -> dict:
        return {"decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth, "patch_size": self.patch_size,
                "mask_ratio": self.mask_ratio, "norm_pix_loss": self.norm_pix_loss, "grn_stats": self.grn_stats,
                **self.extra}
