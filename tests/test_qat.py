"""QAT by self-distillation: the switch really trains and closes where the teacher is
wrong, time limit and resume, and a 2-process torchrun run that ends with identical
weights on both ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from edgekit.calibration.distill import FeatureTaps
from edgekit.calibration.qat import DistillOptions, qat_train
from edgekit.errors import EdgekitError
from test_ddp import free_port
from test_distill import Toy, fake_quant, one_thread  # noqa: F401 (one_thread: autouse fixture)

TESTS = Path(__file__).resolve().parent


def confident_teacher() -> Toy:
    teacher = Toy()
    with torch.no_grad():
        teacher.head.weight.mul_(50)
    return teacher


def two_clusters(teacher: Toy, per_cluster: int = 32):
    """Images of two recognisable kinds (a bright channel 0 or channel 1), labelled so that
    the teacher is right (p(label) > 1/2) on every image of the first kind and wrong on
    every image of the second. Candidates for the first kind are drawn 16 per image kept:
    at 4 a random toy teacher was too rarely confident about 1 time in 60."""
    a, b = torch.randn(16 * per_cluster, 3, 12, 12), torch.randn(per_cluster, 3, 12, 12)
    a[:, 0] += 2.0
    b[:, 1] += 2.0
    with torch.no_grad():
        pa = teacher(a).softmax(1)
        a = a[pa.max(1).values > 0.5][:per_cluster]
        ya, yb = teacher(a).argmax(1), (teacher(b).argmax(1) + 1) % 3
    assert len(a) >= per_cluster // 2, "the teacher is confident on too few images"
    return a, b, TensorDataset(torch.cat([a, b]), torch.cat([ya, yb]))


def gate_probability(teacher, student, switch, images) -> torch.Tensor:
    """Mean open-probability per layer of the trained switch on ``images``."""
    taps_t, taps_s = FeatureTaps(teacher, switch.paths), FeatureTaps(student, switch.paths)
    with torch.no_grad():
        teacher(images), student(images)
        probs = torch.sigmoid(switch.logits(taps_t.features, taps_s.features)).mean(1)
    taps_t.remove(), taps_s.remove()
    return probs


def test_switch_trains_and_closes_where_the_teacher_is_wrong(tmp_path, fresh_torch_seed):
    teacher = confident_teacher()
    a, b, data = two_clusters(teacher)
    result = qat_train(teacher, lambda m: fake_quant(m, bits=2), data, epochs=8, lr=1e-3, batch_size=16,
                       distill=DistillOptions(switch_lr=0.1), out=tmp_path, progress=False, seed=fresh_torch_seed)
    switch, student = result["switch"], result["student"]
    biases = torch.stack([seq[1].bias.detach() for seq in switch.proj]).flatten()
    assert not torch.allclose(biases, torch.full_like(biases, DistillOptions().init_logit))  # it learned
    right, wrong = gate_probability(teacher, student, switch, a), gate_probability(teacher, student, switch, b)
    print("gate probability, teacher right:", right.tolist(), "teacher wrong:", wrong.tolist())
    # At the start they are equal (same bias, ~0 weights). The first tap sees the bright
    # channel that tells the two kinds apart; a deeper tap's gate stayed open on both kinds
    # for about 1 random toy in 10 (8 epochs; over 300 seeds: first-tap margin >= 0.90,
    # mean over taps >= 0.37), so the per-layer check is on the first tap, and on the mean.
    assert right[0] > wrong[0] + 0.5 and (right - wrong).mean() > 0.25
    history = result["history"]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    record = json.loads((tmp_path / "qat.json").read_text())
    assert record["config"]["distill"]["taps"] == switch.paths and len(record["rank_digests"]) == 1
    assert (tmp_path / "student.safetensors").is_file() and not list(tmp_path.glob(".*tmp*"))


def test_time_limit_resume_and_bad_options(tmp_path, fresh_torch_seed):
    teacher = confident_teacher()
    _, _, data = two_clusters(teacher, per_cluster=8)
    run = dict(quantized_model=lambda m: fake_quant(m, bits=4), data=data, batch_size=8, progress=False)
    short = qat_train(teacher, epochs=50, time_limit=1e-3, out=tmp_path / "a", **run)
    assert len(short["history"]) == 1  # the plan was fitted to the budget after epoch 1
    again = qat_train(teacher, epochs=3, out=tmp_path / "b", resume=tmp_path / "a" / "last.state.pt", **run)
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    plain = qat_train(teacher, epochs=1, out=tmp_path / "f", distill=DistillOptions(switch=False), **run)
    assert plain["switch"] is None and not any(k.startswith(("gate/", "switch")) for k in plain["history"][0])
    with pytest.raises(EdgekitError, match="does not match"):
        qat_train(Toy(width=4), epochs=2, out=tmp_path / "c", resume=tmp_path / "a" / "last.state.pt", **run)
    with pytest.raises(EdgekitError, match="temperature"):
        qat_train(teacher, distill=DistillOptions(temperature=0), out=tmp_path / "d", **run)
    with pytest.raises(EdgekitError, match="DOTA root"):
        qat_train(teacher, data=[1, 2, 3], out=tmp_path / "e")


def test_brevitas_student_from_quantize(tmp_path, fresh_torch_seed):
    from edgekit.calibration.quantize import QuantConfig, quantize, quantized_layer_types
    from edgekit.engine.checkpoint import read_checkpoint

    teacher = confident_teacher()
    _, _, data = two_clusters(teacher, per_cluster=8)
    config = QuantConfig(weight_bits=3, act_bits=8, first_layer_bits=None, last_layer_bits=None)
    with pytest.raises(EdgekitError, match="float model itself"):
        qat_train(teacher, teacher, data, out=tmp_path / "same")
    result = qat_train(teacher, lambda m: quantize(m, config), data, epochs=2, batch_size=8, lr=1e-3,
                       out=tmp_path, progress=False, model_name="toy", model_kwargs={"width": 8})
    student = result["student"]
    assert any(isinstance(m, quantized_layer_types()) for m in student.modules())
    assert not any(isinstance(m, quantized_layer_types()) for m in teacher.modules())  # the teacher stays float
    assert all(torch.isfinite(torch.tensor(v)) for h in result["history"] for v in h.values())
    trained = dict(student.named_parameters())
    assert not torch.equal(trained["stages.0.0.weight"], teacher.stages[0][0].weight)
    _, name, kwargs, info = read_checkpoint(tmp_path / "student.safetensors")  # load_quantized can rebuild it
    assert (name, kwargs) == ("toy", {"width": 8})
    assert set(info["quant_config"]["weight_bits"].values()) == {3} and info["qat"] and info["epoch"] == 2


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_distill import fake_quant
from edgekit.calibration.qat import qat_train, weight_digest
from edgekit.engine import distributed
from edgekit.engine.checkpoint import load_model

before = weight_digest(fake_quant(load_model({checkpoint!r})[0], bits=4))
result = qat_train({checkpoint!r}, lambda m: fake_quant(m, bits=4), {data!r}, epochs=1, batch_size=2, lr=1e-3,
                   out={out!r}, progress=False, evaluate_fn=lambda student: {{"evaluated": True}})
if distributed.is_main_process():
    Path({out!r}, "student.txt").write_text(before + " " + weight_digest(result["student"]))
"""


def test_torchrun_two_processes_end_with_identical_weights(tiny_data, tmp_path):
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.engine.train import discover_classes
    from edgekit.models import create_model

    classes = discover_classes(tiny_data / "train")
    kwargs = {"num_classes": len(classes), "class_names": classes, "deformable": False}
    checkpoint = save_checkpoint(tmp_path / "float.safetensors", create_model("rsdet_atto", **kwargs), "rsdet_atto",
                                 kwargs, {"image_size": 128})
    out = tmp_path / "qat"
    script = tmp_path / "qat_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), data=str(tiny_data), out=str(out), checkpoint=str(checkpoint)))
    # The pure-torch GRN: each rank would otherwise JIT-compile the Numba kernels (tested elsewhere).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEKIT_BACKEND": "torch"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "qat.json").read_text())
    # 8 images over 2 ranks at batch 2: two synchronised steps per rank.
    assert record["world_size"] == 2 and [h["epoch"] for h in record["history"]] == [1]
    assert record["model"] == "rsdet_atto" and record["config"]["image_size"] == 128  # from the checkpoint
    first, second = record["rank_digests"]
    assert first == second  # DDP kept the ranks in step, the switch included
    before, after = (out / "student.txt").read_text().split()
    assert before != after  # and the student did train
    assert record["val"] == {"evaluated": True}  # rank 0 alone evaluates and writes
    assert (out / "student.safetensors").is_file() and (out / "last.state.pt").is_file()
