"""RSDet: a small anchor-free detector for on-board remote sensing.

ConvNeXt V2 backbone (strides 8/16/32) -> a light top-down FPN neck -> an FCOS-style head
shared across levels (classification, box distances, centerness), whose last conv of
each branch can be a modulated deformable convolution. Everything is plain torch so that
it trains and exports anywhere; box decoding and class-aware NMS live in
:mod:`edgekit.models.detect_post` so that export can reuse them.

``obb=True`` adds an angle branch (one 3x3 conv on the regression tower) and makes the
model oriented: ``forward`` returns (cls, box, ctr, angle), the loss is
:func:`edgekit.models.obb_loss.obb_loss` and ``predict`` gives rotated boxes
(:mod:`edgekit.models.obb_post`). A keyword rather than ``rsdet_*_obb`` names: the flag
travels with the constructor kwargs a checkpoint stores and with ``model.config``, so a
path that rebuilds a model from those builds the oriented one without knowing about it,
and horizontal models keep their names, weights and outputs.

Why FCOS-style: no anchors to tune per data set (DOTA object sizes vary by orders of
magnitude), a single dense output per level, and trivial ONNX export.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.models.convnextv2 import ConvNeXtV2, VARIANTS
from edgekit.models.deform import DeformConv2dPack
from edgekit.models.detect_loss import fcos_loss
from edgekit.models.detect_post import decode_predictions, postprocess
from edgekit.models.obb_loss import obb_loss
from edgekit.models.obb_post import decode_rotated_predictions, postprocess_rotated
from edgekit.models.registry import register_model

INF = 1e8


def _conv_gn_act(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(min(16, cout // 4), cout), nn.SiLU())


class _DeformGnAct(nn.Module):
    """DCNv2 (offsets and mask from its own input) + GroupNorm + SiLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = DeformConv2dPack(channels, channels, 3, padding=1, bias=False, modulated=True)
        self.norm = nn.GroupNorm(min(16, channels // 4), channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class FPNNeck(nn.Module):
    """Top-down feature pyramid: 1x1 laterals, nearest upsampling, one 3x3 conv per level."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_gn_act(channels, channels) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.smooth, lat)]


class Scale(nn.Module):
    """A learnable scalar per level, as in FCOS, so one shared head serves all strides."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.scale


class FCOSHead(nn.Module):
    """Shared head: a classification tower and a regression tower (boxes + centerness, and
    with ``angle=True`` the rotated box's angle logit)."""

    def __init__(self, channels: int, num_classes: int, num_levels: int, num_convs: int = 2,
                 deformable: bool = True, prior_prob: float = 0.01, angle: bool = False):
        super().__init__()

        def tower():
            layers = [_conv_gn_act(channels, channels) for _ in range(num_convs - int(deformable))]
            if deformable:
                layers.append(_DeformGnAct(channels))
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_out = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctr_out = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        self.angle_out = nn.Conv2d(channels, 1, 3, padding=1) if angle else None
        for conv in (self.cls_out, self.box_out, self.ctr_out, self.angle_out):
            if conv is None:
                continue
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[torch.Tensor]):
        cls, box, ctr, angle = [], [], [], []
        for level, x in enumerate(feats):
            c, r = self.cls_tower(x), self.reg_tower(x)
            cls.append(self.cls_out(c))
            # Distances in units of the level's stride, positive by construction.
            box.append(torch.exp(self.scales[level](self.box_out(r)).clamp(max=8.0)))
            ctr.append(self.ctr_out(r))
            if self.angle_out is not None:
                angle.append(self.angle_out(r))  # a logit; obb_post.angle_from_logits maps it to radians
        return (cls, box, ctr, angle) if self.angle_out is not None else (cls, box, ctr)


class RSDet(nn.Module):
    """ConvNeXt V2 + FPN + FCOS-style head. ``forward`` returns raw per-level outputs;
    :meth:`loss` trains them and :meth:`predict` turns them into boxes (rotated ones too
    with ``obb=True``)."""

    strides = (8, 16, 32)

    def __init__(self, backbone: str = "atto", num_classes: int = 15, neck_channels: int | None = None,
                 head_convs: int = 2, deformable: bool = True, drop_path_rate: float = 0.0,
                 class_names: list[str] | None = None, grn_backend: str = "auto", obb: bool = False):
        super().__init__()
        if backbone not in VARIANTS:
            from edgekit.errors import EdgekitError
            raise EdgekitError(f"unknown backbone {backbone!r}; choose one of {', '.join(VARIANTS)}")
        if class_names is not None and len(class_names) != num_classes:
            num_classes = len(class_names)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
        self.config = dict(backbone=backbone, num_classes=num_classes, neck_channels=neck_channels,
                           head_convs=head_convs, deformable=deformable, class_names=self.class_names,
                           obb=bool(obb))
        self.obb = bool(obb)
        self.backbone = ConvNeXtV2(**VARIANTS[backbone], features_only=True, out_indices=(1, 2, 3),
                                   drop_path_rate=drop_path_rate, grn_backend=grn_backend)
        in_channels = [info["channels"] for info in self.backbone.feature_info]
        channels = neck_channels or max(64, in_channels[0])
        self.neck = FPNNeck(in_channels, channels)
        self.head = FCOSHead(channels, num_classes, len(self.strides), head_convs, deformable, angle=self.obb)

    def forward(self, images: torch.Tensor):
        return self.head(self.neck(self.backbone(images)))

    def loss(self, outputs, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Training losses; the oriented model needs ``rboxes`` in each target."""
        if self.obb:
            return obb_loss(outputs, targets, self.strides)
        return fcos_loss(outputs, targets, self.strides)

    def decode(self, outputs):
        """Raw outputs -> (boxes [B, P, 4] xyxy, or rboxes [B, P, 5] when oriented; scores [B, P, K])."""
        if self.obb:
            return decode_rotated_predictions(outputs, self.strides)
        return decode_predictions(outputs, self.strides)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float = 0.05, iou_threshold: float = 0.6,
                max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
        """Per image a dict: ``boxes`` [M, 4], ``scores``, ``labels``; oriented models add
        ``rboxes`` [M, 5] (``boxes`` are then their enclosing horizontal boxes)."""
        if self.obb:
            rboxes, scores = self.decode(self(images))
            return postprocess_rotated(rboxes, scores, score_threshold, iou_threshold, max_detections,
                                       image_size=images.shape[-2:])
        boxes, scores = decode_predictions(self(images), self.strides)
        return postprocess(boxes, scores, score_threshold, iou_threshold, max_detections,
                           image_size=images.shape[-2:])


def _register(size: str):
    @register_model(f"rsdet_{size}")
    def _build(**kwargs):
        return RSDet(backbone=size, **kwargs)
    _build.__doc__ = f"RSDet detector with a ConvNeXt V2 {size} backbone."
    return _build


for _size in VARIANTS:
    _register(_size)
