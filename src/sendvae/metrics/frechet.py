"""Feature-space metrics of the ADM evaluator (Dhariwal & Nichol 2021, guided-diffusion/evaluations).

- Frechet distance (FID / sFID): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64.
- Inception Score: exp(E_x KL(p(y|x) || p(y))) per split, averaged over splits; ADM's splits are
  consecutive runs of 5000 samples (the last one shorter when N is not a multiple).
- Improved precision / recall (Kynkaanniemi et al. 2019): k-NN balls around each feature vector;
  precision = fraction of fake samples inside the real manifold, recall = the converse.

Every function takes numpy arrays or torch tensors. Statistics and the Frechet distance are float64
(float32 covariances of 2048-d features lose several digits of FID). Distances for precision / recall
follow ADM's DistanceBlock: float16 for every 10000 x 10000 block whose float16 distances are all
finite, float32 otherwise (or float32 throughout on request), computed in chunks on the features'
device so memory stays O(chunk * N).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    The square root of S1 S2 follows ADM / pytorch-fid: when sqrtm fails (a singular product gives a
    non-finite result with some BLAS builds) both covariances get eps * I added; a complex result
    with a negligible imaginary diagonal (|imag| <= 1e-3) is taken as its real part, a larger one
    is an error.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf; recompute the statistics")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component of {m:.3g}; "
                "the covariances are not positive semi-definite"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class StatsAccumulator:
    """Streaming mean and unbiased covariance of feature vectors, float64.

    Batches merge with Chan et al.'s parallel update: with running count n, mean m, scatter M and a
    batch (n_b, m_b, M_b), delta = m_b - m, M += M_b + delta delta^T n n_b / (n + n_b). Every batch is
    centred on its own mean, so there is no large-mean cancellation, and the result does not depend on
    the batch size beyond float64 rounding. Runs on the device of the features it receives.
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: torch.Tensor | None = None  # (D,)
        self._scatter: torch.Tensor | None = None  # (D, D) sum of centred outer products

    def update(self, feats: ArrayLike) -> None:
        x = torch.as_tensor(feats).detach().to(torch.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature width changed from {self._mean.shape[0]} to {x.shape[1]}")
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        nb = x.shape[0]
        mb = x.mean(0)
        xc = x - mb
        scatter_b = xc.T @ xc  # (D, D)
        if self._mean is None:
            self.n, self._mean, self._scatter = nb, mb, scatter_b
            return
        assert self._scatter is not None  # set together with the mean
        mb, scatter_b = mb.to(self._mean.device), scatter_b.to(self._mean.device)
        delta = mb - self._mean
        total = self.n + nb
        self._scatter += scatter_b + torch.outer(delta, delta) * (self.n * nb / total)
        self._mean += delta * (nb / total)
        self.n = total

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) as float64 numpy arrays; sigma uses N - 1 like np.cov."""
        if self._mean is None or self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        assert self._scatter is not None  # set together with the mean
        return self._mean.cpu().numpy(), (self._scatter / (self.n - 1)).cpu().numpy()


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features, float64 (np.mean, np.cov(rowvar=False))."""
    acc = StatsAccumulator()
    acc.update(features)
    return acc.finalize()


IS_SPLIT_SIZE = 5000  # ADM: compute_inception_score(activations, split_size=5000)


def is_split_sizes(n: int, split_size: int | None = None, splits: int | None = None) -> list[int]:
    """Sizes of the consecutive parts the Inception Score of n samples averages over.

    split_size (default IS_SPLIT_SIZE when splits is None): ADM's parts, range(0, n, split_size), so
    the last part holds the remainder (12000 samples: 5000, 5000, 2000). splits: that many parts of
    equal size (sizes differ by at most one, the first ones larger), the older definition of
    improved-GAN-style code; 50k samples give the same ten parts of 5000 either way.
    """
    if split_size is not None and splits is not None:
        raise ValueError("pass split_size (ADM's fixed-size splits) or splits (equal splits), not both")
    if n < 1:
        raise ValueError("the Inception Score needs at least one sample")
    if splits is not None:
        if not 1 <= splits <= n:
            raise ValueError(
                f"inception_score needs at least `splits` samples: got {n} for {splits} splits; "
                "pass fewer splits"
            )
        return [len(p) for p in torch.arange(n).tensor_split(splits)]
    split_size = IS_SPLIT_SIZE if split_size is None else split_size
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    return [min(split_size, n - i) for i in range(0, n, split_size)]


def inception_score(
    logits_or_probs: ArrayLike,
    split_size: int | None = None,
    splits: int | None = None,
    from_logits: bool = True,
) -> float:
    """Inception Score of (N, C) classifier outputs, float64.

    ADM: p(y|x) = softmax(pool_3 @ W) (the graph's logits without bias); for each consecutive part s,
    IS_s = exp(mean_x sum_y p(y|x) (log p(y|x) - log p_s(y))), where p_s(y) is the part's mean
    prediction; the result is the mean over parts. The parts are ADM's, split_size = 5000 samples, by
    default, or `splits` equal parts (see is_split_sizes). The two agree at 50k samples only; at 10k,
    ADM's two parts of 5000 and ten parts of 1000 differ by several points.
    """
    x = torch.as_tensor(logits_or_probs).detach().to(torch.float64).cpu()
    if x.ndim != 2:
        raise ValueError(f"expected (N, classes) logits or probabilities, got shape {tuple(x.shape)}")
    sizes = is_split_sizes(x.shape[0], split_size, splits)
    if from_logits:
        logp = torch.log_softmax(x, dim=1)
    else:
        if (x < 0).any() or not torch.allclose(x.sum(1), torch.ones(x.shape[0], dtype=x.dtype), atol=1e-4):
            raise ValueError("probabilities must be non-negative and sum to 1 per row (or pass from_logits)")
        logp = x.log()
    scores = []
    for part in logp.split(sizes, dim=0):
        p = part.exp()
        # (1, C) log of the marginal p(y) = mean_x p(y|x); logsumexp, as a mean of subnormal p would be 0
        log_py = torch.logsumexp(part, dim=0, keepdim=True) - math.log(part.shape[0])
        kl = torch.where(p > 0, p * (part - log_py), torch.zeros_like(p)).sum(1)  # (n,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))


PR_DISTANCE_DTYPES = ("float16", "float32")
PR_BLOCK = 10000  # ADM's ManifoldEstimator row_batch_size = col_batch_size


class _Float16Overflow(Exception):
    """A float16 distance tile is not finite: its block is computed again in float32."""


class _Prepared:
    """A feature set ready for distances: its vectors and squared norms in the distances' precision.

    float16 follows ADM's TF graph: the features are cast to float16; |x|^2 sums float16 squares and is
    rounded to float16; x holds the float16 values as float32 (exactly), so that a @ b.T is a float16
    product accumulated in float32 (cuBLAS's default for TF's float16 matmul) before its rounding to
    float16. TF's own float16 sums accumulate in a kernel-dependent order, so a given TF build can differ
    from this by an ulp of float16 in a norm.
    """

    def __init__(self, feats: torch.Tensor, half: bool):
        self.half = half
        if half:
            h = feats.half()
            self.x, self.sq = h.float(), h.square().float().sum(1).half()
        else:
            self.x, self.sq = feats, feats.square().sum(1)


def _tiles(a: _Prepared, b: _Prepared, rows: slice, cols: slice, chunk: int):
    """(i, j, d) over the chunk x chunk tiles of block (rows, cols): d = max(|a_i|^2 - 2 a_i.b_j + |b_j|^2, 0)
    as float32, (len(i), len(j)). In float16 every op rounds to float16, as in the TF graph, and a tile
    that is not finite raises _Float16Overflow."""
    for r in range(rows.start, rows.stop, chunk):
        i = slice(r, min(r + chunk, rows.stop))
        for c in range(cols.start, cols.stop, chunk):
            j = slice(c, min(c + chunk, cols.stop))
            ab = a.x[i] @ b.x[j].T
            if a.half:
                d = a.sq[i, None] - 2 * ab.half() + b.sq[None, j]  # float16 arithmetic
                if not torch.isfinite(d).all():
                    raise _Float16Overflow
                yield i, j, d.float().clamp_min_(0.0)
            else:
                yield i, j, (a.sq[i, None] - 2.0 * ab + b.sq[None, j]).clamp_min_(0.0)


def _blocks(a: torch.Tensor, b: torch.Tensor, distance_dtype: str, chunk: int, block: int, reduce):
    """reduce(rows, cols, tiles) for every block x block block of the distances of a's rows to b's rows,
    yielded as (rows, cols, result).

    ADM's DistanceBlock decides the precision per block: float16 when all of the block's float16
    distances are finite, else float32 (or float32 throughout for distance_dtype="float32").
    """
    if distance_dtype not in PR_DISTANCE_DTYPES:
        raise ValueError(f"distance_dtype must be one of {PR_DISTANCE_DTYPES}, got {distance_dtype!r}")
    if chunk < 1 or block < 1:
        raise ValueError(f"chunk and block must be >= 1, got {chunk} and {block}")
    prepared: dict[tuple[int, bool], _Prepared] = {}

    def prep(x: torch.Tensor, half: bool) -> _Prepared:  # once per set and precision; a may be b
        key = (id(x), half)
        if key not in prepared:
            prepared[key] = _Prepared(x, half)
        return prepared[key]

    for r in range(0, a.shape[0], block):
        rows = slice(r, min(r + block, a.shape[0]))
        for c in range(0, b.shape[0], block):
            cols = slice(c, min(c + block, b.shape[0]))
            result = None
            if distance_dtype == "float16":
                try:
                    result = reduce(rows, cols, _tiles(prep(a, True), prep(b, True), rows, cols, chunk))
                except _Float16Overflow:
                    pass  # ADM's tf.cond: the whole block again in float32
            if result is None:
                result = reduce(rows, cols, _tiles(prep(a, False), prep(b, False), rows, cols, chunk))
            yield rows, cols, result


def _local(s: slice, origin: slice) -> slice:
    return slice(s.start - origin.start, s.stop - origin.start)


def knn_radii(
    feats: torch.Tensor,
    k: int = 3,
    chunk: int = 1024,
    distance_dtype: str = "float16",
    block: int = PR_BLOCK,
) -> torch.Tensor:
    """Squared distance of every vector to its k-th nearest neighbour in the same set, float32 (N,).

    As ADM, the vector itself counts as neighbour 0 (the (k + 1)-th smallest distance of its row, so
    the k-th other vector), and distances are computed as `distance_dtype` (see precision_recall).
    """
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {n}")

    def smallest(rows: slice, cols: slice, tiles) -> torch.Tensor:  # (rows, k + 1) over the block's columns
        best = feats.new_full((rows.stop - rows.start, k + 1), float("inf"))
        for i, _, d in tiles:
            r = _local(i, rows)
            best[r] = torch.cat([best[r], d], 1).topk(k + 1, dim=1, largest=False).values
        return best

    best = feats.new_full((n, k + 1), float("inf"))
    for rows, _, part in _blocks(feats, feats, distance_dtype, chunk, block, smallest):
        best[rows] = torch.cat([best[rows], part], 1).topk(k + 1, dim=1, largest=False).values
    return best[:, k]


def precision_recall(
    real_feats: ArrayLike,
    fake_feats: ArrayLike,
    k: int = 3,
    chunk: int = 1024,
    distance_dtype: str = "float16",
    block: int = PR_BLOCK,
) -> tuple[float, float]:
    """Improved precision and recall of fake features against real ones (ADM's ManifoldEstimator).

    A vector lies in a set's manifold when it falls within (distance <=) the k-NN ball of any member.
    precision = P(fake in real manifold), recall = P(real in fake manifold).

    distance_dtype: "float16" (default) as ADM's DistanceBlock: squared distances
    max(|a|^2 - 2 a.b + |b|^2, 0) from float16 features in float16 arithmetic, for every block of
    block x block distances (ADM: 10000) whose float16 values are all finite, float32 for a block that
    overflows; "float32": float32 throughout. The choice moves 2048-d Inception precision / recall by
    ~1e-3. Radii and comparisons are float32 of those distances, as in ADM; chunk sets the tile size
    (memory O(chunk * (chunk + N)), independent of the result).
    """
    real = torch.as_tensor(real_feats).detach().float()
    fake = torch.as_tensor(fake_feats).detach().float().to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    r_real = knn_radii(real, k, chunk, distance_dtype, block)
    r_fake = knn_radii(fake, k, chunk, distance_dtype, block)

    def inside(rows: slice, cols: slice, tiles) -> tuple[torch.Tensor, torch.Tensor]:
        real_in = torch.zeros(rows.stop - rows.start, dtype=torch.bool, device=real.device)
        fake_in = torch.zeros(cols.stop - cols.start, dtype=torch.bool, device=real.device)
        for i, j, d in tiles:  # d: (real rows i, fake rows j)
            fake_in[_local(j, cols)] |= (d <= r_real[i, None]).any(0)
            real_in[_local(i, rows)] |= (d <= r_fake[None, j]).any(1)
        return real_in, fake_in

    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    for rows, cols, (r_in, f_in) in _blocks(real, fake, distance_dtype, chunk, block, inside):
        real_in[rows] |= r_in
        fake_in[cols] |= f_in
    return fake_in.double().mean().item(), real_in.double().mean().item()
