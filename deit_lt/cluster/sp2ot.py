"""SP²OT's additions to the P²OT solver (`deit_lt.cluster.ot`): the sparse k-nearest-neighbour similarity of the
samples and the majorisation-minimisation around the partial-OT solve that makes neighbours share pseudo-labels
(SPPOT, the extension of Zhang et al., ICLR 2024; official code: see the citations of each function)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .ot import OTPlan, P2OTSolver, cost_from_logits, mm_weight

__all__ = ['SparseSimilarity', 'KNNGraph', 'knn_similarity', 'MMResult', 'mm_partial_ot', 'SP2OTSolver']


# --------------------------------------------------------------------------------------------------------------
# Sparse similarity (SP²OT)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SparseSimilarity:
    """A sparse (n, n) similarity S as an edge list (duplicate edges add up).

    Attributes:
        rows: (E,) long row indices.
        cols: (E,) long column indices.
        values: (E,) similarity values.
        size: n.
    """
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    size: int
    _sym: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_dense(cls, s: torch.Tensor) -> SparseSimilarity:
        """Build from a dense (n, n) matrix, keeping the non-zero entries."""
        r, c = torch.nonzero(s, as_tuple=True)
        return cls(r, c, s[r, c], s.shape[0])

    def to_dense(self) -> torch.Tensor:
        """(n, n) dense matrix."""
        out = self.values.new_zeros(self.size, self.size)
        out.index_put_((self.rows, self.cols), self.values, accumulate=True)
        return out

    def _symmetric(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # S + S^T as one coalesced sparse matrix, built once per (device, dtype)
        if self._sym is None or self._sym.device != device or self._sym.dtype != dtype:
            idx = torch.stack([torch.cat([self.rows, self.cols]), torch.cat([self.cols, self.rows])]).to(device)
            val = torch.cat([self.values, self.values]).to(device=device, dtype=dtype)
            self._sym = torch.sparse_coo_tensor(idx, val, (self.size, self.size), check_invariants=False).coalesce()
        return self._sym

    def sym_matmul(self, q: torch.Tensor) -> torch.Tensor:
        """(S + S^T) Q for Q (n, K): the gradient of <S, Q Q^T>."""
        if q.shape[0] != self.size:
            raise ValueError(f'Q has {q.shape[0]} rows, the similarity is {self.size} x {self.size}')
        return torch.sparse.mm(self._symmetric(q.device, q.dtype), q)

    def quadratic(self, q: torch.Tensor) -> torch.Tensor:
        """<S, Q Q^T> = sum_ij S_ij q_i . q_j = 0.5 <Q, (S + S^T) Q> (scalar tensor)."""
        return 0.5 * (q * self.sym_matmul(q)).sum()


@dataclasses.dataclass
class KNNGraph:
    """k-nearest-neighbour similarity of a whole training set, S_ij kept only for j among i's k neighbours.

    Attributes:
        indices: (N, k) long neighbour indices of each sample (self excluded).
        values: (N, k) similarities S_ij.
    """
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.indices.shape[0]

    def subgraph(self, ids: torch.Tensor) -> SparseSimilarity:
        """Similarity among the samples `ids` (a bank or batch, duplicates allowed), as S[ids][:, ids].

        Every position p holding id i gets an edge to every position q holding a neighbour j of i. The result
        lives on the device of `ids`.

        Args:
            ids: (n,) long dataset indices in [0, N).
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        dev = ids.device
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_nodes):
            raise ValueError(f'ids must be dataset indices in [0, {self.num_nodes}); unknown ids (-1) cannot be used')
        nbr = self.indices.to(dev)[ids]                                  # (n, k) global neighbour ids
        val = self.values.to(dev)[ids]
        k = nbr.shape[1]
        src = torch.arange(ids.numel(), device=dev).repeat_interleave(k)
        nbr, val = nbr.flatten(), val.flatten()
        # positions of each neighbour id in `ids` (all of them, via a sorted copy)
        order = torch.argsort(ids)
        sorted_ids = ids[order]
        lo = torch.searchsorted(sorted_ids, nbr, right=False)
        cnt = torch.searchsorted(sorted_ids, nbr, right=True) - lo
        edge = torch.arange(nbr.numel(), device=dev).repeat_interleave(cnt)
        start = torch.cumsum(cnt, 0) - cnt
        offset = torch.arange(edge.numel(), device=dev) - start.repeat_interleave(cnt)
        dst = order[lo[edge] + offset]
        return SparseSimilarity(src[edge], dst, val[edge], ids.numel())


@torch.no_grad()
def knn_similarity(features: torch.Tensor, k: int = 20, sigma: float = 2.0, chunk_size: int = 1024) -> KNNGraph:
    """Sparse Gaussian k-NN similarity of SP²OT (SPPOT utils/structure.py, train.py:66-72).

    S_ij = exp(-||f_i - f_j||^2 / (2 sigma^2 d)) with d the feature dimension (768 for DINO ViT-B/16), the
    diagonal removed, and each row keeping its k largest values (so S is not symmetric). Built once before training
    from the initial backbone features of the whole training set; computed in row chunks so N x N is never held.

    Args:
        features: (N, d) features.
        k: neighbours per row (20); clipped to N - 1.
        sigma: kernel width (2).
        chunk_size: rows per distance block.

    Returns:
        The `KNNGraph` (float32 values, on the features' device).
    """
    x = features.detach()
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    n, d = x.shape
    k = min(int(k), n - 1)
    if k < 1:
        raise ValueError('knn_similarity needs at least 2 samples')
    sq = (x * x).sum(1)
    idx_out, val_out = [], []
    for s in range(0, n, chunk_size):
        xb = x[s:s + chunk_size]
        d2 = (sq[s:s + chunk_size, None] + sq[None, :] - 2.0 * xb @ x.T).clamp_min_(0.0)
        rows = torch.arange(xb.shape[0], device=x.device)
        d2[rows, rows + s] = math.inf                                  # no self-loops
        dist, idx = torch.topk(d2, k, dim=1, largest=False)
        idx_out.append(idx)
        val_out.append(torch.exp(-dist / (2.0 * sigma * sigma * d)).float())
    return KNNGraph(torch.cat(idx_out), torch.cat(val_out))


# --------------------------------------------------------------------------------------------------------------
# Majorisation-minimisation (SP²OT)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MMResult:
    """Result of `mm_partial_ot`.

    Attributes:
        q: (N, K) float64 unscaled real plan Q (total mass rho).
        num_iters: MM iterations run.
        inner_iters: scaling iterations summed over the inner solves.
        objective: final F(Q) = <Q, C> - lam1 <S, Q Q^T> + eps sum Q log Q (the KL term is left out, as in SPPOT).
    """
    q: torch.Tensor
    num_iters: int
    inner_iters: int
    objective: float

    def pseudo_labels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) soft targets N * Q."""
        return (self.q.shape[0] * self.q).to(dtype)


def _mm_objective(q: torch.Tensor, cost: torch.Tensor, grad: torch.Tensor, lam1: float, epsilon: float) -> float:
    # grad = (S + S^T) Q, so <S, Q Q^T> = 0.5 <Q, grad>; 0 log 0 = 0
    return float((q * cost).sum() - 0.5 * lam1 * (q * grad).sum() + epsilon * torch.special.xlogy(q, q).sum())


@torch.no_grad()
def mm_partial_ot(
        cost: torch.Tensor,
        similarity: SparseSimilarity,
        rho: float,
        lam1: float,
        solve: Callable[[torch.Tensor, float], OTPlan],
        epsilon: float,
        tol: float = 1e-6,
        max_iter: int = 100,
        ema: float = 1.0,
) -> MMResult:
    """SP²OT: minimise the P²OT objective minus lam1 <S, Q Q^T> by majorisation-minimisation (SPPOT `MMOT`).

    From Q_0 = rho / (N K) everywhere, each step solves the partial OT problem with the linearised cost
    C_t = C - lam1 (S + S^T) Q_t and sets Q_{t+1} = (1 - ema) Q_t + ema Q_new (ema = 1: no damping), stopping when
    |F(Q_{t+1}) - F(Q_t)| < tol or after max_iter steps.

    Args:
        cost: (N, K) cost C = -log P.
        similarity: (N, N) sparse similarity S of the same samples.
        rho: transported mass.
        lam1: weight of the semantic term (`mm_weight`).
        solve: inner solver, `solve(cost, rho) -> OTPlan` (e.g. `P2OTSolver.solve_cost`, which warm-starts).
        epsilon: the inner solver's eps, for the objective.
        tol: objective tolerance (1e-6).
        max_iter: MM iterations (`mm_iter_limit`, 100).
        ema: damping of the update (`ema_mm`, 1).

    Returns:
        The `MMResult` with the unscaled real plan.
    """
    cost = cost.detach().to(torch.float64)
    n, k = cost.shape
    if similarity.size != n:
        raise ValueError(f'similarity is {similarity.size} x {similarity.size} for {n} samples')
    q = cost.new_full((n, k), rho / (n * k))
    grad = similarity.sym_matmul(q)
    f_old = _mm_objective(q, cost, grad, lam1, epsilon)
    inner = 0
    it = 0
    while it < max_iter:
        res = solve(cost - lam1 * grad, rho)
        inner += res.num_iters
        q = (1.0 - ema) * q + ema * res.real
        grad = similarity.sym_matmul(q)
        f_new = _mm_objective(q, cost, grad, lam1, epsilon)
        it += 1
        if abs(f_new - f_old) < tol:
            f_old = f_new
            break
        f_old = f_new
    return MMResult(q=q, num_iters=it, inner_iters=inner, objective=f_old)


class SP2OTSolver:
    """Stateful SP²OT pseudo-labeller for one head: MM around a warm-started P²OT solver.

    SPPOT's defaults: the stable P²OT solver with tol 1e-10 (`sppot_stable`), lam1 = (1 - rho) * 1000, at most 100
    MM steps with objective tolerance 1e-6, no damping.

    Args:
        base: the inner `P2OTSolver` (its eps, lam, mode, tolerance and warm start); default
            `P2OTSolver(tol=1e-10)`.
        mm_factor: lam1 scale (`mm_factor`, 1000).
        mm_factor_fixed: use lam1 = mm_factor regardless of rho (`mm_factor_fix`).
        mm_tol: MM objective tolerance (1e-6).
        mm_max_iter: MM iteration cap (`mm_iter_limit`, 100).
        ema: MM damping (`ema_mm`, 1 = none).
    """

    def __init__(self, base: P2OTSolver | None = None, mm_factor: float = 1000.0, mm_factor_fixed: bool = False,
                 mm_tol: float = 1e-6, mm_max_iter: int = 100, ema: float = 1.0):
        self.base = base if base is not None else P2OTSolver(tol=1e-10)
        self.mm_factor = float(mm_factor)
        self.mm_factor_fixed = mm_factor_fixed
        self.mm_tol = float(mm_tol)
        self.mm_max_iter = int(mm_max_iter)
        self.ema = float(ema)
        self.last: MMResult | None = None

    def lam1(self, rho: float) -> float:
        """Semantic weight at mass rho (after the base mode's rho override)."""
        return self.mm_factor if self.mm_factor_fixed else mm_weight(self.base.effective_rho(rho), self.mm_factor)

    def reset(self) -> None:
        self.base.reset()
        self.last = None

    def solve(self, logits: torch.Tensor, rho: float, similarity: SparseSimilarity) -> MMResult:
        """(N, K) logits and their (N, N) similarity -> unscaled `MMResult`."""
        res = mm_partial_ot(cost_from_logits(logits), similarity, self.base.effective_rho(rho), self.lam1(rho),
                            self.base.solve_cost, self.base.epsilon, tol=self.mm_tol, max_iter=self.mm_max_iter,
                            ema=self.ema)
        self.last = res
        return res

    def __call__(self, logits: torch.Tensor, rho: float, similarity: SparseSimilarity) -> torch.Tensor:
        """(N, K) logits -> (N, K) float32 soft targets N * Q."""
        return self.solve(logits, rho, similarity).pseudo_labels()

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
        self.last = None
