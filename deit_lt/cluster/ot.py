"""Entropic partial optimal transport for imbalanced clustering: P²OT pseudo-labels and their SP²OT extension.

P²OT: Zhang*, Ren*, He, "P²OT: Progressive Partial Optimal Transport for Deep Imbalanced Clustering", ICLR 2024
(arXiv 2401.09266), official code rhfeiyang/PPOT@bd6721c4b5f6581ae5cd896eba9cc9250c769997 (PPOT below).
SP²OT: Zhang, Ren, He, arXiv 2404.03446 (the journal extension), official code
rhfeiyang/SPPOT@788a7a4670cc6c3205566cfda4d7fa502343daa8 (SPPOT below).

For N samples with class probabilities P = softmax(z) (N, K) and cost C = -log P, P²OT solves

    min_Q <Q, C> + lam * KL(Q^T 1_N || rho * pi) + eps * sum Q log Q
    s.t. Q >= 0, Q 1_K <= 1_N / N, 1^T Q 1 = rho,

with pi the uniform cluster prior 1_K / K. A zero-cost virtual column xi absorbs the 1 - rho unselected mass, so
Q_hat = [Q, xi] has exact rows 1_N / N and an exact virtual column sum 1 - rho; only the K real columns are
KL-relaxed. The generalised Sinkhorn iteration (paper Algorithm 1; PPOT utils/sinkhorn_knopp.py:10-66) is

    M = exp(-[C, 0] / eps),  a = alpha / (M b),  b = (beta / (M^T a)) ** f,
    f_j = lam / (lam + eps) for the real columns, f_{K+1} = 1 (a hard constraint, i.e. lam -> inf),

stopping when ||b - b_prev||_2 <= tol or after max_iter iterations, and Q_hat = diag(a) M diag(b) with the last a
(computed before the last b). The fixed point satisfies the KKT condition of the relaxed columns,
col_sum_j = beta_j * b_j ** (-eps / lam).

Everything runs in float64 without gradients, whatever the input dtype (fp32 P ** (1 / eps) underflows: p = 1e-4,
eps = 0.1 gives 1e-40). On top of float64 the iteration is log-stabilised: the kernel is kept column-normalised by
log potentials u, v, and scalings above 1e8 are absorbed into them (as SPPOT's `SemiCurrSinkhornKnopp_stable`,
utils/sinkhorn_knopp.py:105-191), so no row or column of the kernel underflows even when float64 P ** (1 / eps)
would. In exact arithmetic the iterates, the stopping rule and the returned plan are those of the plain scaling loop
above (the tests check this to 1e-12).

SP²OT adds a semantic term: min F(Q) - lam1 * <S, Q Q^T> over the same constraints, with S a sparse k-NN Gaussian
similarity of backbone features. It is solved by majorisation-minimisation (SPPOT `MMOT`,
utils/sinkhorn_knopp.py:194-268): linearise the quadratic at Q_t, i.e. cost C_t = C - lam1 (S + S^T) Q_t, solve the
P²OT problem with C_t, repeat until the objective (without its KL term) changes by less than mm_tol. The linear
term majorises -lam1 <S, Q Q^T> only when S + S^T is positive semi-definite; a k-NN S with a zero diagonal is not,
so the objective need not fall monotonically, and with lam1 large against eps the iteration can cycle until
mm_max_iter (lam1 = 1000 was tuned for a 5120-sample bank).

Schedules: rho_t = rho0 + (rho_max - rho0) * exp(-5 (1 - t / T)^2) (PPOT losses/losses.py:126-134,
losses/ramps.py:19-26) and lam1 = (1 - rho_t) * mm_factor (SPPOT `MMOT.set_rho`).
"""
from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ['OT_MODES', 'OTPlan', 'partial_ot', 'cost_from_logits', 'P2OTSolver', 'sigmoid_rampup', 'rho_schedule',
           'mm_weight']

# Ablations of PPOT losses/losses.py:22-31: 'ppot' (KL-relaxed columns, progressive rho), 'uot' (the same solver with
# rho fixed to 1: no virtual mass, plain relaxed OT) and 'pot' (exact column equality, f = 1, progressive rho).
OT_MODES = ('ppot', 'uot', 'pot')

# A scaling above _ABSORB is moved into the log potentials (SPPOT utils/sinkhorn_knopp.py:105-191).
_ABSORB = 1e8


# --------------------------------------------------------------------------------------------------------------
# Entropic partial OT (P²OT)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class OTPlan:
    """Result of one partial-OT solve.

    Attributes:
        plan: (N, K + 1) float64 transport plan Q_hat = [Q, xi], unscaled: rows sum to 1 / N, the virtual (last)
            column to 1 - rho, the real part to rho.
        log_b: (K + 1,) float64 log of the final column scaling b (-inf for columns with zero target mass); pass it
            back as `log_b_init` to warm-start the next solve.
        num_iters: scaling iterations run.
        err: final ||b - b_prev||_2 (the stopping criterion).
        rho: the transported mass used.
    """
    plan: torch.Tensor
    log_b: torch.Tensor
    num_iters: int
    err: float
    rho: float

    @property
    def real(self) -> torch.Tensor:
        """(N, K) unscaled real part Q."""
        return self.plan[:, :-1]

    @property
    def virtual(self) -> torch.Tensor:
        """(N,) unscaled mass each sample sends to the virtual cluster."""
        return self.plan[:, -1]

    def pseudo_labels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) soft targets N * Q, as the official code returns them (PPOT sinkhorn_knopp.py:61-66).

        Row i sums to the selection mass w_i in [0, 1] and the rows together to N * rho. Rows are deliberately not
        renormalised: a sample the OT leaves in the virtual cluster gets a near-zero target and so no loss.
        """
        return (self.plan.shape[0] * self.plan[:, :-1]).to(dtype)


def cost_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """C = -log softmax(logits), detached, in float64 (log_softmax avoids the log(0) of an underflowed softmax).

    Args:
        logits: (N, K) logits of any floating dtype.

    Returns:
        (N, K) float64 cost.
    """
    return -torch.log_softmax(logits.detach().to(torch.float64), dim=1)


def _relax_exponent(lam: float, epsilon: float) -> float:
    """f = lam / (lam + eps): 0 ignores the column marginal, 1 enforces it (lam = inf)."""
    return 1.0 if math.isinf(lam) else lam / (lam + epsilon)


def _checked_problem(cost: torch.Tensor, rho: float, epsilon: float, lam: float, max_iter: int,
                     col_prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cost in float64 and the (K + 1,) column targets beta = [rho * pi, 1 - rho], after checking the inputs."""
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f'cost must be a non-empty (N, K) matrix, got shape {tuple(cost.shape)}')
    if not 0.0 < rho <= 1.0:
        raise ValueError(f'rho must be in (0, 1], got {rho}')
    if epsilon <= 0:
        raise ValueError(f'epsilon must be > 0, got {epsilon}')
    if lam < 0:
        raise ValueError(f'lam must be >= 0, got {lam}')
    if max_iter < 1:
        raise ValueError(f'max_iter must be >= 1, got {max_iter}')
    k, dev, f64 = cost.shape[1], cost.device, torch.float64
    cost = cost.detach().to(f64)
    if torch.isnan(cost).any() or (cost == -math.inf).any():
        raise ValueError('cost contains NaN or -inf')
    if col_prior is None:
        prior = torch.full((k,), 1.0 / k, dtype=f64, device=dev)
    else:
        prior = torch.as_tensor(col_prior, dtype=f64, device=dev).flatten()
        if prior.numel() != k or (prior < 0).any() or not prior.sum() > 0:
            raise ValueError(f'col_prior must hold {k} non-negative values with a positive sum')
        prior = prior / prior.sum()
    return cost, torch.cat([rho * prior, prior.new_tensor([1.0 - rho])])


@torch.no_grad()
def partial_ot(
        cost: torch.Tensor,
        rho: float,
        epsilon: float = 0.1,
        lam: float = 1.0,
        col_prior: torch.Tensor | None = None,
        log_b_init: torch.Tensor | None = None,
        tol: float = 1e-6,
        max_iter: int = 1000,
) -> OTPlan:
    """Solve the entropic partial OT problem with a virtual column and KL-relaxed real columns.

    Defaults are PPOT's (train.py:36-63): eps = 0.1 (`sk_factor`), lam = 1 (`gamma_bound`), tol = 1e-6,
    max_iter = 1000 (`sk_iter_limit`).

    Args:
        cost: (N, K) cost matrix C (any float dtype; +inf allowed for impossible pairs, not NaN or -inf).
        rho: mass to transport to the real clusters, in (0, 1].
        epsilon: entropic regularisation eps > 0.
        lam: KL weight of the real column marginal; `math.inf` enforces it exactly (the 'pot' ablation), 0 drops it.
        col_prior: (K,) non-negative cluster-size prior pi (normalised here); uniform 1 / K by default. The real
            column targets are rho * pi.
        log_b_init: (K + 1,) log column scaling to start from (`OTPlan.log_b` of a previous solve with the same K);
            None starts from b = 1 / (K + 1) as the code does.
        tol: stop when ||b - b_prev||_2 <= tol.
        max_iter: iteration cap.

    Returns:
        The `OTPlan` (float64, on the device of `cost`).
    """
    # one function on purpose: the stabilised iteration below shares a, b, u, v and the kernel across its steps
    n, k = cost.shape if cost.ndim == 2 else (0, 0)
    dev, f64 = cost.device, torch.float64
    cost, beta = _checked_problem(cost, rho, epsilon, lam, max_iter, col_prior)
    f = torch.full((k + 1,), _relax_exponent(lam, epsilon), dtype=f64, device=dev)
    f[-1] = 1.0
    log_g = torch.cat([-cost / epsilon, cost.new_zeros(n, 1)], dim=1)      # log M

    # Columns without target mass (the virtual one at rho = 1, zero prior entries) carry nothing: b_j = 0 exactly
    # in the plain iteration. Dropping them keeps the log potentials finite.
    cols = torch.nonzero(beta > 0).flatten()
    alpha = 1.0 / n

    default_log_b = torch.full((k + 1,), -math.log(k + 1), dtype=f64, device=dev)
    if log_b_init is not None:
        log_b_init = log_b_init.detach().to(device=dev, dtype=f64).flatten()
        if log_b_init.numel() != k + 1:
            raise ValueError(f'log_b_init must have K + 1 = {k + 1} entries, got {log_b_init.numel()}')
    for start in ([log_b_init] if log_b_init is not None else []) + [default_log_b]:
        # First a-update in the log domain, u = log(alpha / (M b0)), exact for any b0 (a warm start may hold b_j = 0).
        # It uses every column of b0, as the plain iteration does, even those without target mass.
        u = math.log(alpha) - torch.logsumexp(log_g + start, dim=1)
        if torch.isfinite(u).all():
            break
    else:
        raise ValueError('some row has no finite cost to a column with target mass')
    log_b0 = start[cols]
    log_g, beta_a, f_a = log_g[:, cols], beta[cols], f[cols]
    # the dropped columns jump from b0 to 0 in the first iteration: part of that iteration's ||b - b_prev||
    dropped_sq = torch.exp(2.0 * start[beta <= 0]).sum()
    log_beta = torch.log(beta_a)

    def normalised_kernel(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Column potential v making K = exp(log M + u + v) sum to beta per column: every entry <= 1 and no column
        # underflows to zero, however far the logits are apart.
        v = log_beta - torch.logsumexp(log_g + u[:, None], dim=0)
        return v, torch.exp(log_g + u[:, None] + v)

    v, kernel = normalised_kernel(u)
    # The iteration runs on relative scalings a, b of the kernel; the plain iteration's are e^u * a and e^v * b.
    a = torch.ones(n, dtype=f64, device=dev)
    log_b = log_b0 - v
    b = torch.exp(log_b)
    b_plain_prev = torch.exp(log_b0)
    err, it = math.inf, 0
    while it < max_iter:
        if it > 0:      # the first a-update was done in the log domain above
            a = alpha / (kernel @ b)
        # b_plain = (beta / (M^T a_plain)) ** f, on the relative scale and in logs: a column with negligible mass
        # may have b below the float64 range, which must stay an exact 0 in K b rather than become log(0).
        log_b = f_a * (log_beta - torch.log(kernel.T @ a)) + (f_a - 1.0) * v
        b = torch.exp(log_b)
        it += 1
        # ||b_plain - b_prev||_2 over the columns whose b_plain is representable; one that overflows float64 holds
        # a negligible share of the plan (the plain iteration would give inf and NaN there).
        log_b_plain = v + log_b
        b_plain = torch.exp(log_b_plain)
        diff = torch.where(torch.isfinite(b_plain) & torch.isfinite(b_plain_prev), b_plain - b_plain_prev, 0.0)
        diff_sq = torch.square(diff).sum() + (dropped_sq if it == 1 else 0.0)
        # one host sync per iteration, as the stopping test of the plain iteration needs anyway
        err, a_max, b_max = torch.stack([diff_sq.sqrt(), a.max(), b.max()]).tolist()
        b_plain_prev = b_plain
        if err <= tol:
            break
        if max(a_max, b_max) > _ABSORB:
            # move a into u and renormalise the kernel; b is re-expressed against the new v (the plan is unchanged)
            u = u + torch.log(a)
            v, kernel = normalised_kernel(u)
            log_b = log_b_plain - v
            a, b = torch.ones_like(a), torch.exp(log_b)

    plan = cost.new_zeros(n, k + 1)
    plan[:, cols] = a[:, None] * kernel * b
    log_b_full = torch.full((k + 1,), -math.inf, dtype=f64, device=dev)
    log_b_full[cols] = v + log_b
    return OTPlan(plan=plan, log_b=log_b_full, num_iters=it, err=err, rho=float(rho))


class P2OTSolver:
    """Stateful P²OT pseudo-labeller for one classifier head: warm-starts each solve from the previous b.

    PPOT keeps one solver per head and reuses b across calls (sinkhorn_knopp.py:45, 62), so the second view of a
    step starts from the first view's solution. The warm start is reset when K changes.

    Args:
        epsilon: entropic regularisation (PPOT `sk_factor`, 0.1).
        lam: KL weight of the real columns (PPOT `gamma_bound`, 1); ignored by mode 'pot'.
        mode: 'ppot', 'uot' (rho forced to 1) or 'pot' (exact column equality), see `OT_MODES`.
        tol: stopping tolerance on ||b - b_prev||_2 (1e-6 in PPOT, 1e-10 in SPPOT's stable solver).
        max_iter: iteration cap (`sk_iter_limit`, 1000).
        col_prior: optional (K,) cluster-size prior (uniform by default).
        warm_start: reuse the previous b.
    """

    def __init__(self, epsilon: float = 0.1, lam: float = 1.0, mode: str = 'ppot', tol: float = 1e-6,
                 max_iter: int = 1000, col_prior: torch.Tensor | None = None, warm_start: bool = True):
        if mode not in OT_MODES:
            raise ValueError(f'mode must be one of {OT_MODES}, got {mode!r}')
        self.epsilon = float(epsilon)
        self.lam = math.inf if mode == 'pot' else float(lam)
        self.mode = mode
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.col_prior = col_prior
        self.warm_start = warm_start
        self.log_b: torch.Tensor | None = None
        self.last: OTPlan | None = None

    def effective_rho(self, rho: float) -> float:
        """The mass actually transported: 1 in mode 'uot', else `rho`."""
        return 1.0 if self.mode == 'uot' else float(rho)

    def reset(self) -> None:
        """Forget the warm start."""
        self.log_b, self.last = None, None

    def solve_cost(self, cost: torch.Tensor, rho: float) -> OTPlan:
        """Solve for an (N, K) cost matrix and update the warm start; returns the unscaled `OTPlan`."""
        init = self.log_b
        if init is not None and init.numel() != cost.shape[1] + 1:
            init = None
        res = partial_ot(cost, self.effective_rho(rho), epsilon=self.epsilon, lam=self.lam, col_prior=self.col_prior,
                         log_b_init=init if self.warm_start else None, tol=self.tol, max_iter=self.max_iter)
        self.log_b, self.last = res.log_b, res
        return res

    def solve(self, logits: torch.Tensor, rho: float) -> OTPlan:
        """Solve for (N, K) logits (cost -log softmax); returns the unscaled `OTPlan`."""
        return self.solve_cost(cost_from_logits(logits), rho)

    def __call__(self, logits: torch.Tensor, rho: float) -> torch.Tensor:
        """(N, K) logits -> (N, K) float32 soft targets N * Q (see `OTPlan.pseudo_labels`), on the logits' device."""
        return self.solve(logits, rho).pseudo_labels()

    def state_dict(self) -> dict:
        """Warm-start state, for exact resume."""
        return {'log_b': None if self.log_b is None else self.log_b.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.log_b = state.get('log_b')
        self.last = None


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------

def sigmoid_rampup(step: float, total: float) -> float:
    """exp(-5 (1 - t / T)^2) with t clipped to [0, T]; 1 when T = 0 (PPOT losses/ramps.py:19-26)."""
    if total <= 0:
        return 1.0
    phase = 1.0 - min(max(float(step), 0.0), float(total)) / total
    return math.exp(-5.0 * phase * phase)


def rho_schedule(step: float, total_steps: float, rho0: float = 0.1, rho_max: float = 1.0,
                 strategy: str = 'sigmoid') -> float:
    """Progressive mass rho_t = rho0 + (rho_max - rho0) * ramp(t / T) (PPOT losses/losses.py:126-134).

    Args:
        step: optimiser steps done so far (t = 0 for the first step).
        total_steps: T = steps per epoch x epochs.
        rho0: initial mass (0.1).
        rho_max: final mass (1).
        strategy: 'sigmoid' (the published default, `sigmoid_rampup`) or 'linear' (t / T, clipped).
    """
    if strategy == 'sigmoid':
        ramp = sigmoid_rampup(step, total_steps)
    elif strategy == 'linear':
        ramp = 1.0 if total_steps <= 0 else min(max(float(step), 0.0), float(total_steps)) / total_steps
    else:
        raise ValueError(f"strategy must be 'sigmoid' or 'linear', got {strategy!r}")
    return rho0 + (rho_max - rho0) * ramp


def mm_weight(rho: float, mm_factor: float = 1000.0) -> float:
    """SP²OT's semantic weight lam1 = (1 - rho) * mm_factor, vanishing as rho -> 1 (SPPOT `MMOT.set_rho`).

    The default 1000 assumes unscaled plans (total mass rho) on a bank of about 5120 samples; retune otherwise.
    """
    return (1.0 - float(rho)) * float(mm_factor)
