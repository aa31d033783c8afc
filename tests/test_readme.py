"""The README's Python API example runs as printed (slow: it trains, quantizes, exports
and benchmarks a small detector)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    section = README.read_text().split("## The Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_uses_only_the_api_module():
    code = api_example()
    assert "from edgekit.api import" in code and "argparse" not in code and "edgekit.cli" not in code


@pytest.mark.slow
def test_the_api_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-c", api_example()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "api_demo" / "int8" / "model_int8.onnx").is_file()
    assert "mAP@[.5:.95]" in proc.stdout and "True" in proc.stdout
