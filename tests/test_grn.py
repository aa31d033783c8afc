"""GRN reference against independent float64 / official computations, in every precision."""

import numpy as np
import pytest
import torch

from edgekit.models import GRN, grn_reference
from reference_convnextv2_official import GRN as OfficialGRN


pytestmark = pytest.mark.usefixtures("fresh_torch_seed")


def grn_float64_numpy(x, gamma, beta, eps=1e-6):
    """GRN on NHWC written from the paper's equations in float64 numpy."""
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(gamma, dtype=np.float64).reshape(-1)
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    gx = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
    nx = gx / (gx.mean(axis=3, keepdims=True) + eps)
    return g * (x * nx) + b + x


def random_case(n=2, h=5, w=7, c=6, scale=1.0, dtype=torch.float32):
    x = torch.randn(n, h, w, c, dtype=torch.float64) * scale
    gamma = torch.randn(1, 1, 1, c, dtype=torch.float64)
    beta = torch.randn(1, 1, 1, c, dtype=torch.float64)
    return x.to(dtype), gamma.to(dtype), beta.to(dtype)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 1, 1, 3), (3, 14, 9, 32)])
def test_matches_independent_float64(shape):
    x, gamma, beta = random_case(*shape)
    expected = grn_float64_numpy(x.double().numpy(), gamma.double().numpy(), beta.double().numpy())
    got = grn_reference(x, gamma, beta)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    got64 = grn_reference(x.double(), gamma.double(), beta.double())
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_float32_is_bitwise_official():
    x, gamma, beta = random_case(2, 8, 8, 16)
    official = OfficialGRN(16)
    with torch.no_grad():
        official.gamma.copy_(gamma)
        official.beta.copy_(beta)
        assert torch.equal(grn_reference(x, gamma, beta, eps=1e-6), official(x))


def test_channels_first_equals_channels_last_permuted():
    x, gamma, beta = random_case(2, 6, 5, 8, dtype=torch.float64)
    last = grn_reference(x, gamma, beta, data_format="channels_last")
    first = grn_reference(x.permute(0, 3, 1, 2).contiguous(), gamma.reshape(1, -1, 1, 1), beta.reshape(-1),
                          data_format="channels_first")
    torch.testing.assert_close(first.permute(0, 2, 3, 1), last, rtol=1e-12, atol=1e-12)


def test_parameter_shape_only_needs_c_elements():
    x, gamma, beta = random_case(1, 4, 4, 5)
    base = grn_reference(x, gamma, beta)
    for shape in [(5,), (1, 5), (1, 5, 1, 1)]:
        assert torch.equal(grn_reference(x, gamma.reshape(shape), beta.reshape(shape)), base)


# |x| ~ 2000 over 48x48 positions: the channel norms (~1e5) exceed float16's max (65504)
# although every input and output value fits, so only the reduction must be wider.
BIG = dict(h=48, w=48, c=8, scale=2000.0)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def official_half_grn(x, gamma, beta):
    """The official GRN run in half precision, as a naive fp16 engine would."""
    grn = OfficialGRN(x.shape[-1]).to(x.dtype)
    with torch.no_grad():
        grn.gamma.copy_(gamma.reshape(grn.gamma.shape))
        grn.beta.copy_(beta.reshape(grn.beta.shape))
        return grn(x)


def assert_close_to_float64(got, x, gamma, beta):
    """Compare with float64 GRN of exactly the (rounded) inputs the function received."""
    expected = grn_float64_numpy(x.detach().double().numpy(), gamma.detach().double().numpy(),
                                 beta.detach().double().numpy())
    tol = TOLERANCE[got.dtype]
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=tol,
                               atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite_where_naive_overflows(dtype):
    x64, gamma, beta = random_case(2, **BIG, dtype=torch.float64)
    x, gamma, beta = x64.to(dtype), (gamma * 0.5).to(dtype), beta.to(dtype)
    if dtype == torch.float16:
        assert not torch.isfinite(official_half_grn(x, gamma, beta)).all(), "input must overflow naive fp16"
    got = grn_reference(x, gamma, beta)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close_to_float64(got, x, gamma, beta)
    got_first = grn_reference(x.permute(0, 3, 1, 2), gamma, beta, data_format="channels_first")
    assert torch.isfinite(got_first).all()
    assert_close_to_float64(got_first.permute(0, 2, 3, 1), x, gamma, beta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_under_autocast_reduces_in_float32(dtype):
    c = BIG["c"]
    linear = torch.nn.Linear(c, c)
    grn = GRN(c, backend="torch")
    with torch.no_grad():
        linear.weight.mul_(BIG["scale"] * 2)
        grn.gamma.normal_(0.0, 0.5)
        grn.beta.normal_()
    inp = torch.randn(2, BIG["h"], BIG["w"], c)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y = linear(inp)
        assert y.dtype == dtype
        if dtype == torch.float16:
            assert not torch.isfinite(official_half_grn(y, grn.gamma.half(), grn.beta.half())).all(), \
                "input must overflow naive fp16"
        got = grn(y)
        assert torch.equal(got, grn_reference(y, grn.gamma, grn.beta))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close_to_float64(got, y, grn.gamma, grn.beta)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_gradcheck(data_format):
    x, gamma, beta = random_case(2, 3, 4, 5, dtype=torch.float64)
    if data_format == "channels_first":
        x = x.permute(0, 3, 1, 2).contiguous()
    for t in (x, gamma, beta):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g, b: grn_reference(a, g, b, 1e-6, data_format),
                                    (x, gamma, beta))


def test_module_is_official_parameterisation_and_identity_at_init():
    grn = GRN(12, backend="torch")
    assert dict((k, tuple(v.shape)) for k, v in grn.state_dict().items()) == \
        {k: tuple(v.shape) for k, v in OfficialGRN(12).state_dict().items()}
    assert not grn.gamma.any() and not grn.beta.any()
    x = torch.randn(2, 3, 3, 12)
    torch.testing.assert_close(grn(x), x, rtol=0, atol=0)


def test_module_forward_and_backward_through_ops():
    grn = GRN(6, backend="torch")
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 5, 4, 6, requires_grad=True)
    out = grn(x)
    assert torch.equal(out, grn_reference(x, grn.gamma, grn.beta))
    out.square().sum().backward()
    assert x.grad is not None and grn.gamma.grad.abs().sum() > 0 and grn.beta.grad.abs().sum() > 0
    with torch.no_grad():  # the default backend agrees (whichever it picks here)
        torch.testing.assert_close(_auto_copy(grn)(x), out, rtol=1e-5, atol=1e-5)


def _auto_copy(grn):
    auto = GRN(grn.gamma.shape[-1])
    auto.load_state_dict(grn.state_dict())
    return auto


@pytest.mark.parametrize("bad", [
    dict(data_format="nhwc"),
    dict(gamma=torch.zeros(5)),
    dict(x=torch.zeros(2, 3, 6)),
])
def test_bad_arguments(bad):
    args = dict(x=torch.zeros(1, 2, 2, 6), gamma=torch.zeros(6), beta=torch.zeros(6))
    args.update(bad)
    with pytest.raises(ValueError):
        grn_reference(**args)
