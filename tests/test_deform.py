"""Deformable convolution: the reference against a literal float64 loop version of
torchvision's CPU kernel (forward and backward), finite differences, F.conv2d, the
modules' documented initial behaviour, and the ops dispatch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deform_cases import describe, fresh_seed, random_deform_case, run_case, tensor_args
from edgekit import ops
from edgekit.errors import BackendUnavailableError
from edgekit.models.deform import (DeformableSkip, DeformConv2d, DeformConv2dPack, deform_conv2d_reference,
                                   deform_geometry)


# --- torchvision's CPU kernel, written out literally (deform_conv2d_kernel.cpp) ---------

def tv_bilinear(img, h, w):
    """bilinear_interpolate(): 0 outside (-1, H) x (-1, W); corners off the map read 0."""
    height, width = img.shape
    if h <= -1 or height <= h or w <= -1 or width <= w:
        return 0.0
    h_low, w_low = math.floor(h), math.floor(w)
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = h - h_low, w - w_low
    hh, hw = 1 - lh, 1 - lw
    v1 = img[h_low, w_low] if h_low >= 0 and w_low >= 0 else 0.0
    v2 = img[h_low, w_high] if h_low >= 0 and w_high <= width - 1 else 0.0
    v3 = img[h_high, w_low] if h_high <= height - 1 and w_low >= 0 else 0.0
    v4 = img[h_high, w_high] if h_high <= height - 1 and w_high <= width - 1 else 0.0
    return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4


def tv_coordinate_weight(img, y, x, is_y):
    """get_coordinate_weight(): d(sample)/dy or d/dx, one-sided (floor) at integers."""
    height, width = img.shape
    y_l, x_l = math.floor(y), math.floor(x)
    y_h, x_h = y_l + 1, x_l + 1

    def v(r, c):
        return img[r, c] if 0 <= r < height and 0 <= c < width else 0.0

    if is_y:
        dx = x - x_l
        return dx * (v(y_h, x_h) - v(y_l, x_h)) + (1 - dx) * (v(y_h, x_l) - v(y_l, x_l))
    dy = y - y_l
    return dy * (v(y_h, x_h) - v(y_h, x_l)) + (1 - dy) * (v(y_l, x_h) - v(y_l, x_l))


def _samples(case):
    """Yield (b, c, i, j, oy, ox, g, y, x, m) for every sample, as the kernel's loops do."""
    x, off = case["input"].detach().numpy(), case["offset"].detach().numpy()
    mask = None if case["mask"] is None else case["mask"].detach().numpy()
    batch, channels = x.shape[:2]
    kh, kw = case["kernel"]
    (sh, sw), (ph, pw), (dh, dw) = case["stride"], case["padding"], case["dilation"]
    og = off.shape[1] // (2 * kh * kw)
    for b in range(batch):
        for c in range(channels):
            g = c // (channels // og)
            for i in range(kh):
                for j in range(kw):
                    k = g * kh * kw + i * kw + j
                    for oy in range(off.shape[2]):
                        for ox in range(off.shape[3]):
                            y = oy * sh - ph + i * dh + off[b, 2 * k, oy, ox]
                            xx = ox * sw - pw + j * dw + off[b, 2 * k + 1, oy, ox]
                            m = 1.0 if mask is None else mask[b, k, oy, ox]
                            yield b, c, i, j, oy, ox, k, y, xx, m


def naive_forward(case):
    """Output and columns [B, C, kh, kw, Ho, Wo] of deform_conv2d, in float64 loops."""
    x = case["input"].detach().numpy().astype(np.float64)
    w = case["weight"].detach().numpy().astype(np.float64)
    ho, wo = case["offset"].shape[2:]
    cols = np.zeros((*x.shape[:2], *case["kernel"], ho, wo))
    for b, c, i, j, oy, ox, _, y, xx, m in _samples(case):
        cols[b, c, i, j, oy, ox] = m * tv_bilinear(x[b, c], y, xx)
    groups = x.shape[1] // w.shape[1]
    cg, og_ = w.shape[1], w.shape[0] // groups
    out = np.concatenate([np.einsum("ocij,bcijyx->boyx", w[g * og_:(g + 1) * og_], cols[:, g * cg:(g + 1) * cg])
                          for g in range(groups)], axis=1)
    if case["bias"] is not None:
        out = out + case["bias"].detach().numpy()[None, :, None, None]
    return out, cols


def naive_backward(case, grad_out):
    """Gradients (input, offset, mask, weight, bias) as torchvision's backward computes them."""
    x = case["input"].detach().numpy().astype(np.float64)
    w = case["weight"].detach().numpy().astype(np.float64)
    _, cols = naive_forward(case)
    groups = x.shape[1] // w.shape[1]
    cg, og_ = w.shape[1], w.shape[0] // groups
    grad_cols = np.concatenate([np.einsum("ocij,boyx->bcijyx", w[g * og_:(g + 1) * og_],
                                          grad_out[:, g * og_:(g + 1) * og_]) for g in range(groups)], axis=1)
    grad_w = np.concatenate([np.einsum("boyx,bcijyx->ocij", grad_out[:, g * og_:(g + 1) * og_],
                                       cols[:, g * cg:(g + 1) * cg]) for g in range(groups)], axis=0)
    grad_x = np.zeros_like(x)
    grad_off = np.zeros(case["offset"].shape)
    grad_mask = None if case["mask"] is None else np.zeros(case["mask"].shape)
    height, width = x.shape[2:]
    for b, c, i, j, oy, ox, k, y, xx, m in _samples(case):
        gc = grad_cols[b, c, i, j, oy, ox]
        img = x[b, c]
        grad_off[b, 2 * k, oy, ox] += gc * m * tv_coordinate_weight(img, y, xx, True)
        grad_off[b, 2 * k + 1, oy, ox] += gc * m * tv_coordinate_weight(img, y, xx, False)
        if grad_mask is not None:
            grad_mask[b, k, oy, ox] += gc * tv_bilinear(img, y, xx)
        for yp in (int(y) - 1, int(y), int(y) + 1):  # deformable_col2im_kernel (int() truncates)
            for xp in (int(xx) - 1, int(xx), int(xx) + 1):
                if 0 <= yp < height and 0 <= xp < width and abs(y - yp) < 1 and abs(xx - xp) < 1:
                    grad_x[b, c, yp, xp] += m * (1 - abs(y - yp)) * (1 - abs(xx - xp)) * gc
    grad_b = grad_out.sum(axis=(0, 2, 3))
    return grad_x, grad_off, grad_mask, grad_w, grad_b


def _rng():
    seed = fresh_seed()
    return seed, np.random.default_rng(seed)


# --- the reference against the literal kernel --------------------------------------------

def test_reference_matches_torchvision_loops_forward():
    seed, rng = _rng()
    for n in range(60):
        case = random_deform_case(rng, max_size=7)
        want, _ = naive_forward(case)
        got = run_case(deform_conv2d_reference, case).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11,
                                   err_msg=f"seed {seed}, case {n}: {describe(case)}")


def test_reference_backward_matches_torchvision_backward_at_borders_and_integers():
    """At integer and border positions bilinear interpolation has kinks, where finite
    differences say nothing; the gradient must then be torchvision's (floor-based) one."""
    seed, rng = _rng()
    for n in range(15):
        case = random_deform_case(rng, max_size=6, offset_kinds=("integer", "border", "smooth"),
                                  requires_grad=True)
        out = run_case(deform_conv2d_reference, case)
        grad_out = rng.normal(size=out.shape)
        out.backward(torch.from_numpy(grad_out))
        names = ("input", "offset", "mask", "weight", "bias")
        for name, want in zip(names, naive_backward(case, grad_out)):
            if want is None or case[name] is None:
                continue
            np.testing.assert_allclose(case[name].grad.numpy(), want, rtol=1e-10, atol=1e-10,
                                       err_msg=f"grad of {name}; seed {seed}, case {n}: {describe(case)}")


def test_exact_borders_sample_zero():
    """A sample exactly at y = -1 or y = H (or x = -1 / W) reads 0; just inside it does not."""
    x = torch.rand(1, 1, 4, 5, dtype=torch.float64) + 1
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for dy, dx, zero in ((-1, 0, True), (4, 0, True), (0, -1, True), (0, 5, True),
                         (-0.75, 0, False), (3.5, 0, False), (0, 4.25, False)):
        off = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
        off[0, 0, 0, 0], off[0, 1, 0, 0] = dy, dx
        got = deform_conv2d_reference(x, off, w)[0, 0, 0, 0].item()
        assert (got == 0.0) == zero, (dy, dx, got)
        assert got == pytest.approx(tv_bilinear(x[0, 0].numpy(), dy, dx), abs=1e-14)


@pytest.mark.parametrize("config", [
    dict(groups=1, offset_groups=1, kernel=3, stride=1, padding=1, dilation=1),
    dict(groups=2, offset_groups=2, kernel=(2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    dict(groups=1, offset_groups=3, kernel=4, stride=1, padding=2, dilation=1, batch=2, size=(3, 4)),
])
def test_gradcheck_float64(config):
    seed, rng = _rng()
    case = random_deform_case(rng, **config, use_mask=True, use_bias=True, max_size=4,
                              offset_kinds=("smooth",), offset_scale=1.0, requires_grad=True)
    inputs = tuple(case[k] for k in ("input", "offset", "mask", "weight", "bias"))

    def fn(x, off, mask, w, b):
        return deform_conv2d_reference(x, off, w, b, case["stride"], case["padding"], case["dilation"], mask)

    # Large cases are checked on random projections (fast_mode) to keep the test quick.
    fast = sum(t.numel() for t in inputs) > 600
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast), f"seed {seed}: {describe(case)}"


def test_zero_offsets_without_mask_equal_conv2d():
    seed, rng = _rng()
    for n in range(20):
        case = random_deform_case(rng, use_mask=False)
        case["offset"] = torch.zeros_like(case["offset"])
        want = F.conv2d(case["input"], case["weight"], case["bias"], case["stride"], case["padding"],
                        case["dilation"], case["groups"])
        torch.testing.assert_close(run_case(deform_conv2d_reference, case), want, rtol=1e-12, atol=1e-12,
                                   msg=f"seed {seed}, case {n}: {describe(case)}")


def test_low_precision_inputs_keep_their_dtype_and_match_float32():
    seed, rng = _rng()
    case = random_deform_case(rng, dtype=torch.float32, max_size=8)
    want = run_case(deform_conv2d_reference, case)
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        low = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        got = run_case(deform_conv2d_reference, low)
        assert got.dtype == dtype
        # Inputs are rounded to the low precision, so compare against float32 on those values.
        ref32 = run_case(deform_conv2d_reference,
                         {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in low.items()})
        torch.testing.assert_close(got.float(), ref32, rtol=tol, atol=tol, msg=f"seed {seed}: {describe(case)}")
    assert want.dtype == torch.float32


def test_noncontiguous_inputs_and_empty_batch():
    seed, rng = _rng()
    case = random_deform_case(rng, max_size=7)
    want = run_case(deform_conv2d_reference, case)
    strided = dict(case, input=case["input"].contiguous(memory_format=torch.channels_last),
                   offset=case["offset"].transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(run_case(deform_conv2d_reference, strided), want, msg=f"seed {seed}")
    empty = {k: v[:0] if k in ("input", "offset", "mask") and v is not None else v for k, v in case.items()}
    assert run_case(deform_conv2d_reference, empty).shape == (0, *want.shape[1:])


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(offset=c["offset"][:, :-1]), "offset.shape"),
    (lambda c: c.update(offset=c["offset"][:, :, :-1]), "offset has shape"),
    (lambda c: c.update(offset=c["offset"][:1].expand(3, -1, -1, -1)), "offset has shape"),
    (lambda c: c.update(mask=c["mask"][:, :-1]), "mask has shape"),
    (lambda c: c.update(weight=torch.rand(4, 3, 3, 3, dtype=c["input"].dtype)), "not a multiple"),
    (lambda c: c.update(weight=c["weight"][:-1]), "not divisible by groups"),
    (lambda c: c.update(bias=c["bias"][:-1]), "bias must have shape"),
    (lambda c: c.update(input=c["input"][0]), "4-D"),
    (lambda c: c.update(stride=(0, 1)), "stride"),
    (lambda c: c.update(input=c["input"][:, :, :1, :1], padding=(0, 0)), "too small"),
])
def test_invalid_arguments_raise_value_error(change, match):
    rng = np.random.default_rng(fresh_seed())
    case = random_deform_case(rng, batch=2, groups=2, offset_groups=1, in_channels=4, out_channels=4,
                              kernel=3, stride=1, padding=1, dilation=1, size=(5, 6), use_mask=True, use_bias=True)
    change(case)
    with pytest.raises(ValueError, match=match):
        run_case(deform_conv2d_reference, case)


def test_offset_groups_must_divide_channels():
    x, w = torch.rand(1, 4, 5, 5), torch.rand(2, 4, 3, 3)
    with pytest.raises(ValueError, match="offset_groups=3"):
        deform_conv2d_reference(x, torch.zeros(1, 54, 3, 3), w)
    assert deform_geometry(x, torch.zeros(1, 36, 3, 3), w).offset_groups == 2


# --- ops dispatch -----------------------------------------------------------------------

def test_ops_torch_backend_is_the_reference():
    seed, rng = _rng()
    case = random_deform_case(rng)
    got = ops.deform_conv2d(*tensor_args(case), backend="torch")
    assert torch.equal(got, run_case(deform_conv2d_reference, case)), f"seed {seed}"
    # ops also takes ints for stride/padding/dilation, as torchvision does.
    x, w = torch.rand(1, 2, 6, 6), torch.rand(3, 2, 3, 3)
    off = torch.randn(1, 18, 3, 3)
    torch.testing.assert_close(ops.deform_conv2d(x, off, w, None, 2, 1, 1, backend="torch"),
                               deform_conv2d_reference(x, off, w, None, (2, 2), (1, 1), (1, 1)))


def test_unknown_backend_raises():
    x, w, off = torch.rand(1, 2, 5, 5), torch.rand(3, 2, 3, 3), torch.zeros(1, 18, 3, 3)
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        ops.deform_conv2d(x, off, w, backend="no-such-backend")
    with pytest.raises(BackendUnavailableError):
        DeformConv2d(2, 3, 3, backend="no-such-backend")(x, off)


# --- modules ----------------------------------------------------------------------------

def test_deform_conv2d_module_matches_reference_and_checks_offset_groups():
    seed, rng = _rng()
    case = random_deform_case(rng, dtype=torch.float32, use_bias=True)
    x, w = case["input"], case["weight"]
    layer = DeformConv2d(x.shape[1], w.shape[0], case["kernel"], case["stride"], case["padding"], case["dilation"],
                         groups=case["groups"], offset_groups=case["offset_groups"], backend="torch")
    assert set(layer.state_dict()) == {"weight", "bias"} and layer.weight.shape == w.shape
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(case["bias"])
    torch.testing.assert_close(layer(x, case["offset"], case["mask"]), run_case(deform_conv2d_reference, case),
                               msg=f"seed {seed}: {describe(case)}")
    bad = DeformConv2d(x.shape[1], w.shape[0], case["kernel"], offset_groups=case["offset_groups"] + 1
                       if x.shape[1] % (case["offset_groups"] + 1) == 0 else 1)
    if bad.offset_groups != case["offset_groups"]:
        with pytest.raises(ValueError, match="2\\*offset_groups\\*kh\\*kw"):
            bad(x, case["offset"])
    with pytest.raises(ValueError, match="divisible by groups"):
        DeformConv2d(3, 4, 3, groups=2)


def _pack_config(rng):
    groups = int(rng.choice([1, 2]))
    og = int(rng.choice([1, 2]))
    return dict(in_channels=4, out_channels=2 * groups, kernel_size=(int(rng.integers(1, 4)), 3),
                stride=int(rng.integers(1, 3)), padding=1, dilation=int(rng.integers(1, 3)), groups=groups,
                offset_groups=og)


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_at_init_is_plain_conv(modulated):
    """Zero-initialised offsets: DCNv1 pack == Conv2d; DCNv2 pack == 0.5 * conv + bias."""
    seed, rng = _rng()
    cfg = _pack_config(rng)
    layer = DeformConv2dPack(**cfg, modulated=modulated, backend="torch").double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    conv = F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    want = (0.5 * conv if modulated else conv) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12, msg=f"seed {seed}: {cfg}")
    per_point = 3 if modulated else 2
    assert layer.conv_offset.out_channels == per_point * cfg["offset_groups"] * math.prod(layer.kernel_size)
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()


def test_modulated_pack_layout_is_mmcv():
    """o1, o2, m = chunk(3); offset = cat(o1, o2); mask = sigmoid(m) (mmcv's convention)."""
    seed, rng = _rng()
    layer = DeformConv2dPack(**_pack_config(rng), backend="torch").double()
    with torch.no_grad():
        layer.conv_offset.bias.copy_(torch.from_numpy(rng.normal(0, 1.5, layer.conv_offset.out_channels)))
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    pred = layer.conv_offset(x)
    n = pred.shape[1] // 3
    want = deform_conv2d_reference(x, pred[:, :2 * n], layer.weight, layer.bias, layer.stride, layer.padding,
                                   layer.dilation, torch.sigmoid(pred[:, 2 * n:]))
    torch.testing.assert_close(layer(x), want, msg=f"seed {seed}")
    out = layer(x).sum()
    out.backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0  # offsets are learnt


def test_deformable_skip_is_identity_at_init_and_then_deforms():
    seed, rng = _rng()
    skip_c, main_c, og = 4, 6, int(rng.choice([1, 2]))
    block = DeformableSkip(skip_c, main_c, kernel_size=3, offset_groups=og, backend="torch").double()
    skip = torch.randn(2, skip_c, 7, 5, dtype=torch.float64)
    main = torch.randn(2, main_c, 7, 5, dtype=torch.float64)
    assert torch.equal(block(skip, main), main)
    block(skip, main).square().sum().backward()
    assert block.dcn.weight.grad.abs().sum() > 0, "the DCN weight must learn from the start"
    with torch.no_grad():
        block.dcn.weight.normal_()
        block.conv_offset.bias.copy_(torch.from_numpy(rng.normal(0, 1.0, block.conv_offset.out_channels)))
    pred = block.conv_offset(torch.cat((skip, main), 1))
    n = pred.shape[1] // 3
    want = main + deform_conv2d_reference(skip, pred[:, :2 * n], block.dcn.weight, block.dcn.bias, (1, 1), (1, 1),
                                          (1, 1), torch.sigmoid(pred[:, 2 * n:]))
    torch.testing.assert_close(block(skip, main), want, msg=f"seed {seed}")
    with pytest.raises(ValueError, match="same batch and spatial size"):
        block(skip, main[:, :, :6])
    with pytest.raises(ValueError, match="odd"):
        DeformableSkip(4, 6, kernel_size=4)
