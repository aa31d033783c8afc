"""Self-supervised FCMAE pretraining of a ConvNeXt V2 encoder on unlabeled imagery.

Any folder of images (searched recursively; PNG, JPEG, TIFF, BMP through
:func:`edgekit.data.images.load_image`) is cut into random crops at native resolution, so a
large aerial scene yields many crops per epoch and no pixel is resampled. Images smaller
than the crop on either side are skipped (padding would add flat patches whose normalised
targets carry no signal), and so are files that do not open; both are counted in the
record. The run reuses the detector training engine: AdamW (betas 0.9/0.95, as official),
linear warm-up then cosine, optional EMA, atomic checkpoints every epoch, resume, a time
limit, tqdm progress and DDP under torchrun.

Outputs in ``out``: ``last.safetensors`` (the FCMAE weights, model ``fcmae_<encoder>``;
:func:`load_fcmae_checkpoint` rebuilds it; the encoder loads into a
classifier or a detector backbone with :func:`edgekit.models.fcmae.load_pretrained_encoder`),
``last.state.pt`` (resume), ``pretrain.json`` (the record) and ``reconstructions.png``
(input / masked input / reconstruction for a few images).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from edgekit.config import flag, require
from edgekit.engine.pretrain_config import EXTRA_KEYS, PretrainConfig  # noqa: F401  (PretrainConfig: public here)
from edgekit.data.images import IMAGE_SUFFIXES, image_size, load_image, save_image
from edgekit.engine import distributed as dist
from edgekit.engine.checkpoint import (load_state_strict, load_training_state, read_checkpoint, save_checkpoint,
                                       save_training_state)
from edgekit.engine.ema import ModelEMA
from edgekit.engine.train import CosineWithWarmup, ema_decay_for, optimizer_step, seed_everything
from edgekit.errors import EdgekitError
from edgekit.fileio import check_output_dir, make_dirs, write_json_atomic
from edgekit.models.fcmae import FCMAE, FCMAE_PREFIX, fcmae_from_name
from edgekit.models.masking import generate_masks, mask_grid, mask_to_map

# ImageNet statistics, as the official pretraining normalises its inputs.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
DECODED_CACHE = 4  # decoded images held per loader process; an epoch visits images in groups of this size


@dataclass
class PretrainResult:
    """What a pretraining run produced."""

    checkpoint: Path
    history: list
    seconds: float
    out: Path
    images: int = 0                     # images used
    skipped: dict = field(default_factory=dict)  # {"unreadable": n, "too_small": n}
    reconstructions: Path | None = None
    record: Path | None = None
    world_size: int = 1


# --- data -------------------------------------------------------------------------------

@dataclass
class ImageSet:
    paths: list[Path]
    sizes: list[tuple[int, int]]       # (height, width) from the file headers
    skipped: dict


def find_images(folders: list[Path], crop: int) -> ImageSet:
    """Every image file under ``folders`` at least ``crop`` px on both sides; a folder
    with none is one line saying what was found."""
    files: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise EdgekitError(f"--data {folder} is not a folder; pass folder(s) of images")
        files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    paths, sizes, skipped = [], [], {"unreadable": 0, "too_small": 0}
    for path in files:
        try:
            h, w = image_size(path)
        except EdgekitError:
            skipped["unreadable"] += 1
            continue
        if h < crop or w < crop:
            skipped["too_small"] += 1
            continue
        paths.append(path)
        sizes.append((h, w))
    if not paths:
        where = ", ".join(str(f) for f in folders)
        raise EdgekitError(f"--data {where}: no readable image of at least {crop}x{crop} px ({len(files)} image files, "
                           f"{skipped['unreadable']} unreadable, {skipped['too_small']} smaller); add images or lower "
                           f"--input-size")
    return ImageSet(paths, sizes, skipped)


def epoch_crops(images: ImageSet, crop: int, crops_per_image: int, seed: int, epoch: int) -> list[tuple]:
    """(image index, top, left, flip) for one epoch: images in random order, taken
    ``DECODED_CACHE`` at a time with their crops shuffled together, so each image is
    decoded once per epoch while a batch still mixes several images."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(images.paths))
    crops = []
    for start in range(0, len(order), DECODED_CACHE):
        group = []
        for i in order[start:start + DECODED_CACHE]:
            h, w = images.sizes[i]
            count = crops_per_image or max(1, (h // crop) * (w // crop))
            tops = rng.integers(0, h - crop + 1, count)
            lefts = rng.integers(0, w - crop + 1, count)
            flips = rng.random(count) < 0.5
            group += [(int(i), int(top), int(left), bool(flip)) for top, left, flip in zip(tops, lefts, flips)]
        crops += [group[j] for j in rng.permutation(len(group))]
    return crops


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float."""
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0 - MEAN) / STD


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`, clipped to uint8."""
    pixels = ((image.detach().float().cpu() * STD + MEAN) * 255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


class CropDataset(Dataset):
    """The crops of one epoch; decoded images are kept in a small LRU cache."""

    def __init__(self, images: ImageSet, crops: list[tuple], crop: int):
        self.images, self.crops, self.crop = images, crops, crop
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.crops)

    def _image(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
        else:
            self._cache[index] = load_image(self.images.paths[index])
            if len(self._cache) > DECODED_CACHE:
                self._cache.popitem(last=False)
        return self._cache[index]

    def __getitem__(self, item: int) -> torch.Tensor:
        index, top, left, flip = self.crops[item]
        pixels = self._image(index)[top:top + self.crop, left:left + self.crop]
        if pixels.shape[:2] != (self.crop, self.crop):  # the header lied about the size
            raise EdgekitError(f"image {self.images.paths[index]} decodes smaller than its header says; "
                               f"remove or re-save it")
        return to_tensor(pixels[:, ::-1] if flip else pixels)


# --- the run ----------------------------------------------------------------------------

RESUME_FIELDS = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "history": list,
                 "total_epochs": int, "config_epochs": int, "model_name": str}


def _read_resume(path: str, model_name: str) -> dict:
    state = load_training_state(path)
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in RESUME_FIELDS.items()):
        raise EdgekitError(f"--resume {path} is not a state written by edgekit pretrain; start without --resume")
    if state["model_name"] != model_name:
        raise EdgekitError(f"--resume {path} continues a {state['model_name']} run, not {model_name}; "
                           f"pass the matching --model or start without --resume")
    return state


def _shard(crops: list, rank: int, world: int) -> list:
    """This rank's crops; every rank gets as many (DDP steps in lockstep), a few dropped."""
    if len(crops) < world:
        crops = crops * world
    return crops[:len(crops) // world * world][rank::world]


def resolve_device(name: str, rank: int = 0, world: int = 1) -> torch.device:
    """``auto`` -> a GPU when torch sees one, else the CPU; under torchrun each rank takes
    its LOCAL_RANK GPU. Asking for a GPU that is not there is one line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EdgekitError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    device = torch.device(name)
    if world > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if (device.index or 0) >= torch.cuda.device_count():
        raise EdgekitError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible; pick one of them")
    return device


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith((".gamma", ".beta")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain ``cfg.model``'s encoder with FCMAE as ``cfg`` says; see the module docstring."""
    check_output_dir(cfg.out)
    images = find_images(cfg.folders, cfg.input_size)
    rank, world = dist.init_distributed()
    device = resolve_device(cfg.device, rank, world)
    grid = mask_grid(cfg.input_size, cfg.patch_size, cfg.mask_ratio, where=flag("mask_ratio"))
    model_name = FCMAE_PREFIX + cfg.model
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = FCMAE(encoder_name=cfg.model, **cfg.model_kwargs()).to(device)
    seed_everything(cfg.seed + rank)
    mask_rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    state = _read_resume(cfg.resume, model_name) if cfg.resume else None

    crops_per_rank = len(_shard(epoch_crops(images, cfg.input_size, cfg.crops_per_image, cfg.seed, 0), 0, world))
    steps_per_epoch = math.ceil(crops_per_rank / cfg.batch_size)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    schedule = CosineWithWarmup(cfg.epochs * steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch)),
                                cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = ModelEMA(model, ema_decay_for(cfg.ema_decay, cfg.epochs * steps_per_epoch),
                   warmup_steps=max(20, steps_per_epoch)) if cfg.ema else None
    start_epoch, history, total_epochs = 0, [], cfg.epochs
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise EdgekitError(f"--resume {cfg.resume} does not match this run (model or options changed?): "
                               f"{' '.join(str(exc).split())[:200]}") from None
        start_epoch, history = state["epoch"], state["history"]
        total_epochs = state["total_epochs"] if cfg.epochs == state["config_epochs"] else cfg.epochs
        schedule.total_steps = total_epochs * steps_per_epoch
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    out = Path(cfg.out)
    if dist.is_main_process():
        make_dirs(out)

    t_start, first_step_seconds = time.perf_counter(), None
    epoch = start_epoch
    while epoch < total_epochs:
        crops = _shard(epoch_crops(images, cfg.input_size, cfg.crops_per_image, cfg.seed, epoch), rank, world)
        loader = DataLoader(CropDataset(images, crops, cfg.input_size), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, pin_memory=device.type == "cuda")
        train_model.train()
        t_epoch, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"pretrain {epoch + 1}/{total_epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and dist.is_main_process()))
        for imgs in bar:
            imgs = imgs.to(device, non_blocking=True)
            masks = generate_masks(cfg.masking, imgs.shape[0], grid, cfg.mask_ratio, cfg.views, mask_rng, device)
            inputs = imgs.repeat_interleave(cfg.views, dim=0) if cfg.views > 1 else imgs
            loss, _, _ = train_model(inputs, masks)
            optimizer_step(loss, model, optimizer, scheduler, ema, cfg.grad_clip,
                           f"pretraining diverged at epoch {epoch + 1} step {steps}", cfg.lr)
            if first_step_seconds is None:
                first_step_seconds = time.perf_counter() - t_epoch
            steps, seen, loss_sum = steps + 1, seen + imgs.shape[0], loss_sum + float(loss.detach())
            rate = seen * world / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{loss_sum / steps:.4f}", img_s=f"{rate:.1f}")
        epoch += 1
        seconds = dist.all_reduce_mean(time.perf_counter() - t_epoch)
        record = {"epoch": epoch, "loss": dist.all_reduce_mean(loss_sum / max(1, steps)), "steps": steps,
                  "lr": scheduler.get_last_lr()[0], "seconds": seconds, "crops_per_s": seen * world / seconds}
        if cfg.time_limit:
            total_epochs = _fit_epochs(cfg, epoch, start_epoch, steps_per_epoch, t_start, first_step_seconds or 0.0)
            schedule.total_steps = total_epochs * steps_per_epoch
            if ema is not None:
                ema.decay = ema_decay_for(cfg.ema_decay, schedule.total_steps)
        history.append(record)
        if dist.is_main_process():
            if cfg.progress:
                tqdm.write(f"pretrain epoch {epoch}: loss {record['loss']:.4f} lr {record['lr']:.2e} "
                           f"{record['crops_per_s']:.1f} crops/s")
            _save(cfg, out, model_name, ema.module if ema is not None else model, epoch, images)
            save_training_state(out / "last.state.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}), "model_name": model_name,
                "epoch": epoch, "history": history, "total_epochs": total_epochs, "config_epochs": cfg.epochs})
        dist.barrier()

    final = ema.module if ema is not None else model
    result = PretrainResult(out / "last.safetensors", history, time.perf_counter() - t_start, out,
                            len(images.paths), images.skipped, world_size=world)
    if dist.is_main_process():
        if epoch == start_epoch:  # nothing left to train: the checkpoint must still exist
            _save(cfg, out, model_name, final, epoch, images)
        if cfg.reconstructions:
            result.reconstructions = save_reconstructions(out / "reconstructions.png", final, images,
                                                          cfg.input_size, cfg.reconstructions, cfg.seed)
        result.record = write_json_atomic(out / "pretrain.json", {
            "config": cfg.to_dict(), "model": model_name, "checkpoint": str(result.checkpoint), "history": history,
            "seconds": result.seconds, "images": len(images.paths), "skipped": images.skipped, "world_size": world})
    dist.cleanup()
    return result


def load_fcmae_checkpoint(path: str | Path) -> tuple[FCMAE, dict]:
    """(model, info) of a pretraining checkpoint (``last.safetensors``), rebuilt and loaded strictly."""
    state, name, kwargs, info = read_checkpoint(path)
    if not name.startswith(FCMAE_PREFIX):
        raise EdgekitError(f"{path} is a {name} checkpoint, not an FCMAE pretraining one (written by edgekit pretrain)")
    try:
        model = fcmae_from_name(name, **kwargs)
    except EdgekitError as exc:
        raise EdgekitError(f"checkpoint {path}: {exc}") from None
    load_state_strict(model, state, f"checkpoint {path}")
    return model.eval(), {"model": name, "kwargs": kwargs, **info}


def _fit_epochs(cfg, epoch, start_epoch, steps_per_epoch, t_start, first_step) -> int:
    """Epochs that fit the time limit from the mean step time so far (the first step,
    which compiles kernels, counts against the budget but not in the rate), as train does."""
    elapsed = dist.all_reduce_mean(time.perf_counter() - t_start)
    first = dist.all_reduce_mean(first_step)
    steps = (epoch - start_epoch) * steps_per_epoch
    per_step = (elapsed - first) / (steps - 1) if steps > 1 else elapsed
    fit = epoch + int((cfg.time_limit - elapsed) / max(per_step * steps_per_epoch, 1e-9))
    return max(epoch, min(cfg.epochs, fit))


def _save(cfg: PretrainConfig, out: Path, model_name: str, model: FCMAE, epoch: int, images: ImageSet) -> None:
    save_checkpoint(out / "last.safetensors", model, model_name, model.config() | dict(cfg.extra),
                    {"epoch": epoch, "image_size": cfg.input_size, "encoder": cfg.model, "masking": cfg.masking,
                     "views": cfg.views, "images": len(images.paths)})


@torch.no_grad()
def save_reconstructions(path: Path, model: FCMAE, images: ImageSet, crop: int, count: int, seed: int) -> Path:
    """A PNG grid, one row per image (its centre crop): input | masked input (masked
    patches grey) | reconstruction (predicted masked patches, visible ones kept); atomic."""
    was_training = model.training
    model.eval()
    chosen = range(min(count, len(images.paths)))
    crops = []
    for i in chosen:
        h, w = images.sizes[i]
        top, left = (h - crop) // 2, (w - crop) // 2
        crops.append(to_tensor(load_image(images.paths[i])[top:top + crop, left:left + crop]))
    device = next(model.parameters()).device
    imgs = torch.stack(crops).to(device)
    grid = mask_grid(crop, model.patch_size, model.mask_ratio)
    masks = generate_masks("random", len(crops), grid, model.mask_ratio, generator=torch.Generator().manual_seed(seed),
                           device=device)
    recon = model.reconstruct(imgs, masks)
    hidden = mask_to_map(masks, grid, model.patch_size).bool().expand_as(imgs)
    masked = imgs.masked_fill(hidden, 0.0)  # 0 in normalised space: the mean colour
    gap = 4
    sheet = np.full((len(crops) * (crop + gap) - gap, 3 * (crop + gap) - gap, 3), 255, dtype=np.uint8)
    for row, columns in enumerate(zip(imgs, masked, recon)):
        for col, image in enumerate(columns):
            y, x = row * (crop + gap), col * (crop + gap)
            sheet[y:y + crop, x:x + crop] = to_pixels(image)
    model.train(was_training)
    return save_image(path, sheet)


# --- disjoint vs random masking -----------------------------------------------------------

@dataclass
class MaskingCurve:
    """One masking setting's run: the held-out reconstruction loss after each block of steps."""

    masking: str
    views: int
    steps: list = field(default_factory=list)       # optimisation steps done at each evaluation
    seconds: list = field(default_factory=list)     # training time so far (evaluations and data loading excluded)
    eval_loss: list = field(default_factory=list)   # masked-patch loss on the held-out crops (fixed random masks)
    train_loss: list = field(default_factory=list)  # mean training loss over the steps since the last evaluation

    def add(self, step: int, seconds: float, eval_loss: float, train_loss: float | None) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.eval_loss.append(eval_loss)
        self.train_loss.append(train_loss)


def _split_held_out(images: ImageSet) -> tuple[ImageSet, ImageSet, bool]:
    """Every fourth image held out for evaluation when there are four or more; otherwise the
    evaluation crops come from the training images (at other random positions)."""
    if len(images.paths) < 4:
        return images, images, False
    def pick(keep) -> ImageSet:
        chosen = [i for i in range(len(images.paths)) if keep(i)]
        return ImageSet([images.paths[i] for i in chosen], [images.sizes[i] for i in chosen], images.skipped)

    return pick(lambda i: i % 4 != 3), pick(lambda i: i % 4 == 3), True


def _batches(images: ImageSet, cfg: PretrainConfig):
    """Training batches forever, epoch after epoch, the same sequence for every setting."""
    for epoch in itertools.count():
        crops = epoch_crops(images, cfg.input_size, cfg.crops_per_image, cfg.seed, epoch)
        loader = DataLoader(CropDataset(images, crops, cfg.input_size), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, drop_last=len(crops) >= cfg.batch_size)
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _held_out_loss(model: FCMAE, imgs: torch.Tensor, masks: torch.Tensor, batch: int) -> float:
    model.eval()
    total = sum(float(model(imgs[i:i + batch], masks[i:i + batch])[0]) * len(imgs[i:i + batch])
                for i in range(0, len(imgs), batch))
    model.train()
    return total / len(imgs)  # every mask removes the same number of patches: a plain mean


# The PretrainConfig fields a masking comparison uses; the rest (epochs, EMA, output...) do not apply.
COMPARE_KEYS = ("model", "input_size", "crops_per_image", "mask_ratio", "patch_size", "decoder_dim", "decoder_depth",
                "norm_pix_loss", "grn_stats", "batch_size", "lr", "weight_decay", "min_lr_ratio", "seed", "device",
                "workers", "progress", "extra")


def compare_masking(data, settings=(("random", 1), ("random", 2), ("disjoint", 2)), steps: int = 200,
                    eval_every: int = 20, eval_crops: int = 32, warmup_steps: int = 20, **options) -> dict:
    """Train one FCMAE per masking setting ``(masking, views)`` from the same initial
    weights on the same sequence of crops with the same schedule, and record the held-out
    reconstruction loss (single random view, the same fixed masks for every setting)
    against optimisation steps and against training seconds. ``options`` are
    :class:`PretrainConfig` fields (model, input_size, mask_ratio, batch_size, lr, seed,
    device, decoder_dim, ...); returns a JSON-ready record."""
    require(steps >= 1, "steps", steps, ">= 1")
    unknown = sorted(set(options) - set(COMPARE_KEYS))
    if unknown:
        raise EdgekitError(f"compare_masking: {', '.join(unknown)} do not apply; it takes {', '.join(COMPARE_KEYS)}")
    require(eval_every >= 1, "eval_every", eval_every, ">= 1")
    base = PretrainConfig(**{"data": data, "reconstructions": 0, **options})
    configs = [base.replace(masking=m, views=v) for m, v in settings]  # each setting checked
    images = find_images(base.folders, base.input_size)
    train_images, eval_images, held_out = _split_held_out(images)
    device = resolve_device(base.device)
    grid = mask_grid(base.input_size, base.patch_size, base.mask_ratio)
    per_image = math.ceil(eval_crops / len(eval_images.paths))
    eval_crops_list = epoch_crops(eval_images, base.input_size, per_image, base.seed + 1, 0)[:eval_crops]
    eval_set = CropDataset(eval_images, eval_crops_list, base.input_size)
    eval_imgs = torch.stack([eval_set[i] for i in range(len(eval_set))]).to(device)
    eval_masks = generate_masks("random", len(eval_imgs), grid, base.mask_ratio,
                                generator=torch.Generator().manual_seed(base.seed + 2), device=device)
    curves = []
    for cfg in configs:
        torch.manual_seed(cfg.seed)
        model = FCMAE(encoder_name=cfg.model, **cfg.model_kwargs()).to(device)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, CosineWithWarmup(steps, min(warmup_steps, steps), cfg.min_lr_ratio))
        mask_rng = torch.Generator().manual_seed(cfg.seed)
        curve = MaskingCurve(cfg.masking, cfg.views)
        curve.add(0, 0.0, _held_out_loss(model, eval_imgs, eval_masks, cfg.batch_size), None)
        clock, since = 0.0, []
        batches = _batches(train_images, cfg)
        bar = tqdm(range(1, steps + 1), desc=f"{cfg.masking} x{cfg.views}", leave=False, disable=not cfg.progress)
        for step in bar:
            imgs = next(batches).to(device)
            _sync(device)
            t = time.perf_counter()
            masks = generate_masks(cfg.masking, imgs.shape[0], grid, cfg.mask_ratio, cfg.views, mask_rng, device)
            loss = model(imgs.repeat_interleave(cfg.views, dim=0), masks)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            _sync(device)
            clock += time.perf_counter() - t
            since.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                eval_loss = _held_out_loss(model, eval_imgs, eval_masks, cfg.batch_size)
                curve.add(step, clock, eval_loss, float(np.mean(since)))
                bar.set_postfix(eval_loss=f"{curve.eval_loss[-1]:.4f}")
                since = []
        curves.append(curve)
    config = {key: value for key, value in base.to_dict().items() if key in COMPARE_KEYS + ("data",)}
    return {"config": config, "settings": [list(s) for s in settings], "steps": steps, "warmup_steps": warmup_steps,
            "eval_every": eval_every, "eval_crops": len(eval_imgs), "held_out_images": held_out,
            "train_images": len(train_images.paths), "device": str(device), "curves": [asdict(c) for c in curves]}
