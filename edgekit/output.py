"""What a user sees is edgekit's own output: third-party warnings and log lines that say
nothing to the user are hidden at their source (``--verbose`` shows them).

Each filter names the library and the message it hides, so a new warning from a library
still shows; progress bars (tqdm) are edgekit's own and stay.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# (logger name, message start): log lines libraries write while edgekit uses them as designed.
QUIET_LOGS = (
    # torch.onnx's registry looks up torchvision's ops; edgekit exports its own DeformConv.
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    ("torch.onnx._internal.exporter", "Setting ONNX exporter"),
)
# (category, message regex, module regex) for warnings.filterwarnings.
QUIET_WARNINGS = (
    (UserWarning, r".*", r"brevitas(\.|$)"),         # brevitas' notes on its own proxies and defaults
    (UserWarning, r".*TypedStorage is deprecated.*", r".*"),
    (DeprecationWarning, r".*", r"(onnxscript|onnx_ir|onnxslim|brevitas|numba|faster_coco_eval)(\.|$)"),
    (FutureWarning, r".*", r"(brevitas|onnxscript|torch\.onnx)(\.|$)"),
    (UserWarning, r".*Exporting a model .* dynamo.*", r".*"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False):
    """Within the block, hide the known third-party noise unless ``verbose``."""
    if verbose:
        yield
        return
    filters = []
    for name in {name for name, _ in QUIET_LOGS}:
        f = _DropMessages(tuple(start for n, start in QUIET_LOGS if n == name))
        logging.getLogger(name).addFilter(f)
        filters.append((name, f))
    with warnings.catch_warnings():
        for category, message, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        try:
            yield
        finally:
            for name, f in filters:
                logging.getLogger(name).removeFilter(f)
