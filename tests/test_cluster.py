"""P²OT / SP²OT core: the solver against the plain scaling iteration and hand-derived fixed points, marginals and KKT
conditions on random imbalanced problems, low-precision inputs, schedules, the SP²OT pieces, the loss and bank
protocol, and the Hungarian metrics on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deit_lt.cluster import (KNNGraph, MemoryBank, P2OTSolver, SP2OTSolver, SparseSimilarity, cluster_metrics,
                             cost_from_logits, frequency_groups, hungarian_match, kmeans_clusters, knn_similarity,
                             mm_partial_ot, mm_weight, partial_ot, pseudo_labels, remap_clusters, rho_schedule,
                             selection_score, sigmoid_rampup, swapped_prediction_loss)
from deit_lt.data.lt_datasets import class_splits_from_bounds

F64 = torch.float64
ORACLE_TOL = 1e-5


def solve_scaled(logits, rho, epsilon, lam, **kw):
    """N * Q_hat (virtual column last) for a small logit matrix."""
    z = torch.tensor(logits, dtype=F64)
    res = partial_ot(cost_from_logits(z), rho, epsilon=epsilon, lam=lam, **kw)
    return z.shape[0] * res.plan, res


def plain_scaling(cost, rho, epsilon, lam, prior=None, log_b0=None, tol=1e-6, max_iter=1000):
    """The unstabilised scaling loop exactly as the paper's Algorithm 1 / the official code write it (reference)."""
    n, k = cost.shape
    m = torch.exp(-torch.cat([cost, cost.new_zeros(n, 1)], 1) / epsilon)
    prior = torch.full((k,), 1.0 / k, dtype=F64) if prior is None else prior / prior.sum()
    beta = torch.cat([rho * prior, torch.tensor([1.0 - rho], dtype=F64)])
    f = torch.full((k + 1,), 1.0 if math.isinf(lam) else lam / (lam + epsilon), dtype=F64)
    f[-1] = 1.0
    b = torch.full((k + 1,), 1.0 / (k + 1), dtype=F64) if log_b0 is None else log_b0.exp()
    err, it = 1.0, 0
    while err > tol and it < max_iter:
        a = (1.0 / n) / (m @ b)
        b_new = (beta / (m.T @ a)) ** f
        err = torch.linalg.vector_norm(b_new - b).item()
        b, it = b_new, it + 1
    return a[:, None] * m * b, it


def lt_prior(k, imb=100.0):
    """Long-tailed cluster prior pi_c proportional to imb^(-c / (K - 1))."""
    return torch.tensor([imb ** (-c / max(k - 1, 1)) for c in range(k)], dtype=F64)


# ----------------------------------------------------------------------------------------------------------------
# Oracle cases 1-4 (N = 3, K = 2, outputs N * Q_hat)
# ----------------------------------------------------------------------------------------------------------------

def test_oracle_uniform_logits():
    out, _ = solve_scaled([[0.0, 0.0]] * 3, rho=0.5, epsilon=0.1, lam=1.0)
    assert torch.allclose(out[:, :2], torch.full((3, 2), 0.25, dtype=F64), atol=ORACLE_TOL)
    assert torch.allclose(out[:, 2], torch.full((3,), 0.5, dtype=F64), atol=ORACLE_TOL)


def test_oracle_rho_times_softmax_fixed_point():
    l3 = math.log(3.0)
    out, res = solve_scaled([[l3, 0.0], [0.0, l3], [0.0, 0.0]], rho=0.5, epsilon=1.0, lam=1.0)
    expect = torch.tensor([[0.375, 0.125], [0.125, 0.375], [0.25, 0.25]], dtype=F64)
    assert torch.allclose(out[:, :2], expect, atol=ORACLE_TOL)
    # fixed point b_real = 1, b_virt = (1 - rho) / rho
    assert torch.allclose(res.log_b.exp(), torch.tensor([1.0, 1.0, 1.0], dtype=F64), atol=1e-5)


def test_oracle_lam_zero_is_softmax():
    out, _ = solve_scaled([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], rho=1.0, epsilon=1.0, lam=0.0)
    expect = torch.tensor([[0.880797, 0.119203], [0.268941, 0.731059], [0.5, 0.5]], dtype=F64)
    assert torch.allclose(out[:, :2], expect, atol=ORACLE_TOL)
    assert torch.all(out[:, 2] == 0)


def test_oracle_balanced_relaxed_and_default():
    logits = [[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    out, _ = solve_scaled(logits, rho=1.0, epsilon=1.0, lam=math.inf)
    expect = torch.sigmoid(torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]], dtype=F64))
    assert torch.allclose(out[:, :2], expect, atol=ORACLE_TOL)
    assert torch.allclose(out[:, :2].sum(0), torch.tensor([1.5, 1.5], dtype=F64), atol=ORACLE_TOL)

    out, _ = solve_scaled(logits, rho=1.0, epsilon=1.0, lam=1.0)
    cols = out[:, :2].sum(0)
    assert torch.allclose(cols, torch.tensor([1.840769, 1.159231], dtype=F64), atol=ORACLE_TOL)
    pred = torch.softmax(torch.tensor(logits, dtype=F64), 1).sum(0)
    assert torch.allclose(pred, torch.tensor([2.111856, 0.888144], dtype=F64), atol=ORACLE_TOL)
    assert 1.5 < cols[0] < pred[0] and pred[1] < cols[1] < 1.5

    out, _ = solve_scaled(logits, rho=0.5, epsilon=0.1, lam=1.0)
    expect = torch.tensor([[0.684146, 0.0], [0.251047, 0.001938], [0.003290, 0.559578]], dtype=F64)
    assert torch.allclose(out[:, :2], expect, atol=ORACLE_TOL)
    assert out[:, 2].sum().item() == pytest.approx(1.5, abs=ORACLE_TOL)


# ----------------------------------------------------------------------------------------------------------------
# Solver: equivalence with the plain loop, marginals, KKT, low precision, extremes, warm start, modes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('rho,lam', [(0.3, 1.0), (1.0, 1.0), (0.7, math.inf), (0.5, 0.2)])
def test_stabilised_iterates_equal_plain_loop(rho, lam):
    g = torch.Generator().manual_seed(0)
    cost = cost_from_logits(3.0 * torch.randn(40, 7, generator=g, dtype=F64))
    prior = lt_prior(7, 20.0)
    ref, ref_iters = plain_scaling(cost, rho, 0.1, lam, prior=prior)
    res = partial_ot(cost, rho, epsilon=0.1, lam=lam, col_prior=prior)
    assert torch.allclose(res.plan, ref, atol=1e-12, rtol=0)
    assert abs(res.num_iters - ref_iters) <= 2        # the same stopping rule, up to rounding at the threshold
    # warm start from the previous b, as the code does for the second view
    cost2 = cost_from_logits(3.0 * torch.randn(40, 7, generator=g, dtype=F64))
    ref2, _ = plain_scaling(cost2, rho, 0.1, lam, prior=prior, log_b0=res.log_b)
    res2 = partial_ot(cost2, rho, epsilon=0.1, lam=lam, col_prior=prior, log_b_init=res.log_b)
    assert torch.allclose(res2.plan, ref2, atol=1e-12, rtol=0)


@pytest.mark.parametrize('n,k', [(5, 2), (48, 10), (150, 31)])
@pytest.mark.parametrize('rho', [0.1, 0.55, 1.0])
def test_marginals_on_random_imbalanced_problems(n, k, rho):
    g = torch.Generator().manual_seed(n * 100 + k)
    prior = lt_prior(k, 100.0)[torch.randperm(k, generator=g)]
    for lam in (1.0, math.inf):
        cost = cost_from_logits(2.0 * torch.randn(n, k, generator=g, dtype=F64))
        res = partial_ot(cost, rho, epsilon=0.1, lam=lam, col_prior=prior, tol=1e-12, max_iter=20000)
        assert res.err <= 1e-12
        q = res.plan
        assert torch.all(q >= 0) and torch.isfinite(q).all()
        assert (n * q.sum(1) - 1.0).abs().max() < 1e-6                     # rows: 1 / N each (x N = 1)
        assert abs(q[:, -1].sum().item() - (1.0 - rho)) < 1e-6             # virtual column: 1 - rho
        assert abs(q[:, :-1].sum().item() - rho) < 1e-6                    # real mass: rho
        cols = q[:, :-1].sum(0)
        beta = rho * prior / prior.sum()
        if math.isinf(lam):
            assert (cols - beta).abs().max() < 1e-6                        # exact column equality
        else:
            # KKT of the KL-relaxed columns: col_j = beta_j * b_j ** (-eps / lam)
            kkt = beta * torch.exp(-0.1 / lam * res.log_b[:-1])
            assert ((cols - kkt).abs() / kkt).max() < 1e-6
            # a soft constraint: the sizes move off the prior
            assert ((cols - beta).abs() / beta).max() > 1e-3


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_low_precision_inputs_do_not_give_nan(dtype):
    g = torch.Generator().manual_seed(3)
    logits = 3.0 * torch.randn(64, 10, generator=g)
    logits[:, 0] -= 20.0                       # a cluster no sample is close to, as a trained head produces
    logits = logits.to(dtype)
    # the pitfall: P ** (1 / eps) in the input precision flushes that column to 0 and the plain loop makes NaN
    p = torch.softmax(logits.float(), 1)
    m = torch.cat([p ** 10.0, torch.ones(64, 1)], 1)
    assert (m[:, 0] == 0).all()
    beta = torch.tensor([0.03] * 10 + [0.7])
    f = torch.tensor([1.0 / 1.1] * 10 + [1.0])
    b = torch.full((11,), 1.0 / 11)
    for _ in range(20):
        a = (1.0 / 64) / (m @ b)
        b = (beta / (m.T @ a)) ** f
    assert not torch.isfinite(a[:, None] * m * b).all()

    solver = P2OTSolver(tol=1e-10, max_iter=5000)
    q = solver(logits, 0.3)
    assert q.dtype == torch.float32 and q.shape == (64, 10) and torch.isfinite(q).all()
    ref, _ = plain_scaling(cost_from_logits(logits), 0.3, 0.1, 1.0, tol=1e-10, max_iter=5000)
    assert torch.allclose(q.double(), 64 * ref[:, :-1], atol=1e-6)
    assert q.sum().item() == pytest.approx(64 * 0.3, abs=1e-4)
    assert (q.sum(1) <= 1.0 + 1e-5).all()


def test_column_without_affinity_stays_finite():
    # cluster 0 is ~1e4 nats less likely for every sample: its float64 kernel column is exactly zero, so the plain
    # loop divides by zero; the stabilised solver keeps the marginals
    g = torch.Generator().manual_seed(4)
    z = torch.randn(50, 5, generator=g, dtype=F64)
    z[:, 0] = -1000.0
    cost = cost_from_logits(z)
    assert (torch.exp(-cost[:, 0] / 0.1) == 0).all()
    with np.errstate(all='ignore'):
        ref, _ = plain_scaling(cost, 0.4, 0.1, 1.0)
    assert not torch.isfinite(ref).all()
    res = partial_ot(cost, 0.4, epsilon=0.1, lam=1.0, tol=1e-12, max_iter=20000)
    assert torch.isfinite(res.plan).all()
    assert (50 * res.plan.sum(1) - 1.0).abs().max() < 1e-6
    assert abs(res.plan[:, -1].sum().item() - 0.6) < 1e-9
    assert res.plan[:, 0].sum().item() < 1e-12


def test_large_logit_gaps_match_plain_loop_and_absorb():
    g = torch.Generator().manual_seed(5)
    cost = cost_from_logits(60.0 * torch.randn(30, 6, generator=g, dtype=F64))
    ref, _ = plain_scaling(cost, 0.5, 0.1, 1.0, tol=1e-10, max_iter=5000)
    res = partial_ot(cost, 0.5, epsilon=0.1, lam=1.0, tol=1e-10, max_iter=5000)
    assert torch.isfinite(ref).all()
    assert torch.allclose(res.plan, ref, atol=1e-10, rtol=0)


def test_solver_warm_start_modes_and_state():
    g = torch.Generator().manual_seed(6)
    z0, z1 = torch.randn(2, 100, 8, generator=g)
    warm = P2OTSolver(tol=1e-9)
    warm(z0, 0.4)
    q_warm = warm(z1, 0.4)
    iters_warm = warm.last.num_iters
    cold = P2OTSolver(tol=1e-9, warm_start=False)
    q_cold = cold(z1, 0.4)
    assert iters_warm < cold.last.num_iters
    assert torch.allclose(q_warm, q_cold, atol=1e-6)
    state = warm.state_dict()
    other = P2OTSolver(tol=1e-9)
    other.load_state_dict(state)
    assert torch.equal(other.solve(z1, 0.4).plan, warm.solve(z1, 0.4).plan)
    warm(torch.randn(20, 5, generator=g), 0.4)          # K changed: the warm start is dropped, not misapplied
    assert warm.log_b.numel() == 6

    uot = P2OTSolver(mode='uot')
    q = uot(z0, 0.1)
    assert uot.last.rho == 1.0 and (q.sum(1) - 1).abs().max() < 1e-5      # every sample fully selected
    pot = P2OTSolver(mode='pot', tol=1e-10)
    q = pot(z0, 0.5)
    assert (q.sum(0) - 100 * 0.5 / 8).abs().max() < 1e-5                  # exact cluster sizes N rho / K
    with pytest.raises(ValueError):
        P2OTSolver(mode='sla')
    with pytest.raises(ValueError):
        partial_ot(torch.zeros(3, 2), 0.0)
    with pytest.raises(ValueError):
        partial_ot(torch.full((3, 2), float('nan')), 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Schedules (oracle case 5)
# ----------------------------------------------------------------------------------------------------------------

def test_schedules_oracle():
    for t, rho, lam1 in [(0, 0.1060642, 893.936), (50, 0.3578543, 642.146), (100, 1.0, 0.0)]:
        r = rho_schedule(t, 100)
        assert r == pytest.approx(rho, abs=1e-7)
        assert mm_weight(r) == pytest.approx(lam1, abs=1e-3)
    assert rho_schedule(-5, 100) == rho_schedule(0, 100) and rho_schedule(150, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    assert rho_schedule(25, 100, strategy='linear') == pytest.approx(0.1 + 0.9 * 0.25)
    assert rho_schedule(0, 10, rho0=0.2, rho_max=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        rho_schedule(0, 10, strategy='step')


# ----------------------------------------------------------------------------------------------------------------
# SP²OT (oracle case 7, k-NN graph, MM)
# ----------------------------------------------------------------------------------------------------------------

def test_similarity_oracle():
    s = SparseSimilarity.from_dense(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64))
    q = torch.tensor([[0.3, 0.2], [0.1, 0.4]], dtype=F64)
    assert torch.allclose(s.sym_matmul(q), torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=F64))
    assert s.quadratic(q).item() == pytest.approx(0.22)
    s = SparseSimilarity.from_dense(torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.0, 1.0], [0.0, 3.0, 0.0]], dtype=F64))
    q = torch.rand(3, 4, dtype=F64)
    dense = s.to_dense()
    assert torch.allclose(s.sym_matmul(q), (dense + dense.T) @ q)
    assert s.quadratic(q).item() == pytest.approx((dense * (q @ q.T)).sum().item())


def blobs(n=60, k=3, d=6, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(k, d, generator=g)
    labels = torch.arange(n) % k
    return centers[labels] + torch.randn(n, d, generator=g), labels


def test_knn_graph_and_subgraph_match_dense():
    feats, _ = blobs(40, d=5)
    graph = knn_similarity(feats, k=4, sigma=2.0, chunk_size=16)
    assert isinstance(graph, KNNGraph) and graph.indices.shape == (40, 4)
    f = feats.double()
    dense = torch.exp(-torch.cdist(f, f) ** 2 / (2 * 2.0 ** 2 * 5))
    dense.fill_diagonal_(0)
    top = dense.topk(4, dim=1).indices
    ref = torch.zeros_like(dense).scatter_(1, top, dense.gather(1, top))
    assert (graph.indices != torch.arange(40)[:, None]).all()          # no self-loops
    assert torch.allclose(graph.subgraph(torch.arange(40)).to_dense().double(), ref, atol=1e-6)
    ids = torch.tensor([3, 7, 3, 10, 7, 39, 0])                          # a bank may hold an id twice
    assert torch.allclose(graph.subgraph(ids).to_dense().double(), ref[ids][:, ids], atol=1e-6)
    assert knn_similarity(feats[:3], k=20).indices.shape == (3, 2)       # k clipped to N - 1
    with pytest.raises(ValueError):
        graph.subgraph(torch.tensor([0, -1]))


def test_mm_zero_weight_is_p2ot_and_fixed_point():
    feats, _ = blobs(60)
    sim = knn_similarity(feats, k=5).subgraph(torch.arange(60))
    logits = torch.randn(60, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    cost = cost_from_logits(logits)
    inner = P2OTSolver(tol=1e-12, max_iter=5000)
    res = mm_partial_ot(cost, sim, 0.5, 0.0, inner.solve_cost, 0.1)
    assert res.num_iters <= 2
    direct = partial_ot(cost, 0.5, tol=1e-12, max_iter=5000)
    assert torch.allclose(res.q, direct.real, atol=1e-9)

    lam1 = 2.0
    inner = P2OTSolver(tol=1e-12, max_iter=5000)
    res = mm_partial_ot(cost, sim, 0.5, lam1, inner.solve_cost, 0.1, tol=1e-12, max_iter=100)
    assert res.num_iters < 100
    # at convergence Q solves the P²OT problem linearised at itself
    again = partial_ot(cost - lam1 * sim.sym_matmul(res.q), 0.5, tol=1e-12, max_iter=5000)
    assert torch.allclose(again.real, res.q, atol=1e-8)
    assert (60 * res.q.sum(1) <= 1 + 1e-9).all() and res.q.sum().item() == pytest.approx(0.5, abs=1e-9)
    # the semantic term pulls neighbours together
    assert sim.quadratic(res.q) > sim.quadratic(direct.real)


def test_sp2ot_solver_schedule_and_output():
    feats, _ = blobs(45)
    graph = knn_similarity(feats, k=5)
    logits = torch.randn(45, 3, generator=torch.Generator().manual_seed(2))
    solver = SP2OTSolver(P2OTSolver(tol=1e-8), mm_factor=4.0, mm_tol=1e-8)
    assert solver.lam1(0.25) == pytest.approx(3.0)
    q = solver(logits, 0.25, graph.subgraph(torch.arange(45)))
    assert q.shape == (45, 3) and q.dtype == torch.float32 and torch.isfinite(q).all()
    assert q.sum().item() == pytest.approx(45 * 0.25, abs=1e-4)
    assert SP2OTSolver(mm_factor=4.0, mm_factor_fixed=True).lam1(0.9) == 4.0
    assert SP2OTSolver(P2OTSolver(mode='uot')).lam1(0.1) == 0.0
    assert SP2OTSolver().base.tol == 1e-10 and SP2OTSolver().mm_max_iter == 100


# ----------------------------------------------------------------------------------------------------------------
# Loss, memory bank, per-step pseudo-labels
# ----------------------------------------------------------------------------------------------------------------

def test_swapped_prediction_loss_by_hand():
    g = torch.Generator().manual_seed(7)
    z = [torch.randn(4, 3, generator=g, requires_grad=True) for _ in range(2)]
    q = [torch.rand(4, 3, generator=g) * 0.5 for _ in range(2)]
    loss = swapped_prediction_loss(z, q)
    by_hand = sum(-(q[b] * torch.log_softmax(z[a], 1)).sum(1).mean() for a, b in [(0, 1), (1, 0)])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert z[0].grad is not None and z[0].grad.abs().sum() > 0
    # a sample left in the virtual cluster (zero target row) contributes nothing
    q0 = [t.clone() for t in q]
    for t in q0:
        t[0] = 0
    z2 = [t.detach().clone() for t in z]
    z2[0][0] += 100.0
    assert swapped_prediction_loss(z2, q0).item() == pytest.approx(
        swapped_prediction_loss([t.detach() for t in z], q0).item(), rel=1e-6)
    three = swapped_prediction_loss(z * 2, q * 2)[()]                     # 4 views: 12 ordered pairs
    assert torch.isfinite(three)
    assert torch.isfinite(swapped_prediction_loss([t.detach().bfloat16() for t in z], q))
    with pytest.raises(ValueError):
        swapped_prediction_loss(z[:1], q[:1])


def test_memory_bank_fifo():
    bank = MemoryBank(5, 2)
    s0 = bank.enqueue(torch.arange(6.0).view(3, 2), ids=torch.tensor([10, 11, 12]))
    assert s0.tolist() == [0, 1, 2] and len(bank) == 3 and not bank.is_full
    assert bank.values().shape == (3, 2) and bank.filled_ids().tolist() == [10, 11, 12]
    s1 = bank.enqueue(torch.full((3, 2), 9.0), ids=torch.tensor([13, 14, 15]))
    assert s1.tolist() == [3, 4, 0] and bank.is_full                    # wraps, overwriting the oldest row
    assert bank.filled_ids().tolist() == [15, 11, 12, 13, 14]
    bank.write(s1, torch.full((3, 2), -1.0), ids=torch.tensor([13, 14, 15]))
    assert bank.values()[[3, 4, 0]].eq(-1).all() and int(bank.ptr) == 1
    restored = MemoryBank(5, 2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.values(), bank.values()) and int(restored.ptr) == 1
    bank.reset()
    assert len(bank) == 0 and bank.values().shape == (0, 2)
    with pytest.raises(ValueError):
        bank.enqueue(torch.zeros(6, 2))


def test_pseudo_labels_bank_protocol():
    g = torch.Generator().manual_seed(8)
    k, b = 4, 6
    init = torch.randn(12, k, generator=g)
    v0, v1 = torch.randn(2, b, k, generator=g)
    bank = MemoryBank(16, k)
    bank.enqueue(init)
    solver = P2OTSolver(tol=1e-10, warm_start=False)
    t0, t1 = pseudo_labels(solver, [v0, v1], 0.3, bank=bank)
    # reference: view 0 appended (wrapping), solved on the whole bank; then view 1 written into the same slots
    slots = torch.tensor([12, 13, 14, 15, 0, 1])
    mem = init.new_zeros(16, k)
    mem[:12] = init
    mem[slots] = v0
    ref0 = P2OTSolver(tol=1e-10, warm_start=False)(mem, 0.3)[slots]
    mem[slots] = v1
    ref1 = P2OTSolver(tol=1e-10, warm_start=False)(mem, 0.3)[slots]
    assert torch.allclose(t0, ref0) and torch.allclose(t1, ref1)
    assert torch.equal(bank.values(), mem)
    assert (t0.sum() < b) and t0.shape == (b, k)                         # rows are not renormalised
    # without a bank each view is solved on the batch alone
    t = pseudo_labels(P2OTSolver(warm_start=False), [v0], 0.3)[0]
    assert torch.allclose(t, P2OTSolver(warm_start=False)(v0, 0.3))


def test_pseudo_labels_sp2ot_with_bank_and_graph():
    feats, _ = blobs(30)
    graph = knn_similarity(feats, k=4)
    g = torch.Generator().manual_seed(9)
    bank = MemoryBank(12, 3)
    bank.enqueue(torch.randn(8, 3, generator=g), ids=torch.arange(8))
    ids = torch.tensor([20, 21, 22, 23])
    views = list(torch.randn(2, 4, 3, generator=g))
    solver = SP2OTSolver(P2OTSolver(tol=1e-8), mm_factor=2.0)
    out = pseudo_labels(solver, views, 0.5, bank=bank, ids=ids, graph=graph)
    assert [t.shape for t in out] == [(4, 3), (4, 3)] and all(torch.isfinite(t).all() for t in out)
    assert bank.filled_ids()[8:].tolist() == [20, 21, 22, 23]
    with pytest.raises(ValueError):
        pseudo_labels(solver, views, 0.5, bank=bank)                     # no graph / ids
    with pytest.raises(ValueError):
        pseudo_labels(P2OTSolver(), views, 0.5, graph=graph, ids=ids)
    assert selection_score(2.0, 0.5) == 4.0


# ----------------------------------------------------------------------------------------------------------------
# Metrics (oracle case 6 and hand-checked cases)
# ----------------------------------------------------------------------------------------------------------------

def test_metrics_oracle():
    targets, preds = [0, 0, 0, 1, 1, 2], [1, 1, 1, 0, 0, 0]
    mapping = hungarian_match(preds, targets, num_clusters=3)
    assert mapping.tolist() == [1, 0, 2]
    m = cluster_metrics(preds, targets, num_clusters=3)
    assert m['overall_acc'] == pytest.approx(500 / 6, abs=1e-2)
    assert m['acc'] == pytest.approx(200 / 3, abs=1e-2)
    assert m['f1'] == pytest.approx(60.0, abs=1e-2)
    assert m['nmi'] == pytest.approx(81.33, abs=1e-2)


def test_permuted_perfect_clustering():
    targets = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    perm = np.array([2, 0, 3, 1])
    m = cluster_metrics(torch.as_tensor(perm[targets]), torch.as_tensor(targets))
    for key in ('acc', 'overall_acc', 'nmi', 'ari', 'f1'):
        assert m[key] == pytest.approx(100.0)
    assert remap_clusters(perm[targets], np.array(m['mapping'])).tolist() == targets.tolist()


def test_known_confusion_with_surplus_and_empty_clusters():
    # classes 0 (x4), 1 (x2), 2 (x4); clusters 0, 1, 5 used, 2-4 empty
    targets = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [5, 5, 5, 1, 1, 1, 0, 0, 0, 5]
    m = cluster_metrics(preds, targets, groups={'head': [0], 'mid': [1], 'tail': [2]}, num_clusters=6)
    assert m['mapping'] == [2, 1, -1, -1, -1, 0]                         # 5->0 (3), 1->1 (2), 0->2 (3)
    assert m['overall_acc'] == pytest.approx(80.0)
    assert m['class_acc'] == pytest.approx([75.0, 100.0, 75.0])
    assert m['acc'] == pytest.approx(250 / 3)
    # F1 per class: 0: P 3/4 R 3/4; 1: P 2/3 R 1; 2: P 1 R 3/4
    f1 = [0.75, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.75 / 1.75]
    assert m['f1'] == pytest.approx(100 * sum(f1) / 3)
    assert (m['head_acc'], m['mid_acc'], m['tail_acc']) == pytest.approx((75.0, 100.0, 75.0))

    # a non-empty surplus cluster stays unmatched: its sample is an error (a false negative of class 1 only)
    m = cluster_metrics([0, 0, 1, 1, 2], [0, 0, 1, 1, 1])
    assert m['mapping'] == [0, 1, -1]
    assert m['overall_acc'] == pytest.approx(80.0) and m['acc'] == pytest.approx(250 / 3)
    assert m['f1'] == pytest.approx(100 * (1.0 + 0.8) / 2)


def test_groups_and_kmeans():
    assert frequency_groups(10) == {'head': [0, 1, 2], 'mid': [3, 4, 5, 6], 'tail': [7, 8, 9]}
    g7 = frequency_groups(7)
    assert sorted(g7['head'] + g7['mid'] + g7['tail']) == list(range(7)) and len(g7['tail']) == 2
    splits = class_splits_from_bounds(3, 1, 2)                           # deit_lt's ClassSplits groups work as-is
    m = cluster_metrics([0, 0, 1, 2, 2], [0, 0, 1, 2, 1], groups=splits.groups)
    assert m['tail_acc'] == 100.0 and m['mid_acc'] == 50.0

    feats, labels = blobs(60, spread=10.0)
    a = kmeans_clusters(feats, 3, seed=0, n_init=2)
    b = kmeans_clusters(feats.numpy(), 3, seed=0, n_init=2)
    assert a.dtype == np.int64 and np.array_equal(a, b)
    assert cluster_metrics(a, labels)['acc'] == pytest.approx(100.0)
    assert len(np.unique(kmeans_clusters(feats, 3, seed=1, n_init=1, normalize=True))) == 3
