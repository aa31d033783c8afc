"""Target devices for roofline predictions: peak rates and memory bandwidth, each cited.

Figures are the vendors' (NVIDIA data sheets / technical briefs), as retrieved from the
copies named in ``sources``; a figure no retrieved source states is ``None`` (unknown),
never a guess, and the roofline refuses to predict with an unknown figure. Where a
figure is *derived* (CUDA cores x 2 FLOP per FMA x maximum GPU clock; bus width x
transfer rate), the derivation is written beside it.

INT8 figures are **dense** (without 2:4 structured sparsity, which a dense detector does
not use); NVIDIA quotes Jetson "TOPS" as sparse INT8 summed over GPU and DLAs, so a
module total is not a GPU figure and is recorded in ``notes`` only.

The CI-class CPU is this machine, described at run time: peak FP32 = cores x clock x
32 FLOP/cycle (AVX2 with FMA: two 256-bit FMA pipes x 8 float32 lanes x 2 FLOP, AMD Zen
and Intel since Haswell), memory bandwidth = a measured large copy (read + write bytes).

``launch_us`` is a per-layer fixed cost added to every layer's roofline time: measured on
the CPU (an eager call of a 1-element conv), and *assumed* for GPUs (stated values, as
CUDA kernel launches cost a few microseconds and Jetson's slower CPU cores more).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from edgekit.errors import EdgekitError

GPU_LAUNCH_US = 5.0      # assumed: one CUDA kernel launch per layer on a desktop/data-centre GPU
JETSON_LAUNCH_US = 10.0  # assumed: the same launch issued from a slower Arm core
CPU_FLOP_PER_CYCLE = 32  # AVX2 + FMA: 2 FMA pipes x 8 fp32 lanes x 2 FLOP


@dataclass(frozen=True)
class Source:
    document: str
    url: str
    figures: str  # which figures this source gives


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    kind: str  # "jetson" | "gpu" | "cpu"
    fp32_tflops: float | None
    fp16_tflops: float | None
    int8_tops: float | None  # dense
    bandwidth_gbs: float | None
    launch_us: float
    sources: tuple[Source, ...] = ()
    notes: str = ""
    derived: dict = field(default_factory=dict)

    def peak_ops(self, precision: str) -> float | None:
        """Peak operations per second for ``precision`` ("fp32", "fp16", "int8")."""
        value = {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "int8": self.int8_tops}.get(precision)
        if precision not in ("fp32", "fp16", "int8"):
            raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
        return None if value is None else value * 1e12

    def to_dict(self) -> dict:
        return asdict(self)


_ORIN_NANO_DS = Source("NVIDIA Jetson Orin Nano Series Data Sheet (copy on Scribd)",
                       "https://www.scribd.com/document/673174036/Orin-nano-datasheet",
                       "1024 CUDA cores, 625 MHz max GPU frequency, 40 sparse / 20 dense INT8 TOPS (8GB)")
_ORIN_NANO_SUPER = Source("Jetson Orin Nano Super deep dive, citing NVIDIA's Jetson Orin Nano Super Developer Kit "
                          "data sheet (Dec 2024)",
                          "https://www.brojogopalsapui.com/ai-foundations/sub_contents/AI_hardware/"
                          "jetson_orin_nano_light.html",
                          "memory bandwidth 68 GB/s (102 GB/s in the later 'Super' 25 W mode)")
_ORIN_NX_DS = Source("NVIDIA Jetson Orin NX Series data sheet",
                     "https://github.com/icub-tech-iit/cad-libraries/files/13056089/JETSON-ORIN-NX-DATASHEET.pdf",
                     "up to 100 TOPS (module, sparse INT8, GPU + DLAs)")
_ORIN_NX_QUERY = Source("CUDA deviceQuery output on a Jetson Orin NX 16GB",
                        "https://gist.github.com/atinfinity/8cede915acda05d0ff427c09604735dd",
                        "8 SMs x 128 = 1024 CUDA cores, 918 MHz max GPU clock")
_AGX_ORIN_BRIEF = Source("NVIDIA Jetson AGX Orin Series Technical Brief (as summarised at mzph.cn)",
                         "http://mzph.cn/web/30785.shtml",
                         "2048 CUDA cores = 5.3 FP32 TFLOPS; 64 Tensor Cores = 170 sparse INT8 TOPS (GPU)")
_XAVIER_NX_DS = Source("NVIDIA Jetson Xavier NX Data Sheet DA-09366-001",
                       "https://documents.pub/document/data-sheet-preliminary-nvidia-jetson-xavier-nx-jetson-xavier-nx-"
                       "integrates.html",
                       "384 CUDA cores, 1100 MHz max GPU; up to 21 TOPS INT8 (module); 128-bit LPDDR4x, 1600 MHz")
_RTX4090 = (Source("NVIDIA GeForce RTX 4090 specifications (Tom's Hardware table, republished)",
                   "https://holynerdvana.blogspot.com/2022/10/nvidia-geforce-rtx-4090-specifications.html",
                   "82.6 FP32 TFLOPS, 1008 GB/s"),
            Source("NVIDIA GeForce RTX 4090 compute table", "https://waredb.com/processor/nvidia-geforce-rtx-4090",
                   "FP16 tensor 165.15 TFLOPS dense, INT8 tensor 660.6 TOPS dense"),
            Source("NVIDIA GeForce RTX 4090 GPU family specifications",
                   "https://www.thefpsreview.com/gpu-family/nvidia-geforce-rtx-4090-gpu-family-specifications",
                   "memory bandwidth 1008 GB/s"))
_A100 = (Source("NVIDIA A100 Tensor Core GPU data sheet",
                "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
                "FP32 19.5 TFLOPS, FP16 tensor 312 TFLOPS, INT8 tensor 624 TOPS (dense)"),
         Source("Glenn Lockwood, A100 notes (figures from the NVIDIA data sheet above)",
                "https://glennklockwood.com/garden/processors/A100", "80 GB SXM4 HBM2e bandwidth 2.039 TB/s"))
_H100 = (Source("NVIDIA H100 Tensor Core GPU data sheet table (SXM5), HPC Tech copy",
                "https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html",
                "FP32 67 TFLOPS; FP16 tensor 1979, INT8 tensor 3958 (with sparsity; dense is half); 3350 GB/s"),
         Source("Glenn Lockwood, H100 notes", "https://glennklockwood.com/garden/processors/h100",
                "FP16 matrix 989.4 TFLOPS, INT8 matrix 1978.9 TOPS (dense)"))

DEVICES: dict[str, Device] = {d.key: d for d in (
    Device("orin-nano-8gb", "Jetson Orin Nano 8GB (15 W)", "jetson", fp32_tflops=1024 * 2 * 0.625e9 / 1e12,
           fp16_tflops=None, int8_tops=20.0, bandwidth_gbs=68.0, launch_us=JETSON_LAUNCH_US,
           sources=(_ORIN_NANO_DS, _ORIN_NANO_SUPER),
           derived={"fp32_tflops": "1024 CUDA cores x 2 FLOP x 0.625 GHz"},
           notes="FP16 tensor rate not stated in the retrieved sources; 'Super' mode raises clocks "
                 "(1.02 GHz GPU, 102 GB/s)."),
    Device("orin-nx-16gb", "Jetson Orin NX 16GB", "jetson", fp32_tflops=1024 * 2 * 0.918e9 / 1e12,
           fp16_tflops=None, int8_tops=None, bandwidth_gbs=None, launch_us=JETSON_LAUNCH_US,
           sources=(_ORIN_NX_DS, _ORIN_NX_QUERY),
           derived={"fp32_tflops": "1024 CUDA cores x 2 FLOP x 0.918 GHz (deviceQuery max clock)"},
           notes="100 TOPS is the module's sparse INT8 total (GPU + 2 DLAs), not a GPU figure; memory "
                 "bandwidth not stated in the retrieved sources, so no roofline prediction until it is added."),
    Device("agx-orin-64gb", "Jetson AGX Orin 64GB", "jetson", fp32_tflops=5.3, fp16_tflops=None, int8_tops=85.0,
           bandwidth_gbs=None, launch_us=JETSON_LAUNCH_US, sources=(_AGX_ORIN_BRIEF,),
           derived={"int8_tops": "170 sparse GPU TOPS / 2"},
           notes="275 TOPS is the module's sparse INT8 total incl. DLAs; memory bandwidth not stated in the "
                 "retrieved sources."),
    Device("xavier-nx", "Jetson Xavier NX 8GB", "jetson", fp32_tflops=384 * 2 * 1.1e9 / 1e12, fp16_tflops=None,
           int8_tops=None, bandwidth_gbs=128 / 8 * 1600e6 * 2 / 1e9, launch_us=JETSON_LAUNCH_US,
           sources=(_XAVIER_NX_DS,),
           derived={"fp32_tflops": "384 CUDA cores x 2 FLOP x 1.1 GHz",
                    "bandwidth_gbs": "128-bit bus / 8 x 1600 MHz x 2 (double data rate)"},
           notes="21 TOPS is the module's INT8 total (GPU + 2 DLAs)."),
    Device("rtx-4090", "GeForce RTX 4090", "gpu", fp32_tflops=82.6, fp16_tflops=165.15, int8_tops=660.6,
           bandwidth_gbs=1008.0, launch_us=GPU_LAUNCH_US, sources=_RTX4090,
           notes="FP16 is the tensor rate with FP32 accumulation (GeForce); third-party tables of NVIDIA's figures."),
    Device("a100-sxm-80gb", "A100 SXM4 80GB", "gpu", fp32_tflops=19.5, fp16_tflops=312.0, int8_tops=624.0,
           bandwidth_gbs=2039.0, launch_us=GPU_LAUNCH_US, sources=_A100),
    Device("h100-sxm", "H100 SXM5 80GB", "gpu", fp32_tflops=67.0, fp16_tflops=989.4, int8_tops=1978.9,
           bandwidth_gbs=3350.0, launch_us=GPU_LAUNCH_US, sources=_H100),
)}


def cpu_clock_ghz() -> float | None:
    """Highest 'cpu MHz' in /proc/cpuinfo (the current clock; virtual machines rarely
    expose cpufreq's maximum), in GHz."""
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return None
    return max(mhz) / 1e3 if mhz else None


def cpu_has_avx2_fma() -> bool:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":")[1].split())
                return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def copy_bandwidth(megabytes: int = 64, repeats: int = 10) -> dict:
    """The host's copy bandwidth: bytes moved per second (read + write) by a large copy,
    the better of torch's and numpy's, each timed by the one timing core."""
    import numpy as np
    import torch

    from edgekit.benchmarks.latency import measure

    n = megabytes * (1 << 20) // 4  # float32 elements
    src = torch.randn(n)
    dst = torch.empty_like(src)
    a, b = src.numpy(), dst.numpy()
    t_torch = measure(lambda: dst.copy_(src), repeats=repeats, min_repeats=min(3, repeats))
    t_numpy = measure(lambda: np.copyto(b, a), repeats=repeats, min_repeats=min(3, repeats))
    best = min(t_torch["median_ms"], t_numpy["median_ms"])
    return {"bytes": 4 * n, "torch_copy": t_torch, "numpy_copy": t_numpy, "gb_per_s": 2 * 4 * n / (best * 1e-3) / 1e9}


def copy_bandwidth_gbs(megabytes: int = 64, repeats: int = 5) -> float:
    return copy_bandwidth(megabytes, repeats)["gb_per_s"]


def gemm_tflops(n: int = 1024, repeats: int = 5) -> float:
    """FP32 rate of the best of ``repeats`` n x n x n torch matmuls (all torch threads): the
    compute ceiling that real kernels reach here, as the copy is the bandwidth one. The
    theoretical peak (clock x FMA width) is rarely approached on a small, shared CPU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def eager_launch_us(repeats: int = 2000) -> float:
    """Median time of an eager call of a 1-element 1x1 conv: PyTorch's per-layer fixed cost."""
    import statistics

    import torch

    conv = torch.nn.Conv2d(1, 1, 1).eval()
    x = torch.ones(1, 1, 1, 1)
    times = []
    with torch.inference_mode():
        for _ in range(50):
            conv(x)
        for _ in range(repeats):
            t = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def ci_cpu(threads: int | None = None, measure: bool = True) -> Device:
    """This machine as a roofline device (the CI-class CPU); ``measure=False`` skips the
    bandwidth and launch measurements (their figures are then unknown)."""
    from edgekit.sysinfo import cpu_model

    cores = threads or os.cpu_count() or 1
    ghz = cpu_clock_ghz()
    avx2 = cpu_has_avx2_fma()
    fp32 = cores * ghz * 1e9 * CPU_FLOP_PER_CYCLE / 1e12 if ghz and avx2 else None
    return Device("ci-cpu", f"{cpu_model()} ({cores} cores)", "cpu", fp32_tflops=fp32, fp16_tflops=None,
                  int8_tops=None, bandwidth_gbs=copy_bandwidth_gbs() if measure else None,
                  launch_us=eager_launch_us() if measure else 0.0,
                  sources=(Source("/proc/cpuinfo of this machine", "file:///proc/cpuinfo",
                                  f"{cores} cores, {ghz} GHz, avx2+fma={avx2}"),),
                  derived={"fp32_tflops": f"{cores} cores x {ghz} GHz x {CPU_FLOP_PER_CYCLE} FLOP/cycle (AVX2 FMA)",
                           "bandwidth_gbs": "measured: best 64 MiB numpy copy, read + write bytes",
                           "launch_us": "measured: median eager call of a 1-element Conv2d"},
                  notes="FP16/INT8 peaks left unknown: AVX2 has no FP16 arithmetic, and INT8 throughput "
                        "depends on the kernel (no VNNI).")


# CUDA device names -> the table entry with that chip (the board variant may differ: an
# "H100 PCIe" has lower clocks and bandwidth than the SXM entry, so a match is labelled as such).
_GPU_NAME_KEYS = (("H100", "h100-sxm"), ("A100", "a100-sxm-80gb"), ("4090", "rtx-4090"), ("Orin", "orin-nano-8gb"),
                  ("Xavier", "xavier-nx"))


def match_gpu(cuda_name: str) -> Device | None:
    """The table entry for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    for needle, key in _GPU_NAME_KEYS:
        if needle.lower() in cuda_name.lower():
            return DEVICES[key]
    return None


def get_device(key: str, **cpu_kwargs) -> Device:
    if key == "ci-cpu":
        return ci_cpu(**cpu_kwargs)
    if key not in DEVICES:
        raise EdgekitError(f"unknown device {key!r}; choose from ci-cpu, {', '.join(DEVICES)}")
    return DEVICES[key]


def device_table_markdown(devices) -> str:
    """The device table with every figure's source (unknown figures shown as '?')."""
    def f(v, fmt="{:.1f}"):
        return "?" if v is None else fmt.format(v)
    lines = ["| device | FP32 TFLOPS | FP16 TFLOPS | INT8 TOPS (dense) | bandwidth GB/s | launch µs | sources |",
             "|---|---|---|---|---|---|---|"]
    for d in devices:
        src = "; ".join(f"[{s.document}]({s.url})" for s in d.sources)
        lines.append(f"| {d.name} | {f(d.fp32_tflops, '{:.2f}')} | {f(d.fp16_tflops)} | {f(d.int8_tops)} | "
                     f"{f(d.bandwidth_gbs)} | {d.launch_us:.1f} | {src} |")
    return "\n".join(lines)
