"""The training stage's config: every key a user can set, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekit.config import StageConfig, check_image_size, require


@dataclass
class TrainConfig(StageConfig):
    data: str = ""                      # DOTA-format root holding train/ and val/ splits
    out: str = "runs/train"             # where checkpoints and the training record go
    model: str = "rsdet_atto"
    classes: list[str] | None = None    # None: the classes found in the training labels
    image_size: int = 256
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 10.0
    ema: bool = True
    ema_decay: float = 0.998
    deformable: bool = True
    obb: bool = False                   # oriented boxes: the angle head, trained on the labels' polygons
    augment: bool = True                # flips and 90-degree turns of each training image
    color_jitter: float = 0.0           # photometric augmentation strength in [0, 1); 0 = none
    seed: int = 0
    workers: int = 0
    time_limit: float = 0.0             # seconds; 0 = no limit (the schedule is then cut short)
    eval_every: int = 0                 # epochs between evaluations; 0 = only at the end
    resume: str | None = None           # a last.state.pt to resume from
    init: str | None = None             # FCMAE checkpoint (encoder -> backbone) or a detector checkpoint to start from
    progress: bool = True
    extra: dict = field(default_factory=dict)  # model kwargs passed to create_model

    def check(self) -> None:
        check_image_size(self.image_size)
        require(1 <= self.epochs <= 100_000, "epochs", self.epochs, "an integer in [1, 100000]")
        require(1 <= self.batch_size <= 4096, "batch_size", self.batch_size, "an integer in [1, 4096]")
        require(0 < self.lr <= 10, "lr", self.lr, "in (0, 10]")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")
        require(self.time_limit >= 0, "time_limit", self.time_limit, ">= 0 seconds")
        require(0 <= self.workers <= 256, "workers", self.workers, "an integer in [0, 256]")
        require(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, ">= 0")
        require(0 <= self.color_jitter < 1, "color_jitter", self.color_jitter, "in [0, 1) (0: no color jitter)")
        if self.color_jitter and not self.augment:
            from edgekit.errors import EdgekitError

            raise EdgekitError("--color-jitter is an augmentation, and augmentation is off (--no-augment); "
                               "drop one of them")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0: no clipping)")
        if "obb" in self.extra:
            from edgekit.errors import EdgekitError

            raise EdgekitError("set oriented boxes with obb (--obb), not through the model's extra kwargs")
        if self.init is not None and self.resume is not None:
            from edgekit.errors import EdgekitError

            raise EdgekitError("--init starts a new run from a pretrained encoder and --resume continues a run; "
                               "give one of them")
        if self.classes is not None:
            require(bool(self.classes) and all(c.strip() for c in self.classes), "classes", self.classes,
                    "a non-empty list of class names")
            require(len(set(self.classes)) == len(self.classes), "classes", self.classes, "free of duplicates")
