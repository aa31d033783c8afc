"""Per-layer weight bits from a cluster validity index: how many clusters do the weights form?

GHOST's HQ rule asks the same question through a hand-set threshold on the k-means error
(:func:`edgekit.calibration.hq_search.threshold_bits`). Here no threshold: each layer's
weights (1-D values; at most ``max_samples`` of them, a fixed-seed draw) are split in two
halves; 1-D k-means is fitted on one half for every k = 2..2^max(bits), the other half is
partitioned by those centres and scored by a validity index; the smallest k within one
standard error of the best score wins (:func:`best_cluster_count`) and the layer gets
``ceil(log2 k)`` bits, raised to the nearest allowed width.

Why held out: scored on the points it was fitted to, the silhouette rewards splitting
random sampling gaps once clusters hold a few dozen points, and on unimodal weights it
rises again at large k (random-init rsdet_atto, 4096 in-sample values: 21 of 49 layers
picked k > 140, i.e. 8 bits, on Gaussian weights). Held-out points do not share those
gaps, so only real structure scores (the same layers: all k = 2).

Which index. HCVI (Xie et al., "A novel cluster internal evaluation index based on
hyper-balls", arXiv 2212.14524) is not implemented: the text we could reach gives the
abstract and the hyper-ball centre/radius definition with its formulas stripped, not the
index itself nor its ball-splitting rule, and we do not invent one. Of scikit-learn's
indices, measured held out on 1-D data (8192 samples, k up to 256):

- ``silhouette`` (default) finds k exactly on well-separated mixtures (5, 13, 40 clusters)
  and picks k = 2 or 3 on unimodal data (Gaussian, Laplace, uniform: no cluster
  structure, so the fewest bits);
- ``calinski_harabasz`` grows with k on unimodal data (between/within ratio ~ k^2 for a
  uniform density) and on mixtures alike: it picked k = 169..255 on all six;
- ``davies_bouldin`` finds the mixtures but is nearly flat (~0.5) in k on unimodal data,
  so its minimum there is noise (k = 10, 156, 231), and it is 20-50x slower.

The silhouette is computed exactly in O(n) per k on sorted values (:func:`silhouette_1d`)
instead of scikit-learn's O(n^2) pairwise form, because a layer scores up to 255 values of
k; it is tested against ``sklearn.metrics.silhouette_score``.
"""

from __future__ import annotations

import math

import numpy as np

from edgekit.calibration.kmeans import kmeans_1d
from edgekit.calibration.spec import DEFAULT_BITS
from edgekit.errors import EdgekitError

INDICES = ("silhouette", "davies_bouldin", "calinski_harabasz")
_HIGHER_IS_BETTER = {"silhouette": True, "davies_bouldin": False, "calinski_harabasz": True}


def split_halves(values, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit half, held-out half) of ``values`` (flattened, float64, each sorted): a seeded
    permutation, cut to ``max_samples`` first when the layer is larger, split alternately.
    The same layer and seed give the same halves every run."""
    w = np.asarray(values, dtype=np.float64).ravel()
    order = np.random.default_rng(seed).permutation(w.size)[:max_samples]
    return np.sort(w[order[::2]]), np.sort(w[order[1::2]])


def held_out_segments(fit_sorted: np.ndarray, eval_sorted: np.ndarray, k: int) -> np.ndarray:
    """Boundaries ``[0, e_1, ..., n]`` of the non-empty clusters that a 1-D k-means fitted on
    ``fit_sorted`` makes of ``eval_sorted``: every 1-D k-means cluster is a contiguous run,
    cut at the centre midpoints, so on sorted values a partition is its boundaries."""
    centres, _ = kmeans_1d(fit_sorted, k, presorted=True)
    cuts = np.searchsorted(eval_sorted, (centres[:-1] + centres[1:]) / 2, side="right")
    return np.unique(np.concatenate(([0], cuts, [eval_sorted.size])))  # empty clusters collapse


def silhouette_samples_1d(sorted_values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per-value silhouettes (scikit-learn's definition, Euclidean) of sorted values
    partitioned into contiguous runs ``bounds``.

    In 1-D with contiguous clusters the nearest other cluster of a point is an adjacent
    one (every point of a farther cluster is farther than every point of the adjacent
    one), and the mean distance to a cluster lying wholly below x is x minus its mean, so
    prefix sums give every point's a and b exactly. Singleton clusters score 0, as in
    scikit-learn.
    """
    x = sorted_values - sorted_values[sorted_values.size // 2]  # centring keeps prefix sums accurate
    n = x.size
    counts = np.diff(bounds)
    k = counts.size
    if not 2 <= k <= n - 1:
        raise ValueError(f"silhouette needs 2 <= clusters <= n-1, got {k} clusters of {n} values")
    prefix = np.concatenate(([0.0], np.cumsum(x)))
    sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
    means = sums / counts
    label = np.repeat(np.arange(k), counts)
    start, stop = bounds[:-1][label], bounds[1:][label]
    i = np.arange(n)
    below = x * (i - start) - (prefix[i] - prefix[start])
    above = (prefix[stop] - prefix[i + 1]) - x * (stop - i - 1)
    size = counts[label]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (below + above) / (size - 1)
        lower = np.where(label > 0, x - means[np.maximum(label - 1, 0)], np.inf)
        upper = np.where(label < k - 1, means[np.minimum(label + 1, k - 1)] - x, np.inf)
        b = np.minimum(lower, upper)
        s = np.nan_to_num((b - a) / np.maximum(a, b))
    s[size == 1] = 0.0
    return s


def silhouette_1d(sorted_values: np.ndarray, bounds: np.ndarray) -> float:
    """Mean of :func:`silhouette_samples_1d` (``sklearn.metrics.silhouette_score``)."""
    return float(np.mean(silhouette_samples_1d(sorted_values, bounds)))


def score_partition(sorted_values: np.ndarray, bounds: np.ndarray, index: str) -> tuple[float, float]:
    """(validity ``index`` of the contiguous partition ``bounds`` of sorted values, its
    standard error): the silhouette is a mean over values, so its standard error is theirs
    (std / sqrt(n)); the other indices are not means and get 0."""
    if index == "silhouette":
        s = silhouette_samples_1d(sorted_values, bounds)
        return float(np.mean(s)), float(np.std(s, ddof=1) / np.sqrt(s.size))
    from sklearn import metrics

    labels = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    score = metrics.davies_bouldin_score if index == "davies_bouldin" else metrics.calinski_harabasz_score
    return float(score(sorted_values.reshape(-1, 1), labels)), 0.0


def best_cluster_count(fit_sorted: np.ndarray, eval_sorted: np.ndarray, max_k: int,
                       index: str = "silhouette") -> tuple[int, dict]:
    """(chosen k, ``{k: score or None}``) over k = 2..max_k, each k scored on the held-out
    values partitioned by the k-means fitted on ``fit_sorted``. None marks a k that is not
    realised on the held-out values (an empty cluster, or k >= their number).

    The choice is the one-standard-error rule (Breiman et al.'s, also the gap statistic's):
    the smallest k scoring within one standard error of the best score, so that a larger
    k must beat a smaller one by more than the sampling noise of the score (small layers:
    1960 Gaussian weights once picked k = 5 over k = 2 by 0.0004, standard error 0.008).
    With no scorable k the answer is k = 1.
    """
    _check_index(index)
    scores, errors = {}, {}
    for k in range(2, max_k + 1):
        bounds = held_out_segments(fit_sorted, eval_sorted, k) if k <= eval_sorted.size - 1 else None
        if bounds is None or bounds.size - 1 < k:
            scores[k] = None
            continue
        scores[k], errors[k] = score_partition(eval_sorted, bounds, index)
    if not errors:
        return 1, scores
    sign = 1.0 if _HIGHER_IS_BETTER[index] else -1.0
    best = max(errors, key=lambda k: (sign * scores[k], -k))
    return min(k for k in errors if sign * scores[k] >= sign * scores[best] - errors[best]), scores


def bits_for_clusters(k: int, bits) -> int:
    """The smallest allowed width holding k levels (ceil(log2 k)), or the widest allowed."""
    need = math.ceil(math.log2(k)) if k > 1 else 0
    allowed = sorted(bits)
    return next((b for b in allowed if b >= need), allowed[-1])


def choose_bits_by_cluster_validity(model, bits=DEFAULT_BITS, index: str = "silhouette", layers=None,
                                    max_samples: int = 8192, seed: int = 0, config=None,
                                    progress: bool = False) -> dict:
    """``{layer path: {"bits", "k", "scores"}}`` for the quantizable layers of ``model``.

    ``layers``: None (every layer :func:`~edgekit.calibration.quantize.quantizable_layers`
    picks under ``config``), a list of paths, or a ``{path: module}`` dict. k runs over
    2..2^max(bits); ``scores`` maps each k to its index value (None: not realisable).
    """
    from edgekit.calibration.quantize import quantizable_layers
    from edgekit.calibration.spec import check_bits

    _check_index(index)
    bits = tuple(sorted({check_bits(b, "bit widths") for b in bits}))
    if not bits:
        raise EdgekitError("no bit widths to choose from; pass some, e.g. bits=(2, 4, 8)")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 6:
        raise EdgekitError(f"max_samples must be an integer >= 6 (two halves of >= 3), got {max_samples!r}")
    if not isinstance(layers, dict):
        layers = quantizable_layers(model, config, layers)
    items = layers.items()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"cluster bits ({index})", unit="layer")
    out = {}
    for path, module in items:
        fit, held_out = split_halves(module.weight.detach().cpu().double().numpy(), max_samples, seed)
        k, scores = best_cluster_count(fit, held_out, 2 ** bits[-1], index)
        out[path] = {"bits": bits_for_clusters(k, bits), "k": k, "scores": scores}
    return out


def _check_index(index: str) -> None:
    if index not in INDICES:
        raise EdgekitError(f"unknown cluster validity index {index!r}; use one of {', '.join(INDICES)}")
