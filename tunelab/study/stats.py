"""Paired bootstrap over eval samples: the confidence intervals of a study's per-row differences and of
its conclusions' deciding margins. Pure numpy; no files, no model.

    point, lo, hi = bootstrap(lambda d: d.mean(-1), [row_nll - base_nll])   # 95% CI of a mean difference

A replicate draws n sample indices with replacement from one eval set's n samples. The same draw is
applied to every row at once, so each row's per-sample difference from the base row (already paired on
the sample) and every comparison between rows keep their pairing. Draws are seeded (SEED and the eval
set's name), so a report rebuilt from the same files shows the same intervals.

Replicates travel as one array `reps` of shape (..., 1 + B): reps[..., 0] is the statistic on the
original samples (the point estimate), reps[..., 1:] its B replicates. Any margin computed from such
arrays with numpy (differences, means over rows, max over groups) carries its point estimate and its
replicates together, and `interval` turns it into (point, lo, hi). A quantity known only as a point
(no per-sample data, such as the published 2023 table) is an array of shape (..., 1): it gives no
interval, and the verdict rests on the point estimate.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

REPLICATES = 2000   # bootstrap replicates B
LEVEL = 0.95        # two-sided percentile interval
SEED = 20230424     # fixed: the same study files always give the same intervals

METHOD = (f"paired bootstrap over eval samples (B = {REPLICATES} replicates, one resample of the sample "
          f"indices per eval set and replicate shared by all rows, seeds pooled per sample), "
          f"{LEVEL:.0%} percentile intervals, RNG seed {SEED}")


def draw(n: int, replicates: int = REPLICATES, seed: int = SEED, key: str = "") -> np.ndarray:
    """(replicates, n) sample indices drawn with replacement; the same (n, replicates, seed, key) always
    gives the same draw, so two measures on one eval set (key = its name) share their resamples."""
    if n < 1:
        raise ValueError("cannot resample an empty set of samples")
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    return rng.integers(0, n, size=(replicates, n))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, n) how often each sample was drawn in each replicate."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def replicate_means(values: np.ndarray | Sequence[float], idx: np.ndarray) -> np.ndarray:
    """Mean over samples of `values` (..., n) on the original samples, then on each draw of `idx`
    (B, n): shape (..., 1 + B)."""
    values = np.asarray(values, dtype=float)
    n = values.shape[-1]
    point = values.mean(axis=-1, keepdims=True)
    reps = values @ _counts(idx, n).T / n   # (..., B): weighted means, without materializing (..., B, n)
    return np.concatenate([point, reps], axis=-1)


def point_only(value: float) -> np.ndarray:
    """A quantity known only as a point estimate, in the replicate layout."""
    return np.array([float(value)])


def interval(reps: np.ndarray | Sequence[float], level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """(point, lo, hi) of a replicate array (1 + B,); lo and hi are None without replicates."""
    reps = np.asarray(reps, dtype=float).reshape(-1)
    if reps.size < 2:
        return float(reps[0]), None, None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(reps[1:], [tail, 100.0 - tail])
    return float(reps[0]), float(lo), float(hi)


def bootstrap(stat_fn: Callable[..., np.ndarray], arrays: Sequence[Sequence[float]], replicates: int = REPLICATES,
              seed: int = SEED, level: float = LEVEL, key: str = "") -> tuple[float, float | None, float | None]:
    """(point, lo, hi) of a statistic of paired per-sample arrays (element i of every array is eval
    sample i). `stat_fn(*arrays)` gets arrays of shape (..., n) and reduces the last axis: it runs once
    on the original samples and once, vectorized, on all B resamples (arrays of shape (B, n))."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    sizes = {a.shape[-1] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"paired arrays must have the same number of samples, got {sorted(sizes)}")
    idx = draw(sizes.pop(), replicates, seed, key)
    point = np.asarray(stat_fn(*arrays), dtype=float).reshape(1)
    reps = np.asarray(stat_fn(*[a[..., idx] for a in arrays]), dtype=float).reshape(-1)
    return interval(np.concatenate([point, reps]), level)
