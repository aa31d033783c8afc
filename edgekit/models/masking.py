"""Patch masks for masked-image pretraining: random masking (MAE / FCMAE) and disjoint
multi-view masking (DMJD, Ma et al. 2022).

A mask is a float tensor over the patch grid, flattened row-major to ``L = grid_h * grid_w``
entries: 1 marks a masked (removed) patch, 0 a visible one, as in the official FCMAE code.
Every mask of a given ``(L, mask_ratio)`` removes exactly :func:`num_masked` patches.

Disjoint masking gives each image ``views`` masks whose masked sets do not overlap, so the
views together ask the model to reconstruct more of the image per visible-pixel budget.
Strict disjointness needs ``views * num_masked <= L`` (about ``views <= 1 / mask_ratio``);
beyond that the views are laid round a random permutation of the patches cyclically, so
every patch is masked in either ``floor(views * M / L)`` or ``ceil(views * M / L)`` views
(the least overlap possible) and each view still masks exactly ``M`` distinct patches.
"""

from __future__ import annotations

import torch

from edgekit.errors import EdgekitError

MASKINGS = ("random", "disjoint")


def mask_grid(input_size: tuple[int, int] | int, patch_size: int, mask_ratio: float,
              where: str = "masking") -> tuple[int, int]:
    """The patch grid ``(grid_h, grid_w)`` of an input, after checking the setup; a bad
    ratio or a patch size that does not divide the input is one :class:`EdgekitError` line."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    if not (isinstance(mask_ratio, (int, float)) and 0.0 < mask_ratio < 1.0):
        raise EdgekitError(f"{where}: mask ratio {mask_ratio!r} is outside (0, 1); use e.g. 0.6")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise EdgekitError(f"{where}: patch size {patch_size!r} must be a positive integer, e.g. 32")
    if height % patch_size or width % patch_size or height < 1 or width < 1:
        raise EdgekitError(f"{where}: patch size {patch_size} does not divide the input size {height}x{width}; "
                           f"use an input size that is a multiple of {patch_size}")
    grid = (height // patch_size, width // patch_size)
    num_masked(grid[0] * grid[1], mask_ratio, where)
    return grid


def num_masked(num_patches: int, mask_ratio: float, where: str = "masking") -> int:
    """Patches removed per mask: ``L - int(L * (1 - ratio))`` as the official code keeps
    ``int(L * (1 - ratio))``; the tiny epsilon stops float error (10 * (1 - 0.9) is
    0.99999...) from dropping a kept patch. At least one patch must stay and one go."""
    keep = int(num_patches * (1.0 - mask_ratio) + 1e-9)
    masked = num_patches - keep
    if keep < 1 or masked < 1:
        raise EdgekitError(f"{where}: mask ratio {mask_ratio} on {num_patches} patches leaves "
                           f"{keep} visible and {masked} masked; both must be >= 1, so use a larger input "
                           f"or a ratio nearer 0.5")
    return masked


def max_disjoint_views(num_patches: int, mask_ratio: float) -> int:
    """The most views whose masked sets can be strictly disjoint: ``L // num_masked``."""
    return num_patches // num_masked(num_patches, mask_ratio)


def random_mask(batch: int, grid: tuple[int, int], mask_ratio: float,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(batch, L) masks, each removing the same number of uniformly chosen patches."""
    num_patches = grid[0] * grid[1]
    masked = num_masked(num_patches, mask_ratio)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_patches)
    mask.scatter_(1, order[:, :masked], 1.0)
    return mask.to(device) if device is not None else mask


def disjoint_masks(batch: int, grid: tuple[int, int], mask_ratio: float, views: int,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(batch, views, L) masks; view k removes the patches at positions
    ``k*M .. k*M + M - 1`` (mod L) of a random permutation, so the views are disjoint
    while ``views * M <= L`` and overlap as little as possible otherwise."""
    if views < 1:
        raise EdgekitError(f"masking: views={views} must be >= 1")
    num_patches = grid[0] * grid[1]
    masked = num_masked(num_patches, mask_ratio)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    slots = (torch.arange(views)[:, None] * masked + torch.arange(masked)[None, :]) % num_patches
    chosen = order[:, slots]  # (batch, views, M)
    mask = torch.zeros(batch, views, num_patches)
    mask.scatter_(2, chosen, 1.0)
    return mask.to(device) if device is not None else mask


def generate_masks(kind: str, batch: int, grid: tuple[int, int], mask_ratio: float, views: int = 1,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(batch * views, L) masks, the views of one image adjacent (image i's view k at
    row ``i * views + k``): independent random masks, or disjoint ones."""
    if kind not in MASKINGS:
        raise EdgekitError(f"masking: unknown kind {kind!r}; use one of {', '.join(MASKINGS)}")
    if views < 1:
        raise EdgekitError(f"masking: views={views} must be >= 1")
    if kind == "random":
        mask = random_mask(batch * views, grid, mask_ratio, generator, device)
    else:
        mask = disjoint_masks(batch, grid, mask_ratio, views, generator, device)
    return mask.reshape(batch * views, grid[0] * grid[1])


def mask_to_map(mask: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """(N, L) patch mask -> (N, 1, grid_h * scale, grid_w * scale) map, each patch
    repeated over a scale x scale block (the official ``upsample_mask``, non-square too)."""
    n = mask.shape[0]
    return (mask.reshape(n, 1, grid[0], grid[1])
            .repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3))
