"""What machine a measurement ran on (recorded beside every figure edgekit writes)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int | None:
    """Size of the highest-level CPU cache from Linux sysfs, or None where it cannot be read
    (Python's os.sysconf has no cache names, and getconf reports the host's cache inside
    some VMs)."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        except (OSError, ValueError):
            continue
        best = max(best or (0, 0), (level, size))
    return None if best is None else best[1]


# CPU features that decide which integer and vector kernels the runtimes can use.
NOTABLE_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
                     "amx_bf16", "neon", "asimddp", "sve")
VERSIONED_PACKAGES = ("edgekit", "torch", "numpy", "numba", "onnx", "onnxruntime", "brevitas", "scikit-learn",
                      "openvino", "nncf", "tensorrt")


def cpu_flags() -> list[str]:
    """The notable feature flags of this CPU (from /proc/cpuinfo; empty where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [f for f in NOTABLE_CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def command_line() -> str:
    """The command as typed: ``edgekit ...``, or ``python -m pkg.mod ...`` when run as a module."""
    import sys

    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if argv0 == "edgekit" or (spec is not None and spec.name in ("edgekit.cli", "edgekit.cli.__main__")):
        return " ".join(["edgekit", *sys.argv[1:]])
    if spec is not None and spec.name:
        return " ".join(["python", "-m", spec.name, *sys.argv[1:]])
    return " ".join([Path(sys.executable).name, *sys.argv])


def package_versions(names=VERSIONED_PACKAGES) -> dict:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    """The one record of where and how a result was measured, written beside every figure:
    CPU (model, flags, cores, last-level cache), threads, load, platform, versions, the
    command line and the date."""
    import datetime
    import os

    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "last_level_cache_bytes": last_level_cache_bytes(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": load, "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "versions": package_versions(), "command": command_line(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
