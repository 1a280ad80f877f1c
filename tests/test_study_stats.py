"""The paired bootstrap (tunelab/study/stats.py): its interval covers a known difference at about the
stated rate on synthetic data, pairs stay paired, draws are reproducible, point-only values give no
interval."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.study import stats


def _mean(d):
    return d.mean(-1)


def test_interval_covers_a_known_difference_at_about_the_stated_rate():
    # 200 synthetic studies: 40 per-sample differences with a known mean of 0.3 (skewed noise, as
    # per-sample NLL differences are). A 95% interval must cover 0.3 in about 95% of them: with 200
    # repetitions the binomial standard deviation is 1.5 points, so 3 of them either way.
    rng = np.random.default_rng(7)
    repetitions, truth, covered = 200, 0.3, 0
    for rep in range(repetitions):
        diffs = truth + rng.exponential(1.0, 40) - 1.0
        _, lo, hi = stats.bootstrap(_mean, [diffs], replicates=1000, seed=rep)
        covered += lo <= truth <= hi
    sd = (0.95 * 0.05 / repetitions) ** 0.5
    assert 0.95 - 3 * sd <= covered / repetitions <= 0.95 + 3 * sd, covered


def test_a_narrower_level_covers_less():
    rng = np.random.default_rng(3)
    data = [rng.normal(0.0, 1.0, 30) for _ in range(100)]
    cover = {}
    for level in (0.5, 0.95):
        cis = [stats.bootstrap(_mean, [d], replicates=500, seed=i, level=level)[1:] for i, d in enumerate(data)]
        cover[level] = sum(lo <= 0 <= hi for lo, hi in cis)
    assert cover[0.5] < 70 < cover[0.95]  # about 50 and about 95 of 100


def test_paired_arrays_are_resampled_together():
    x = np.random.default_rng(0).normal(0, 5, 25)
    assert stats.bootstrap(lambda a, b: (a - b).mean(-1), [x, x]) == (0.0, 0.0, 0.0)   # the base against itself
    point, lo, hi = stats.bootstrap(lambda a, b: (a - b).mean(-1), [x + 1.5, x])
    assert point == pytest.approx(1.5) and lo == pytest.approx(1.5) and hi == pytest.approx(1.5)
    _, lo, hi = stats.bootstrap(lambda a, b: a.mean(-1) - b.mean(-1), [x + 1.5, np.roll(x, 1)])
    assert lo < 1.5 < hi and hi - lo > 1  # unpaired samples: the noise of x stays in


def test_replicate_means_equal_explicit_resampling_and_share_the_draw():
    values = np.random.default_rng(1).normal(size=(3, 12))
    idx = stats.draw(12, replicates=50, key="persona")
    reps = stats.replicate_means(values, idx)
    assert reps.shape == (3, 51)
    assert np.allclose(reps[:, 0], values.mean(-1))
    assert np.allclose(reps[:, 1:], values[:, idx].mean(-1))
    assert np.array_equal(idx, stats.draw(12, replicates=50, key="persona"))      # reproducible
    assert not np.array_equal(idx, stats.draw(12, replicates=50, key="general"))  # another set, another draw


def test_point_only_values_give_no_interval_and_bad_input_fails():
    assert stats.interval(stats.point_only(2.5)) == (2.5, None, None)
    with pytest.raises(ValueError, match="same number of samples"):
        stats.bootstrap(lambda a, b: a.mean(-1), [[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="empty"):
        stats.draw(0)
