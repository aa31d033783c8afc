"""Checkpoints: model weights and the recipe to rebuild the model in one safetensors file.

The safetensors header carries the model name and constructor kwargs as JSON, so a
checkpoint is self-describing and loading it never unpickles anything. Optimizer and
schedule state for resuming go in a separate file loaded with ``weights_only=True``.
All writes go to a temporary name first and are renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from edgekit.errors import EdgekitError
from edgekit.fileio import temp_path


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_name: str, model_kwargs: dict,
                    info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"edgekit.model": model_name, "edgekit.kwargs": json.dumps(model_kwargs),
            "edgekit.info": json.dumps(info or {})}
    tmp = temp_path(path)
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, str, dict, dict]:
    """(state_dict, model_name, model_kwargs, info); a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EdgekitError(f"checkpoint {path} is not a readable safetensors file ({exc}); "
                           f"re-export it or point to another file") from None
    try:
        return state, meta["edgekit.model"], json.loads(meta["edgekit.kwargs"]), json.loads(meta.get("edgekit.info", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise EdgekitError(f"checkpoint {path} has no valid edgekit model metadata; "
                           f"was it written by edgekit train?") from None


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights strictly."""
    from edgekit.models import create_model

    state, name, kwargs, info = read_checkpoint(path)
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EdgekitError(f"checkpoint {path} does not match model {name}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, {"model": name, "kwargs": kwargs, **info}


def save_training_state(path: str | Path, state: dict) -> None:
    path = Path(path)
    tmp = temp_path(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"resume state {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt pickles
        raise EdgekitError(f"resume state {path} is unreadable ({type(exc).__name__}); start without --resume") from None
