"""Helpers shared by the export tests (end-to-end, parity, CLI)."""

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
