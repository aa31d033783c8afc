"""Training configuration: one dataclass, loadable from YAML, validated field by field.

Every key a user can set is a field here; an unknown key or a value of the wrong type is
one clear :class:`EdgekitError` naming the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekit.errors import EdgekitError


@dataclass
class TrainConfig:
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
    augment: bool = True
    seed: int = 0
    workers: int = 0
    time_limit: float = 0.0             # seconds; 0 = no limit (the schedule is then cut short)
    eval_every: int = 0                 # epochs between evaluations; 0 = only at the end
    resume: str | None = None           # a last.state.pt to resume from
    progress: bool = True
    extra: dict = field(default_factory=dict)  # model kwargs passed to create_model

    def validate(self) -> "TrainConfig":
        checks = [
            (self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "a multiple of 32, >= 32"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr > 0, "lr", "> 0"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)"),
            (self.time_limit >= 0, "time_limit", ">= 0"),
            (self.workers >= 0, "workers", ">= 0"),
            (self.eval_every >= 0, "eval_every", ">= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]"),
            (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
            (self.classes is None or (self.classes and all(isinstance(c, str) and c for c in self.classes)),
             "classes", "a non-empty list of class names"),
        ]
        for ok, key, rule in checks:
            if not ok:
                raise EdgekitError(f"config: {key}={getattr(self, key)!r} is invalid; it must be {rule}")
        return self


def _check_type(key: str, value, source: str):
    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) or (hint,)
    origin_ok = any((typing.get_origin(t) or t) is type(value) for t in allowed if t is not type(None))
    if value is None and type(None) in allowed:
        return value
    if float in allowed and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:  # YAML reads 2e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not origin_ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise EdgekitError(f"{source}: key {key!r} must be {names}, got {value!r}")
    return value


def make_config(overrides: dict | None = None, path: str | Path | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file, then explicit overrides (e.g. CLI flags)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EdgekitError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise EdgekitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise EdgekitError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update((k, (v, str(path))) for k, v in loaded.items())
    values.update((k, (v, "option")) for k, v in (overrides or {}).items() if v is not None)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    for key, (value, source) in values.items():
        if key not in known:
            raise EdgekitError(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        kwargs[key] = _check_type(key, value, source)
    return TrainConfig(**kwargs).validate()
