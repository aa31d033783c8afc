"""FCMAE: the dense emulation of the sparse encoder against an explicit sparse computation
(gather visible positions, compute each op from visible inputs only) in float64, the
masked-patch loss against a per-patch float64 reference, patch masking (random and
disjoint), and the encoder's weights loading into ConvNeXt V2 models and from the
official checkpoint layouts."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.models import ConvNeXtV2, create_model, list_models
from edgekit.models.fcmae import (FCMAE, dense_from_minkowski, encoder_state_dict, fcmae_from_name,
                                  fcmae_state_from_official, load_fcmae_state, load_pretrained_encoder,
                                  masked_encoder_forward)
from edgekit.models.masking import (disjoint_masks, generate_masks, mask_grid, mask_to_map, max_disjoint_views,
                                    num_masked, random_mask)
from conftest import one_line_error
from reference_convnextv2_official import official_model

pytestmark = pytest.mark.usefixtures("fresh_torch_seed", "one_thread")


def randomise(module, scale=0.3):
    """Perturb every parameter: a fresh model's GRN is the identity (gamma = beta = 0)
    and its LayerNorms are plain standardisation, which would test nothing."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith((".gamma", ".beta")):
                p.normal_(0.0, 0.5)
            elif p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.add_(torch.randn_like(p) * scale / math.sqrt(p[0].numel()))
    return module


# --- an explicit sparse encoder: rows of visible positions, gathers by coordinate -------

class Sparse:
    """Per image: visible coordinates (k, 2) and their features (k, C)."""

    def __init__(self, coords, feats, shape):
        self.coords, self.feats, self.shape = coords, feats, shape

    def index_map(self, n):
        index = torch.full(self.shape, -1, dtype=torch.long)
        index[self.coords[n][:, 0], self.coords[n][:, 1]] = torch.arange(len(self.coords[n]))
        return index

    def gather(self, n, rows, cols):
        """Features at (rows, cols) where visible, zero rows elsewhere or off the map."""
        h, w = self.shape
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        index = torch.full(rows.shape, -1, dtype=torch.long)
        index[inside] = self.index_map(n)[rows[inside], cols[inside]]
        out = torch.zeros(len(rows), self.feats[n].shape[1], dtype=self.feats[n].dtype)
        out[index >= 0] = self.feats[n][index[index >= 0]]
        return out


def sparse_depthwise(x, conv):
    k = conv.kernel_size[0]
    feats = []
    for n, coords in enumerate(x.coords):
        out = conv.bias.expand(len(coords), -1).clone()
        for a in range(k):
            for b in range(k):
                neighbour = x.gather(n, coords[:, 0] + a - k // 2, coords[:, 1] + b - k // 2)
                out = out + neighbour * conv.weight[:, 0, a, b]
        feats.append(out)
    return Sparse(x.coords, feats, x.shape)


def sparse_downsample(x, norm, conv):
    """LayerNorm per row, then a 2x2 stride-2 conv whose outputs exist where any input does."""
    rows = [F.layer_norm(f, f.shape[1:], norm.weight, norm.bias, norm.eps) for f in x.feats]
    normed = Sparse(x.coords, rows, x.shape)
    coords, feats = [], []
    for n, c in enumerate(x.coords):
        out_coords = torch.unique(c // 2, dim=0)
        out = conv.bias.expand(len(out_coords), -1).clone()
        for a in range(2):
            for b in range(2):
                inputs = normed.gather(n, 2 * out_coords[:, 0] + a, 2 * out_coords[:, 1] + b)
                out = out + inputs @ conv.weight[:, :, a, b].T
        coords.append(out_coords)
        feats.append(out)
    return Sparse(coords, feats, (x.shape[0] // 2, x.shape[1] // 2))


def sparse_block(x, block, stats):
    y = sparse_depthwise(x, block.dwconv)
    hidden = [block.act(block.pwconv1(F.layer_norm(f, f.shape[1:], block.norm.weight, block.norm.bias, 1e-6)))
              for f in y.feats]
    if stats == "sample":
        norms = [torch.linalg.vector_norm(h, dim=0) for h in hidden]
    else:  # the official MinkowskiGRN: one norm over every visible row of the batch
        pooled = torch.linalg.vector_norm(torch.cat(hidden), dim=0)
        norms = [pooled] * len(hidden)
    gamma, beta = block.grn.gamma.reshape(-1), block.grn.beta.reshape(-1)
    feats = []
    for f, h, g in zip(x.feats, hidden, norms):
        h = gamma * (h * (g / (g.mean() + 1e-6))) + beta + h
        feats.append(f + block.pwconv2(h))
    return Sparse(x.coords, feats, x.shape)


def sparse_encoder(encoder, imgs, mask, patch, stats):
    """The official sparse encoder, written out: the stem densely on the image, then
    only visible positions (from the patch mask at stride 4) carried through."""
    stem = encoder.downsample_layers[0](imgs)
    h, w = stem.shape[-2:]
    grid_w = imgs.shape[-1] // patch
    coords, feats = [], []
    for n in range(imgs.shape[0]):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        patch_index = (ys * 4 // patch) * grid_w + (xs * 4 // patch)
        keep = mask[n][patch_index] == 0
        c = torch.stack([ys[keep], xs[keep]], dim=1)
        coords.append(c)
        feats.append(stem[n, :, c[:, 0], c[:, 1]].T)
    x = Sparse(coords, feats, (h, w))
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            x = sparse_downsample(x, *encoder.downsample_layers[i])
        for block in stage:
            x = sparse_block(x, block, stats)
    return x


@pytest.mark.parametrize("stats", ["sample", "batch"])
def test_masked_encoder_equals_explicit_sparse_computation(stats):
    model = randomise(FCMAE(decoder_dim=16, grn_stats=stats, grn_backend="torch")).double().eval()
    imgs = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    mask = random_mask(2, (3, 2), 0.5).double()
    with torch.no_grad():
        ours = model.forward_encoder(imgs, mask)
        ref = sparse_encoder(model.encoder, imgs, mask, 32, stats)
    for n in range(2):
        visible = (mask[n] == 0).reshape(3, 2)
        expected_coords = visible.nonzero()
        assert torch.equal(ref.coords[n], expected_coords)  # the reference kept exactly the visible patches
        got = ours[n, :, expected_coords[:, 0], expected_coords[:, 1]].T
        scale = ref.feats[n].abs().max()
        assert torch.allclose(got, ref.feats[n], rtol=0, atol=1e-10 * scale), (got - ref.feats[n]).abs().max()
        assert torch.all(ours[n][:, ~visible] == 0)


def test_batch_grn_statistics_couple_images_and_sample_statistics_do_not():
    model = randomise(FCMAE(decoder_dim=16, grn_backend="torch")).eval()
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, (2, 2), 0.5)
    other = imgs.clone()
    other[1] = torch.randn_like(other[1])
    with torch.no_grad():
        alone = model.forward_encoder(imgs, mask)[0]
        assert torch.equal(model.forward_encoder(other, mask)[0], alone)
        model.grn_stats = "batch"
        a, b = model.forward_encoder(imgs, mask)[0], model.forward_encoder(other, mask)[0]
    assert not torch.allclose(a, b)


def test_visible_outputs_ignore_masked_pixels():
    model = randomise(FCMAE(decoder_dim=16, grn_backend="torch")).eval()
    imgs = torch.randn(2, 3, 64, 96)
    mask = random_mask(2, (2, 3), 0.6)
    pixels = mask_to_map(mask, (2, 3), 32).bool().expand_as(imgs)
    changed = imgs.clone()
    changed[pixels] = torch.randn(int(pixels.sum())) * 10
    with torch.no_grad():
        assert torch.equal(model.forward_encoder(imgs, mask), model.forward_encoder(changed, mask))
        # ...while the dense encoder does read them
        assert not torch.allclose(model.encoder(imgs)[0], model.encoder(changed)[0])


def test_all_visible_emulation_is_the_dense_convnextv2():
    model = randomise(FCMAE(decoder_dim=16, grn_backend="torch")).eval()
    imgs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = masked_encoder_forward(model.encoder, imgs, torch.ones(1, 1, 16, 16))
        dense = model.encoder(imgs)[0]
    assert torch.equal(ours, dense)


# --- loss ---------------------------------------------------------------------------------

def reference_loss(imgs, pred, mask, patch, norm_pix):
    """float64 numpy: the predicted image from the official channel layout (pixel (y, x, c)
    of a 32x32 decoder cell at channel (y*32 + x)*3 + c), per-patch MSE over masked patches."""
    imgs, pred, mask = imgs.numpy(), pred.detach().numpy(), mask.numpy()
    n, c, height, width = imgs.shape
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.empty_like(imgs)
    for ch in range(c):
        image[:, ch] = pred[:, ((ys % 32) * 32 + xs % 32) * c + ch, ys // 32, xs // 32]
    grid_w = width // patch
    losses = []
    for i in range(n):
        for k in np.flatnonzero(mask[i]):
            gy, gx = divmod(k, grid_w)
            window = np.s_[:, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch]
            target = imgs[i][window].transpose(1, 2, 0).ravel()
            guess = image[i][window].transpose(1, 2, 0).ravel()
            if norm_pix:
                target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
            losses.append(np.mean((guess - target) ** 2))
    return float(np.mean(losses))


@pytest.mark.parametrize("patch,norm_pix", [(32, True), (32, False), (64, True)])
def test_loss_matches_reference_and_ignores_visible_patches(patch, norm_pix):
    model = FCMAE(decoder_dim=16, patch_size=patch, norm_pix_loss=norm_pix, grn_backend="torch").double()
    imgs = torch.randn(2, 3, 128, 192, dtype=torch.float64)
    grid = (128 // patch, 192 // patch)
    mask = random_mask(2, grid, 0.6).double()
    pred = torch.randn(2, 32 * 32 * 3, 4, 6, dtype=torch.float64, requires_grad=True)
    loss = model.forward_loss(imgs, pred, mask)
    assert abs(loss.item() - reference_loss(imgs, pred, mask, patch, norm_pix)) < 1e-10 * loss.item()
    loss.backward()
    masked_cells = mask_to_map(mask, grid, patch // 32).bool().expand(-1, pred.shape[1], -1, -1)
    assert torch.all(pred.grad[~masked_cells] == 0)
    cell_grad = pred.grad.abs().sum(1)  # (N, H/32, W/32)
    assert torch.all(cell_grad[masked_cells[:, 0]] > 0)
    with torch.no_grad():
        moved = pred + torch.randn_like(pred) * (~masked_cells)
        assert model.forward_loss(imgs, moved, mask).item() == loss.item()


def test_forward_trains_end_to_end_and_reconstruct_keeps_visible_patches():
    model = FCMAE(decoder_dim=16, grn_backend="torch")
    imgs = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 3072, 2, 2) and mask.shape == (2, 4) and torch.all(mask.sum(1) == num_masked(4, 0.6))
    loss.backward()
    assert model.encoder.stages[0][0].dwconv.weight.grad.abs().sum() > 0 and model.mask_token.grad.abs().sum() > 0
    out = model.reconstruct(imgs, mask)
    pixels = mask_to_map(mask, (2, 2), 32).bool().expand_as(imgs)
    assert torch.equal(out[~pixels], imgs[~pixels]) and not torch.allclose(out[pixels], imgs[pixels])


# --- masking --------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.6), ((4, 5), 0.25), ((3, 3), 0.3), ((10, 1), 0.9)])
def test_disjoint_views_do_not_overlap_and_keep_the_ratio(grid, ratio):
    num = grid[0] * grid[1]
    expected = num - int(round(num * (1 - ratio), 9))  # the official int(L * (1 - ratio)), exact in decimals
    assert num_masked(num, ratio) == expected
    views = max_disjoint_views(num, ratio)
    assert views == num // expected
    masks = generate_masks("disjoint", 5, grid, ratio, views).reshape(5, views, num)
    assert torch.all(masks.sum(-1) == expected)
    assert torch.all(masks.sum(1) <= 1)  # no patch masked in two views
    random = generate_masks("random", 5, grid, ratio, views)
    assert random.shape == (5 * views, num) and torch.all(random.sum(-1) == expected)


def test_too_many_disjoint_views_overlap_as_little_as_possible():
    ratio, views = 0.6, 3  # 3 views x 12 masked > 20 patches
    masks = disjoint_masks(50, (4, 5), ratio, views)
    assert torch.all(masks.sum(-1) == 12)
    counts = masks.sum(1)  # times each patch is masked
    assert torch.all((counts == 1) | (counts == 2)) and torch.all(counts.sum(-1) == 36)


def test_random_masks_are_uniform_over_patches():
    masks = random_mask(4000, (2, 3), 0.5)
    frequency = masks.mean(0)
    assert torch.all((frequency - 0.5).abs() < 0.04), frequency  # 0.5 +- 5 standard errors (0.0079)


def test_mask_setup_errors_are_one_line():
    assert mask_grid((64, 96), 32, 0.6) == (2, 3)
    for ratio in (0.0, 1.0, -0.1, 1.5):
        assert "outside (0, 1)" in one_line_error(mask_grid, 64, 32, ratio)
    assert "does not divide" in one_line_error(mask_grid, (64, 80), 32, 0.6)
    assert "both must be >= 1" in one_line_error(mask_grid, (32, 32), 32, 0.5)  # one patch cannot be split
    assert "unknown kind" in one_line_error(generate_masks, "checkerboard", 1, (2, 2), 0.5)
    assert "views" in one_line_error(generate_masks, "disjoint", 1, (2, 2), 0.5, views=0)
    assert "multiple of the encoder stride" in one_line_error(FCMAE, patch_size=16)
    assert "no FCMAE form" in one_line_error(FCMAE, encoder_name="rsdet_atto")
    with pytest.raises(EdgekitError, match="does not divide"):
        FCMAE(decoder_dim=16)(torch.zeros(1, 3, 64, 80))


# --- weights in and out -------------------------------------------------------------------

def test_encoder_loads_strictly_into_convnextv2_and_detector_backbone():
    fcmae = randomise(FCMAE(decoder_dim=16, grn_backend="torch")).eval()
    state = fcmae.state_dict()
    classifier = create_model("convnextv2_atto", grn_backend="torch").eval()
    head_before = classifier.head.weight.clone()
    assert load_pretrained_encoder(classifier, state) == len(classifier.state_dict())
    assert torch.equal(classifier.head.weight, head_before)  # the head is the model's own
    detector = create_model("rsdet_atto", num_classes=3, grn_backend="torch").eval()
    load_pretrained_encoder(detector, state)
    imgs = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = fcmae.encoder(imgs)[0]
        assert torch.equal(classifier.forward_stages(imgs)[-1], expected)
        assert torch.equal(detector.backbone(imgs)[-1], expected)
    femto = create_model("convnextv2_femto")
    assert "do not fit" in one_line_error(load_pretrained_encoder, femto, state)
    assert "no ConvNeXt V2 backbone" in one_line_error(load_pretrained_encoder, torch.nn.Linear(2, 2), state)
    assert "no ConvNeXt V2 encoder weights" in one_line_error(encoder_state_dict, {"pred.weight": torch.zeros(1)})


def minkowski_kernel(weight):
    """MinkowskiEngine's kernel layout from the official module layout: (k*k, in, out),
    depthwise (k*k, C), kernel offsets enumerated with the first spatial axis fastest
    (the order the official remap_checkpoint_keys undoes)."""
    out_ch, in_ch, k, _ = weight.shape
    depthwise = in_ch == 1
    kernel = torch.empty((k * k, out_ch) if depthwise else (k * k, in_ch, out_ch), dtype=weight.dtype)
    for a in range(k):
        for b in range(k):
            kernel[b * k + a] = weight[:, 0, a, b] if depthwise else weight[:, :, a, b].T
    return kernel


def official_fcmae_state(model):
    """The state dict the official FCMAE (SparseConvNeXtV2 encoder, D=2) would hold for
    these weights, its keys written out from the official module layout."""
    dense = model.state_dict()
    state = {}
    for k in ("mask_token", "proj.weight", "proj.bias", "pred.weight", "pred.bias"):
        state[k] = dense[k]
    state.update({k: v for k, v in dense.items() if k.startswith("decoder.")})  # dense convnextv2.Block
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):  # stem: nn.Conv2d + dense LayerNorm
        state[f"encoder.downsample_layers.0.{k}"] = dense[f"encoder.downsample_layers.0.{k}"]
    for i in range(1, 4):
        d = f"encoder.downsample_layers.{i}"
        state[f"{d}.0.ln.weight"], state[f"{d}.0.ln.bias"] = dense[f"{d}.0.weight"], dense[f"{d}.0.bias"]
        state[f"{d}.1.kernel"] = minkowski_kernel(dense[f"{d}.1.weight"])
        state[f"{d}.1.bias"] = dense[f"{d}.1.bias"][None, :]
    for i, stage in enumerate(model.encoder.stages):
        for j in range(len(stage)):
            b = f"encoder.stages.{i}.{j}"
            state[f"{b}.dwconv.kernel"] = minkowski_kernel(dense[f"{b}.dwconv.weight"])
            state[f"{b}.dwconv.bias"] = dense[f"{b}.dwconv.bias"][None, :]
            state[f"{b}.norm.ln.weight"] = dense[f"{b}.norm.weight"]
            state[f"{b}.norm.ln.bias"] = dense[f"{b}.norm.bias"]
            for lin in ("pwconv1", "pwconv2"):
                state[f"{b}.{lin}.linear.weight"] = dense[f"{b}.{lin}.weight"]
                state[f"{b}.{lin}.linear.bias"] = dense[f"{b}.{lin}.bias"]
            state[f"{b}.grn.gamma"] = dense[f"{b}.grn.gamma"].reshape(1, -1)  # MinkowskiGRN: (1, dim)
            state[f"{b}.grn.beta"] = dense[f"{b}.grn.beta"].reshape(1, -1)
    assert len(state) == len(dense)
    return state


def test_official_fcmae_layout_loads(tmp_path):
    source = randomise(FCMAE(decoder_dim=16, grn_backend="torch")).eval()
    official = official_fcmae_state(source)
    target = load_fcmae_state(FCMAE(decoder_dim=16, grn_backend="torch"), {"model": official})
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    # the encoder part, straight from the official layout into the official dense ConvNeXt V2
    reference = official_model("atto").eval()
    missing = reference.load_state_dict(encoder_state_dict(official), strict=False)
    assert set(missing.missing_keys) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert not missing.unexpected_keys
    # conversion is idempotent on dense keys, and a file of released encoder-only weights loads
    assert fcmae_state_from_official(source.state_dict()).keys() == source.state_dict().keys()
    assert dense_from_minkowski("stages.0.0.dwconv.weight", official["decoder.0.dwconv.weight"])[0] \
        == "stages.0.0.dwconv.weight"
    released = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": encoder_state_dict(source.state_dict())}, released)
    classifier = create_model("convnextv2_atto", grn_backend="torch").eval()
    load_pretrained_encoder(classifier, released)
    imgs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(classifier.forward_stages(imgs)[-1], source.encoder(imgs)[0])
    assert isinstance(classifier, ConvNeXtV2)
    with_args = tmp_path / "checkpoint-799.pth"  # what the official main_pretrain.py saves
    torch.save({"model": official, "args": argparse.Namespace(mask_ratio=0.6), "epoch": 799}, with_args)
    assert "holds more than tensors" in one_line_error(load_pretrained_encoder, classifier, with_args)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert "cannot read pretrained weights" in one_line_error(load_pretrained_encoder, classifier, bad)
    assert "not found" in one_line_error(load_pretrained_encoder, classifier, tmp_path / "missing.safetensors")


def test_fcmae_rebuilds_from_its_name_and_stays_out_of_the_registry():
    model = fcmae_from_name("fcmae_convnextv2_atto", decoder_dim=16, mask_ratio=0.5)
    assert isinstance(model, FCMAE) and model.config()["mask_ratio"] == 0.5 and model.encoder_name == "convnextv2_atto"
    assert not list_models("fcmae*")  # not a deployable model: the registry's stages do not apply
    assert "decoder_width" in one_line_error(fcmae_from_name, "fcmae_convnextv2_atto", decoder_width=3)
    assert "not an FCMAE name" in one_line_error(fcmae_from_name, "convnextv2_atto")
    assert "no FCMAE form" in one_line_error(fcmae_from_name, "fcmae_rsdet_atto")
