"""Linear probes on frozen features: multi-label binary attributes, categorical and continuous targets.

The protocol of Send-VAE's semantic-disentanglement evaluation (Table 8, Fig. 2): the flattened encoder
latent of each image is the feature vector, and a linear model per target is fitted on a train split,
its L2 strength chosen on a validation split from a small grid, and scored on a test split:

    multi-label binary -> F1 (micro and macro, threshold 0.5) and top-5 recall;
    categorical        -> accuracy (multinomial logistic regression);
    continuous         -> R^2 (ridge regression).

The solvers are written in torch so one implementation runs a 2k-image CPU probe and a 50k x 8192 GPU
probe alike; tests check them against scikit-learn's LogisticRegression and Ridge (the same objectives):

    logistic:  min_{W,b}  sum_i loss_i(x_i W + b) + ||W||^2 / (2 C)    (b unpenalised), full-batch L-BFGS
               with a strong-Wolfe line search, warm-started along the increasing C grid;
    ridge:     min_{w,b}  ||y - X w - b||^2 + alpha ||w||^2, closed form from one eigendecomposition of
               the centred Gram matrix (X^T X, or X X^T when D > N) shared by every alpha.

Features are standardised with the train split's mean and std. The splits are a fixed function of
(n, seed), and the solvers are deterministic for a given device, dtype and thread count, so reruns give
the same numbers. After selection the model is not refitted on train + validation: the test numbers are
those of the model that was selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strength of the logistic probes
ALPHA_GRID = (1.0, 10.0, 100.0, 1000.0)  # L2 strength of the ridge probes


@dataclass(frozen=True)
class Split:
    """Disjoint index arrays into the N images."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_split(n: int, seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)) -> Split:
    """A seeded permutation of range(n) cut into train / val / test (the rest)."""
    if n < 10:
        raise ValueError(f"a probe needs at least 10 images to split into train/val/test, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return Split(np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]))


def standardize(x, train: np.ndarray, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(N, D) features -> (N, D) tensor with the train rows' per-dimension mean 0 and std 1.

    dtype: by default float64 for small CPU probes (N * D <= 2^25: exact, and cheap), otherwise float32,
    which halves the memory traffic the large full-batch fits are bound by.
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(x))
    if dtype is None:
        small = x.numel() <= 2**25 and device.type == "cpu"
        dtype = torch.float64 if small else torch.float32
    x = x.to(device=device, dtype=dtype)
    t = torch.as_tensor(np.asarray(train), device=device)
    mu, sd = x[t].mean(0), x[t].std(0, correction=0)
    return (x - mu) / torch.where(sd > 1e-12, sd, torch.ones_like(sd))


# -- metrics ---------------------------------------------------------------------------------------------


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(micro F1, macro F1) of (N, A) boolean predictions.

    micro: 2 TP / (2 TP + FP + FN) over all (image, attribute) pairs; macro: the mean over attributes of
    the per-attribute F1, where an attribute with no positives and no predicted positives scores 0
    (scikit-learn's zero_division=0).
    """
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)  # (A,) each
    denom = 2 * tp + fp + fn
    micro = 2 * tp.sum() / denom.sum() if denom.sum() else 0.0
    per = np.divide(2 * tp, denom, out=np.zeros(len(tp), np.float64), where=denom > 0)
    return float(micro), float(per.mean())


def top_k_recall(y_true: np.ndarray, scores: np.ndarray, k: int = 5) -> float:
    """Mean over images with >= 1 true attribute of |true attributes among the k top-scoring| / |true|.

    y_true (N, A) bool, scores (N, A); ties are broken by attribute order (stable sort).
    """
    t = np.asarray(y_true, bool)
    top = np.argsort(-np.asarray(scores, np.float64), axis=1, kind="stable")[:, :k]  # (N, k)
    hits = np.take_along_axis(t, top, axis=1).sum(1)  # (N,)
    n_true = t.sum(1)
    keep = n_true > 0
    if not keep.any():
        raise ValueError("top-k recall needs images with at least one true attribute; none has any")
    return float((hits[keep] / n_true[keep]).mean())


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot (0 for a constant target predicted exactly, negative when worse than the mean)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    ss_tot = ((y - y.mean()) ** 2).sum()
    ss_res = ((y - pred) ** 2).sum()
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else 0.0


# -- solvers ---------------------------------------------------------------------------------------------


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
    num_outputs: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by full-batch L-BFGS -> (W (D, K), b (K,)).

    x (n, D) float. Multinomial when y is (n,) int64 class indices in [0, K): softmax cross-entropy
    (scikit-learn's multinomial objective). Otherwise y is (n, K) in {0, 1}: one sigmoid per column, K
    binary problems that share C fitted together (the objective is a sum over columns, so the joint
    minimum is every column's own minimum). The objective is divided by C n for conditioning:
    mean loss + ||W||^2 / (2 C n), the same minimiser as C sum(loss) + ||W||^2 / 2.
    """
    n, d = x.shape
    multinomial = y.ndim == 1
    # The weights are held as (K, D) and the gradient is formed by hand as G^T x (K, D): autograd's
    # x^T G for a thin G runs ~5x slower in CPU BLAS, and the fit is a few hundred such products.
    if init is None:
        w = torch.zeros(num_outputs, d, dtype=x.dtype, device=x.device)
        b = torch.zeros(num_outputs, dtype=x.dtype, device=x.device)
    else:
        w, b = init[0].T.contiguous(), init[1].clone()
    tol = 1e-7 if x.dtype == torch.float64 else 1e-5
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )  # fmt: skip
    lam = 1.0 / (2.0 * c * n)
    rows = torch.arange(n, device=x.device)

    @torch.no_grad()
    def closure() -> torch.Tensor:
        logits = torch.addmm(b, x, w.T)  # (n, K)
        if multinomial:
            loss = F.cross_entropy(logits, y)
            g = torch.softmax(logits, 1)  # d loss / d logits = (softmax - onehot) / n
            g[rows, y] -= 1
        else:
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / n
            g = torch.sigmoid(logits) - y  # d loss / d logits = (sigmoid - y) / n
        g /= n
        w.grad = torch.mm(g.T, x).add_(w, alpha=2.0 * lam)  # (K, D)
        b.grad = g.sum(0)
        return loss + lam * (w * w).sum()

    opt.step(closure)
    return w.T, b


class RidgeBasis:
    """The eigendecomposition of one training matrix's centred Gram, shared by every target and alpha.

    x (n, D). With centred Xc and Xc^T Xc = V diag(l) V^T, w(alpha) = V diag(1 / (l + alpha)) V^T Xc^T yc;
    when D > n the n x n Gram Xc Xc^T = U diag(l) U^T is smaller and w(alpha) = Xc^T U diag(1 / (l + alpha))
    U^T yc (the same w). b = mean(y) - mean(x) w. Building it is the whole cost of a ridge probe (one Gram
    product and one eigh: ~2 min for 30k x 8192 on two CPU cores); solving for a target is cheap.
    """

    def __init__(self, x: torch.Tensor):
        self.xm = x.mean(0)  # (D,)
        xc = x - self.xm
        self.primal = xc.shape[1] <= xc.shape[0]
        gram = xc.T @ xc if self.primal else xc @ xc.T  # (D, D) or (n, n)
        evals, self.basis = torch.linalg.eigh(gram)
        self.evals = evals.clamp_min(0)

    def _xc_t(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Xc^T v (D, T) as (v^T X)^T - mean(x) 1^T v: the fast layout for a thin v, no centred copy."""
        return torch.mm(v.T, x).T - self.xm[:, None] * v.sum(0)

    def solve(self, x: torch.Tensor, y: torch.Tensor, alphas: tuple[float, ...]):
        """x (n, D) the matrix this basis was built from, y (n, T) -> [(w (D, T), b (T,))] per alpha."""
        ym = y.mean(0)
        yc = y - ym
        if self.primal:
            proj = self.basis.T @ self._xc_t(x, yc)  # (D, T)
            ws = [self.basis @ (proj / (self.evals + a)[:, None]) for a in alphas]
        else:
            proj = self.basis.T @ yc  # (n, T)
            ws = [self._xc_t(x, self.basis @ (proj / (self.evals + a)[:, None])) for a in alphas]
        return [(w, ym - self.xm @ w) for w in ws]


def ridge_path(
    x: torch.Tensor, y: torch.Tensor, alphas: tuple[float, ...]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ridge with an unpenalised intercept for each alpha; x (n, D), y (n, T) -> [(w (D, T), b (T,))]."""
    return RidgeBasis(x).solve(x, y, alphas)


# -- probes ----------------------------------------------------------------------------------------------


def _index(split: Split, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(s, device=x.device) for s in (split.train, split.val, split.test))


def probe_multilabel(
    x: torch.Tensor, y: np.ndarray, split: Split, grid: tuple[float, ...] = C_GRID, k: int = 5
) -> dict[str, float]:
    """One logistic probe per attribute, one C for all chosen by validation micro F1.

    x (N, D) standardised features (see `standardize`), y (N, A) bool. Returns test f1_micro, f1_macro,
    top{k}_recall and C. An attribute never (or always) true in the train rows gets a constant probe.
    """
    y = np.asarray(y, bool)
    tr, _, _ = _index(split, x)
    rate = y[split.train].mean(0)  # (A,)
    fitted = np.flatnonzero((rate > 0) & (rate < 1))  # a constant column would drive b to +-inf
    xt = x[tr]
    yt = torch.as_tensor(y[split.train][:, fitted], dtype=x.dtype, device=x.device)
    best: tuple[float, float, np.ndarray] | None = None
    fit = None
    for c in sorted(grid):  # increasing C (weaker L2): each fit starts from the last one's solution
        p = np.tile(rate, (len(x), 1))  # (N, A): constant columns predict their train rate
        if len(fitted):
            fit = fit_logistic(xt, yt, c, len(fitted), init=fit)
            p[:, fitted] = torch.sigmoid(torch.addmm(fit[1], x, fit[0])).cpu().numpy()
        val = f1_scores(y[split.val], p[split.val] >= 0.5)[0]
        if best is None or val > best[0]:
            best = (val, c, p)
    assert best is not None  # the grid is not empty
    _, c, p = best
    micro, macro = f1_scores(y[split.test], p[split.test] >= 0.5)
    return {
        "f1_micro": micro,
        "f1_macro": macro,
        f"top{k}_recall": top_k_recall(y[split.test], p[split.test], k),
        "C": c,
    }


def _valid(split: Split, mask: np.ndarray) -> Split:
    return Split(*(s[mask[s]] for s in (split.train, split.val, split.test)))


def probe_categorical(
    x: torch.Tensor, y: np.ndarray, split: Split, grid: tuple[float, ...] = C_GRID
) -> dict[str, float]:
    """Multinomial logistic probe; rows with y < 0 (attribute does not apply) are left out.

    Returns test accuracy, the chance level (the train split's majority class) and C.
    """
    y = np.asarray(y, np.int64)
    s = _valid(split, y >= 0)
    if len(np.unique(y[s.train])) < 2:
        raise ValueError("a categorical probe needs at least 2 classes among the training images")
    tr, va, te = _index(s, x)
    xt, yt = x[tr], torch.as_tensor(y[s.train], device=x.device)
    best: tuple[float, float, np.ndarray] | None = None
    fit = None
    for c in sorted(grid):
        fit = fit_logistic(xt, yt, c, int(y.max()) + 1, init=fit)
        pred = lambda rows, f=fit: torch.addmm(f[1], x[rows], f[0]).argmax(1).cpu().numpy()  # noqa: E731
        val = float((pred(va) == y[s.val]).mean())
        if best is None or val > best[0]:
            best = (val, c, pred(te))
    assert best is not None  # the grid is not empty
    _, c, test_pred = best
    majority = np.bincount(y[s.train]).argmax()
    return {
        "accuracy": float((test_pred == y[s.test]).mean()),
        "chance": float((y[s.test] == majority).mean()),
        "C": c,
    }


def probe_continuous(
    x: torch.Tensor,
    y: np.ndarray,
    split: Split,
    grid: tuple[float, ...] = ALPHA_GRID,
    cache: dict | None = None,
) -> dict[str, float]:
    """Ridge probe; rows with NaN targets (attribute does not apply) are left out. Returns test R^2, alpha.

    cache: a dict kept by the caller for one feature matrix x; targets with the same training rows then
    share one RidgeBasis (the shapes targets need two: every image, and images with a second object).
    """
    y = np.asarray(y, np.float64)
    s = _valid(split, np.isfinite(y))
    tr, va, te = _index(s, x)
    xt = x[tr]
    key = s.train.tobytes()
    basis = cache.get(key) if cache is not None else None
    if basis is None:
        basis = RidgeBasis(xt)
        if cache is not None:
            cache[key] = basis
    yt = torch.as_tensor(y[s.train], dtype=x.dtype, device=x.device)[:, None]  # (n, 1)
    best: tuple[float, float, np.ndarray] | None = None
    for alpha, (w, b) in zip(grid, basis.solve(xt, yt, grid)):
        pred = lambda rows, w=w, b=b: (x[rows] @ w + b)[:, 0].cpu().numpy()  # noqa: E731
        val = r2_score(y[s.val], pred(va))
        if best is None or val > best[0]:
            best = (val, alpha, pred(te))
    assert best is not None  # the grid is not empty
    _, alpha, test_pred = best
    return {"r2": r2_score(y[s.test], test_pred), "alpha": alpha}


PRIMARY_METRIC = {"multilabel": "f1_micro", "categorical": "accuracy", "continuous": "r2"}


def run_probe(
    kind: str, x: torch.Tensor, y: np.ndarray, split: Split, cache: dict | None = None
) -> dict[str, float]:
    """Dispatch on the kind: "multilabel", "categorical" or "continuous" (cache: see probe_continuous)."""
    if kind == "multilabel":
        return probe_multilabel(x, y, split)
    if kind == "categorical":
        return probe_categorical(x, y, split)
    if kind == "continuous":
        return probe_continuous(x, y, split, cache=cache)
    raise ValueError(f"unknown probe kind {kind!r}; expected one of {sorted(PRIMARY_METRIC)}")
