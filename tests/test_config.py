"""Training config: YAML + overrides, and one clear error for each kind of bad key or value."""

import pytest

from edgekit.engine.config import make_config
from edgekit.errors import EdgekitError


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr: 2e-3\nweight_decay: 1\nclasses: [plane, ship]\n")
    cfg = make_config({"epochs": 5}, f)
    assert cfg.epochs == 5 and cfg.lr == 2e-3 and cfg.weight_decay == 1.0 and cfg.classes == ["plane", "ship"]


@pytest.mark.parametrize("text, needle", [
    ("epocs: 3\n", "unknown config key 'epocs'"),
    ("epochs: three\n", "key 'epochs' must be int"),
    ("lr: -1\n", "lr=-1.0 is invalid"),
    ("image_size: 100\n", "multiple of 32"),
    ("lr: fast\n", "key 'lr' must be float"),
    ("classes: [1, 2]\n", "classes="),
    ("min_lr_ratio: 5\n", "min_lr_ratio=5.0 is invalid"),
    ("- just\n- a list\n", "expected a mapping"),
    ("epochs: [\n", "not valid YAML"),
])
def test_bad_config_is_one_line(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(EdgekitError) as err:
        make_config(None, f)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(EdgekitError, match="not found"):
        make_config(None, tmp_path / "nope.yaml")
