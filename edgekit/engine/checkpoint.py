"""Checkpoints: model weights and the recipe to rebuild the model in one safetensors file.

The safetensors header carries the model name and constructor kwargs as JSON, so a
checkpoint is self-describing and loading it never unpickles anything. Optimizer and
schedule state for resuming go in a separate file loaded with ``weights_only=True``.
All writes go to a temporary name first and are renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from edgekit.errors import EdgekitError
from edgekit.fileio import atomic_target


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_name: str, model_kwargs: dict,
                    info: dict | None = None) -> Path:
    """Write weights + recipe atomically; a model with a NaN or infinite tensor is refused
    (a diverged run must not leave a checkpoint that looks usable)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise EdgekitError(f"refusing to write {path}: tensor {bad} holds NaN or infinite values (the model "
                           f"diverged); lower the learning rate or check the data")
    meta = {"edgekit.model": model_name, "edgekit.kwargs": json.dumps(model_kwargs),
            "edgekit.info": json.dumps(info or {})}
    with atomic_target(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[dict, str, dict, dict]:
    """(state_dict, model_name, model_kwargs, info); a clear error for missing or corrupt
    files, headers of the wrong shape and non-finite weights."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EdgekitError(f"checkpoint {path} is not a readable safetensors file ({_first_line(exc)}); "
                           f"re-export it or point to another file") from None
    try:
        name, kwargs, info = meta["edgekit.model"], json.loads(meta["edgekit.kwargs"]), \
            json.loads(meta.get("edgekit.info", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise EdgekitError(f"checkpoint {path} has no valid edgekit model metadata; "
                           f"was it written by edgekit train?") from None
    if not isinstance(name, str) or not isinstance(kwargs, dict) or not isinstance(info, dict):
        raise EdgekitError(f"checkpoint {path}: its edgekit header has fields of the wrong type (model must be a "
                           f"name, kwargs and info mappings); re-export it with edgekit")
    classes = kwargs.get("class_names")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise EdgekitError(f"checkpoint {path}: class_names must be a list of names, got {classes!r}")
    if "image_size" in info and not (isinstance(info["image_size"], int) and 32 <= info["image_size"] <= 4096):
        raise EdgekitError(f"checkpoint {path}: image_size {info['image_size']!r} is not a size in [32, 4096]")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise EdgekitError(f"checkpoint {path}: tensor {bad} holds NaN or infinite values (a diverged run?); "
                           f"use an earlier checkpoint or retrain with a lower learning rate")
    return state, name, kwargs, info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_state_strict(model: torch.nn.Module, state: dict, where) -> None:
    """``load_state_dict(strict=True)`` whose failure names what is missing, unexpected or
    mis-shaped (torch's own message is several lines and is cut to its useless first one)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise EdgekitError(f"{where}: the weights do not fit the model: {'; '.join(p for p in parts if p)}")
    model.load_state_dict(state, strict=True)


@dataclass
class LoadedModel:
    """A model as a stage receives it: from a checkpoint file or a registered name."""

    model: torch.nn.Module
    name: str                     # the registry name that rebuilds it
    kwargs: dict                  # create_model keyword arguments
    info: dict                    # checkpoint info (image_size, epoch, quant_config, ...)
    path: Path | None = None      # None: a registry name (random weights)

    @property
    def image_size(self) -> int:
        return int(self.info.get("image_size", 256))

    @property
    def class_names(self) -> list[str] | None:
        return self.kwargs.get("class_names") or getattr(self.model, "class_names", None)

    @property
    def quantized(self) -> bool:
        return "quant_config" in self.info

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else self.name

    def detector_classes(self) -> list[str]:
        """Class names of a trained detector; one line for anything else."""
        classes = self.kwargs.get("class_names")
        if not classes:
            raise EdgekitError(f"{self.label} is a {self.name} checkpoint with no class names; this stage needs a "
                               f"detector checkpoint written by edgekit train")
        return list(classes)


def load(source: str | Path, *, weights: bool = True, allow_quantized: bool = False) -> LoadedModel:
    """The one loader of every stage: a checkpoint file, or a registered model name
    (random weights). ``weights=False`` builds the model without loading its tensors (for
    shape-only work such as profiling). A quantized checkpoint is refused unless
    ``allow_quantized`` (its float twin is built; the caller applies its quant config)."""
    from edgekit.models import create_model, list_models

    path = Path(source)
    if path.is_file():
        state, name, kwargs, info = read_checkpoint(path)
        if "quant_config" in info and not allow_quantized:
            raise EdgekitError(f"{path} is already quantized; pass the float checkpoint it came from")
        model = _create(name, kwargs, path)
        if weights and "quant_config" not in info:
            load_state_strict(model, state, f"checkpoint {path}")
        return LoadedModel(model.eval(), name, kwargs, {"model": name, "kwargs": kwargs, **info}, path)
    if str(source) in list_models():
        return LoadedModel(create_model(str(source)).eval(), str(source), {}, {}, None)
    if path.suffix or "/" in str(source) or path.exists():
        raise EdgekitError(f"checkpoint {source} not found (or not a file); pass an edgekit checkpoint "
                           f"(.safetensors) or a model name (edgekit models)")
    raise EdgekitError(f"{source!r} is neither a checkpoint file nor a model name; model names: "
                       f"{', '.join(list_models())}")


def _create(name: str, kwargs: dict, path: Path) -> torch.nn.Module:
    from edgekit.models import create_model

    if name.startswith("fcmae_"):
        raise EdgekitError(f"{path} is an FCMAE pretraining checkpoint ({name}); start a detector from it with "
                           f"edgekit train --init {path}")
    try:
        return create_model(name, **kwargs)
    except EdgekitError as exc:
        raise EdgekitError(f"checkpoint {path}: {exc}") from None


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model, info) of a float checkpoint file: :func:`load` for callers that need the pair."""
    if not Path(path).is_file():
        raise EdgekitError(f"checkpoint {path} not found")
    loaded = load(path)
    return loaded.model, loaded.info


def save_training_state(path: str | Path, state: dict) -> None:
    with atomic_target(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"resume state {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt pickles
        raise EdgekitError(f"resume state {path} is unreadable ({type(exc).__name__}); start without --resume") from None
