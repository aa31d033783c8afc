#!/usr/bin/env python
"""Compile every kernels/cuda/*.cu with nvcc for each target GPU and fail on register spills.

Why: the CUDA C++ backend compiles its kernels at run time (NVRTC), so without this
check a syntax error, a missing entry point or a spilling kernel would only show up on
a user's GPU. Each (file, arch) pair is compiled to a cubin with ``-Xptxas -v``; the
ptxas resource report is parsed into a table, and the extern "C" names that
``edgekit.kernels.cuda_cpp.KERNELS`` launches are looked up in the compiled code
(``cuobjdump -symbols`` when present, else the ``.entry`` lines of the PTX). When NVRTC
is installed, each file is also compiled the way the backend does at run time (NVRTC,
same options) and checked for the same names.

Exit status 0 when everything compiles with zero spill stores/loads and every entry
point exists, 1 otherwise, 2 when nvcc is missing. Usage::

    python scripts/check_cuda_build.py [--arch 80 --arch 87] [--json out.json] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "kernels" / "cuda"
DEFAULT_ARCHS = ("75", "80", "86", "87", "89", "90")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def supported_archs(nvcc: str) -> set[str]:
    """The sm_XX numbers this nvcc can compile for (CUDA 13 dropped sm_72 and older)."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=False).stdout
    return set(re.findall(r"compute_(\d+)", out))


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """Per-entry resources from a ``-Xptxas -v`` report: regs, stack, spill stores/loads."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    return kernels


def compile_cubin(nvcc: str, source: Path, arch: str, out_dir: Path) -> dict:
    """Compile one source for one arch; return its parsed resource report."""
    cubin = out_dir / f"{source.stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", "-I", str(source.parent), "-o", str(cubin), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    result = {"file": source.name, "arch": arch, "ok": proc.returncode == 0, "cubin": str(cubin),
              "kernels": parse_ptxas(proc.stderr + proc.stdout)}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return result


def entry_names(nvcc: str, source: Path, cubin: Path, out_dir: Path) -> tuple[set[str], str]:
    """Names of the kernels in the compiled code, and which tool listed them."""
    cuobjdump = shutil.which("cuobjdump") or str(Path(nvcc).parent / "cuobjdump")
    if Path(cuobjdump).is_file() and cubin.is_file():
        out = subprocess.run([cuobjdump, "-symbols", str(cubin)], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            return set(re.findall(r"STT_FUNC\s+STO_ENTRY\s+(\w+)", out.stdout)), "cuobjdump"
    ptx = out_dir / f"{source.stem}.ptx"
    proc = subprocess.run([nvcc, "-ptx", "-arch=compute_75", "-I", str(source.parent), "-o", str(ptx), str(source)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return set(), "ptx (failed)"
    return set(_PTX_ENTRY.findall(ptx.read_text())), "ptx"


def nvrtc_entries(source: Path, options: tuple[str, ...]) -> tuple[set[str] | None, str]:
    """Compile ``source`` with NVRTC exactly as the runtime backend does (same options).

    Returns (entry names, note); names is None when NVRTC is not installed here
    (``cuda.bindings`` comes with numba-cuda, libnvrtc with nvidia-cuda-nvrtc).
    """
    try:
        from cuda.bindings import nvrtc
        err, prog = nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], [])
    except Exception as exc:  # no bindings or no libnvrtc
        return None, f"NVRTC unavailable ({type(exc).__name__})"
    opts = [b"--gpu-architecture=compute_75"] + [o.encode() for o in options]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        nvrtc.nvrtcDestroyProgram(prog)
        return set(), "NVRTC failed: " + " | ".join(log.decode(errors="replace").strip().splitlines()[-5:])
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    return set(_PTX_ENTRY.findall(ptx.decode(errors="replace"))), "NVRTC ok"


def expected_entries() -> dict[str, tuple[str, ...]]:
    """The extern "C" names the runtime backend launches, from edgekit.kernels.cuda_cpp."""
    sys.path.insert(0, str(ROOT))
    from edgekit.kernels.cuda_cpp import KERNELS, NVRTC_OPTIONS
    return KERNELS, NVRTC_OPTIONS


def check(archs, sources, jobs: int | None = None) -> dict:
    """Compile everything and collect the results (the report the table is printed from)."""
    nvcc = find_nvcc()
    if nvcc is None:
        return {"nvcc": None, "ok": False, "results": [], "entries": {}, "problems": ["nvcc not found"]}
    problems = []
    usable = supported_archs(nvcc)
    for arch in archs:
        if usable and arch not in usable:
            problems.append(f"sm_{arch} is not supported by this nvcc (supports {', '.join(sorted(usable, key=int))}); "
                            "use CUDA 12.x for sm_72 (Jetson Xavier)")
    archs = [a for a in archs if not usable or a in usable]
    expected, nvrtc_options = expected_entries()
    with tempfile.TemporaryDirectory(prefix="edgekit-cuda-") as tmp:
        out_dir = Path(tmp)
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            results = list(pool.map(lambda pair: compile_cubin(nvcc, pair[0], pair[1], out_dir),
                                    [(s, a) for s in sources for a in archs]))
        entries = {}
        for source in sources:
            first = next((r for r in results if r["file"] == source.name and r["ok"]), None)
            names, tool = entry_names(nvcc, source, Path(first["cubin"]) if first else Path("-"), out_dir)
            missing = sorted(set(expected.get(source.name, ())) - names)
            rt_names, note = nvrtc_entries(source, nvrtc_options)
            rt_missing = None if rt_names is None else sorted(set(expected.get(source.name, ())) - rt_names)
            entries[source.name] = {"found": sorted(names), "missing": missing, "tool": tool,
                                    "nvrtc": note, "nvrtc_missing": rt_missing}
            if missing:
                problems.append(f"{source.name}: entry points {', '.join(missing)} not found ({tool})")
            if rt_names is not None and (rt_missing or note != "NVRTC ok"):
                problems.append(f"{source.name}: {note}; missing under NVRTC: {', '.join(rt_missing) or 'none'}")
            if source.name not in expected:
                problems.append(f"{source.name}: not listed in edgekit.kernels.cuda_cpp.KERNELS")
    for r in results:
        r.pop("cubin")
        if not r["ok"]:
            problems.append(f"{r['file']} sm_{r['arch']}: nvcc failed: {' | '.join(r['error'])}")
        for name, k in r["kernels"].items():
            if k["spill_stores"] or k["spill_loads"]:
                problems.append(f"{r['file']} sm_{r['arch']} {name}: {k['spill_stores']} B spill stores, "
                                f"{k['spill_loads']} B spill loads")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip().splitlines()
    return {"nvcc": nvcc, "nvcc_version": version[-1] if version else "", "archs": list(archs),
            "ok": not problems, "results": results, "entries": entries, "problems": problems}


def print_table(report: dict, verbose: bool) -> None:
    print(f"nvcc: {report['nvcc']} ({report.get('nvcc_version', '')})")
    header = f"{'file':<18}{'arch':<8}{'kernels':>8}{'max regs':>10}{'max stack B':>13}{'spill st B':>12}{'spill ld B':>12}  status"
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        ks = r["kernels"].values()
        row = (max((k["registers"] for k in ks), default=0), max((k["stack"] for k in ks), default=0),
               sum(k["spill_stores"] for k in ks), sum(k["spill_loads"] for k in ks))
        status = "ok" if r["ok"] and not row[2] and not row[3] else ("FAILED" if not r["ok"] else "SPILLS")
        print(f"{r['file']:<18}{'sm_' + r['arch']:<8}{len(r['kernels']):>8}{row[0]:>10}{row[1]:>13}{row[2]:>12}{row[3]:>12}  {status}")
        if verbose:
            for name, k in sorted(r["kernels"].items()):
                print(f"    {name:<32} regs {k['registers']:>3}  stack {k['stack']:>4}  "
                      f"spill {k['spill_stores']}/{k['spill_loads']}")
    for name, e in report["entries"].items():
        print(f"{name}: {len(e['found'])} entry points found via {e['tool']}, missing: {', '.join(e['missing']) or 'none'}; "
              f"runtime compile: {e['nvrtc']}")
    for p in report["problems"]:
        print(f"PROBLEM: {p}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", help="sm number, e.g. 87 (repeatable; default: %s)" % " ".join(DEFAULT_ARCHS))
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: CPU count)")
    parser.add_argument("--verbose", action="store_true", help="one line per kernel")
    args = parser.parse_args(argv)
    if find_nvcc() is None:
        print("check_cuda_build: nvcc not found on PATH or in $CUDA_HOME; install the CUDA toolkit to compile the kernels")
        return 2
    sources = sorted(CUDA_DIR.glob("*.cu"))
    report = check([a.removeprefix("sm_") for a in (args.arch or DEFAULT_ARCHS)], sources, args.jobs)
    print_table(report, args.verbose)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
