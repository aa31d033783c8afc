"""The GPU kernels compile for every target GPU without a GPU present.

- CUDA C++: ``scripts/check_cuda_build.py`` compiles each ``kernels/cuda/*.cu`` with nvcc
  for sm_75/80/86/87/89/90 (cubin, ``-Xptxas -v``): no errors, zero spill stores/loads,
  and every extern "C" name ``edgekit.kernels.cuda_cpp`` launches is in the compiled code
  (and, where NVRTC is installed, in the NVRTC build the backend does at run time).
- Numba CUDA: every kernel compiles to PTX for the real CUDA target with the argument
  types the launchers pass (the simulator tests do not type-check for the device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_cuda_build  # noqa: E402

ARCHS = ("75", "80", "86", "87", "89", "90")
NVCC = check_cuda_build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit to compile the kernels)")


@pytest.fixture(scope="module")
def build_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cudabuild") / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda_build.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert out.is_file(), f"check_cuda_build.py wrote no report:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


@needs_nvcc
def test_every_source_compiles_for_every_arch_without_spills(build_report):
    proc, report = build_report
    sources = sorted(p.name for p in (ROOT / "kernels" / "cuda").glob("*.cu"))
    assert sources, "no .cu sources found"
    seen = {(r["file"], r["arch"]) for r in report["results"]}
    assert seen == {(s, a) for s in sources for a in ARCHS}
    for r in report["results"]:
        assert r["ok"], f"{r['file']} sm_{r['arch']} failed: {r.get('error')}"
        assert r["kernels"], f"{r['file']} sm_{r['arch']}: ptxas reported no kernels"
        for name, k in r["kernels"].items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (r["file"], r["arch"], name, k)
            assert 0 < k["registers"] <= 255
    assert proc.returncode == 0 and report["ok"], proc.stdout


@needs_nvcc
def test_launched_entry_points_exist_in_the_compiled_code(build_report):
    from edgekit.kernels.cuda_cpp import KERNELS
    _, report = build_report
    assert set(report["entries"]) == set(KERNELS)
    for source, names in KERNELS.items():
        entry = report["entries"][source]
        assert set(names) <= set(entry["found"]), (source, entry["missing"], entry["tool"])
        compiled = {name for r in report["results"] if r["file"] == source for name in r["kernels"]}
        assert set(names) <= compiled, (source, sorted(set(names) - compiled))
        if entry["nvrtc_missing"] is not None:  # NVRTC installed: the runtime build must work too
            assert entry["nvrtc"] == "NVRTC ok" and not entry["nvrtc_missing"], entry


def test_ptxas_report_parser_reads_spills():
    report = ("ptxas info    : Compiling entry function 'k_a' for 'sm_80'\n"
              "ptxas info    : Function properties for k_a\n"
              "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
              "ptxas info    : Used 255 registers, used 1 barriers, 32 bytes smem\n"
              "ptxas info    : Compiling entry function 'k_b' for 'sm_80'\n"
              "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              "ptxas info    : Used 30 registers\n")
    parsed = check_cuda_build.parse_ptxas(report)
    assert parsed == {"k_a": {"registers": 255, "stack": 16, "spill_stores": 8, "spill_loads": 12},
                      "k_b": {"registers": 30, "stack": 0, "spill_stores": 0, "spill_loads": 0}}


@needs_nvcc
def test_unsupported_arch_is_reported_with_the_jetson_hint():
    if "72" in check_cuda_build.supported_archs(NVCC):
        pytest.skip("this nvcc still supports sm_72")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda_build.py"), "--arch", "72"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "sm_72 is not supported by this nvcc" in proc.stdout and "CUDA 12.x" in proc.stdout


# Compiles the Numba kernels for the device (not the simulator) with the launchers' types.
NUMBA_PTX = r"""
import sys, types
from numba import cuda
try:
    cuda.compile_ptx(lambda a: None, "(float32[::1],)", cc=(7, 5))
except Exception as exc:
    print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    sys.exit(3)
# Device functions are compiled for the current device's cc; there is none here.
import numba.cuda.dispatcher as dispatcher
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
from edgekit.kernels import numba_cuda_kernels as k
A = lambda t, nd: f"{t}[{', '.join([':'] * (nd - 1) + ['::1'])}]"
for CC in ((7, 5),):  # type-checking is cc-independent; one cc keeps the test fast
    for t in ("float32", "float16"):
        sigs = {
            "grn_reduce_cl": [A(t, 3), A("float32", 3), "int64"],
            "grn_reduce_cf": [A(t, 3), A("float32", 3), "int64"],
            "grn_norm": [A("float32", 3), A("float32", 2), "float32"],
            "grn_apply_cl": [A(t, 2), A("float32", 2), A("float32", 1), A("float32", 1), A(t, 2)],
            "grn_apply_cf": [A(t, 2), A("float32", 2), A("float32", 1), A("float32", 1), A(t, 2)],
            "deform_im2col": [A(t, 4)] * 3 + ["boolean"] + ["int64"] * 9 + [A("float32", 3)],
        }
        for name, args in sigs.items():
            ptx, _ = cuda.compile_ptx(getattr(k, name).py_func, ", ".join(args), cc=CC)
            assert ".entry" in ptx, name
            print("ok", name, t, CC)
"""


def test_numba_kernels_compile_for_the_device():
    env = {key: v for key, v in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", NUMBA_PTX], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"Numba cannot compile for CUDA here (needs numba-cuda, NVVM and NVRTC): {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 2 * 6
