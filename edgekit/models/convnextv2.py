"""ConvNeXt V2 (Woo et al., 2023) with GRN, compatible with the official checkpoints.

Module names, parameter shapes, initialisation and outputs follow the official
facebookresearch/ConvNeXt-V2 ``models/convnextv2.py``, so an official ImageNet
checkpoint loads with ``strict=True``. Added here: a multi-scale ``features_only``
mode for detection backbones and a choice of GRN kernel backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from edgekit.errors import EdgekitError
from edgekit.models.grn import GRN
from edgekit.models.layers import DropPath, LayerNorm
from edgekit.models.registry import register_model

# The official variants (paper Table 1 / official code); pico is ``convnext_pico`` there.
VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "atto": {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320)},
    "femto": {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384)},
    "pico": {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512)},
    "nano": {"depths": (2, 2, 8, 2), "dims": (80, 160, 320, 640)},
    "tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
}
NUM_STAGES = 4
STAGE_STRIDES = (4, 8, 16, 32)


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d), residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, grn_backend: str = "auto"):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # 1x1 convs as Linear on NHWC, as official
        self.act = nn.GELU()
        self.grn = GRN(4 * dim, backend=grn_backend)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 classifier, or with ``features_only=True`` a multi-scale backbone.

    The feature model has no ``norm``/``head``, builds stages only up to
    ``max(out_indices)``, and ``forward`` returns the NCHW output of each stage in
    ``out_indices``; ``feature_info`` lists their ``channels`` and ``stride`` (4, 8, 16,
    32). Every downsampling is an unpadded strided conv (4x4/4, then 2x2/2 three
    times), so a side of length L gives maps of floor(L/4), floor(L/8), ... (each
    step floors): for sides that are not multiples of 32 the last rows/columns are
    dropped, e.g. 100x132 -> 25x33, 12x16, 6x8, 3x4. Pad inputs to a multiple of 32
    when boxes near the bottom/right border matter. Sides below 32 fail in the
    last stage (torch reports a kernel larger than its input).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = VARIANTS["tiny"]["depths"],
                 dims: Sequence[int] = VARIANTS["tiny"]["dims"],
                 drop_path_rate: float = 0.0, head_init_scale: float = 1.0,
                 features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
                 grn_backend: str = "auto"):
        super().__init__()
        depths, dims, out_indices = list(depths), list(dims), tuple(int(i) for i in out_indices)
        if len(depths) != NUM_STAGES or len(dims) != NUM_STAGES:
            raise EdgekitError(f"ConvNeXtV2: depths and dims need {NUM_STAGES} entries each, "
                               f"got depths={depths} dims={dims}")
        if not out_indices or list(out_indices) != sorted(set(out_indices)) \
                or not all(0 <= i < NUM_STAGES for i in out_indices):
            raise EdgekitError(f"ConvNeXtV2: out_indices must be increasing stage indices in 0..3, "
                               f"got {out_indices}; e.g. out_indices=(1, 2, 3)")
        self.depths, self.dims = depths, dims
        self.features_only = bool(features_only)
        self.out_indices = out_indices
        num_built = max(out_indices) + 1 if self.features_only else NUM_STAGES

        self.downsample_layers = nn.ModuleList()  # stem + 3 downsampling layers
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
        ))
        for i in range(1, num_built):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i - 1], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2),
            ))

        # The drop-path schedule spans all blocks, also when later stages are not built.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(num_built):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                Block(dims[i], drop_path=rates[first + j], grn_backend=grn_backend)
                for j in range(depths[i])]))

        self.feature_info = [{"channels": dims[i], "stride": STAGE_STRIDES[i]} for i in out_indices]
        if not self.features_only:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], num_classes)

        self.apply(_init_weights)
        if not self.features_only:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW output of every built stage."""
        outs = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Official: last stage, global average pool, LayerNorm -> (N, C)."""
        if self.features_only:
            raise RuntimeError("forward_features needs the classifier's final norm; "
                               "this is a features_only model, call it directly for the stage maps")
        return self.norm(self.forward_stages(x)[-1].mean([-2, -1]))

    def forward(self, x: torch.Tensor):
        if self.features_only:
            outs = self.forward_stages(x)
            return [outs[i] for i in self.out_indices]
        return self.head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """Official init: truncated normal (std .02, cut at +-2 absolute) weights, zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor],
                        out_indices: Sequence[int] = (0, 1, 2, 3)) -> dict[str, torch.Tensor]:
    """Official classifier state dict -> the state dict of a ``features_only`` model
    with these ``out_indices`` (drops ``norm``/``head`` and stages not built), for a
    strict load. Accepts the official checkpoint file's ``{"model": state_dict}`` too."""
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    built = max(out_indices) + 1
    kept = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("norm", "head"):
            continue
        if parts[0] in ("downsample_layers", "stages") and len(parts) > 1 \
                and parts[1].isdigit() and int(parts[1]) >= built:
            continue
        kept[key] = value
    return kept


def _variant_signature() -> inspect.Signature:
    params = [p for name, p in inspect.signature(ConvNeXtV2.__init__).parameters.items()
              if name not in ("self", "depths", "dims")]
    return inspect.Signature(params)


def _register_variant(size: str) -> None:
    arch = VARIANTS[size]

    def build(**kwargs) -> ConvNeXtV2:
        return ConvNeXtV2(depths=arch["depths"], dims=arch["dims"], **kwargs)

    build.__name__ = build.__qualname__ = f"convnextv2_{size}"
    build.__doc__ = f"ConvNeXt V2 {size}: depths {list(arch['depths'])}, dims {list(arch['dims'])}."
    build.__signature__ = _variant_signature()  # lets create_model name a bad keyword up front
    register_model(build.__name__)(build)


for _size in VARIANTS:
    _register_variant(_size)
