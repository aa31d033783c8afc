"""What a user sees is edgekit's own output: third-party warnings and log lines that say
nothing to the user are hidden at their source, from ``import edgekit`` on, for the CLI and
the Python API alike. ``EDGEKIT_VERBOSE=1`` (or ``edgekit --verbose``) shows them.

Each filter names the library and the message it hides, so a new warning from a library
still shows; progress bars (tqdm) are edgekit's own and stay.
"""

from __future__ import annotations

import logging
import os
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
    (DeprecationWarning, r".*", r"(onnxscript|onnx_ir|onnxslim|brevitas|numba|faster_coco_eval)(\.|$)"),
    (FutureWarning, r".*", r"(brevitas|onnxscript|torch\.onnx)(\.|$)"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_installed: list = []  # (logger name, filter) pairs, and the warning filters, while installed


def verbose() -> bool:
    return os.environ.get("EDGEKIT_VERBOSE", "") not in ("", "0")


def hide_third_party() -> None:
    """Install the filters (idempotent; nothing when EDGEKIT_VERBOSE is set)."""
    if _installed or verbose():
        return
    for name in {name for name, _ in QUIET_LOGS}:
        f = _DropMessages(tuple(start for n, start in QUIET_LOGS if n == name))
        logging.getLogger(name).addFilter(f)
        _installed.append((name, f))
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        _installed.append(("warning", (category, message, module)))


def show_third_party() -> None:
    """Remove the filters again (``edgekit --verbose``)."""
    os.environ["EDGEKIT_VERBOSE"] = "1"
    while _installed:
        name, item = _installed.pop()
        if name == "warning":
            category, message, module = item
            warnings.filters[:] = [f for f in warnings.filters
                                   if not (f[0] == "ignore" and f[2] is category and f[1] is not None
                                           and f[1].pattern == message and f[3] is not None
                                           and f[3].pattern == module)]
        else:
            logging.getLogger(name).removeFilter(item)
