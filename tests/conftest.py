"""Shared fixtures: a tiny synthetic data set and a checkpoint trained on it for one epoch."""

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOTA_EXAMPLE = REPO.parent / "shared" / "data" / "dota_example"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from edgekit.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(root, num_train=8, num_val=4, image_size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """(train result, output folder) of a one-epoch run on the tiny set."""
    from edgekit.engine.config import TrainConfig
    from edgekit.engine.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig.from_options({"data": str(tiny_data), "out": str(out), "image_size": 128, "epochs": 1, "batch_size": 4,
                       "progress": False})
    return train(cfg), out


@pytest.fixture(scope="session")
def tiny_obb_run(tiny_data, tmp_path_factory):
    """(train result, output folder) of a one-epoch oriented-box run on the tiny set."""
    from edgekit.engine.config import TrainConfig
    from edgekit.engine.train import train

    out = tmp_path_factory.mktemp("obb_run")
    cfg = TrainConfig(data=str(tiny_data), out=str(out), image_size=128, epochs=1, batch_size=4, progress=False,
                      obb=True)
    return train(cfg), out


def one_line_error(fn, *args, **kwargs):
    """The message of the EdgekitError ``fn`` raises, checked to be one line."""
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def rng():
    """A numpy generator with a fresh, printed seed (replay a failure with that seed)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"numpy seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def fresh_torch_seed():
    """Fresh inputs each run; the seed is printed so a failure can be replayed."""
    value = int(np.random.SeedSequence().entropy % 2**31)
    print(f"torch seed {value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def fast_export(monkeypatch):
    """export_onnx -> a plain TorchScript export of the boxes/scores graph (fp32 only, the
    export metadata kept): seconds instead of the real exporter's tens of seconds. GRN goes
    through its traceable reference, as in the real exporter."""
    import onnx

    import edgekit.export.to_onnx as to_onnx
    from edgekit.export.deform_export import export_backends
    from export_helpers import export_raw_detector

    def export(model, path, *, image_size, precision="fp32", metadata=None, **_):
        assert precision == "fp32"
        with export_backends():
            export_raw_detector(model, path, image_size)
        proto = onnx.load(str(path))
        to_onnx.set_metadata(proto, {"classes": model.class_names, **(metadata or {})})
        onnx.save(proto, str(path))
        return path

    monkeypatch.setattr(to_onnx, "export_onnx", export)


@pytest.fixture
def one_thread():
    """One intra-op thread: small models gain nothing from more, and on a loaded machine two
    threads per process ran ten times slower than one (measured in the FCMAE tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
