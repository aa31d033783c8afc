#!/usr/bin/env bash
# Everything that needs a real GPU, in one command for a lent GPU machine (the device tool):
#
#   bash scripts/gpu_session.sh [--quick]
#
# The machine's image has python3 with torch, torchvision, CuPy, numba-cuda and pytest but
# no network, so edgekit is installed into it without dependencies (the GPU code paths need
# none that the image lacks). Then, each step's log kept:
#   1. environment.txt  nvidia-smi, python, torch/CUDA and the relevant package versions;
#   2. pytest.txt       tests/test_kernels_gpu.py: both GPU backends against float64 references;
#   3. suite.txt        edgekit bench kernels-gpu: kernels_gpu.{json,md};
#   4. build.txt        last, the CPU-side nvcc build of every .cu for every target arch (the
#                       image's nvcc), so a slow step cannot cost the GPU results.
# Each step has its own time limit, inside the device tool's 600 s per call (the simulator
# tests are CPU-only and run in CI, not here). Results go to
# $OUT (the device tool's output folder; ./gpu_out elsewhere), eight files at most (the
# tool's limit). Exit status 0 only when every step passed.
set -u
export PYTHONUNBUFFERED=1  # a step killed at its time limit keeps its log
out="${OUT:-gpu_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"  # the image's python3 holds torch; PYTHON overrides (a local dry run)
status=0

{
    nvidia-smi
    "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    "$py" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|cupy|numba|onnx|pytest|hypothesis)'
} > "$out/environment.txt" 2>&1

if ! "$py" -m pip install --no-index --disable-pip-version-check --no-deps --no-build-isolation -q -e . > /tmp/edgekit-install.txt 2>&1; then
    cp /tmp/edgekit-install.txt "$out/install.txt"
    echo "error: installing edgekit into $py failed: see install.txt" >&2
    exit 2
fi

timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py --junitxml "$out/junit.xml" \
    > "$out/pytest.txt" 2>&1 || status=1
timeout 330 "$py" -m edgekit.cli bench kernels-gpu "$@" --out "$out" > "$out/suite.txt" 2>&1 || status=1
timeout 60 "$py" scripts/check_cuda_build.py > "$out/build.txt" 2>&1 || status=1

echo "== pytest"; tail -n 6 "$out/pytest.txt"
echo "== suite";  tail -n 12 "$out/suite.txt"
echo "== build";  tail -n 4 "$out/build.txt"
exit "$status"
