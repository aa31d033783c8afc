"""The CUDA C++ kernels run on the CPU: ``kernels/cuda/*.cu`` built by g++ with an
emulation of the CUDA execution model (``kernels/cuda/host_emulation.h``).

Why: the development and CI machines have no GPU, so without this the ``cuda`` backend's
kernels would only ever be compiled. Here the very same sources are launched by the very
same host code (:func:`edgekit.kernels.cuda_cpp.grn` and ``deform_conv2d``, with this
module's launcher instead of CuPy's): grid shapes, vector-width choices, H*W splits,
batch chunking, shared memory, barriers and warp shuffles all run, and the tests compare
the results with the float64 references. Every CUDA thread is an OS thread, so this is
for small tensors in tests, not a backend; it says nothing about speed.

``EDGEKIT_EMULATION_SANITIZE=address`` builds the kernels with AddressSanitizer, which
turns any read or write outside a tensor into an error report; the process must then be
started with the ASan runtime preloaded (``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``
``ASAN_OPTIONS=detect_leaks=0``), as ``tests/test_kernels_cuda_emulated.py`` does in a child.

The shared library of each source is built once per content (sources, compiler, flags) into
``$XDG_CACHE_HOME/edgekit/cuda-emulation`` (``~/.cache`` by default), written under a
temporary name and renamed, so concurrent test workers never load a half-written file.
Builds of older sources are kept (another checkout may still load them; each is under
1 MiB): the folder can be deleted at any time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from edgekit.kernels import cuda_cpp

CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-DEDGEKIT_HOST_EMULATION")
HEADERS = ("common.cuh", "host_emulation.h")
SANITIZERS = {"address": ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")}


def compiler() -> str | None:
    """The C++ compiler used: ``$CXX`` or g++ on PATH."""
    return shutil.which(os.environ.get("CXX", "g++"))


def unavailable_reason() -> str | None:
    """None when the emulation can be built here, else a one-line reason."""
    if compiler() is None:
        return "no C++ compiler (set CXX or install g++ 12 or newer: C++20 <barrier> and _Float16)"
    try:
        library("grn.cu")
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def flags() -> tuple[str, ...]:
    """Compiler flags, sanitizer included (``EDGEKIT_EMULATION_SANITIZE``)."""
    sanitize = os.environ.get("EDGEKIT_EMULATION_SANITIZE", "")
    if sanitize and sanitize not in SANITIZERS:
        raise RuntimeError(f"EDGEKIT_EMULATION_SANITIZE={sanitize!r}: use one of {', '.join(SANITIZERS)} or unset it")
    return CXX_FLAGS + SANITIZERS.get(sanitize, ())


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgekit" / "cuda-emulation"


def _wrapper_source(filename: str) -> str:
    """A translation unit: the .cu itself, the emulation state, one launcher per entry point."""
    lines = [f'#include "{filename}"', "EDGEKIT_EMULATION_STATE"]
    lines += [f"EDGEKIT_EMULATE({name})" for name in cuda_cpp.KERNELS[filename]]
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=None)
def library(filename: str) -> ctypes.CDLL:
    """The emulated build of ``kernels/cuda/<filename>``, compiled on first use."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(unavailable_reason())
    wrapper, cxx_flags = _wrapper_source(filename), flags()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (wrapper, version, " ".join(cxx_flags), *(
            (cuda_cpp.CUDA_DIR / name).read_text() for name in (filename,) + HEADERS)):
        digest.update(part.encode())
    sanitizers = [f.split("=", 1)[1] for f in cxx_flags if f.startswith("-fsanitize=")]
    variant = "-".join([Path(filename).stem, *sanitizers])
    target = _cache_dir() / f"{variant}-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "wrapper.cpp", Path(tmp) / "lib.so"
            src.write_text(wrapper)
            proc = subprocess.run([cxx, *cxx_flags, f"-I{cuda_cpp.CUDA_DIR}", str(src), "-o", str(out)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
                raise RuntimeError(f"the CUDA host emulation of {filename} did not build with {cxx}: {first}")
            os.replace(out, target)
    return ctypes.CDLL(str(target))


def _c_argument(value):
    """A kernel argument as the ctypes value whose address the launcher passes."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"the CUDA host emulation takes CPU tensors, got one on {value.device}")
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    raise TypeError(f"unsupported kernel argument type {type(value).__name__}")


class EmulatedLauncher:
    """Launches the kernels of one source file on the CPU; the interface of
    :class:`edgekit.kernels.cuda_cpp._Launcher`."""

    def __init__(self, filename: str, device: torch.device):
        if torch.device(device).type != "cpu":
            raise ValueError(f"the CUDA host emulation runs on the CPU, not on {device}")
        self.library = library(filename)
        self.launches: list[tuple[str, tuple[int, int, int]]] = []  # what ran, for tests

    def __call__(self, name: str, grid, args) -> None:
        gx, gy, gz = (tuple(int(g) for g in grid) + (1, 1))[:3]
        values = [_c_argument(a) for a in args]
        argv = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
        entry = getattr(self.library, f"emulate_{name}")
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_uint] * 4 + [ctypes.c_void_p]
        if entry(gx, gy, gz, cuda_cpp.THREADS, argv) != 0:
            raise RuntimeError(f"emulated launch of {name} refused grid {(gx, gy, gz)} x {cuda_cpp.THREADS} threads")
        self.launches.append((name, (gx, gy, gz)))


def grn(x, gamma, beta, eps=1e-6, data_format="channels_last", launcher=EmulatedLauncher):
    """:func:`edgekit.kernels.cuda_cpp.grn` with the kernels emulated on the CPU."""
    return cuda_cpp.grn(x, gamma, beta, eps, data_format, launcher=launcher)


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None,
                  launcher=EmulatedLauncher):
    """:func:`edgekit.kernels.cuda_cpp.deform_conv2d` with the kernels emulated on the CPU."""
    return cuda_cpp.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask, launcher=launcher)
