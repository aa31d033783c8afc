"""Every registered model, through the stages a user puts it through: it builds, runs
forward, round-trips its checkpoint through the one loader, and (slow) exports to ONNX
with parity. New names in the registry are picked up without touching this file."""

from __future__ import annotations

import pytest
import torch

from edgekit.engine.checkpoint import load, save_checkpoint
from edgekit.models import create_model, list_models

SIZE = 64


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    return [t for o in out for t in _flat(o)]


def _example(model):
    from edgekit.calibration.quantize import default_example_input

    return torch.randn_like(default_example_input(model, SIZE))


@pytest.mark.parametrize("name", list_models())
def test_builds_runs_and_round_trips_its_checkpoint(name, tmp_path, fresh_torch_seed):
    model = create_model(name).eval()
    x = _example(model)
    with torch.no_grad():
        outputs = _flat(model(x))
    assert outputs and all(torch.isfinite(t).all() for t in outputs)
    path = save_checkpoint(tmp_path / f"{name}.safetensors", model, name, {}, {"image_size": SIZE})
    loaded = load(path)
    assert loaded.name == name and loaded.image_size == SIZE and loaded.path == path
    with torch.no_grad():
        again = _flat(loaded.model(x))
    assert all(torch.equal(a, b) for a, b in zip(outputs, again))
    assert load(name).name == name  # a registry name loads too (random weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_exports_to_onnx_with_parity(name, tmp_path, fresh_torch_seed):
    from edgekit.export.parity import check_parity
    from edgekit.export.to_onnx import export_onnx

    model = create_model(name).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=SIZE)
    report = check_parity(model, path, _example(model).repeat(2, 1, 1, 1), "fp32", raise_on_failure=False)
    assert report["passed"], report
