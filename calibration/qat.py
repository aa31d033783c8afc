"""Quantization-aware training by guided self-distillation (GHOST's GQSD + OST).

The teacher is a frozen full-precision copy of the float model; the student is its
quantized version. Training reuses the detector trainer's pieces (schedule, seeding,
data splits, DDP glue, atomic checkpoints) and differs where QAT needs it: the loss is
:class:`~edgekit.calibration.distill.GQSDLoss`, and the switch's projections are built
from one probe forward *before* the optimizer, which owns them in its own parameter
group (GHOST's public code builds them after the optimizer, so its gates never learn).
Under torchrun the student is DDP-wrapped; the switch's gradients are all-reduced by
hand, and every rank's final weight digest goes in the record so a divergence shows.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from edgekit.calibration.distill import GQSDLoss, OneToOneSwitch, default_taps, tap_channels
from edgekit.engine import distributed as dist
from edgekit.engine.checkpoint import load_model, load_training_state, save_checkpoint, save_training_state
from edgekit.engine.train import CosineWithWarmup, discover_classes, seed_everything, split_dirs
from edgekit.errors import EdgekitError
from edgekit.fileio import write_json_atomic


@dataclass
class DistillOptions:
    """What the student learns from its full-precision self (see GQSDLoss)."""
    taps: list[str] | None = None   # module paths distilled one-to-one; None: default_taps(model)
    feature_weight: float = 1.0     # attention-transfer terms
    logit_weight: float = 1.0       # classification-logit KL
    temperature: float = 2.0
    attention_p: float = 2.0
    switch: bool = True             # OST gates; False: every layer guides every sample
    switch_weight: float = 1.0
    switch_lr: float = 1e-3         # the projections start from scratch: a higher rate than QAT's
    switch_threshold: float | None = None  # teacher loss above it = teacher wrong; None: see GQSDLoss
    gumbel_tau: float = 1.0
    init_logit: float = 2.0         # initial gate logit (> 0: guidance starts on)

    def validate(self) -> "DistillOptions":
        for key in ("feature_weight", "logit_weight", "switch_weight"):
            if getattr(self, key) < 0:
                raise EdgekitError(f"distill option {key}={getattr(self, key)} must be >= 0")
        for key in ("temperature", "switch_lr", "gumbel_tau", "attention_p"):
            if getattr(self, key) <= 0:
                raise EdgekitError(f"distill option {key}={getattr(self, key)} must be > 0")
        return self


def _float_model(model, name: str | None, kwargs: dict | None) -> tuple[torch.nn.Module, str, dict, dict]:
    """(model, registry name, constructor kwargs, info) from a checkpoint path or a module."""
    if isinstance(model, torch.nn.Module):
        return model, name or type(model).__name__, kwargs if kwargs is not None else getattr(model, "config", {}), {}
    loaded, info = load_model(model)
    return loaded, info["model"], info["kwargs"], info


def _student(float_model: torch.nn.Module, quantized) -> torch.nn.Module:
    """The quantized model: given, built by a callable from a float copy, or (None) a float copy."""
    if quantized is None:
        return copy.deepcopy(float_model)
    if isinstance(quantized, torch.nn.Module):
        if quantized is float_model:  # quantize() works in place: the teacher would be quantized too
            raise EdgekitError("qat: the quantized model is the float model itself; quantize a copy "
                               "(copy.deepcopy) or pass quantized_model=lambda m: quantize(m, config)")
        return quantized
    if callable(quantized):
        return quantized(copy.deepcopy(float_model))
    raise EdgekitError(f"quantized_model must be a module, a callable(model) -> module or None, "
                       f"got {type(quantized).__name__}")


def _loaders(data, model, image_size: int, batch_size: int, workers: int, world: int, seed: int, collate_fn):
    """(train loader, sampler, val loader or None, classes or None) for a DOTA root or a Dataset."""
    if isinstance(data, Dataset):
        train_ds, val_ds, classes = data, None, None
    elif isinstance(data, (str, Path)):
        from edgekit.data.dataset import DetectionDataset, collate_detection

        train_dir, val_dir = split_dirs(str(data))
        classes = list(getattr(model, "class_names", None) or discover_classes(train_dir))
        train_ds = DetectionDataset(train_dir, classes, image_size=image_size, augment=True)
        val_ds = DetectionDataset(val_dir, classes, image_size=image_size, augment=False)
        collate_fn = collate_fn or collate_detection
    else:
        raise EdgekitError(f"QAT data must be a DOTA root (train/ and val/) or a torch Dataset, got {type(data).__name__}")
    sampler = DistributedSampler(train_ds, shuffle=True, seed=seed) if world > 1 else None
    n = len(sampler) if sampler else len(train_ds)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        collate_fn=collate_fn, num_workers=workers, drop_last=n > batch_size)
    val = (DataLoader(val_ds, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers)
           if val_ds is not None else None)
    return loader, sampler, val, classes


def _param_groups(student: torch.nn.Module, switch: OneToOneSwitch | None, lr: float, weight_decay: float,
                  switch_lr: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith((".gamma", ".beta")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if switch is not None:
        groups.append({"params": list(switch.parameters()), "weight_decay": 0.0, "lr": switch_lr})
    return [g for g in groups if g["params"]]


def _sync_switch(switch: OneToOneSwitch, world: int, grads: bool):
    """Broadcast the switch from rank 0 (grads=False) or average its gradients (grads=True)."""
    if world <= 1:
        return
    for p in switch.parameters():
        if grads:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch_dist.all_reduce(p.grad)
            p.grad /= world
        else:
            torch_dist.broadcast(p.data, 0)


def weight_digest(*modules: torch.nn.Module | None) -> str:
    """sha256 of the modules' state-dict tensors, in key order: equal digests = identical weights."""
    h = hashlib.sha256()
    for module in modules:
        for key, value in (module.state_dict() if module is not None else {}).items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _gathered(value) -> list:
    if not torch_dist.is_initialized():
        return [value]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, value)
    return out


def qat_train(model, quantized_model=None, data=None, *, epochs: int = 1, time_limit: float = 0.0,
              lr: float = 1e-4, batch_size: int = 8, image_size: int | None = None,
              distill: DistillOptions | None = None, out: str | Path = "runs/qat", weight_decay: float = 0.0,
              warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01, grad_clip: float = 10.0, seed: int = 0,
              workers: int = 0, progress: bool = True, collate_fn: Callable | None = None,
              evaluate_fn: Callable | None = None, resume: str | Path | None = None,
              model_name: str | None = None, model_kwargs: dict | None = None) -> dict:
    """Train ``quantized_model`` with its full-precision self as teacher; returns the record.

    ``model``: float checkpoint (safetensors) or module. ``quantized_model``: module,
    callable(float copy) -> module (e.g. ``lambda m: quantize(m, QuantConfig(...))``), or
    None (a float copy: plain self-distillation).
    ``data``: DOTA root with train/ and val/ (detectors) or a Dataset of (input, target)
    items (then pass ``collate_fn`` if needed and ``evaluate_fn(student) -> dict`` for a
    final score).
    Writes ``out/student.safetensors``, ``out/last.state.pt`` and ``out/qat.json``; the
    returned dict also holds the trained ``student`` and ``switch`` modules. For a module
    ``model``, ``model_name``/``model_kwargs`` (its ``create_model`` recipe) go in the
    checkpoint header so that it reloads; a checkpoint path carries its own.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1 or time_limit < 0:
        raise EdgekitError(f"qat: epochs={epochs}, lr={lr}, batch_size={batch_size}, time_limit={time_limit}: "
                           f"need epochs >= 1, lr > 0, batch_size >= 1, time_limit >= 0")
    distill = (distill or DistillOptions()).validate()
    rank, world = dist.init_distributed()
    float_model, model_name, model_kwargs, info = _float_model(model, model_name, model_kwargs)
    image_size = image_size or int(info.get("image_size", 256))
    torch.manual_seed(seed)  # identical student and switch initialisation on every rank
    teacher = copy.deepcopy(float_model).eval()
    student = _student(float_model, quantized_model).train()
    loader, sampler, val_loader, classes = _loaders(data, float_model, image_size, batch_size, workers, world,
                                                    seed, collate_fn)
    taps = distill.taps or default_taps(student)
    switch = None
    if distill.switch:
        probe = next(iter(loader))[0][:1]
        switch = OneToOneSwitch(tap_channels(student, taps, probe), distill.gumbel_tau, distill.init_logit)
        _sync_switch(switch, world, grads=False)
    seed_everything(seed + rank)
    # The optimizer comes after the switch exists and owns its projections.
    optimizer = torch.optim.AdamW(_param_groups(student, switch, lr, weight_decay, distill.switch_lr))
    schedule = CosineWithWarmup(epochs * len(loader), max(1, int(warmup_epochs * len(loader))), min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    train_model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    loss_fn = GQSDLoss(teacher, train_model, taps, switch, distill.feature_weight, distill.logit_weight,
                       distill.switch_weight, distill.temperature, distill.attention_p,
                       switch_threshold=distill.switch_threshold)

    out = Path(out)
    start_epoch, history, total_epochs = 0, [], epochs
    if resume:
        start_epoch, history, total_epochs = _resume(resume, student, switch, optimizer, scheduler, epochs)
        schedule.total_steps = total_epochs * len(loader)
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    ckpt_info = {"image_size": image_size, "qat": True, "float_model": model_name}
    t_start, epoch = time.perf_counter(), start_epoch
    while epoch < total_epochs:
        if sampler is not None:
            sampler.set_epoch(epoch)
        record = _train_epoch(loader, loss_fn, student, switch, optimizer, scheduler, grad_clip, world,
                              f"qat {epoch + 1}/{total_epochs}", progress, lr)
        epoch += 1
        record = {"epoch": epoch, **record, "lr": scheduler.get_last_lr()[0]}
        if time_limit:  # re-fit the plan to the budget after every epoch, as train() does
            elapsed = dist.all_reduce_mean(time.perf_counter() - t_start)
            fit = epoch + int((time_limit - elapsed) / (elapsed / (epoch - start_epoch)))
            total_epochs = max(epoch, min(epochs, fit))
            schedule.total_steps = total_epochs * len(loader)
        history.append(record)
        if dist.is_main_process():
            if progress:
                tqdm.write(f"qat epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                             if k != "epoch" and not k.startswith(("at/", "gate/"))))
            _save_student(out / "student.safetensors", student, model_name, model_kwargs, {**ckpt_info, "epoch": epoch})
            save_training_state(out / "last.state.pt", {
                "student": student.state_dict(), "switch": switch.state_dict() if switch else {},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "history": history, "total_epochs": total_epochs, "config_epochs": epochs})
        dist.barrier()

    loss_fn.remove()
    result = {"config": {"epochs": epochs, "time_limit": time_limit, "lr": lr, "batch_size": batch_size,
                         "image_size": image_size, "weight_decay": weight_decay, "seed": seed,
                         "distill": {**asdict(distill), "taps": taps}},
              "model": model_name, "history": history, "qat_seconds": time.perf_counter() - t_start,
              "world_size": world, "rank_digests": _gathered(weight_digest(student, switch)),
              "checkpoint": str(out / "student.safetensors")}
    if dist.is_main_process():
        student.eval()
        if evaluate_fn is not None:
            result["val"] = evaluate_fn(student)
        elif val_loader is not None:
            from edgekit.engine.evaluate import evaluate_model
            result["val"] = evaluate_model(student, val_loader, classes, progress=progress)
        write_json_atomic(out / "qat.json", result)
    dist.cleanup()
    return {**result, "student": student, "switch": switch}


def _save_student(path: Path, student, model_name: str, model_kwargs: dict, info: dict):
    """A brevitas student (from quantize()) keeps its QuantConfig in the header, so
    ``load_quantized`` rebuilds it; any other student is saved like a float checkpoint."""
    if getattr(student, "quant_config", None) is not None:
        from edgekit.calibration.quantize import save_quantized
        save_quantized(path, student, model_name, model_kwargs, info)
    else:
        save_checkpoint(path, student, model_name, model_kwargs, info)


def _train_epoch(loader, loss_fn: GQSDLoss, student, switch, optimizer, scheduler, grad_clip: float, world: int,
                 desc: str, progress: bool, lr: float) -> dict:
    """One pass over ``loader``; the mean of every loss term and gate rate, over steps and ranks."""
    sums: dict[str, float] = {}
    t0, seen = time.perf_counter(), 0
    bar = tqdm(loader, desc=desc, disable=not (progress and dist.is_main_process()), leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        losses = loss_fn(images, targets)
        if not torch.isfinite(losses["loss"]):
            raise EdgekitError(f"QAT diverged at step {step} (loss {float(losses['loss'])}); lower lr (now {lr})")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if switch is not None:
            _sync_switch(switch, world, grads=True)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        seen += images.shape[0]
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        gates = [v for k, v in sums.items() if k.startswith("gate/")]
        bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}", feat=f"{sums['feature'] / (step + 1):.3f}",
                        **({"gate": f"{sum(gates) / len(gates) / (step + 1):.2f}"} if gates else {}),
                        img_s=f"{seen * world / (time.perf_counter() - t0):.1f}")
    steps = max(1, len(loader))
    record = {k: dist.all_reduce_mean(v / steps) for k, v in sorted(sums.items())}
    record["seconds"] = dist.all_reduce_mean(time.perf_counter() - t0)
    return record


def _resume(path, student, switch, optimizer, scheduler, epochs: int) -> tuple[int, list, int]:
    state = load_training_state(path)
    try:
        student.load_state_dict(state["student"])
        if switch is not None:
            switch.load_state_dict(state["switch"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        total = state["total_epochs"] if epochs == state["config_epochs"] else epochs
        return state["epoch"], state["history"], total
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise EdgekitError(f"{path} does not match this QAT run (model, quantization or distill options changed?): "
                           f"{str(exc).splitlines()[0][:200]}") from None
