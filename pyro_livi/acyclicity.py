"""Acyclicity of a weighted directed graph as a differentiable penalty: DAGMA's log-determinant
characterisation (Bello, Aragam & Ravikumar 2022, "DAGMA: Learning DAGs via M-matrices and a
Log-Determinant Acyclicity Characterization", NeurIPS; reference implementation
kevinsbello/dagma ``src/dagma/linear.py``).

For a weighted adjacency matrix W (d, d), W[i, j] the weight of the edge i -> j, and s > 0::

    h_s(W) = -log det(s I - W o W) + d log s                         (o: elementwise product)
    grad h_s(W) = 2 W o (s I - W o W)^{-T}

on the domain where s I - W o W is a nonsingular M-matrix, i.e. s > rho(W o W), the spectral
radius of the nonnegative matrix W o W (equivalently, (s I - W o W)^{-1} exists and is
entrywise nonnegative, the check of the reference). On that domain h_s(W) >= 0, with equality
exactly when the graph of W is acyclic; h_s grows without bound at the domain's edge, so
gradient steps of moderate size stay inside. A larger s enlarges the domain.

Path following (the reference's ``fit``): T rounds; round t minimises
``mu_t * (score(W) + lambda1 |W|_1) + h_{s_t}(W)`` from the previous round's solution, with
mu_t = mu_init * mu_factor^t decreasing (mu 1, 0.1, ..., so acyclicity weighs more and more)
and s_t from a list (1.0, 0.9, 0.8, 0.7, 0.6). A round whose iterate leaves the domain is
restarted from its starting point with s_t increased by ``s_step`` (0.1) and half the
learning rate. :class:`PathSchedule` holds these numbers; :func:`fit_linear_sem` uses them
for a linear structural equation model, and the CMC-VAE (:mod:`pyro_livi.models.cmcvae`) uses
them as training stages.

Shapes: W is (d, d) as a numpy array or a torch tensor; functions return the same kind.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "LinearSEMFit",
    "PathSchedule",
    "acyclicity",
    "acyclicity_grad",
    "acyclicity_penalty",
    "domain_s",
    "fit_linear_sem",
    "graph_accuracy",
    "in_domain",
    "is_dag",
    "simulate_er_linear_sem",
    "spectral_radius",
    "threshold_graph",
]


def _check_square(W) -> int:
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"expected a square (d, d) matrix; got shape {tuple(W.shape)}")
    return int(W.shape[0])


# ----------------------------------------------------------------------------------- h and grad
def acyclicity(W, s: float = 1.0):
    """h_s(W) = -log det(s I - W o W) + d log s (DAGMA, eq. 5), computed with slogdet.

    W : (d, d) numpy array or torch tensor (differentiable through torch autograd).
    s : scale, > 0; the value is an acyclicity measure only on the domain s > rho(W o W)
        (see :func:`in_domain`); outside it the log of |det| is returned.
    Returns a float (numpy input) or a 0-dim tensor (torch input); 0 for an acyclic W,
    > 0 for a W with a cycle, inside the domain.
    """
    if s <= 0:
        raise ValueError(f"s must be > 0, got {s}")
    d = _check_square(W)
    if isinstance(W, torch.Tensor):
        M = s * torch.eye(d, dtype=W.dtype, device=W.device) - W * W
        return -torch.linalg.slogdet(M)[1] + d * math.log(s)
    W = np.asarray(W, dtype=float)
    M = s * np.eye(d) - W * W
    return float(-np.linalg.slogdet(M)[1] + d * math.log(s))


def acyclicity_grad(W, s: float = 1.0):
    """Closed-form gradient of :func:`acyclicity`: 2 W o (s I - W o W)^{-T}, shape (d, d),
    of the same kind as W (numpy or torch)."""
    d = _check_square(W)
    if isinstance(W, torch.Tensor):
        M = s * torch.eye(d, dtype=W.dtype, device=W.device) - W * W
        return 2 * W * torch.linalg.inv(M).T
    W = np.asarray(W, dtype=float)
    return 2 * W * np.linalg.inv(s * np.eye(d) - W * W).T


def spectral_radius(B) -> float:
    """Largest modulus of the eigenvalues of a square matrix B (numpy or torch; no gradient)."""
    _check_square(B)
    if isinstance(B, torch.Tensor):
        B = B.detach().to("cpu", torch.float64).numpy()
    if B.shape[0] == 0:
        return 0.0
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(B, dtype=float)))))


def in_domain(W, s: float = 1.0, rtol: float = 1e-6) -> bool:
    """True when s I - W o W is a nonsingular M-matrix, i.e. s > rho(W o W) (with a relative
    margin ``rtol``), the domain on which :func:`acyclicity` characterises acyclicity."""
    return spectral_radius(W * W) < s * (1 - rtol)


def domain_s(W, s: float = 1.0, s_step: float = 0.1, max_steps: int = 1000) -> float:
    """The smallest s' = s + k s_step (k = 0, 1, ...) with W inside the domain of h_{s'}: the
    reference's retry with a larger s, as one evaluation. Raises ValueError when no k up to
    ``max_steps`` works (W non-finite)."""
    if s_step <= 0:
        raise ValueError(f"s_step must be > 0, got {s_step}")
    rho = spectral_radius(W * W)
    if not math.isfinite(rho):
        raise ValueError("W holds non-finite values")
    k = 0 if rho < s * (1 - 1e-6) else math.floor((rho - s) / s_step) + 1
    while rho >= (s + k * s_step) * (1 - 1e-6):
        k += 1
    if k > max_steps:
        raise ValueError(f"rho(W o W) = {rho:.3g} needs more than {max_steps} steps of s")
    return s + k * s_step


def acyclicity_penalty(W: torch.Tensor, s: float = 1.0, s_step: float = 0.1) -> tuple[torch.Tensor, float]:
    """(h_{s'}(W), s') with s' = :func:`domain_s` (W, s, s_step): a penalty defined for every
    finite W, equal to h_s(W) inside the domain of s. For stochastic training, where a step may
    leave the domain and the round cannot be restarted, each evaluation uses the smallest
    enlarged s that holds W (h_{s'} is again zero exactly on DAGs). W: (d, d) tensor."""
    s_used = domain_s(W.detach(), s, s_step)
    return acyclicity(W, s_used), s_used


# ----------------------------------------------------------------------------- graphs
def threshold_graph(W, threshold: float = 0.3):
    """Copy of W with the entries of absolute value below ``threshold`` set to 0 (the reference
    thresholds at 0.3)."""
    if isinstance(W, torch.Tensor):
        return torch.where(W.abs() < threshold, torch.zeros_like(W), W)
    W = np.array(W, dtype=float)
    W[np.abs(W) < threshold] = 0.0
    return W


def is_dag(W) -> bool:
    """True when the directed graph with an edge i -> j wherever W[i, j] != 0 has no cycle
    (self-loops are cycles). Kahn's algorithm: repeatedly remove nodes without incoming edges."""
    if isinstance(W, torch.Tensor):
        W = W.detach().cpu().numpy()
    d = _check_square(np.asarray(W))
    B = np.asarray(W) != 0
    indegree = B.sum(axis=0).astype(int)
    ready = [j for j in range(d) if indegree[j] == 0]
    removed = 0
    while ready:
        i = ready.pop()
        removed += 1
        for j in np.flatnonzero(B[i]):
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(int(j))
    return removed == d


def graph_accuracy(B_true, B_est) -> dict:
    """Accuracy of an estimated directed graph against the true one (both (d, d), nonzero =
    edge i -> j), with the reference's definitions:

    - ``shd``: structural Hamming distance = edges of the skeleton added + removed + edges
      present in both skeletons with the wrong direction;
    - ``tpr``: true edges found with the right direction / true edges;
    - ``fdr``: (reversed + absent-from-the-skeleton predictions) / predicted edges;
    - ``fpr``: the same count / (d (d - 1) / 2 - true edges);
    - ``nnz``: predicted edges.
    """
    T = np.asarray(B_true) != 0
    E = np.asarray(B_est) != 0
    d = _check_square(T)
    skeleton_true = T | T.T
    skeleton_est = E | E.T
    true_pos = int((E & T).sum())
    reversed_ = int((E & ~T & T.T).sum())
    false_pos = int((E & ~skeleton_true).sum())
    lower = np.tril(np.ones((d, d), bool), -1)
    extra = int((skeleton_est & ~skeleton_true & lower).sum())
    missing = int((skeleton_true & ~skeleton_est & lower).sum())
    n_pred, n_true = int(E.sum()), int(T.sum())
    negatives = 0.5 * d * (d - 1) - n_true
    return {"shd": extra + missing + reversed_,
            "tpr": true_pos / max(n_true, 1),
            "fdr": (reversed_ + false_pos) / max(n_pred, 1),
            "fpr": (reversed_ + false_pos) / max(negatives, 1),
            "nnz": n_pred}


def simulate_er_linear_sem(d: int = 20, n_edges: int = 20, n: int = 500, seed: int = 0,
                           w_ranges=((-2.0, -0.5), (0.5, 2.0)), noise_scale: float = 1.0):
    """DAGMA's synthetic benchmark: an Erdos-Renyi DAG and samples of its linear Gaussian SEM.

    The skeleton has exactly ``n_edges`` of the d (d - 1) / 2 node pairs, drawn uniformly; each
    edge points from the earlier to the later node of a random order; weights are uniform on
    the union of ``w_ranges`` (each range with probability 1 / len); x = x W + e with
    e ~ Normal(0, noise_scale^2 I), n samples. Returns (W_true (d, d), X (n, d)), numpy float64.
    """
    if n_edges > d * (d - 1) // 2:
        raise ValueError(f"{n_edges} edges do not fit in a DAG of {d} nodes")
    rng = np.random.default_rng(seed)
    rows, cols = np.triu_indices(d, 1)
    chosen = rng.choice(rows.size, size=n_edges, replace=False)
    order = rng.permutation(d)  # order[k]: the node at position k of the causal order
    W = np.zeros((d, d))
    ranges = np.asarray(w_ranges, dtype=float)
    which = rng.integers(len(ranges), size=n_edges)
    weights = rng.uniform(ranges[which, 0], ranges[which, 1])
    W[order[rows[chosen]], order[cols[chosen]]] = weights
    noise = noise_scale * rng.standard_normal((n, d))
    X = noise @ np.linalg.inv(np.eye(d) - W)  # x = x W + e  <=>  x = e (I - W)^{-1}
    return W, X


# ---------------------------------------------------------------------------- path following
@dataclass(frozen=True)
class PathSchedule:
    """DAGMA's path-following schedule (the reference's defaults).

    rounds : T.
    mu_init, mu_factor : mu_t = mu_init * mu_factor^t, the weight of the score in round t
        (equivalently, acyclicity weighs 1 / mu_t relative to the score).
    s : s_t per round; a list shorter than T repeats its last value.
    s_step : the increase of s_t when a round leaves the domain (the retry).
    lr_factor : the learning rate of a retried round relative to the failed try.
    """

    rounds: int = 5
    mu_init: float = 1.0
    mu_factor: float = 0.1
    s: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6)
    s_step: float = 0.1
    lr_factor: float = 0.5

    def __post_init__(self):
        if int(self.rounds) < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.mu_factor <= 1 or self.mu_init <= 0:
            raise ValueError("need mu_init > 0 and 0 < mu_factor <= 1")
        s = (self.s,) if np.isscalar(self.s) else tuple(self.s)
        if not s or min(s) <= 0 or self.s_step <= 0:
            raise ValueError("s values and s_step must be > 0")
        object.__setattr__(self, "s", tuple(float(v) for v in s))

    def mu(self, t: int) -> float:
        """mu_t of round t (0-based)."""
        return self.mu_init * self.mu_factor ** t

    def s_at(self, t: int) -> float:
        """s_t of round t before any retry."""
        return self.s[min(t, len(self.s) - 1)]

    def dag_weight(self, t: int) -> float:
        """1 / mu_t: the weight of h relative to the score in round t."""
        return 1.0 / self.mu(t)


@dataclass
class LinearSEMFit:
    """Result of :func:`fit_linear_sem`.

    W : (d, d) thresholded weighted adjacency (W[i, j]: edge i -> j).
    W_raw : before thresholding.
    h : h_1(W_raw) at the end.
    s_used : s of each round after retries; retries: number of restarted rounds.
    iterations : Adam steps taken in all; seconds : wall time.
    """

    W: np.ndarray
    W_raw: np.ndarray
    h: float
    s_used: list = field(default_factory=list)
    retries: int = 0
    iterations: int = 0
    seconds: float = 0.0


def _l2_score(W, cov):
    """0.5 / n ||X - X W||_F^2 = 0.5 tr((I - W)^T cov (I - W)) and its gradient -cov (I - W)."""
    dif = np.eye(W.shape[0]) - W
    rhs = cov @ dif
    return 0.5 * float(np.sum(dif * rhs)), -rhs


def _minimise_round(W0, cov, lambda1, mu, s, lr, n_iter, tol, check_every, beta1, beta2):
    """One round: Adam on mu (score + lambda1 |W|_1) + h_s(W) from W0. Returns (W, steps, ok);
    ok False when an iterate leaves the domain of h_s."""
    d = W0.shape[0]
    W = W0.copy()
    m = np.zeros_like(W)
    v = np.zeros_like(W)
    eye = np.eye(d)
    previous = math.inf
    for step in range(1, n_iter + 1):
        M = s * eye - W * W
        try:
            M_inv = np.linalg.inv(M)
        except np.linalg.LinAlgError:
            return W, step, False
        if np.any(M_inv < -1e-12):  # s I - W o W is no longer an M-matrix
            return W, step, False
        _, g_score = _l2_score(W, cov)
        grad = mu * (g_score + lambda1 * np.sign(W)) + 2 * W * M_inv.T
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat = m / (1 - beta1 ** step)
        v_hat = v / (1 - beta2 ** step)
        W -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        if step % check_every == 0 or step == n_iter:
            if not in_domain(W, s):
                return W, step, False
            score, _ = _l2_score(W, cov)
            objective = mu * (score + lambda1 * np.abs(W).sum()) + acyclicity(W, s)
            if math.isfinite(previous) and abs((previous - objective) / previous) <= tol:
                return W, step, True
            previous = objective
    return W, n_iter, True


def fit_linear_sem(X, *, lambda1: float = 0.03, w_threshold: float = 0.3, schedule: PathSchedule | None = None,
                   warm_iter: int = 30000, max_iter: int = 60000, lr: float = 3e-4, tol: float = 1e-6,
                   check_every: int = 1000, beta1: float = 0.99, beta2: float = 0.999,
                   max_retries: int = 20) -> LinearSEMFit:
    """A linear SEM x = x W + e learned with the acyclicity penalty h and the path-following
    schedule (DAGMA's linear algorithm with the least-squares score).

    Score: 0.5 / n ||X_c - X_c W||_F^2 (X_c: X centred per column). Each round t minimises
    mu_t (score + lambda1 |W|_1) + h_{s_t}(W) by Adam (``lr``, ``beta1``, ``beta2``) from the
    previous round's W (the first from 0), for up to ``warm_iter`` steps (``max_iter`` in the
    last round), stopping when the objective changes by less than ``tol`` (relative) between
    checks every ``check_every`` steps. A round whose iterate leaves the domain of h_{s_t}
    restarts with s_t + s_step and the learning rate times ``lr_factor`` (at most
    ``max_retries`` restarts in all; then RuntimeError). Finally entries with
    |W| < ``w_threshold`` are set to 0.

    X : (n, d) samples (numpy). Returns :class:`LinearSEMFit`.
    """
    schedule = schedule or PathSchedule()
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"X must be (n, d) with n >= 2; got shape {X.shape}")
    start = time.perf_counter()
    Xc = X - X.mean(axis=0, keepdims=True)
    cov = Xc.T @ Xc / X.shape[0]
    W = np.zeros((X.shape[1], X.shape[1]))
    s_used, retries, total = [], 0, 0
    for t in range(schedule.rounds):
        s, step_lr = schedule.s_at(t), lr
        n_iter = int(max_iter if t == schedule.rounds - 1 else warm_iter)
        while True:
            W_new, steps, ok = _minimise_round(W, cov, lambda1, schedule.mu(t), s, step_lr, n_iter, tol,
                                               check_every, beta1, beta2)
            total += steps
            if ok:
                break
            retries += 1
            if retries > max_retries:
                raise RuntimeError(f"round {t} left the domain of h after {max_retries} retries "
                                   f"(s up to {s:.2f}); lower lr")
            s += schedule.s_step
            step_lr *= schedule.lr_factor
        W = W_new
        s_used.append(s)
    return LinearSEMFit(W=threshold_graph(W, w_threshold), W_raw=W, h=acyclicity(W, 1.0), s_used=s_used,
                        retries=retries, iterations=total, seconds=time.perf_counter() - start)
