"""Training config: YAML + overrides, and one clear error for each kind of bad key or value."""

import pytest

from edgekit.engine.config import TrainConfig
from edgekit.errors import EdgekitError


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr: 2e-3\nweight_decay: 1\nclasses: [plane, ship]\n")
    cfg = TrainConfig.from_options({"epochs": 5}, f)
    assert cfg.epochs == 5 and cfg.lr == 2e-3 and cfg.weight_decay == 1.0 and cfg.classes == ["plane", "ship"]


@pytest.mark.parametrize("text, needle", [
    ("epocs: 3\n", "unknown key 'epocs'"),
    ("epochs: three\n", "--epochs must be an integer"),
    ("lr: -1\n", "--lr must be in (0, 10], got -1.0"),
    ("image_size: 100\n", "multiple of 32"),
    ("image_size: 32000\n", "between 32 and 4096"),
    ("lr: fast\n", "--lr must be a number"),
    ("lr: .inf\n", "--lr must be a finite number"),
    ("classes: [1, 2]\n", "--classes must be a list of text"),
    ("classes: [a, a]\n", "free of duplicates"),
    ("classes: plane\n", "--classes must be a list of text"),
    ("min_lr_ratio: 5\n", "--min-lr-ratio must be in [0, 1], got 5.0"),
    ("- just\n- a list\n", "expected a mapping"),
    ("epochs: [\n", "not valid YAML"),
])
def test_bad_config_is_one_line(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(EdgekitError) as err:
        TrainConfig.from_options(None, f)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(EdgekitError, match="not found"):
        TrainConfig.from_options(None, tmp_path / "nope.yaml")
