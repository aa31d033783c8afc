"""ConvNeXt V2 against an independent transcription of the official code, the feature
(backbone) mode, and the model registry."""

import re

import pytest
import torch

from edgekit.models import ConvNeXtV2, backbone_state_dict, create_model, list_models, register_model, registry
from edgekit.models.layers import DropPath
from conftest import one_line_error
from reference_convnextv2_official import OFFICIAL_VARIANTS, official_model

SIZES = ["atto", "femto", "pico", "nano", "tiny"]
PAPER_PARAMS_M = {"atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6}  # paper, Table 8


pytestmark = pytest.mark.usefixtures("fresh_torch_seed")


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def randomised_official(size, **kwargs):
    """Official model with every parameter perturbed: the official init leaves GRN
    (gamma = beta = 0) and the LayerNorms as identities, which would test nothing."""
    model = official_model(size, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.normal_(0.0, 0.5)
            elif p.ndim == 1:  # LayerNorm weight/bias and conv/linear biases
                p.add_(torch.randn_like(p) * 0.1)
    return model


def stage_outputs(official, x):
    """Intermediate stage outputs of the official model, captured with forward hooks."""
    outs = []
    hooks = [stage.register_forward_hook(lambda m, i, o: outs.append(o)) for stage in official.stages]
    try:
        logits = official(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_and_parameter_count_match_official(size):
    ours = create_model(f"convnextv2_{size}")
    official = official_model(size)
    assert list(shapes(ours).items()) == list(shapes(official).items())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in official.parameters())
    assert round(count / 1e6, 1) == PAPER_PARAMS_M[size]


@pytest.mark.parametrize("size,backend", [("atto", "torch"), ("atto", "auto"), ("nano", "torch")])
def test_official_weights_load_strict_and_give_identical_outputs(size, backend):
    official = randomised_official(size, num_classes=37)
    ours = create_model(f"convnextv2_{size}", num_classes=37, grn_backend=backend).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), official.forward_features(x), rtol=1e-5, atol=1e-5)


def test_official_initialisation():
    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(64, 64, 128, 128), num_classes=500, head_init_scale=0.25)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert not module.bias.any(), name
            scale = 0.25 if name == "head" else 1.0
            w = module.weight.detach() / scale
            assert w.abs().max() <= 2.0, name  # truncated at +-2 (absolute, as timm/torch do)
            if w.numel() >= 4096:
                assert 0.018 < float(w.std()) < 0.022, name
    grn = model.stages[0][0].grn
    assert not grn.gamma.any() and not grn.beta.any()


def expected_map_sizes(h, w):
    """Unpadded 4x4/4 stem then 2x2/2 downsamplings: each step floors."""
    sizes, h, w = [], h // 4, w // 4
    for _ in range(4):
        sizes.append((h, w))
        h, w = h // 2, w // 2
    return sizes


@pytest.mark.parametrize("hw", [(64, 64), (100, 132), (97, 35), (160, 224)])
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2, 3), (0, 2)])
def test_features_only_shapes_channels_strides(hw, out_indices):
    dims = OFFICIAL_VARIANTS["atto"][1]
    model = create_model("convnextv2_atto", features_only=True, out_indices=out_indices, grn_backend="torch")
    assert model.feature_info == [{"channels": dims[i], "stride": 4 * 2 ** i} for i in out_indices]
    assert not hasattr(model, "norm") and not hasattr(model, "head")
    assert len(model.stages) == len(model.downsample_layers) == max(out_indices) + 1
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *hw))
    sizes = expected_map_sizes(*hw)
    assert [tuple(f.shape) for f in feats] == [(1, dims[i], *sizes[i]) for i in out_indices]
    for f, info in zip(feats, model.feature_info):
        # The map covers floor(side / stride) strides of the input.
        assert f.shape[-2:] == (hw[0] // info["stride"], hw[1] // info["stride"])


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2, 3), (0, 1)])
def test_official_weights_load_strict_into_feature_model(out_indices):
    official = randomised_official("atto")
    model = create_model("convnextv2_atto", features_only=True, out_indices=out_indices,
                         grn_backend="torch").eval()
    state = official.state_dict()
    model.load_state_dict(backbone_state_dict(state, out_indices), strict=True)
    # The official checkpoint files wrap the weights as {"model": state_dict}.
    assert backbone_state_dict({"model": state}, out_indices).keys() == shapes(model).keys()
    x = torch.randn(2, 3, 100, 132)
    with torch.no_grad():
        _, expected = stage_outputs(official, x)
        feats = model(x)
    assert len(feats) == len(out_indices)
    for f, i in zip(feats, out_indices):
        torch.testing.assert_close(f, expected[i], rtol=1e-5, atol=1e-5)


def test_feature_model_rejects_forward_features():
    with pytest.raises(RuntimeError, match="features_only"):
        create_model("convnextv2_atto", features_only=True).forward_features(torch.randn(1, 3, 32, 32))


def test_training_step_reaches_grn_and_drop_path_is_stochastic():
    model = create_model("convnextv2_atto", num_classes=5, drop_path_rate=0.5).train()
    with torch.no_grad():  # non-zero GRN so its gradient path is exercised
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.normal_(0.0, 0.5)
    x = torch.randn(4, 3, 32, 32)
    model(x).square().sum().backward()
    grn = model.stages[2][3].grn
    assert grn.gamma.grad is not None and grn.gamma.grad.abs().sum() > 0
    outs = torch.stack([model(x).detach() for _ in range(4)])
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_drop_path_keeps_or_rescales_whole_samples():
    drop = DropPath(0.25).train()
    x = torch.rand(4000, 3, 2) + 0.5
    y = drop(x)
    kept = (y != 0).flatten(1).all(1)
    assert ((y == 0).flatten(1).all(1) | kept).all()  # each sample is dropped entirely or not at all
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.05  # ~9 sigma for n = 4000
    assert torch.equal(drop.eval()(x), x)


def test_registry_lists_variants():
    assert {f"convnextv2_{s}" for s in SIZES} <= set(list_models())
    assert list_models("convnextv2_*") == sorted(f"convnextv2_{s}" for s in SIZES)
    assert list_models("no_such_*") == []


def test_create_model_unknown_name():
    message = one_line_error(create_model, "convnextv2_gigantic")
    assert "unknown model 'convnextv2_gigantic'" in message and "convnextv2_atto" in message


def test_create_model_bad_keyword():
    message = one_line_error(create_model, "convnextv2_nano", num_clases=3)
    assert "convnextv2_nano" in message and "num_clases" in message and "num_classes" in message
    message = one_line_error(create_model, "convnextv2_atto", depths=(1, 1, 1, 1))
    assert "convnextv2_atto" in message and "depths" in message


def test_create_model_bad_keyword_of_kwargs_only_builder(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test
    name = "test_only_kwargs_builder"

    @register_model(name)
    def build(**kwargs):
        return ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), **kwargs)

    assert isinstance(create_model(name, num_classes=3), ConvNeXtV2)
    message = one_line_error(create_model, name, colour="red")
    assert name in message and "colour" in message
    with pytest.raises(ValueError, match="already registered"):
        register_model("convnextv2_atto")(build)


@pytest.mark.parametrize("out_indices", [(4,), (2, 1), (), (1, 1)])
def test_bad_out_indices(out_indices):
    message = one_line_error(create_model, "convnextv2_atto", features_only=True, out_indices=out_indices)
    assert re.search("out_indices", message)
