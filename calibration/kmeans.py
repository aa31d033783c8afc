"""1-D k-means of a layer's weights, shared by GHOST's threshold rule
(:mod:`edgekit.calibration.hq_search`) and the cluster-validity bit chooser
(:mod:`edgekit.calibration.cluster_bits`).

Exact-enough and fast: on sorted weights every cluster is a contiguous run, so a Lloyd
step is a ``searchsorted`` of the centre midpoints plus prefix sums, O(k log n) after one
O(n log n) sort, whatever the layer size. Written here rather than taken from
scikit-learn, whose KMeans is O(n k) per step and knows nothing of the sorted 1-D case.
"""

from __future__ import annotations

import numpy as np

EXACT_CHUNKS = 256    # the optimal segmentation cuts between at most this many equal-count runs
EXACT_WORK = 2e6      # ... and is used when k * runs^2 stays below this (all k <= 16; small layers)


def kmeans_1d(values, k: int, iters: int = 300, presorted: bool = False) -> tuple[np.ndarray, float]:
    """(sorted centres, mean squared distance) of a 1-D k-means.

    For k <= 16, or few weights, the start is the optimal k-segmentation of the sorted
    weights cut only between EXACT_CHUNKS equal-count runs (exact dynamic programming;
    the exact optimum when there are at most that many weights): few centres, or few
    weights per centre, is where plain Lloyd gets stuck in poor local optima. Otherwise the
    start is companding quantiles. Lloyd then refines on all weights up to a fixed point
    (``iters`` caps it; 40 steps left bimodal layers at k=64 short of one in ~10% of draws)
    (``presorted``: ``values`` is a sorted 1-D float64 array).
    """
    w = np.asarray(values, dtype=np.float64).ravel()
    w = w if presorted else np.sort(w)
    n = w.size
    if n == 0:
        raise ValueError("kmeans_1d: empty input")
    shift = w[n // 2]
    w = w - shift  # centring keeps the prefix-sum differences accurate
    k = max(1, min(int(k), n))
    cs = np.concatenate(([0.0], np.cumsum(w)))
    cs2 = np.concatenate(([0.0], np.cumsum(w * w)))
    exact = k <= 16 or k * min(n, EXACT_CHUNKS) ** 2 <= EXACT_WORK
    centres = _segmentation_means(cs, cs2, n, k) if exact else _companding_centres(w, k)

    def assign(c):
        idx = np.concatenate(([0], np.searchsorted(w, (c[:-1] + c[1:]) / 2, side="right"), [n]))
        cnt = np.diff(idx)
        s = cs[idx[1:]] - cs[idx[:-1]]
        return idx, cnt, s

    for _ in range(iters):
        idx, cnt, s = assign(centres)
        new = np.where(cnt > 0, s / np.maximum(cnt, 1), centres)
        if np.array_equal(new, centres):
            break
        centres = new
    idx, cnt, s = assign(centres)
    s2 = cs2[idx[1:]] - cs2[idx[:-1]]
    means = np.where(cnt > 0, s / np.maximum(cnt, 1), centres)
    sse = float(np.sum(np.maximum(s2 - 2 * means * s + means * means * cnt, 0.0)))
    return means + shift, sse / n


def _companding_centres(w, k: int, bins: int = 2048) -> np.ndarray:
    """k centres at equal steps of the cumulative density^(1/3) (histogram estimate)."""
    hist, edges = np.histogram(w, bins=bins)
    mass = np.concatenate(([0.0], np.cumsum(np.cbrt(hist.astype(np.float64)))))
    return np.interp((np.arange(k) + 0.5) / k * mass[-1], mass, edges)


def _segmentation_means(cs, cs2, n: int, k: int) -> np.ndarray:
    """Means of the optimal k contiguous segments with cuts at chunk edges (O(k B^2))."""
    edges = np.unique(np.linspace(0, n, min(n, EXACT_CHUNKS) + 1).round().astype(np.int64))
    cnt = edges[None, :] - edges[:, None]                      # [i, j]: weights in chunks i..j-1
    s = cs[edges][None, :] - cs[edges][:, None]
    s2 = cs2[edges][None, :] - cs2[edges][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(cnt > 0, np.maximum(s2 - s * s / cnt, 0.0), np.inf)
    dp = cost[0].copy()                                        # one segment covering edges[0]..edges[j]
    back = []
    for _ in range(k - 1):
        total = dp[:, None] + cost
        arg = np.argmin(total, axis=0)
        dp = total[arg, np.arange(len(edges))]
        back.append(arg)
    cuts, j = [len(edges) - 1], len(edges) - 1
    for arg in reversed(back):
        j = int(arg[j])
        cuts.append(j)
    cuts.append(0)
    cuts = edges[np.array(cuts[::-1])]
    # Fewer distinct segments than k (ties or few weights): duplicate centres are harmless.
    lo, hi = cuts[:-1], cuts[1:]
    sizes = np.maximum(hi - lo, 1)
    return np.maximum.accumulate((cs[hi] - cs[lo]) / sizes)
