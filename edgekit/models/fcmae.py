"""FCMAE (ConvNeXt V2's fully convolutional masked autoencoder) on edgekit's ConvNeXtV2.

The official code runs the encoder on visible patches only with MinkowskiEngine sparse
convolutions. Here the encoder is edgekit's dense :class:`ConvNeXtV2` with sparsity
emulated: the visibility map (the patch mask upsampled to each stage's resolution) is
re-applied after every operation that mixes positions (stem, downsampling conv, depthwise
conv, the residual branch), and GRN takes its L2 statistics over visible positions only.
Masked positions then hold zeros, so every convolution reads only visible inputs and the
values at visible positions equal the sparse computation's (tested in float64). It costs
the dense FLOPs, not the sparse ones; it needs no MinkowskiEngine.

GRN statistics: the official ``MinkowskiGRN`` takes ``torch.norm(x.F, dim=0)`` over the
features of every visible point of the whole batch (facebookresearch/ConvNeXt-V2 issue
#86), not per image as the dense GRN does. ``grn_stats="sample"`` (default) takes them per
image over its visible positions, so an image's features do not depend on its batch mates
(nor on the other views of a disjoint-masked batch); ``grn_stats="batch"`` reproduces the
official pooling exactly.

Checkpoints name the model ``fcmae_<encoder>`` (:func:`fcmae_from_name` rebuilds it);
FCMAE is kept out of the model registry, whose every entry is a deployable model.

State-dict keys are the official FCMAE names (``encoder.*``, ``proj``, ``mask_token``,
``decoder.*``, ``pred``) with the encoder in dense ConvNeXt V2 layout, so
``encoder_state_dict`` strips ``encoder.`` and loads into ``convnextv2_*`` or a detector
backbone. Official training checkpoints keep the encoder in MinkowskiEngine layout
(``kernel``, ``ln``, ``linear``, (1, C) biases and GRN parameters); every loader here
converts that layout first, as the official ``utils.remap_checkpoint_keys`` does.

Initialisation follows ConvNeXt V2's truncated normal (std 0.02) for every conv and
linear layer; the official ``FCMAE._init_weights`` calls timm's ``trunc_normal_`` without
``std`` (std 1) on its own convs: on random 128 px inputs that gave predictions of
standard deviation ~100 and a first loss of ~23 against unit-variance targets (0.12 and
1.01 with this initialisation; measured on atto, decoder 512).
"""

from __future__ import annotations

import inspect
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.models.convnextv2 import STAGE_STRIDES, VARIANTS, Block, ConvNeXtV2, _init_weights, backbone_state_dict
from edgekit.models.masking import mask_grid, mask_to_map, random_mask

ENCODER_STRIDE = STAGE_STRIDES[-1]  # one decoder cell per 32x32 pixels
STEM_STRIDE = STAGE_STRIDES[0]
GRN_STATS = ("sample", "batch")
DECODER_PARTS = ("proj", "mask_token", "decoder", "pred")
ENCODER_PARTS = ("downsample_layers", "stages")
FCMAE_ENCODERS = tuple(f"convnextv2_{size}" for size in VARIANTS)
FCMAE_PREFIX = "fcmae_"  # checkpoint model names: fcmae_<encoder>


def fcmae_encoder_size(encoder_name: str) -> str:
    """``convnextv2_atto`` -> ``atto``; any name without an FCMAE form is one error line."""
    match = re.fullmatch(r"convnextv2_(\w+)", str(encoder_name))
    if not match or match.group(1) not in VARIANTS:
        raise EdgekitError(f"model {encoder_name!r} has no FCMAE form; pretrain one of {', '.join(FCMAE_ENCODERS)} "
                           f"(a detector's backbone loads from it afterwards)")
    return match.group(1)


# --- patches -------------------------------------------------------------------------

def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches row-major, pixels in (row, column, channel)
    order within a patch (the official layout, which fixes the meaning of ``pred``'s channels)."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, L, p*p*C) -> (N, C, grid_h*p, grid_w*p)."""
    n, p = patches.shape[0], patch_size
    x = patches.reshape(n, grid[0], grid[1], p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, grid[0] * p, grid[1] * p)


def normalized_targets(patches: torch.Tensor) -> torch.Tensor:
    """Per-patch normalised pixels (norm_pix_loss): unbiased variance, eps 1e-6, as official."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over masked patches only (mask 1 = masked)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# --- the sparse-emulating encoder ----------------------------------------------------

def _masked_grn(grn: nn.Module, x: torch.Tensor, visible: torch.Tensor, stats: str) -> torch.Tensor:
    """GRN of NHWC ``x`` with L2 statistics over visible positions (per image or pooled
    over the batch); values at masked positions are don't-care."""
    if stats == "sample":
        return grn(x * visible)  # zeroed positions add nothing to the norms; visible values unchanged
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = (x * visible).to(compute)
    gx = torch.sqrt((xf * xf).sum(dim=(0, 1, 2), keepdim=True))
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)
    return (grn.gamma.to(compute) * (xf * nx) + grn.beta.to(compute) + xf).to(x.dtype)


def _masked_block(block: Block, x: torch.Tensor, visible: torch.Tensor, stats: str) -> torch.Tensor:
    y = (block.dwconv(x) * visible).permute(0, 2, 3, 1)
    y = block.act(block.pwconv1(block.norm(y)))
    y = block.pwconv2(_masked_grn(block.grn, y, visible.permute(0, 2, 3, 1), stats))
    return x + block.drop_path(y.permute(0, 3, 1, 2)) * visible


def masked_encoder_forward(encoder: ConvNeXtV2, imgs: torch.Tensor, visible: torch.Tensor,
                           grn_stats: str = "sample") -> torch.Tensor:
    """Last-stage features of ``encoder`` computed from visible positions only.

    ``visible`` is (N, 1, H/4, W/4), 1 where the stem output is visible. As in the
    official code the stem runs on the whole image and its output is masked (a 4x4 stem
    window never straddles two 32 px patches). A downsampled position is visible when any
    of its 2x2 inputs is (MinkowskiEngine's strided output coordinates; with patch-aligned
    masks the 2x2 windows are all visible or all masked). Masked positions come out zero.
    """
    if grn_stats not in GRN_STATS:
        raise EdgekitError(f"FCMAE: grn_stats={grn_stats!r}; use one of {', '.join(GRN_STATS)}")
    visible = visible.to(imgs.dtype)
    x = encoder.downsample_layers[0](imgs) * visible
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            norm, conv = encoder.downsample_layers[i]
            next_visible = F.max_pool2d(visible, 2)
            x = conv(norm(x) * visible) * next_visible
            visible = next_visible
        for block in stage:
            x = _masked_block(block, x, visible, grn_stats)
    return x


# --- the model -------------------------------------------------------------------------

class FCMAE(nn.Module):
    """ConvNeXt V2 encoder on visible patches, a light ConvNeXt decoder with a mask token,
    per-patch pixel prediction, MSE on masked patches (normalised targets by default).

    ``patch_size`` must be a multiple of the encoder stride 32: the decoder predicts the
    32x32 pixels of each stride-32 cell (official layout), and larger patches group cells.
    """

    def __init__(self, encoder_name: str = "convnextv2_atto", decoder_dim: int = 512, decoder_depth: int = 1,
                 patch_size: int = 32, mask_ratio: float = 0.6, norm_pix_loss: bool = True, in_chans: int = 3,
                 grn_stats: str = "sample", drop_path_rate: float = 0.0, grn_backend: str = "auto"):
        super().__init__()
        size = fcmae_encoder_size(encoder_name)
        if not isinstance(patch_size, int) or patch_size < ENCODER_STRIDE or patch_size % ENCODER_STRIDE:
            raise EdgekitError(f"FCMAE: patch size {patch_size!r} must be a multiple of the encoder stride "
                               f"{ENCODER_STRIDE} (the official setting is 32)")
        if not 0.0 < mask_ratio < 1.0:
            raise EdgekitError(f"FCMAE: mask ratio {mask_ratio!r} is outside (0, 1); use e.g. 0.6")
        if grn_stats not in GRN_STATS:
            raise EdgekitError(f"FCMAE: grn_stats={grn_stats!r}; use one of {', '.join(GRN_STATS)}")
        if decoder_dim < 1 or decoder_depth < 0:
            raise EdgekitError(f"FCMAE: decoder_dim={decoder_dim} must be >= 1 and decoder_depth={decoder_depth} >= 0")
        self.encoder_name, self.patch_size, self.mask_ratio = f"convnextv2_{size}", patch_size, float(mask_ratio)
        self.norm_pix_loss, self.in_chans, self.grn_stats = bool(norm_pix_loss), in_chans, grn_stats
        dims = VARIANTS[size]["dims"]
        # features_only with stage 3 built: exactly the official SparseConvNeXtV2's parameters (no norm/head).
        self.encoder = ConvNeXtV2(in_chans=in_chans, **VARIANTS[size], features_only=True, out_indices=(3,),
                                  drop_path_rate=drop_path_rate, grn_backend=grn_backend)
        self.proj = nn.Conv2d(dims[-1], decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_dim, grn_backend=grn_backend) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, ENCODER_STRIDE ** 2 * in_chans, kernel_size=1)
        for part in (self.proj, self.decoder, self.pred):
            part.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        return mask_grid(tuple(imgs.shape[-2:]), self.patch_size, self.mask_ratio, where="FCMAE")

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = mask_to_map(1.0 - mask, self.grid(imgs), self.patch_size // STEM_STRIDE)
        return masked_encoder_forward(self.encoder, imgs, visible, self.grn_stats)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, 32*32*C, H/32, W/32) pixel predictions; masked cells start from the mask token."""
        x = self.proj(latent)
        masked = mask_to_map(mask, grid, self.patch_size // ENCODER_STRIDE).to(x.dtype)
        x = x * (1.0 - masked) + self.mask_token.to(x.dtype) * masked
        return self.pred(self.decoder(x))

    def pred_patches(self, pred: torch.Tensor) -> torch.Tensor:
        """Decoder output -> (N, L, p*p*C) over this model's patch grid."""
        n, _, h, w = pred.shape
        cells = pred.reshape(n, pred.shape[1], h * w).transpose(1, 2)
        if self.patch_size == ENCODER_STRIDE:
            return cells
        image = unpatchify(cells, ENCODER_STRIDE, (h, w), self.in_chans)
        return patchify(image, self.patch_size)

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)
        return normalized_targets(target) if self.norm_pix_loss else target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(self.pred_patches(pred), self.targets(imgs), mask)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None):
        """(loss, pred, mask) as the official FCMAE; ``mask`` (N, L), 1 = masked, is
        drawn at ``mask_ratio`` when not given (see :mod:`edgekit.models.masking`)."""
        grid = self.grid(imgs)
        if mask is None:
            mask = random_mask(imgs.shape[0], grid, self.mask_ratio, device=imgs.device)
        if mask.shape != (imgs.shape[0], grid[0] * grid[1]):
            raise ValueError(f"FCMAE: mask of shape {tuple(mask.shape)} for {imgs.shape[0]} images of "
                             f"{grid[0]}x{grid[1]} patches")
        mask = mask.to(imgs.dtype)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask, grid)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The image with its masked patches replaced by the prediction, in the input's
        space (normalised predictions take each true patch's mean and spread, as MAE's
        visualisation does)."""
        grid = self.grid(imgs)
        _, pred, mask = self(imgs, mask)
        patches, true = self.pred_patches(pred), patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            patches = patches * (true.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + true.mean(dim=-1, keepdim=True)
        merged = torch.where(mask[..., None] > 0, patches, true)
        return unpatchify(merged, self.patch_size, grid, self.in_chans)

    def config(self) -> dict:
        """Constructor keywords that rebuild this model (besides the encoder name)."""
        return {"decoder_dim": self.proj.out_channels, "decoder_depth": len(self.decoder),
                "patch_size": self.patch_size, "mask_ratio": self.mask_ratio, "norm_pix_loss": self.norm_pix_loss,
                "in_chans": self.in_chans, "grn_stats": self.grn_stats}


# --- checkpoints -----------------------------------------------------------------------

def _unwrap(state: Mapping) -> Mapping:
    """Official checkpoint files hold ``{"model": state_dict, ...}``."""
    if "model" in state and isinstance(state["model"], Mapping):
        return state["model"]
    return state


def dense_from_minkowski(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One encoder entry in MinkowskiEngine layout -> dense ConvNeXt V2 layout (identity
    for dense entries). MinkowskiEngine stores a conv kernel as (k*k, in, out) (depthwise:
    (k*k, C)) with the first spatial axis varying fastest, so dense ``weight[o, i, a, b]``
    is ``kernel[b*k + a, i, o]`` (the official ``remap_checkpoint_keys``); ``ln``/``linear``
    wrappers are dropped from the name, (1, C) biases and GRN parameters reshaped."""
    parts = key.split(".")
    if parts[-1] == "kernel":
        k = math.isqrt(value.shape[0])
        name = ".".join(parts[:-1] + ["weight"])
        if value.ndim == 3:
            _, cin, cout = value.shape
            return name, value.permute(2, 1, 0).reshape(cout, cin, k, k).transpose(2, 3).contiguous()
        return name, value.permute(1, 0).reshape(value.shape[1], 1, k, k).transpose(2, 3).contiguous()
    if len(parts) >= 2 and parts[-2] in ("ln", "linear"):
        parts.pop(-2)
    key = ".".join(parts)
    if parts[-2:-1] == ["grn"] and value.ndim == 2:
        return key, value.reshape(1, 1, 1, -1)
    if parts[-1] == "bias" and value.ndim == 2:
        return key, value.reshape(-1)
    return key, value


def fcmae_state_from_official(state: Mapping) -> dict[str, torch.Tensor]:
    """An FCMAE state dict in any layout (this module's, or an official training
    checkpoint's with a MinkowskiEngine encoder) -> this module's layout."""
    converted = {}
    for key, value in _unwrap(state).items():
        if key.startswith("encoder."):
            inner, value = dense_from_minkowski(key[len("encoder."):], value)
            key = "encoder." + inner
        converted[key] = value
    return converted


def encoder_state_dict(fcmae_state: Mapping) -> dict[str, torch.Tensor]:
    """The encoder's weights as a ConvNeXt V2 state dict (``downsample_layers.*``,
    ``stages.*``): drops ``proj``/``mask_token``/``decoder``/``pred``, strips ``encoder.``,
    converts MinkowskiEngine layout. Takes this module's FCMAE state, an official FCMAE
    training checkpoint, or the released encoder-only ``*_fcmae.pt`` weights (already
    dense, no prefix); ``{"model": ...}`` wrappers are unwrapped."""
    encoder = {}
    for key, value in _unwrap(fcmae_state).items():
        if key.split(".")[0] in DECODER_PARTS:
            continue
        key = key.removeprefix("encoder.")
        key, value = dense_from_minkowski(key, value)
        if key.split(".")[0] in ENCODER_PARTS:
            encoder[key] = value
    if not encoder:
        raise EdgekitError("no ConvNeXt V2 encoder weights (downsample_layers.*, stages.*) found in this state dict; "
                           "pass an FCMAE checkpoint (edgekit pretrain's last.safetensors or an official one)")
    return encoder


def load_fcmae_state(model: FCMAE, state: Mapping, source: str = "state dict") -> FCMAE:
    """Load an FCMAE state (any layout :func:`fcmae_state_from_official` takes) strictly."""
    try:
        model.load_state_dict(fcmae_state_from_official(state), strict=True)
    except RuntimeError as exc:
        raise EdgekitError(f"{source} does not fit FCMAE({model.encoder_name}): "
                           f"{' '.join(str(exc).split())[:300]}") from None
    return model


def read_state_file(path: str | Path) -> Mapping:
    """Weights from a safetensors file or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"pretrained weights {path} not found; pass edgekit pretrain's last.safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # torch's words for a pickled non-tensor object
            raise EdgekitError(f"cannot read pretrained weights {path}: not a torch or safetensors file; pass "
                               f"edgekit pretrain's last.safetensors") from None
        raise EdgekitError(f"{path} holds more than tensors (official training checkpoints keep their argparse "
                           f"'args'), which a weights-only load refuses; if you trust the file, keep its weights: "
                           f"torch.save({{'model': torch.load(path, weights_only=False)['model']}}, 'weights.pt')") \
            from None
    except Exception as exc:  # safetensors and torch.load raise many types for foreign files
        raise EdgekitError(f"cannot read pretrained weights {path} ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:160]}); pass a .safetensors file or a torch file "
                           f"holding only tensors") from None


def backbone_of(model: nn.Module) -> ConvNeXtV2:
    """The ConvNeXt V2 a pretrained encoder initialises: the model itself or its ``backbone``."""
    if isinstance(model, ConvNeXtV2):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, ConvNeXtV2):
        return backbone
    raise EdgekitError(f"{type(model).__name__} has no ConvNeXt V2 backbone to initialise from a pretrained encoder")


def load_pretrained_encoder(model: nn.Module, source: str | Path | Mapping) -> int:
    """Initialise ``model``'s ConvNeXt V2 (itself, or ``model.backbone`` for a detector)
    from an FCMAE checkpoint, strictly; returns the number of tensors loaded.

    A classifier's ``norm``/``head``, which the encoder lacks, keep the model's own
    values (the official fine-tuning likewise re-initialises the head); a
    ``features_only`` backbone takes the stages it builds (``backbone_state_dict``).
    """
    name = str(source) if not isinstance(source, Mapping) else "the given state dict"
    state = read_state_file(source) if not isinstance(source, Mapping) else source
    encoder = encoder_state_dict(state)
    target = backbone_of(model)
    if target.features_only:
        weights = backbone_state_dict(encoder, target.out_indices)
    else:
        own = {k: v for k, v in target.state_dict().items() if k.split(".")[0] in ("norm", "head")}
        weights = {**encoder, **own}
    try:
        target.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise EdgekitError(f"encoder weights in {name} do not fit this {type(model).__name__} (another ConvNeXt V2 "
                           f"size?): {' '.join(str(exc).split())[:300]}") from None
    return len(weights)


def fcmae_from_name(name: str, **kwargs) -> FCMAE:
    """Rebuild an FCMAE from its checkpoint name ``fcmae_<encoder>`` and keywords. FCMAE
    is a pretraining model, not a deployable one, so it stays out of the model registry
    (whose every entry is built, exported and benchmarked)."""
    if not str(name).startswith(FCMAE_PREFIX):
        raise EdgekitError(f"{name!r} is not an FCMAE name; expected {FCMAE_PREFIX}<encoder>, "
                           f"e.g. fcmae_convnextv2_atto")
    try:
        inspect.signature(FCMAE).bind(encoder_name=name[len(FCMAE_PREFIX):], **kwargs)
    except TypeError as exc:
        raise EdgekitError(f"{name}: {exc}; FCMAE takes {', '.join(inspect.signature(FCMAE).parameters)}") from None
    return FCMAE(encoder_name=name[len(FCMAE_PREFIX):], **kwargs)
