"""Where a training run's first weights come from (``train --init``).

Two kinds of start: an FCMAE checkpoint (``edgekit pretrain``, or an official one), whose
encoder initialises the detector's backbone; or an edgekit detector checkpoint of the same
architecture (say, trained on the synthetic set), from which every tensor whose name and
shape match is taken: backbone, neck and head, while the layers that depend on the class
list (the classification output when the classes differ) or on the box type (the angle
branch of an oriented run started from a horizontal one) keep their fresh initialisation.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError


def detector_checkpoint_name(path: str | Path) -> str | None:
    """The model name of an edgekit detector checkpoint file, or None for any other file
    (an FCMAE checkpoint of ``edgekit pretrain`` included)."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            name = (f.metadata() or {}).get("edgekit.model")
    except (SafetensorError, OSError, ValueError):
        return None
    return name if isinstance(name, str) and name.startswith("rsdet_") else None


def check_init(path: str | Path, model_name: str) -> None:
    """Refuse a start that cannot initialise ``model_name``, before a run writes anything."""
    source = detector_checkpoint_name(path)
    if source is not None:
        if source != model_name:
            raise EdgekitError(f"--init {path} is a {source} checkpoint and this run trains {model_name}; start "
                               f"from a {model_name} checkpoint, an FCMAE checkpoint, or train --model {source}")
        return
    from edgekit.models.fcmae import encoder_state_dict, read_state_file

    encoder_state_dict(read_state_file(path))


def initialise(model, path: str | Path) -> dict:
    """Load the start into ``model``; returns what was loaded (kind, tensor count, what kept its fresh init)."""
    if detector_checkpoint_name(path) is None:
        from edgekit.models.fcmae import load_pretrained_encoder

        return {"kind": "fcmae encoder", "source": str(path), "tensors": load_pretrained_encoder(model, path)}
    from edgekit.engine.checkpoint import read_checkpoint

    state = read_checkpoint(path)[0]
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in matched):
        raise EdgekitError(f"--init {path}: none of its backbone tensors fit this model; start from a checkpoint of "
                           f"the same architecture")
    model.load_state_dict(matched, strict=False)
    return {"kind": "detector", "source": str(path), "tensors": len(matched),
            "fresh": sorted(k for k in own if k not in matched)}
