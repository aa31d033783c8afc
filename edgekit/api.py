"""edgekit's Python API: one function and one config object per pipeline stage.

    from edgekit.api import TrainConfig, train, ExportConfig, export
    result = train(TrainConfig(data="data", out="runs/train", epochs=12))
    export(result.checkpoint, ExportConfig(format="onnx", out="runs/export"))

Every config checks itself when it is made (types, ranges, which options apply to which
method or format); every function returns a typed result holding the paths and figures
its JSON records hold. The ``edgekit`` command maps its flags to the same configs and calls
the same functions. Names are imported on first use, so ``import edgekit.api`` is cheap.
"""

from importlib import import_module

_EXPORTS = {
    # stage: function, config, result
    "train": "edgekit.engine.train", "TrainConfig": "edgekit.engine.config", "TrainResult": "edgekit.engine.train",
    "evaluate": "edgekit.engine.evaluate", "EvalConfig": "edgekit.engine.evaluate", "Metrics": "edgekit.engine.evaluate",
    "predict": "edgekit.engine.predict", "PredictConfig": "edgekit.engine.predict",
    "PredictResult": "edgekit.engine.predict",
    "convert": "edgekit.data.convert", "ConvertConfig": "edgekit.data.convert",
    "tile": "edgekit.data.tiling", "TileConfig": "edgekit.data.tiling",
    "profile": "edgekit.calibration.pipeline", "ProfileConfig": "edgekit.calibration.pipeline",
    "quantize_checkpoint": "edgekit.calibration.pipeline", "QuantizeRecipe": "edgekit.calibration.pipeline",
    "QuantizeResult": "edgekit.calibration.pipeline", "quantize_model": "edgekit.calibration.pipeline",
    "calibrate_checkpoint": "edgekit.calibration.pipeline", "CalibrateConfig": "edgekit.calibration.pipeline",
    "CalibrateResult": "edgekit.calibration.pipeline",
    "onnxruntime_measure": "edgekit.export.deployed_metric",  # deployed_measure for max_drop_on="onnxruntime"
    "onnxruntime_latency": "edgekit.export.layer_latency",  # layer_cost for max_drop_cost="latency"
    "export": "edgekit.export.pipeline", "ExportConfig": "edgekit.export.pipeline",
    "ExportResult": "edgekit.export.pipeline", "ParityError": "edgekit.export.parity",
    "bench": "edgekit.benchmarks.model_bench", "BenchConfig": "edgekit.benchmarks.model_bench",
    "BenchResult": "edgekit.benchmarks.model_bench", "run_suite": "edgekit.benchmarks.suites",
    "run_demo": "edgekit.demo", "DemoConfig": "edgekit.demo",
    "pretrain": "edgekit.engine.pretrain", "PretrainConfig": "edgekit.engine.pretrain",
    "PretrainResult": "edgekit.engine.pretrain", "compare_masking": "edgekit.engine.pretrain",
    "load_pretrained_encoder": "edgekit.models.fcmae",
    # the one loader of checkpoints and model names, and the models
    "load": "edgekit.engine.checkpoint", "LoadedModel": "edgekit.engine.checkpoint",
    "create_model": "edgekit.models", "list_models": "edgekit.models",
    "EdgekitError": "edgekit.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgekit.api' has no attribute '{name}'")


def __dir__():
    return __all__
