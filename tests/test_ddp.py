"""Training under torchrun: two processes, gloo on the CPU, one shared result."""

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "edgekit.cli", "train", "--data", str(tiny_data), "--out", str(out), "--epochs", "2",
           "--batch-size", "2", "--image-size", "128", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "train.json").read_text())
    assert record["world_size"] == 2
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    # 8 training images over 2 processes at batch 2: 2 steps per process per epoch.
    assert (out / "last.safetensors").is_file()
