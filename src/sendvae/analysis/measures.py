"""Latent-space measures beyond probes: uniformity (VA-VAE), discrimination (MAETok), alignment with a
teacher (CKNNA), Pearson r.

Both measures work on a PCA-reduced latent: the flattened latents (N, D) are projected on their top
`dim` principal components and whitened (each component scaled to unit variance), so the numbers are
comparable between VAEs of different latent sizes and scales, and a KDE or a Gaussian mixture stays
tractable (D is 1024 for a 4 x 16 x 16 latent, 8192 for 32 x 16 x 16).

uniformity    Gini coefficient of a Gaussian KDE density evaluated at the latents themselves (VA-VAE,
              Sec. 4.3): 0 when every latent sits at the same density (a uniform spread), towards 1 when
              the density mass concentrates on a few points. Lower is more uniform.
discrimination  held-out fit of a Gaussian mixture with K = number of classes (MAETok): the mixture
              (full covariances) is fitted on a seeded half of the latents and scored on the other half
              as mean log-likelihood per sample and per dimension, in nats. Higher means the latents fall
              into compact clusters; the fit's BIC per sample on the held-out half is reported too.
alignment     CKNNA (Huh et al. 2024, as REPA reports it) between the flattened latents and a teacher's
              pooled features of the same images: kernel alignment (unbiased HSIC) restricted to pairs
              that are among each other's k nearest neighbours in both spaces; 1 for the same geometry.
"""

from __future__ import annotations

import numpy as np


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: sum_ij |v_i - v_j| / (2 n^2 mean(v)).

    Computed from the sorted values v_(1) <= ... <= v_(n) as (2 sum_i i v_(i)) / (n sum v) - (n + 1) / n.
    0 for equal values, (n - 1) / n when one value holds everything.
    """
    v = np.sort(np.asarray(values, np.float64).ravel())
    if v.size == 0 or (v < 0).any():
        raise ValueError("gini needs a non-empty array of non-negative values")
    total = v.sum()
    if total <= 0:
        return 0.0
    n = v.size
    return float(2.0 * (np.arange(1, n + 1) * v).sum() / (n * total) - (n + 1) / n)


def pca_reduce(z: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, min(dim, N - 1, D)) float64 whitened principal components, deterministic for a seed.

    A full SVD (float64) while N * D <= 2^24; above that a seeded randomized SVD (Halko et al., 7 power
    iterations) of the features in their own dtype: the top components of a 50k x 8192 latent in ~10 s on
    two CPU cores instead of a 3.4e12-flop full decomposition. The KDE and the full-covariance mixture
    below are affine-invariant up to their regularisers, so only the subspace has to be right.
    """
    from sklearn.decomposition import PCA

    z = np.asarray(z).reshape(len(z), -1)
    small = z.size <= 2**24
    if small or z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float64)
    k = max(1, min(dim, len(z) - 1, z.shape[1]))
    pca = PCA(n_components=k, whiten=True, svd_solver="full" if small else "randomized", random_state=seed)
    return pca.fit_transform(z).astype(np.float64)


def _kde_gini(p: np.ndarray) -> float:
    from scipy.stats import gaussian_kde

    return gini(gaussian_kde(p.T)(p.T))  # density at each of the N points (N,)


def _gmm_fit(p: np.ndarray, num_components: int, seed: int) -> dict[str, float]:
    from sklearn.mixture import GaussianMixture

    if num_components < 1:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    perm = np.random.default_rng(seed).permutation(len(p))
    fit, held = p[perm[: len(p) // 2]], p[perm[len(p) // 2 :]]
    gmm = GaussianMixture(num_components, covariance_type="full", reg_covar=1e-4, random_state=seed)
    gmm.fit(fit)
    ll = float(gmm.score(held))  # mean log-likelihood per held-out sample
    return {"gmm_loglik_per_dim": ll / p.shape[1], "gmm_bic_per_sample": float(gmm.bic(held)) / len(held)}


def kde_uniformity(z: np.ndarray, dim: int = 8, seed: int = 0) -> float:
    """Gini coefficient of the Gaussian-KDE density (Scott's bandwidth) at each of the N latents (N, ...)."""
    return _kde_gini(pca_reduce(z, dim, seed))


def gmm_discrimination(z: np.ndarray, num_components: int, dim: int = 8, seed: int = 0) -> dict[str, float]:
    """Held-out Gaussian-mixture fit of the PCA-reduced latents (N, ...): mean log-likelihood per sample
    and per dimension (nats) and BIC per sample, both on the held-out half."""
    return _gmm_fit(pca_reduce(z, dim, seed), num_components, seed)


def latent_measures(z: np.ndarray, num_classes: int, dim: int = 8, seed: int = 0) -> dict[str, float]:
    """Uniformity and (with >= 2 classes) discrimination of latents (N, ...) from one shared PCA."""
    p = pca_reduce(z, dim, seed)
    out = _gmm_fit(p, num_classes, seed) if num_classes > 1 else {}
    return {**out, "uniformity_gini": _kde_gini(p)}


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of two (m, m) kernel matrices; diagonals are ignored.

    [tr(K L) + 1'K1 1'L1 / ((m-1)(m-2)) - 2/(m-2) 1'K L 1] / (m (m-3)) with zeroed diagonals; tr(K L) is
    taken as sum(K * L^T), which stays right for the non-symmetric masked kernels of CKNNA.
    """
    m = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    value = (k * l.T).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2.0 * (k @ l).sum() / (m - 2)
    return float(value / (m * (m - 3)))


def _knn_mask(kernel: np.ndarray, k: int) -> np.ndarray:
    """(m, m) 0/1: row i marks the k most similar other points of i (ties broken by index)."""
    sim = kernel.copy()
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (m, k)
    mask = np.zeros_like(kernel)
    np.put_along_axis(mask, top, 1.0, axis=1)
    return mask


def cknna(a: np.ndarray, b: np.ndarray, topk: int = 10) -> float:
    """CKNNA of two feature sets of the same m images, a (m, ...) and b (m, ...).

    Rows are flattened and L2-normalised, kernels are K = a a^T and L = b b^T, and with M = (k-NN mask of K)
    * (k-NN mask of L):  CKNNA = HSIC(M K, M L) / sqrt(HSIC(M_K K, M_K K) HSIC(M_L L, M_L L)).
    """
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if len(a) != len(b):
        raise ValueError(f"cknna needs features of the same images, got {len(a)} and {len(b)} rows")
    if not 2 <= topk < len(a) - 1 or len(a) < 4:
        raise ValueError(f"cknna needs 2 <= topk < m - 1 and m >= 4, got topk={topk}, m={len(a)}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    k, l = a @ a.T, b @ b.T
    mk, ml = _knn_mask(k, topk), _knn_mask(l, topk)
    both = mk * ml
    num = _hsic_unbiased(both * k, both * l)
    den = np.sqrt(_hsic_unbiased(mk * k, mk * k) * _hsic_unbiased(ml * l, ml * l))
    return float(num / den) if den > 0 else 0.0


def pearson_r(x, y) -> tuple[float, float]:
    """(Pearson r, two-sided p-value) of paired values; needs at least 3 pairs that are not constant."""
    from scipy.stats import pearsonr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"pearson_r needs two 1-D arrays of >= 3 paired values, got {x.shape} and {y.shape}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("pearson_r is undefined for a constant series")
    res = pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)
