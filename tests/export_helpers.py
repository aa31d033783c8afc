"""Helpers shared by the export tests (end-to-end, parity, CLI)."""

import types
import warnings

import numpy as np
import torch


def fresh_seed() -> int:
    """Fresh inputs each run; the seed is printed so that a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")
    return seed


class RawDetector(torch.nn.Module):
    """A detector as boxes [B, N, 4] / scores [B, N, C]: the raw graph end-to-end NMS extends."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        from edgekit.models.detect_post import decode_predictions

        return decode_predictions(self.model(images), self.model.strides)


def export_raw_detector(model, path, image_size: int, opset: int = 18):
    """A plain (TorchScript) torch.onnx export of boxes/scores with a dynamic batch, traced
    at batch 1, initializers named by the model's own parameter names: seconds, where
    export_onnx's dynamo export takes tens of seconds on a loaded 2-core machine."""
    import onnx

    from edgekit.export.onnx_checks import rename_values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(RawDetector(model).eval(), (torch.randn(1, 3, image_size, image_size),), str(path),
                          input_names=["images"], output_names=["boxes", "scores"],
                          dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load(str(path))
    rename_values(proto, {i.name: i.name[len("model."):] for i in proto.graph.initializer
                          if i.name.startswith("model.")})
    onnx.save(proto, str(path))
    return path


class FakeTensorRT:
    """A stand-in for the tensorrt module: records the calls build_engine makes."""

    def __init__(self, version):
        self.calls = []
        rec = self
        self.module = types.SimpleNamespace(
            __version__=version,
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None}),
            NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
            BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8"),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
            Builder=lambda logger: rec, OnnxParser=lambda network, logger: rec)
        self.num_errors = 0

    # builder
    def create_network(self, flags):
        self.calls.append(("create_network", flags))
        return self

    def create_builder_config(self):
        return self

    def create_optimization_profile(self):
        return self

    def build_serialized_network(self, network, config):
        self.calls.append(("build",))
        return b"ENGINE"

    # parser / profile / config
    def parse_from_file(self, path):
        self.calls.append(("parse", path))
        return True

    def set_shape(self, name, lo, opt, hi):
        self.calls.append(("set_shape", name, lo, opt, hi))

    def add_optimization_profile(self, profile):
        self.calls.append(("profile",))

    def set_flag(self, flag):
        self.calls.append(("flag", flag))

    def set_memory_pool_limit(self, pool, size):
        self.calls.append(("pool", pool, size))

    def create_timing_cache(self, data):
        self.calls.append(("cache_in", bytes(data)))
        return self

    def set_timing_cache(self, cache, ignore_mismatch):
        pass

    def get_timing_cache(self):
        return self

    def serialize(self):
        return b"CACHE"
