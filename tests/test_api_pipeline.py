"""The whole pipeline through the Python API alone (no argparse anywhere), and the same
through the ``edgekit`` command: synthetic data -> train -> quantize -> calibrate ->
export -> bench. The two routes must write the same artefacts (weights, quant specs,
ONNX graphs that compute the same outputs, bench rows of the same shape)."""

from __future__ import annotations

import json

import numpy as np
import torch

from edgekit import api
from edgekit.cli import main

SIZE = 128


def cli(*argv):
    code = main([str(a) for a in argv])
    assert code == 0, argv


def api_route(data, out):
    torch.manual_seed(0)
    trained = api.train(api.TrainConfig(data=str(data), out=str(out / "train"), image_size=SIZE, epochs=1,
                                        batch_size=4, deformable=False, progress=False))
    ckpt = trained.checkpoint
    torch.manual_seed(1)
    api.quantize_checkpoint(ckpt, api.QuantizeRecipe(method="uniform", weight_bits=4, calib_batches=1,
                                                     progress=False), data=data / "train", out=out / "q")
    spec = api.calibrate_checkpoint(ckpt, data / "train", api.CalibrateConfig(batches=1, batch_size=2,
                                                                              progress=False), out=out / "spec.json")
    api.export(ckpt, api.ExportConfig(format="onnx-int8", out=str(out / "int8"), calibration=str(spec.path)))
    api.bench([str(ckpt)], api.BenchConfig(backends=["eager"], duration=0.05, warmup=0.0, min_count=2,
                                           roofline=False, out=str(out / "bench")))
    return ckpt


def cli_route(data, out):
    torch.manual_seed(0)
    cli("train", "--data", data, "--out", out / "train", "--image-size", SIZE, "--epochs", 1, "--batch-size", 4,
        "--no-deformable", "--quiet")
    ckpt = out / "train" / "last.safetensors"
    torch.manual_seed(1)
    cli("quantize", ckpt, "--method", "uniform", "--weight-bits", 4, "--calib-batches", 1, "--data", data / "train",
        "--out", out / "q", "--quiet")
    cli("calibrate", ckpt, "--data", data / "train", "--batches", 1, "--batch-size", 2, "--out", out / "spec.json",
        "--quiet")
    cli("export", ckpt, "--format", "onnx-int8", "--out", out / "int8", "--calibration", out / "spec.json")
    cli("bench", ckpt, "--backends", "eager", "--duration", 0.05, "--warmup", 0, "--no-roofline", "--out",
        out / "bench")
    return ckpt


def _without_times(value):
    """A record without the fields that differ between any two runs (timings) or routes
    (the checkpoint's folder)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items()
                if not any(w in k for w in ("seconds", "_s", "time", "date", "command", "load", "checkpoint"))}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_api_and_cli_write_the_same_artefacts(tiny_data, tmp_path, fast_export):
    from safetensors.torch import load_file

    a, b = api_route(tiny_data, tmp_path / "api"), cli_route(tiny_data, tmp_path / "cli")
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("q/quant_spec.json", "q/qconfig.json", "spec.json"):
        ja, jb = (json.loads((tmp_path / r / name).read_text()) for r in ("api", "cli"))
        assert ja == jb, name
    sa, sb = (json.loads((tmp_path / r / "q" / "search.json").read_text()) for r in ("api", "cli"))
    assert _without_times(sa) == _without_times(sb)
    import onnxruntime as ort

    x = {"images": np.random.default_rng().standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)}
    outs = [ort.InferenceSession(str(tmp_path / r / "int8" / "model_int8.onnx")).run(None, x) for r in ("api", "cli")]
    assert all(np.array_equal(u, v) for u, v in zip(*outs))
    pa, pb = (json.loads((tmp_path / r / "int8" / "model_int8.parity.json").read_text()) for r in ("api", "cli"))
    assert pa["passed"] and pb["passed"] and pa["precision"] == pb["precision"] == "int8"
    ra, rb = (json.loads((tmp_path / r / "bench" / "bench.json").read_text())["rows"] for r in ("api", "cli"))
    shape = [[(r["backend"], r["status"], r["format"], r["size_mb"]) for r in rows] for rows in (ra, rb)]
    assert shape[0] == shape[1] and shape[0][0][1] == "ok"


def test_every_stage_is_a_function_with_a_config_and_no_argparse():
    """Each stage is a function taking a checked config; none of them touches argparse
    (the layering test checks the imports; this checks the surface)."""
    import dataclasses

    from edgekit.config import StageConfig

    configs = [api.TrainConfig, api.EvalConfig, api.PredictConfig, api.ConvertConfig, api.TileConfig,
               api.ProfileConfig, api.QuantizeRecipe, api.CalibrateConfig, api.ExportConfig, api.BenchConfig,
               api.DemoConfig]
    for config in configs:
        assert dataclasses.is_dataclass(config) and issubclass(config, StageConfig)
        config()  # every default config is valid
    for function in (api.train, api.evaluate, api.predict, api.convert, api.tile, api.profile,
                     api.quantize_checkpoint, api.calibrate_checkpoint, api.export, api.bench, api.run_demo,
                     api.run_suite):
        assert callable(function) and "argparse" not in function.__code__.co_names
