"""Cluster-validity bit chooser: the 1-D silhouette against scikit-learn, k found on separated
mixtures, fewest bits on unimodal weights, and a comparison with GHOST's threshold rule."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_samples, silhouette_score

from edgekit.calibration import cluster_bits as cb
from edgekit.calibration.kmeans import kmeans_1d
from edgekit.errors import EdgekitError


def linear_with_weights(values) -> torch.nn.Sequential:
    """A one-layer model whose weight holds ``values`` (float32, as real layers do)."""
    values = np.asarray(values)
    layer = torch.nn.Linear(values.size // 16, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(values[: 16 * (values.size // 16)].reshape(16, -1)))
    return torch.nn.Sequential(layer)


def separated_mixture(rng, k: int, n: int) -> np.ndarray:
    """n values from k clusters whose gaps are >= 10 standard deviations, unequal sizes
    (each at least half of an equal share)."""
    centres = np.cumsum(rng.uniform(1.0, 3.0, k)) * 0.05
    share = 0.5 * rng.dirichlet(np.full(k, 2.0)) + 0.5 / k
    labels = rng.choice(k, size=n, p=share / share.sum())
    return centres[labels] + rng.normal(0.0, rng.uniform(0.002, 0.005), n)


def test_silhouette_1d_matches_sklearn(rng):
    for _ in range(20):
        n = int(rng.integers(4, 400))
        x = rng.normal(size=n)
        if rng.random() < 0.5:
            x = np.round(x * 4) / 4  # ties inside and across clusters
        x = np.sort(x)
        k = int(rng.integers(2, n))
        cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))  # singletons happen
        bounds = np.concatenate(([0], cuts, [n]))
        labels = np.repeat(np.arange(k), np.diff(bounds))
        ours = cb.silhouette_1d(x, bounds)
        ref = silhouette_score(x.reshape(-1, 1), labels)
        assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9), (n, k)  # the two sum in different orders


def test_choice_is_the_one_standard_error_rule(rng):
    """The smallest k within one standard error (scikit-learn's per-value silhouettes) of the
    best score: on a small unimodal layer, where scores differ by less than their noise."""
    fit, held = cb.split_halves(rng.normal(0.0, 0.02, 1960), 8192, seed=0)
    k, scores = cb.best_cluster_count(fit, held, 64)
    valid = {j: v for j, v in scores.items() if v is not None}
    best = max(valid, key=lambda j: (valid[j], -j))
    bounds = cb.held_out_segments(fit, held, best)
    per_value = silhouette_samples(held.reshape(-1, 1), np.repeat(np.arange(bounds.size - 1), np.diff(bounds)))
    assert valid[best] == pytest.approx(per_value.mean(), abs=1e-10)
    band = valid[best] - per_value.std(ddof=1) / np.sqrt(per_value.size)
    assert k == min(j for j, v in valid.items() if v >= band)
    assert k <= 3


def test_silhouette_1d_refuses_one_cluster():
    with pytest.raises(ValueError):
        cb.silhouette_1d(np.arange(5.0), np.array([0, 5]))


def test_held_out_segments_are_nearest_centre_assignment(rng):
    fit, held = np.sort(rng.normal(size=600)), np.sort(rng.normal(size=700))
    for k in (2, 5, 17, 40):
        centres, _ = kmeans_1d(fit, k, presorted=True)
        nearest = np.argmin(np.abs(held[:, None] - centres[None, :]), axis=1)
        changes = np.flatnonzero(np.diff(nearest)) + 1
        expected = np.concatenate(([0], changes, [held.size]))
        np.testing.assert_array_equal(cb.held_out_segments(fit, held, k), expected)


def test_split_halves_is_a_seeded_subsample(rng):
    w = rng.normal(size=1001)
    fit, held = cb.split_halves(w, 300, seed=3)
    assert fit.size == held.size == 150
    assert np.all(np.diff(fit) >= 0) and np.all(np.diff(held) >= 0)
    both = np.sort(np.concatenate([fit, held]))
    assert np.isin(both, w).all() and np.unique(both).size == 300  # distinct draws, no repeats
    again = cb.split_halves(w, 300, seed=3)
    np.testing.assert_array_equal(fit, again[0])
    small_fit, small_held = cb.split_halves(w[:9], 300, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate([small_fit, small_held])), np.sort(w[:9]))


def test_bits_for_clusters():
    for bits in ((2, 3, 4, 5, 6, 7, 8), (3, 4, 8), (2, 8)):
        for k in range(1, 257):
            need = (k - 1).bit_length()  # ceil(log2 k), 0 for k = 1
            expected = min([b for b in bits if b >= need], default=max(bits))
            assert cb.bits_for_clusters(k, bits) == expected


def test_finds_k_of_well_separated_clusters(rng):
    for _ in range(3):
        k = int(rng.integers(2, 31))
        model = linear_with_weights(separated_mixture(rng, k, 16 * 1024))
        result = cb.choose_bits_by_cluster_validity(model, bits=(2, 3, 4, 5, 6, 7, 8))
        (entry,) = result.values()
        assert entry["k"] == k, (k, entry["k"])
        assert entry["bits"] == max(2, math.ceil(math.log2(k)))
        assert entry["scores"][k] == max(v for v in entry["scores"].values() if v is not None)  # real structure


@pytest.mark.parametrize("draw", ["normal", "laplace", "uniform"])
def test_unimodal_weights_get_the_fewest_bits(rng, draw):
    values = getattr(rng, draw)(0.0, 0.02, 8192) if draw != "uniform" else rng.uniform(-0.04, 0.04, 8192)
    model = linear_with_weights(values)
    (entry,) = cb.choose_bits_by_cluster_validity(model, bits=(2, 3, 4, 5, 6, 7, 8)).values()
    assert entry["k"] <= 3 and entry["bits"] == 2
    (entry,) = cb.choose_bits_by_cluster_validity(model, bits=(3, 4, 8)).values()
    assert entry["bits"] == 3  # clamped up to the narrowest allowed width


def test_calinski_harabasz_grows_with_k_on_unimodal_weights(rng):
    """Why it is not the default: on a uniform density it prefers the largest k searched."""
    fit, held = cb.split_halves(rng.uniform(-1, 1, 8192), 8192, seed=0)
    k, scores = cb.best_cluster_count(fit, held, 32, "calinski_harabasz")
    assert k >= 24, scores


def test_layers_argument_and_errors(rng):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    picked = cb.choose_bits_by_cluster_validity(model, bits=(2, 4), layers=["2"])
    assert list(picked) == ["2"] and picked["2"]["bits"] in (2, 4)
    assert set(picked["2"]["scores"]) == set(range(2, 17))
    assert list(cb.choose_bits_by_cluster_validity(model, bits=(2, 3))) == ["0", "2"]
    with pytest.raises(EdgekitError, match="index"):
        cb.choose_bits_by_cluster_validity(model, index="dunn")
    with pytest.raises(EdgekitError, match="bits"):
        cb.choose_bits_by_cluster_validity(model, bits=(2, 9))
    with pytest.raises(EdgekitError, match="max_samples"):
        cb.choose_bits_by_cluster_validity(model, max_samples=4)
    with pytest.raises(EdgekitError, match="not Conv2d"):
        cb.choose_bits_by_cluster_validity(model, layers=["1"])


def test_tiny_layer_has_unrealisable_k():
    """32 weights: held-out halves of 16 values cannot hold 16 or more clusters."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False))
    (entry,) = cb.choose_bits_by_cluster_validity(model, bits=(2, 8)).values()
    assert all(entry["scores"][k] is None for k in range(16, 257))
    assert entry["bits"] == cb.bits_for_clusters(entry["k"], (2, 8))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rsdet_atto", "convnextv2_atto"])
def test_agreement_with_ghost_threshold_rule(fresh_torch_seed, name):
    """Both rules on the layers GHOST searches of a random-init model. Its weights are
    unimodal (trunc-normal / Kaiming-uniform init): no cluster structure, so the validity
    index gives every layer k <= 3; GHOST's 1% k-means error needs 16 levels (4 bits)."""
    from edgekit.calibration.hq_search import search_bits
    from edgekit.models import create_model

    model = create_model(name).eval()
    ghost = search_bits(model, "ghost")
    cluster = cb.choose_bits_by_cluster_validity(model, layers=list(ghost.weight_bits))
    assert set(cluster) == set(ghost.weight_bits)
    agree = sum(cluster[p]["bits"] == b for p, b in ghost.weight_bits.items())
    print(f"{name}: {agree}/{len(cluster)} layers agree; ghost {sorted(set(ghost.weight_bits.values()))}, "
          f"cluster {sorted({v['bits'] for v in cluster.values()})}")
    many = {p: (v["k"], v["scores"][2], v["scores"][v["k"]]) for p, v in cluster.items() if v["k"] > 3}
    assert not many, many
