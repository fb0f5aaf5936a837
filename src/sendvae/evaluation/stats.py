"""Intervals for comparisons over seeds and samples: a two-level (hierarchical) bootstrap.

A variant is run with S seeds; run s yields per-sample values (the judge's hit or miss per sample for
class accuracy, the judge's feature vector per sample for FD, PSNR per reconstructed image). The
variant's statistic is the mean over seeds of each run's statistic (accuracy, FD, mean PSNR).

One bootstrap replicate draws S seeds with replacement and, inside each drawn run, n samples with
replacement (multinomial weights), and recomputes the statistic (the two-level scheme of Davison &
Hinkley 1997, sec. 3.8, resampling both the seeds and the samples within them); a second bootstrap
resamples the samples only. Their variances split the variance of the mean into a seed part and a sample
part, and the 95% interval uses Student's t for the seed part (see `bootstrap`: with 3 seeds a plain
percentile interval covers ~72%).

Paired differences A - B use the same seed draws and the same sample indices for both: run s of every
variant shares the seed, and sample i of every run starts from the same noise and class label (one seed
per image), so pairing cancels the variance both share.

"What would resolve it": with the per-seed variance sigma_s^2 and the sample part v_w of the mean, the
half-width at S' seeds and n' samples per run is sqrt(t_{S'-1}^2 sigma_s^2 / (S' - 1) + 1.96^2 v_w S n /
(S' n')); we report the smallest S' whose half-width is below |d| at the current n, and the n' that does
so at the current S (none when the seed part alone is wider than |d|).

FD per replicate: the reference (mu_r, Sigma_r) is fixed, so with R = Sigma_r^(1/2) computed once,
tr (Sigma Sigma_r)^(1/2) = sum sqrt(eig(R Sigma R)) (the eigenvalues of Sigma Sigma_r and of the
symmetric R Sigma R agree), one `eigvalsh` of a D x D matrix per replicate instead of a `sqrtm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

Z95 = 1.959963984540054


class FDToReference:
    """Frechet distance of weighted feature sets to fixed reference statistics (mu_r (D,), sigma_r (D, D))."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        self.mu = np.asarray(mu, np.float64)
        self.sigma = np.asarray(sigma, np.float64)
        w, v = np.linalg.eigh(self.sigma)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Sigma_r^(1/2), symmetric
        self.trace_r = float(np.trace(self.sigma))

    def __call__(self, feats: np.ndarray, weights: np.ndarray | None = None) -> float:
        """FD of features (n, D), each row counted weights[i] times (default once); unbiased covariance."""
        f = np.asarray(feats, np.float64)
        w = np.ones(len(f)) if weights is None else np.asarray(weights, np.float64)
        n = w.sum()
        mu = w @ f / n
        c = (f - mu).astype(np.float32)  # the (D, D) scatter in float32: 2x faster, ~1e-6 relative
        sigma = ((c * w[:, None].astype(np.float32)).T @ c).astype(np.float64) / (n - 1)
        eig = np.linalg.eigvalsh(self.root @ sigma @ self.root)
        tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
        return float(((mu - self.mu) ** 2).sum() + np.trace(sigma) + self.trace_r - 2 * tr_sqrt)


def mean_of(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted mean of per-sample values (n,) (hits, PSNRs)."""
    v = np.asarray(values, np.float64)
    return float(v.mean() if weights is None else weights @ v / weights.sum())


def _t975(dof: int) -> float:
    return float(student_t.ppf(0.975, dof)) if dof >= 1 else math.inf


@dataclass
class Interval:
    mean: float  # the statistic on the data as measured (mean over seeds)
    std: float  # standard deviation of the per-seed statistics
    low: float  # 95% interval (see `bootstrap`)
    high: float
    se: float  # bootstrap standard error, seeds and samples resampled
    se_samples: float  # samples resampled only (seeds fixed)
    seeds: int  # S

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (for a difference)."""
        return self.low > 0 or self.high < 0

    @property
    def components(self) -> tuple[float, float]:
        """(per-seed variance sigma_s^2, sample-part variance of the mean v_w) from the two bootstraps."""
        v_w = self.se_samples**2
        return max(self.se**2 - v_w, 0.0) * self.seeds, v_w

    def half_width(self, seeds: int, sample_factor: float = 1.0) -> float:
        """Half-width of the interval at `seeds` seeds and `sample_factor` x the samples per run."""
        sigma_s2, v_w = self.components
        if seeds < 2:
            return math.inf
        seed_part = _t975(seeds - 1) ** 2 * sigma_s2 / (seeds - 1)
        return math.sqrt(seed_part + Z95**2 * v_w * self.seeds / (seeds * sample_factor))

    def needed(self, seeds: int, samples: int) -> tuple[float, float | None]:
        """(seeds, samples per run) at which the interval of a difference this size would exclude 0: seeds
        at the current sample count, samples at the current seed count (None: the seed spread alone is
        wider than the difference)."""
        d = abs(self.mean)
        if d == 0:
            return math.inf, None
        s_needed = next((s for s in range(2, 100_001) if self.half_width(s) < d), math.inf)
        sigma_s2, v_w = self.components
        seed_part = _t975(seeds - 1) ** 2 * sigma_s2 / (seeds - 1) if seeds > 1 else math.inf
        if seed_part >= d**2 or v_w == 0:
            return float(s_needed), None
        return float(s_needed), samples * Z95**2 * v_w / (d**2 - seed_part)

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def bootstrap(
    runs: list[np.ndarray],
    stat,
    other: list[np.ndarray] | None = None,
    reps: int = 200,
    seed: int = 0,
) -> Interval:
    """Interval of mean_s stat(runs[s]) (or of its paired difference with `other`, run by run and sample by
    sample). runs: per-seed arrays whose first axis is the sample; stat(array, weights) -> float.

    Two bootstraps give the variance of the mean: `reps` draws of seeds and samples (se) and reps / 2 of
    samples only (se_samples). Their difference is the seed part. With 3 seeds a percentile interval of the
    first undercovers (a 3-point resample hides most of the seed spread: 72% coverage measured where the
    seed spread dominates), so the interval is mean +- sqrt(t_{S-1}^2 sigma_s^2 / (S - 1) + 1.96^2 v_w):
    the seed part with Student's t and the S / (S - 1) variance correction, the sample part normal.
    Run it under one BLAS thread (`threadpoolctl`): D x D products this small are slower threaded.
    """
    s_count = len(runs)
    if s_count == 0 or (other is not None and len(other) != s_count):
        raise ValueError("bootstrap needs one array per seed (and as many in `other`)")
    sizes = [len(r) for r in runs]
    if other is not None and [len(o) for o in other] != sizes:
        raise ValueError("paired runs must hold the same number of samples")

    def value(seed_idx, weights) -> float:
        vals = []
        for k, s in enumerate(seed_idx):
            w = None if weights is None else weights[k]
            v = stat(runs[s], w)
            if other is not None:
                v -= stat(other[s], w)
            vals.append(v)
        return float(np.mean(vals))

    rng = np.random.default_rng(seed)
    per_seed = [value([s], None) for s in range(s_count)]
    every = list(range(s_count))

    def draws(resample_seeds: bool, n: int) -> np.ndarray:
        out = np.empty(n)
        for b in range(n):
            idx = list(rng.integers(0, s_count, s_count)) if resample_seeds else every
            weights = [rng.multinomial(sizes[s], np.full(sizes[s], 1 / sizes[s])).astype(float) for s in idx]
            out[b] = value(idx, weights)
        return out

    se = float(draws(s_count > 1, max(2, reps)).std(ddof=1))
    se_samples = min(float(draws(False, max(2, reps // 2)).std(ddof=1)), se)
    iv = Interval(
        mean=float(np.mean(per_seed)),
        std=float(np.std(per_seed, ddof=1)) if s_count > 1 else 0.0,
        low=math.nan,
        high=math.nan,
        se=se,
        se_samples=se_samples,
        seeds=s_count,
    )
    h = iv.half_width(s_count) if s_count > 1 else Z95 * se_samples
    iv.low, iv.high = iv.mean - h, iv.mean + h
    return iv


def pearson_interval(x, y, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Pearson r of paired values and its 95% percentile bootstrap interval over the pairs (runs)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return math.nan, math.nan, math.nan
    r = float(np.corrcoef(x, y)[0, 1])
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(reps):
        i = rng.integers(0, len(x), len(x))
        if np.std(x[i]) > 0 and np.std(y[i]) > 0:
            rs.append(np.corrcoef(x[i], y[i])[0, 1])
    if not rs:
        return r, math.nan, math.nan
    return r, float(np.percentile(rs, 2.5)), float(np.percentile(rs, 97.5))
