"""GQSD building blocks against direct references: attention maps and logit KL against
numpy in float64, the straight-through gate, one-to-one gradient routing, and a toy
distillation whose terms fall."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from edgekit.calibration.distill import (DETECTOR_TAPS, FeatureTaps, GQSDLoss, OneToOneSwitch, attention_loss,
                                         attention_map, default_taps, gumbel_sigmoid_st, logit_distillation,
                                         tap_channels)
from edgekit.errors import EdgekitError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is ~10x faster than two on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Toy(nn.Module):
    """Three conv stages and a linear head: ``stages.i`` are the default taps."""

    def __init__(self, classes: int = 3, width: int = 8):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


class RoundST(nn.Module):
    """Symmetric per-output-channel weight rounding with a straight-through gradient."""

    def __init__(self, bits: int):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, w):
        scale = w.detach().abs().flatten(1).amax(1).clamp(min=1e-8).view(-1, *[1] * (w.ndim - 1)) / self.qmax
        return w + ((w / scale).round().clamp(-self.qmax, self.qmax) * scale - w).detach()


def fake_quant(model: nn.Module, bits: int) -> nn.Module:
    """A weight-quantized copy with the same module paths (a stand-in for brevitas)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(module, "weight", RoundST(bits))
    return model


class FixedSwitch(OneToOneSwitch):
    """A switch whose gates are set by the test."""

    def __init__(self, channels, gates):
        super().__init__(channels)
        self.gates = gates

    def forward(self, teacher, student):
        return self.gates


def _feature_only(teacher, student, switch):
    return GQSDLoss(teacher, student, switch=switch, logit_weight=0.0, switch_weight=0.0,
                    task_loss=lambda out, y: out.sum() * 0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map_and_loss_match_numpy(p, fresh_torch_seed):
    s, t = torch.randn(3, 5, 6, 7, dtype=torch.float64), torch.randn(3, 5, 6, 7, dtype=torch.float64)

    def at(x):
        a = (np.abs(x) ** p).mean(1).reshape(x.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    np.testing.assert_allclose(attention_map(s, p).numpy(), at(s.numpy()), rtol=1e-12)
    np.testing.assert_allclose(attention_loss(s, t, p).numpy(), ((at(s.numpy()) - at(t.numpy())) ** 2).sum(1),
                               rtol=1e-10)
    assert torch.allclose(attention_loss(t.clone(), t, p), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="spatial"):
        attention_loss(s, t[:, :, :3], p)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_logit_distillation_matches_numpy(temperature, fresh_torch_seed):
    zs, zt = torch.randn(4, 5, 6, dtype=torch.float64) * 3, torch.randn(4, 5, 6, dtype=torch.float64) * 3
    s, t = zs.numpy() / temperature, zt.numpy() / temperature
    ps, pt = 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-t))
    binary = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    np.testing.assert_allclose(logit_distillation(zs, zt, "sigmoid", temperature).numpy(),
                               binary.sum(1).mean(1) * temperature ** 2, rtol=1e-9)
    qs, qt = np.exp(s) / np.exp(s).sum(1, keepdims=True), np.exp(t) / np.exp(t).sum(1, keepdims=True)
    np.testing.assert_allclose(logit_distillation(zs, zt, "softmax", temperature).numpy(),
                               (qt * np.log(qt / qs)).sum(1).mean(1) * temperature ** 2, rtol=1e-9)
    for kind in ("sigmoid", "softmax"):  # [N, K] (no points) reduces the same way
        assert torch.allclose(logit_distillation(zs[..., 0], zt[..., 0], kind, temperature),
                              logit_distillation(zs[..., :1], zt[..., :1], kind, temperature), rtol=1e-12)
        assert torch.allclose(logit_distillation(zt.clone(), zt, kind, temperature), torch.zeros(4, dtype=torch.float64))


def test_straight_through_gate_is_hard_forward_with_a_sigmoid_gradient(fresh_torch_seed):
    logits = (torch.randn(4, 2000) * 2).requires_grad_()
    gates = gumbel_sigmoid_st(logits, tau=1.0)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    gates.sum().backward()
    assert (logits.grad > 0).all()
    # A gate opens with probability sigmoid(logit): the logistic noise samples it.
    x = torch.tensor([-1.0, 0.5, 2.0])
    rate = gumbel_sigmoid_st(x.expand(20000, 3)).mean(0)
    assert torch.allclose(rate, torch.sigmoid(x), atol=0.02)
    # Without sampling (eval) the gate is the sign of the logit.
    assert torch.equal(gumbel_sigmoid_st(torch.tensor([-0.1, 0.1]), sample=False), torch.tensor([0.0, 1.0]))


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_one_to_one_gate_routes_each_term_to_its_own_layer(fresh_torch_seed):
    teacher = Toy()
    student = fake_quant(teacher, bits=2)
    images = torch.randn(4, 3, 16, 16)
    channels = tap_channels(student, default_taps(student), images)
    layers = len(channels)

    def feature_grads(gates, x=images):
        student.zero_grad()
        loss = _feature_only(teacher, student, FixedSwitch(channels, gates))(x, torch.zeros(4, dtype=torch.long))
        loss["loss"].backward()
        return _grads(student)

    per_layer = []
    for i in range(layers):
        gates = torch.zeros(layers, 4)
        gates[i] = 1
        g = feature_grads(gates)
        per_layer.append(g)
        for name, grad in g.items():
            stage = int(name.split(".")[1]) if name.startswith("stages.") else layers
            # Term i reaches student layer i and what feeds it, nothing after it.
            assert (grad.abs().sum() > 0) == (stage <= i), (i, name)
    everything = feature_grads(torch.ones(layers, 4))
    for name in everything:
        assert torch.allclose(everything[name], sum(g[name] for g in per_layer), atol=1e-6)
    assert all(float(g.abs().sum()) == 0 for g in feature_grads(torch.zeros(layers, 4)).values())
    assert all(p.grad is None for p in teacher.parameters())

    # Per sample: closing sample 1's gate for the only open layer removes its input gradient.
    x = images.clone().requires_grad_()
    gates = torch.zeros(layers, 4)
    gates[layers - 1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    feature_grads(gates, x)
    per_sample = x.grad.abs().flatten(1).sum(1)
    assert per_sample[1] == 0 and (per_sample[[0, 2, 3]] > 0).all()


def test_distillation_terms_fall_on_a_toy_problem(fresh_torch_seed):
    teacher = Toy()
    with torch.no_grad():
        teacher.head.weight.mul_(10)  # a confident teacher, so the logit term has something to teach
    student = fake_quant(teacher, bits=3)
    with torch.no_grad():  # start the student away from the teacher
        for p in student.parameters():
            p.add_(torch.randn_like(p) * p.std())
    images = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        labels = teacher(images).argmax(1)
        agree_before = (student(images).argmax(1) == labels).float().mean()
    loss_fn = GQSDLoss(teacher, student, switch=None, temperature=2.0, logit_weight=10.0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        out = loss_fn(images, labels)
        assert all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    # The hard-label task term and the soft teacher disagree near the optimum, so the task
    # term is judged by agreement with the teacher's labels rather than by its value.
    for key in ("loss", "feature", "logit"):
        first, last = np.mean([h[key] for h in history[:5]]), np.mean([h[key] for h in history[-5:]])
        assert last < first, (key, first, last)
    with torch.no_grad():
        assert (student(images).argmax(1) == labels).float().mean() >= agree_before
    assert set(history[0]) >= {f"at/stages.{i}" for i in range(3)}


def test_taps_errors_and_detector_defaults(fresh_torch_seed, monkeypatch):
    from edgekit.models import create_model

    monkeypatch.setenv("EDGEKIT_BACKEND", "torch")  # the reference ops: no Numba JIT in this test
    with pytest.raises(EdgekitError, match="not found"):
        FeatureTaps(Toy(), ["stages.9"])
    with pytest.raises(EdgekitError, match="taps="):
        default_taps(nn.Linear(2, 2))
    det = create_model("rsdet_atto", num_classes=2)
    assert default_taps(det) == list(DETECTOR_TAPS)
    # The whole loss on the detector: shared-head outputs, per-sample detection losses.
    teacher, student = det, fake_quant(det, bits=4)
    images = torch.randn(2, 3, 64, 64)
    switch = OneToOneSwitch(tap_channels(student, DETECTOR_TAPS, images[:1]))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = GQSDLoss(teacher, student, switch=switch)(images, targets)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is not None for p in switch.parameters())


def test_switch_signal_is_the_teacher_being_right(fresh_torch_seed):
    """With every gate open the switch loss is -mean(signal): the signal is +1 where the
    teacher gives the true class p > 1/2 (classifiers) or, with a per-sample loss of the
    user's, where that loss is below its running mean."""
    teacher = Toy()
    with torch.no_grad():
        teacher.head.weight.mul_(50)
    images = torch.randn(12, 3, 8, 8)
    with torch.no_grad():
        probs = teacher(images).softmax(1)
    labels = torch.where(torch.rand(12) < 0.5, probs.argmax(1), (probs.argmax(1) + 1) % 3)
    right = probs.gather(1, labels[:, None]).squeeze(1) > 0.5
    student = fake_quant(teacher, bits=4)
    channels = tap_channels(student, default_taps(student), images)
    ones = FixedSwitch(channels, torch.ones(3, 12))
    out = GQSDLoss(teacher, student, switch=ones)(images, labels)
    assert torch.isclose(out["switch"], -(right.float() * 2 - 1).mean())

    losses = torch.rand(12)
    custom = GQSDLoss(teacher, student, switch=ones, sample_loss=lambda outputs, y: losses)
    first, second = custom(images, labels)["switch"], custom(images, labels)["switch"]
    expected = -torch.sign(losses.mean() - losses).mean()  # running mean of a constant batch = its mean
    assert torch.isclose(first, expected) and torch.isclose(second, expected)
