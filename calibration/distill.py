"""GHOST's guided quantization self-distillation (GQSD) with one-to-one self-teaching (OST).

The teacher is the frozen full-precision copy of the student's own model, so the two
have the same module paths: teacher layer i guides student layer i only. Per tapped
layer the guidance is an attention-transfer map (Zagoruyko & Komodakis 2017); on top
comes logit distillation of the classification outputs and the task loss.

The switch (:class:`OneToOneSwitch`) decides per sample and per layer whether teacher
layer i guides student layer i. Its training signal says where the teacher is wrong:
the teacher's own task loss on each sample against the ground truth, ``L_t_n``, compared
with a threshold ``tau``: ``s_n = tau - L_t_n`` is positive where the teacher is right.
For classifiers (cross-entropy) ``tau = ln 2``, i.e. the teacher gives the true class
more than even odds; for detectors, whose per-image loss has no absolute scale, ``tau``
is the running mean of the teacher's per-image loss (guidance where the teacher does
better than it usually does). The switch minimises ``-mean(g_in * sign(s_n))``
through the straight-through estimate of its hard gates, so it learns to open where the
teacher is right and to close where it is wrong. (Comparing with the *student's* loss
instead was tried and rejected: the quantized copy is wrong where its teacher is, so
that difference is noise exactly where the switch matters.) The gates multiply the
distillation terms as constants: the student cannot lower its loss by closing its own
guidance (otherwise every gate would collapse to 0, the trivial minimum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.errors import EdgekitError

# RSDet: the three backbone stages the neck reads and the three FPN outputs the head reads.
DETECTOR_TAPS = ("backbone.stages.1", "backbone.stages.2", "backbone.stages.3",
                 "neck.smooth.0", "neck.smooth.1", "neck.smooth.2")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper (hooks and paths live there)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def default_taps(model: nn.Module) -> list[str]:
    """Module paths to distil: RSDet's stages + FPN outputs, or a classifier's stages."""
    names = {n for n, _ in unwrap(model).named_modules()}
    if all(t in names for t in DETECTOR_TAPS):
        return list(DETECTOR_TAPS)
    stages = sorted((n for n in names if n.startswith("stages.") and n.count(".") == 1), key=lambda n: int(n[7:]))
    if stages:
        return stages
    raise EdgekitError(f"{type(unwrap(model)).__name__}: no default distillation layers known; "
                       f"pass taps=[module paths] (see model.named_modules())")


def _as_tensor(output) -> torch.Tensor:
    """A hook output as a plain tensor (brevitas layers may return a QuantTensor)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor) and hasattr(output, "value"):
        output = output.value
    return output


class FeatureTaps:
    """Forward hooks that record the outputs of the modules at ``paths``.

    A module called several times per forward (a shared head) records every call, in
    order, so ``features[path]`` is a list. Call :meth:`clear` before each forward.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        modules = dict(unwrap(model).named_modules())
        missing = [p for p in paths if p not in modules]
        if missing:
            raise EdgekitError(f"distillation layers {missing} not found in {type(unwrap(model)).__name__}; "
                               f"use module paths from model.named_modules()")
        self.paths = list(paths)
        self.features: dict[str, list[torch.Tensor]] = {p: [] for p in self.paths}
        self._handles = [modules[p].register_forward_hook(self._hook(p)) for p in self.paths]

    def _hook(self, path: str):
        def record(module, inputs, output):
            self.features[path].append(_as_tensor(output))
        return record

    def clear(self):
        for feats in self.features.values():
            feats.clear()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """[N, C, H, W] (or [N, C, L]) -> [N, H*W]: channel mean of |A|^p, L2-normalised per sample."""
    if feat.ndim < 3:
        raise ValueError(f"attention_map needs a [N, C, ...] feature map, got shape {tuple(feat.shape)}")
    return F.normalize(feat.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample ||at(student) - at(teacher)||^2, shape [N]; the teacher side carries no gradient."""
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"attention transfer needs the same batch and spatial size, got "
                         f"{tuple(student.shape)} vs {tuple(teacher.shape)}")
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).sum(1)


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str = "sigmoid",
                       temperature: float = 1.0) -> torch.Tensor:
    """Per-sample KL(teacher || student) of tempered probabilities, times T^2, shape [N].

    ``[N, K, *rest]`` logits. ``sigmoid``: K independent binary KLs (focal-style heads),
    summed over K; ``softmax``: KL over the K classes. Both averaged over ``rest``
    (e.g. the points of a dense head).
    """
    t = temperature
    zs, zt = student / t, teacher.detach() / t
    if kind == "sigmoid":
        pt = torch.sigmoid(zt)
        # KL(pt||ps) = BCE(zs; pt) - H(pt); BCE-with-logits keeps it stable at saturated logits.
        kl = (F.binary_cross_entropy_with_logits(zs, pt, reduction="none")
              - F.binary_cross_entropy_with_logits(zt, pt, reduction="none"))
    elif kind == "softmax":
        kl = F.kl_div(F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1), reduction="none", log_target=True)
    else:
        raise ValueError(f"logit_distillation kind must be 'sigmoid' or 'softmax', got {kind!r}")
    return kl.sum(1).reshape(kl.shape[0], -1).mean(1) * t * t


def class_logits(outputs) -> tuple[torch.Tensor, str]:
    """The classification logits of a model output, and how they were trained.

    A tensor is a classifier's softmax logits; a tuple whose first item is a list of
    per-level maps is a dense detector head (RSDet: sigmoid/focal class maps), returned
    as [N, K, points].
    """
    if isinstance(outputs, torch.Tensor):
        return outputs, "softmax"
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], (tuple, list)):
        return torch.cat([level.flatten(2) for level in outputs[0]], dim=2), "sigmoid"
    raise EdgekitError(f"cannot find class logits in a model output of type {type(outputs).__name__}; "
                       f"pass logits=fn(outputs) -> (tensor, 'sigmoid'|'softmax') or logit_weight=0")


def gumbel_sigmoid_st(logits: torch.Tensor, tau: float = 1.0, sample: bool = True) -> torch.Tensor:
    """Hard 0/1 gates forward, the gradient of the (noisy) sigmoid backward.

    With ``sample`` the logistic noise log(u) - log(1 - u) makes a gate open with
    probability sigmoid(logit), so a closed layer is still tried now and then.
    """
    if sample:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(logits / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # x - x is exactly 0: the forward stays exactly 0/1


class OneToOneSwitch(nn.Module):
    """Per tapped layer: GAP(teacher) ++ GAP(student) -> LayerNorm -> Linear -> gate logit.

    ``forward`` returns gates [layers, N] (straight-through Gumbel-sigmoid in training
    mode, deterministic ``logit > 0`` in eval mode). Build it with the channel counts
    (:func:`tap_channels`) *before* the optimizer, and give the optimizer its parameters.
    ``init_logit`` > 0 starts with guidance on (sigmoid(2) = 0.88).
    """

    def __init__(self, channels: dict[str, int], tau: float = 1.0, init_logit: float = 2.0):
        super().__init__()
        self.paths, self.tau = list(channels), tau
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(2 * c, elementwise_affine=False), nn.Linear(2 * c, 1))
                                  for c in channels.values())
        for seq in self.proj:
            nn.init.normal_(seq[1].weight, std=0.01)
            nn.init.constant_(seq[1].bias, init_logit)

    def logits(self, teacher: dict[str, list[torch.Tensor]], student: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        rows = []
        for path, proj in zip(self.paths, self.proj):
            # Inputs are detached: the switch reads the features, it does not shape them.
            gap_t = torch.stack([f.detach().flatten(2).mean(2) for f in teacher[path]]).mean(0)
            gap_s = torch.stack([f.detach().flatten(2).mean(2) for f in student[path]]).mean(0)
            rows.append(proj(torch.cat([gap_t, gap_s], dim=1)).squeeze(1))
        return torch.stack(rows)

    def forward(self, teacher, student) -> torch.Tensor:
        return gumbel_sigmoid_st(self.logits(teacher, student), self.tau, sample=self.training)


@torch.no_grad()
def tap_channels(model: nn.Module, taps: Sequence[str], example: torch.Tensor) -> dict[str, int]:
    """Channel count of each tapped layer's output, from one forward pass on ``example``."""
    hooks = FeatureTaps(model, taps)
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        hooks.remove()
    return {p: hooks.features[p][0].shape[1] for p in taps}


def _select(outputs, n: int):
    """Sample ``n`` of a nested model output (tensors sliced to [n:n+1], structure kept)."""
    if isinstance(outputs, torch.Tensor):
        return outputs[n:n + 1]
    return type(outputs)(_select(o, n) for o in outputs)


def default_losses(model: nn.Module) -> tuple[Callable, Callable]:
    """(task_loss(outputs, targets) -> scalar, sample_loss(outputs, targets) -> [N]).

    Models with a ``loss(outputs, targets)`` method (the detectors) use it, per sample by
    slicing the outputs; others are classifiers trained with cross-entropy.
    """
    model = unwrap(model)
    if hasattr(model, "loss"):
        def task(outputs, targets):
            return model.loss(outputs, targets)["loss"]

        def per_sample(outputs, targets):
            return torch.stack([model.loss(_select(outputs, n), [t])["loss"] for n, t in enumerate(targets)])
        return task, per_sample
    return (lambda o, y: F.cross_entropy(o, y)), (lambda o, y: F.cross_entropy(o, y, reduction="none"))


class GQSDLoss:
    """Task loss + gated one-to-one attention transfer + logit distillation + switch loss.

    ``loss_fn(images, targets)`` runs the frozen teacher and the student (``student`` may
    be DDP-wrapped) and returns a dict: ``loss`` (what to backpropagate), ``task``,
    ``feature``, ``logit``, ``switch`` and per layer ``at/<path>`` (mean ungated term)
    and ``gate/<path>`` (fraction of samples guided), all but ``loss`` detached.
    ``switch_threshold``: the teacher per-sample loss above which the teacher counts as
    wrong; None picks ln 2 for cross-entropy classifiers, a running mean otherwise.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, taps: Sequence[str] | None = None,
                 switch: OneToOneSwitch | None = None, feature_weight: float = 1.0, logit_weight: float = 1.0,
                 switch_weight: float = 1.0, temperature: float = 2.0, attention_p: float = 2.0,
                 task_loss: Callable | None = None, sample_loss: Callable | None = None,
                 logits: Callable | None = None, switch_threshold: float | None = None):
        self.teacher, self.student = teacher.eval(), student
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.taps = list(taps) if taps is not None else default_taps(student)
        if switch is not None and switch.paths != self.taps:
            raise ValueError(f"switch layers {switch.paths} differ from the distilled layers {self.taps}")
        self.switch = switch
        self.feature_weight, self.logit_weight, self.switch_weight = feature_weight, logit_weight, switch_weight
        self.temperature, self.attention_p = temperature, attention_p
        default_task, default_sample = default_losses(student)
        self.task_loss, self.sample_loss = task_loss or default_task, sample_loss or default_sample
        if switch_threshold is None and sample_loss is None and not hasattr(unwrap(student), "loss"):
            switch_threshold = math.log(2.0)  # cross-entropy: the teacher's p(true class) > 1/2
        self.switch_threshold, self._running_loss = switch_threshold, None
        self.logits = logits or class_logits
        self.teacher_taps, self.student_taps = FeatureTaps(teacher, self.taps), FeatureTaps(student, self.taps)

    def __call__(self, images: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        self.teacher_taps.clear()
        self.student_taps.clear()
        with torch.no_grad():
            t_out = self.teacher(images)
        s_out = self.student(images)
        t_feats, s_feats = self.teacher_taps.features, self.student_taps.features
        task = self.task_loss(s_out, targets)
        terms = torch.stack([sum(attention_loss(s, t, self.attention_p) for s, t in zip(s_feats[p], t_feats[p]))
                             for p in self.taps])  # [layers, N]
        result = {"task": task.detach(), **{f"at/{p}": term.detach().mean() for p, term in zip(self.taps, terms)}}
        if self.switch is not None:
            gates = self.switch(t_feats, s_feats)
            signal = self._teacher_right(t_out, targets)
            switch_loss = -(gates * signal).mean()
            terms = terms * gates.detach()  # one-to-one: gate i scales only teacher-i -> student-i
            result["switch"] = switch_loss.detach()
            result.update({f"gate/{p}": g.detach().mean() for p, g in zip(self.taps, gates)})
        else:
            switch_loss = task.new_zeros(())
        feature = terms.mean(1).sum()
        if self.logit_weight:
            (zs, kind), (zt, _) = self.logits(s_out), self.logits(t_out)
            logit = logit_distillation(zs, zt, kind, self.temperature).mean()
        else:
            logit = task.new_zeros(())
        result.update({"feature": feature.detach(), "logit": logit.detach()})
        result["loss"] = task + self.feature_weight * feature + self.logit_weight * logit + self.switch_weight * switch_loss
        return result

    @torch.no_grad()
    def _teacher_right(self, t_out, targets) -> torch.Tensor:
        """Per sample +1 where the teacher is right, -1 where it is wrong (see the module docstring).

        The sign, not the margin: how wrong a teacher is does not matter to the decision,
        and a few very wrong samples would otherwise outweigh all the right ones."""
        loss = self.sample_loss(t_out, targets).float()
        threshold = self.switch_threshold
        if threshold is None:
            batch = float(loss.mean())
            self._running_loss = batch if self._running_loss is None else 0.9 * self._running_loss + 0.1 * batch
            threshold = self._running_loss
        return torch.sign(threshold - loss)

    def remove(self):
        """Take the hooks off both models."""
        self.teacher_taps.remove()
        self.student_taps.remove()
