"""Streaming range observers for post-training quantization.

An observer sees a tensor batch by batch (``update``) and keeps bounded state: running
min/max, or a fixed-size histogram per channel. ``compute(bits, signed)`` turns what it
saw into ``(scale, zero_point)``. Four ways to pick the clipping range:

- ``minmax``: the observed range; nothing is clipped.
- ``percentile``: the p-th and (100-p)-th percentiles (default 99.99), read off the
  histogram's piecewise-linear CDF, so outliers do not stretch the grid.
- ``entropy``: TensorRT's calibration: the threshold on |x| whose quantized histogram is
  closest in KL divergence to the clipped reference histogram.
- ``mse``: the clip (a shrink of the observed range) that minimises the expected squared
  quantization error over the histogram.

Histograms are written here (not taken from torch.ao) because torch's HistogramObserver
is per-tensor only and is deprecated with torch.ao.quantization; the histogram grows its
range by re-binning its piecewise-linear CDF, so it never stores activations.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError

MIN_SCALE = 1e-8  # an all-zero tensor still gets a positive scale (ONNX requires one)


def qparams_from_range(lo, hi, bits: int, signed: bool, symmetric: bool = False, narrow: bool = False):
    """(scale, zero_point) float32/int64 arrays that cover [lo, hi] (widened to include 0)."""
    from edgekit.calibration.spec import qrange

    qmin, qmax = qrange(bits, signed, narrow)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        if not signed:
            raise ValueError("a symmetric grid needs a signed integer type")
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / qmax, MIN_SCALE).astype(np.float32)
        return scale, np.zeros(scale.shape, np.int64)
    scale = np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE).astype(np.float32)
    zero_point = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax).astype(np.int64)
    return scale, zero_point


def _as_channels(x, axis: int | None) -> np.ndarray:
    """[C, N] float64 view of a torch or numpy tensor (C = 1 per tensor)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Base: running per-channel min/max; subclasses choose the clipping range."""

    name = "base"

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, x) -> None:
        data = _as_channels(x, self.axis)
        if data.shape[1] == 0:
            return
        if not np.isfinite(data).all():
            raise EdgekitError(f"{self.name} observer: the calibration data contains NaN or infinity; "
                               f"check the model and the input normalisation")
        if self.min is not None and data.shape[0] != self.min.shape[0]:
            raise ValueError(f"observer saw {self.min.shape[0]} channels, now {data.shape[0]} along axis {self.axis}")
        lo, hi = data.min(axis=1), data.max(axis=1)
        self._observe(data, lo, hi)
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)

    def _observe(self, data, lo, hi) -> None:
        """Hook for subclasses, called before min/max are updated."""

    def clip_range(self, bits: int, signed: bool, symmetric: bool, narrow: bool):
        return self.min, self.max

    def compute(self, bits: int, signed: bool, symmetric: bool = False, narrow: bool = False):
        """(scale [C], zero_point [C]) for per-channel observers, scalars (float, int) per tensor."""
        if self.min is None:
            raise EdgekitError(f"{self.name} observer saw no data; calibration needs at least one batch that "
                               f"reaches this layer")
        lo, hi = self.clip_range(bits, signed, symmetric, narrow)
        scale, zp = qparams_from_range(lo, hi, bits, signed, symmetric, narrow)
        if self.axis is None:
            return float(scale[0]), int(zp[0])
        return scale, zp


class MinMaxObserver(Observer):
    name = "minmax"


class HistogramObserver(Observer):
    """Keeps ``bins`` counts per channel over the running [min, max]."""

    def __init__(self, axis: int | None = None, bins: int = 2048):
        super().__init__(axis)
        self.bins = bins
        self.counts: np.ndarray | None = None  # [C, bins] float64
        self.edges_lo: np.ndarray | None = None
        self.edges_hi: np.ndarray | None = None

    def _observe(self, data, lo, hi) -> None:
        if self.counts is None:
            self.counts = np.zeros((data.shape[0], self.bins))
            self.edges_lo, self.edges_hi = lo.copy(), hi.copy()
        grow = (lo < self.edges_lo) | (hi > self.edges_hi)
        for c in np.flatnonzero(grow):
            self._rebin(c, min(lo[c], self.edges_lo[c]), max(hi[c], self.edges_hi[c]))
        width = self._width()
        idx = np.floor((data - self.edges_lo[:, None]) / width[:, None]).astype(np.int64)
        idx = np.clip(idx, 0, self.bins - 1) + np.arange(data.shape[0])[:, None] * self.bins
        self.counts += np.bincount(idx.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def _width(self) -> np.ndarray:
        span = self.edges_hi - self.edges_lo
        # A constant channel has span 0: a small width (still well above float64 spacing,
        # so the edges stay increasing for re-binning) keeps every value in bin 0.
        return np.where(span > 0, span, np.maximum(np.abs(self.edges_lo), 1.0) * 1e-6) / self.bins

    def _edges(self, c: int) -> np.ndarray:
        return self.edges_lo[c] + self._width()[c] * np.arange(self.bins + 1)

    def _cdf(self, c: int) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.counts[c])])

    def _rebin(self, c: int, lo: float, hi: float) -> None:
        """Spread channel c's counts over the wider [lo, hi], assuming uniform mass per bin."""
        old_edges, cdf = self._edges(c), self._cdf(c)
        self.edges_lo[c], self.edges_hi[c] = lo, hi
        self.counts[c] = np.diff(np.interp(self._edges(c), old_edges, cdf))

    def quantile(self, q: float) -> np.ndarray:
        """Per-channel q-quantile (0..1) from the piecewise-linear CDF."""
        out = np.empty(self.counts.shape[0])
        for c in range(out.size):
            cdf = self._cdf(c)
            out[c] = np.interp(q * cdf[-1], cdf, self._edges(c))
        return np.clip(out, self.min, self.max)


class PercentileObserver(HistogramObserver):
    name = "percentile"

    def __init__(self, axis: int | None = None, percentile: float = 99.99, bins: int = 2048):
        super().__init__(axis, bins)
        if not 50 < percentile <= 100:
            raise EdgekitError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def clip_range(self, bits, signed, symmetric, narrow):
        return self.quantile(1 - self.percentile / 100), self.quantile(self.percentile / 100)


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration on the |x| histogram (``bins`` bins of |x|)."""

    name = "entropy"

    def clip_range(self, bits, signed, symmetric, narrow):
        from edgekit.calibration.spec import qrange

        qmin, qmax = qrange(bits, signed, narrow)
        # Levels on the side of zero the threshold clips: half the grid when signed.
        levels = qmax + 1 if signed else qmax - qmin + 1
        lo, hi = self.min.copy(), self.max.copy()
        for c in range(lo.size):
            amax = max(-self.min[c], self.max[c])
            if amax <= 0:
                continue
            t = _kl_threshold(self._abs_histogram(c, amax), amax, levels)
            lo[c], hi[c] = max(lo[c], -t), min(hi[c], t)
        return lo, hi

    def _abs_histogram(self, c: int, amax: float) -> np.ndarray:
        """Counts of |x| over [0, amax] in ``bins`` bins, from the signed CDF."""
        t = np.linspace(0.0, amax, self.bins + 1)
        edges, cdf = self._edges(c), self._cdf(c)
        f = lambda v: np.interp(v, edges, cdf, left=0.0, right=cdf[-1])  # noqa: E731
        return np.diff(f(t) - f(-t))


def _kl_threshold(hist: np.ndarray, amax: float, levels: int) -> float:
    """TensorRT's search: for each candidate bin count i >= levels, the reference P is the
    first i bins with the outliers folded into the last; Q is P's first i bins merged into
    ``levels`` levels and expanded back over the non-empty bins; pick the i of least KL(P||Q)."""
    bins = hist.size
    if levels >= bins:
        return amax
    best_i, best_kl = bins, np.inf
    total_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # sum of hist[i:]
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[-1] += total_tail[i]
        nonzero = hist[:i] > 0
        group = np.minimum(np.arange(i) * levels // i, levels - 1)
        sums = np.bincount(group, weights=hist[:i], minlength=levels)
        counts = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return amax * best_i / bins


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return np.inf
    p, q = p / ps, q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class MSEObserver(HistogramObserver):
    """Search shrink factors of the observed range for the least expected squared error."""

    name = "mse"

    def __init__(self, axis: int | None = None, bins: int = 2048, steps: int = 100):
        super().__init__(axis, bins)
        self.alphas = np.linspace(1.0, 0.05, steps)

    def clip_range(self, bits, signed, symmetric, narrow):
        lo, hi = self.min.copy(), self.max.copy()
        for c in range(lo.size):
            edges = self._edges(c)
            centers, counts = (edges[:-1] + edges[1:]) / 2, self.counts[c]
            keep = counts > 0
            centers, counts = centers[keep], counts[keep]
            errors = [quantization_mse(centers, counts, a * self.min[c], a * self.max[c], bits, signed, symmetric,
                                       narrow) for a in self.alphas]
            best = self.alphas[int(np.argmin(errors))]
            lo[c], hi[c] = best * self.min[c], best * self.max[c]
        return lo, hi


def quantization_mse(values, weights, lo, hi, bits, signed, symmetric=False, narrow=False) -> float:
    """Weighted mean squared error of fake-quantizing ``values`` with the grid covering [lo, hi]."""
    from edgekit.calibration.spec import qrange

    scale, zp = qparams_from_range(np.array([lo]), np.array([hi]), bits, signed, symmetric, narrow)
    qmin, qmax = qrange(bits, signed, narrow)
    s, z = float(scale[0]), float(zp[0])
    values = np.asarray(values, np.float64)
    deq = (np.clip(np.round(values / s) + z, qmin, qmax) - z) * s
    return float(np.average((values - deq) ** 2, weights=weights))


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "entropy": EntropyObserver,
             "mse": MSEObserver}


def make_observer(name: str, axis: int | None = None, **kwargs) -> Observer:
    """An observer by name (``minmax``, ``percentile``, ``entropy``, ``mse``)."""
    if name not in OBSERVERS:
        raise EdgekitError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](axis=axis, **kwargs)
