"""Influence math against independent references: finite differences, dense Hessians, actual retraining."""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.core.protocol import MatchingStep, RealBatch, uniform_weights
from benchmark.platform.errors import BenchmarkError
from benchmark.core.registry import create_method
from influence import SolverConfig, explicit_scores, implicit_scores, influence_weights, inverse_hvp
from influence.ihvp import HVP, cg_solve, lissa_solve


def _dc_step(ds, task_of, method="dc", extra=(), seed=0):
    task = task_of(ds, 2, seed)
    m = create_method(method, None, ["net_width=4", "batch_real=6", *extra]).for_task(task)
    gen = torch.Generator().manual_seed(seed)
    net = m.fresh_net(task, 0).double()
    syn = {c: (ds.x_train[ds.class_indices[c][:2]].clone() + 0.1, torch.full((2,), c)) for c in range(3)}
    return m, m.build_step(task, net, syn, gen, 0)


@pytest.mark.parametrize("method", ["dc", "dsa", "idc"])
def test_explicit_scores_equal_finite_differences(digits64, task_of, method):
    m, step = _dc_step(digits64, task_of, method)
    w0 = uniform_weights(step)
    for g in range(len(step.batches)):
        scores = explicit_scores(step, g, w0[g])
        syn = [s.detach() for s in step.syn_stats[g]]

        def objective(w):
            return float(step.distance(syn, step.real_statistic(g, w, False)))
        eps = 1e-6
        for j in range(len(w0[g])):
            e = torch.zeros_like(w0[g])
            e[j] = eps
            fd = (objective(w0[g] + e) - objective(w0[g] - e)) / (2 * eps)
            assert abs(fd - float(scores[j])) <= 1e-5 * max(1.0, abs(fd)), (g, j, fd, float(scores[j]))
            # sign convention: a positive score means upweighting raises the objective
            if abs(fd) > 1e-8:
                assert (objective(w0[g] + 10 * e) > objective(w0[g])) == (float(scores[j]) > 0)


def test_dm_explicit_scores_finite_differences(digits64, task_of):
    task = task_of(digits64, 2, 0)
    m = create_method("dm", None, ["net_width=4", "batch_real=6"]).for_task(task)
    net = m.fresh_net(task, 0).double()
    leaf = digits64.x_train[torch.cat([digits64.class_indices[c][:2] for c in range(10)])].clone()
    step = m.build_step(task, net, m.synthetic_batches(task, leaf, 2), torch.Generator().manual_seed(0), 0)
    w0 = uniform_weights(step)
    s = explicit_scores(step, 3, w0[3])
    syn = [t.detach() for t in step.syn_stats[3]]
    for j in range(6):
        e = torch.zeros_like(w0[3])
        e[j] = 1e-6
        fd = (float(step.distance(syn, step.real_statistic(3, w0[3] + e))) -
              float(step.distance(syn, step.real_statistic(3, w0[3] - e)))) / 2e-6
        assert abs(fd - float(s[j])) <= 1e-5 * max(1.0, abs(fd))


def _spd_problem(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    return H, theta, lambda: 0.5 * theta @ H @ theta, torch.randn(n, generator=g, dtype=torch.float64)


def test_cg_and_lissa_match_exact_inverse():
    H, theta, loss, v = _spd_problem()
    exact = torch.linalg.solve(H + 0.01 * torch.eye(12, dtype=torch.float64), v)
    h_cg, info = cg_solve(HVP(loss(), [theta], 0.01), [v], max_iter=100, tol=1e-10)
    assert (h_cg[0] - exact).norm() / exact.norm() <= 1e-4 and info.converged
    top = float(torch.linalg.eigvalsh(H).max())
    h_l, info_l = lissa_solve(HVP(loss(), [theta], 0.01), [v], scale=1.2 * top, depth=3000, tol=1e-6)
    assert (h_l[0] - exact).norm() / exact.norm() <= 5e-2
    h_ex, _ = inverse_hvp(loss, [theta], [v], SolverConfig("exact", damping=0.01))
    assert (h_ex[0] - exact).norm() / exact.norm() <= 1e-10


def test_cg_warm_start():
    """From any x0 CG still solves the system (against torch.linalg.solve); from the exact solution it stops at
    once; from the solution of a nearby system (a network a few SGD steps on) k iterations get closer than k cold
    ones."""
    H, theta, loss, v = _spd_problem()
    damped = H + 0.01 * torch.eye(12, dtype=torch.float64)
    exact = torch.linalg.solve(damped, v)
    x0 = [torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    h, info = cg_solve(HVP(loss(), [theta], 0.01), [v], max_iter=100, tol=1e-10, x0=x0)
    assert (h[0] - exact).norm() / exact.norm() <= 1e-6 and info.converged
    h, info = cg_solve(HVP(loss(), [theta], 0.01), [v], max_iter=100, tol=1e-8, x0=[exact])
    assert info.iterations == 0 and info.converged and torch.allclose(h[0], exact)
    H2, _, _, _ = _spd_problem(seed=2)
    nearby = torch.linalg.solve(damped + 0.05 * H2, v)
    for k in (1, 3, 5):
        warm, _ = cg_solve(HVP(loss(), [theta], 0.01), [v], max_iter=k, tol=0.0, x0=[nearby])
        cold, _ = cg_solve(HVP(loss(), [theta], 0.01), [v], max_iter=k, tol=0.0)
        assert (warm[0] - exact).norm() < (cold[0] - exact).norm(), k
    # inverse_hvp passes it through and hands the solution back for the next solve
    h, info = inverse_hvp(loss, [theta], [v], SolverConfig("cg", damping=0.01, max_iter=0), x0=[exact])
    assert torch.allclose(h[0], exact) and info.solution is h


def test_lissa_divergence_detected_and_falls_back():
    H, theta, loss, v = _spd_problem()
    cfg = SolverConfig("lissa", damping=0.01, lissa_scale=0.01, lissa_depth=500, lissa_fallback=False, max_iter=100)
    from influence.ihvp import InfluenceError
    with pytest.raises(InfluenceError, match="diverged"):
        inverse_hvp(loss, [theta], [v], cfg)
    cfg.lissa_fallback = True
    h, info = inverse_hvp(loss, [theta], [v], cfg)
    assert "fell back to CG" in info.note and all(torch.isfinite(t).all() for t in h)


def test_cg_raises_damping_on_indefinite_hessian():
    """H = diag(-0.5, 2): CG at damping 0.01 meets negative curvature; it must raise the damping (0.01 -> 0.1 -> 1),
    solve (H + 1 I) h = v exactly, and say so, never return the zero vector."""
    H = torch.diag(torch.tensor([-0.5, 2.0], dtype=torch.float64))
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loss = lambda: 0.5 * theta @ H @ theta  # noqa: E731
    v = torch.tensor([1.0, 0.1], dtype=torch.float64)
    h, info = inverse_hvp(loss, [theta], [v], SolverConfig("cg", damping=0.01, max_iter=10, tol=1e-12))
    assert info.damping == pytest.approx(1.0) and "raised" in info.note and info.converged
    assert torch.allclose(h[0], torch.linalg.solve(H + torch.eye(2, dtype=torch.float64), v), rtol=1e-10)
    # no damping up to the cap makes it positive definite: the identity answer at the cap, flagged
    h, info = inverse_hvp(loss, [theta], [v], SolverConfig("cg", damping=0.01, max_damping=0.2))
    assert not info.converged and info.solver == "identity" and torch.allclose(h[0], v / 0.1)


def test_gauss_newton_product_against_dense_jacobian():
    """GaussNewtonVP v = J^T H_z J v with J from torch.autograd.functional.jacobian and H_z = (diag p - p p^T)/N, on a
    small tanh MLP where the Hessian is indefinite but the Gauss-Newton matrix is PSD."""
    from torch.autograd.functional import jacobian
    from influence.ihvp import GaussNewtonVP
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.arange(9) % 3
    W1 = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)  # a parameter the outputs do not depend on
    params = [W1, unused, W2]
    f = lambda a, b: torch.tanh(X @ a) @ b  # noqa: E731
    J = torch.cat([j.reshape(9 * 3, -1) for j in jacobian(f, (W1, W2))], 1)  # (N*C, P) without `unused`
    p = torch.softmax(f(W1, W2), 1).detach()
    Hz = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / 9
    G = J.T @ Hz @ J
    op = GaussNewtonVP(f(W1, W2), lambda z: F.cross_entropy(z, y), params, damping=0.3)
    for k in range(3):
        v = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in params]
        got = op(v)
        vv = torch.cat([v[0].reshape(-1), v[2].reshape(-1)])
        want = G @ vv + 0.3 * vv
        assert torch.allclose(torch.cat([got[0].reshape(-1), got[2].reshape(-1)]), want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got[1], 0.3 * v[1])  # zero curvature in an unused parameter: damping only
    assert torch.linalg.eigvalsh(G).min() > -1e-12
    loss = lambda: F.cross_entropy(f(W1, W2), y)  # noqa: E731
    gr = torch.autograd.grad(loss(), (W1, W2), create_graph=True)
    gflat = torch.cat([t.reshape(-1) for t in gr])
    H = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(gflat[i], (W1, W2), retain_graph=True)])
                     for i in range(len(gflat))])
    assert torch.linalg.eigvalsh(H).min() < -1e-6  # the exact Hessian is indefinite here: what GN avoids


def test_gauss_newton_equals_hessian_for_a_linear_model():
    """Softmax regression is linear in its parameters, so G = H: CG on the Gauss-Newton operator must solve the
    exact-Hessian system, with no damping raised; the dense 'exact' GN solve agrees too."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.arange(20) % 4
    W = (0.1 * torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss = lambda: F.cross_entropy(X @ W, y)  # noqa: E731
    outputs = (lambda: X @ W, lambda z: F.cross_entropy(z, y))
    v = [torch.randn(6, 4, generator=g, dtype=torch.float64)]
    ref, _ = inverse_hvp(loss, [W], v, SolverConfig("exact", damping=0.01))
    cg, info = inverse_hvp(loss, [W], v, SolverConfig("cg", damping=0.01, max_iter=200, tol=1e-12,
                                                      curvature="gauss-newton"), outputs)
    assert info.converged and info.damping == 0.01 and torch.allclose(cg[0], ref[0], rtol=1e-7, atol=1e-9)
    dense, _ = inverse_hvp(loss, [W], v, SolverConfig("exact", damping=0.01, curvature="gauss-newton"), outputs)
    assert torch.allclose(dense[0], ref[0], rtol=1e-9, atol=1e-11)
    with pytest.raises(Exception, match="needs the network outputs"):
        inverse_hvp(loss, [W], v, SolverConfig("cg", curvature="gauss-newton"))


def test_implicit_scores_match_dense_hessian(digits64, task_of):
    """-<(H + damping I)^{-1} g_M, grad l_j> against a dense Hessian and a per-sample backward loop."""
    m, step = _dc_step(digits64, task_of, "idc", ["network=ConvNetD1"])
    w0 = uniform_weights(step)
    damping = 1.0
    scores, info = implicit_scores(step, w0, SolverConfig("exact", damping=damping))
    params = step.train_params
    x = torch.cat([b.x for b in step.batches])
    y = torch.cat([b.y for b in step.batches])
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    # dense Hessian of the mean inner loss, row by row
    g = flat(torch.autograd.grad(step.instance_loss(x, y).mean(), params, create_graph=True))
    H = torch.stack([flat(torch.autograd.grad(g[i], params, retain_graph=True)) for i in range(len(g))])
    total = sum(step.distance(step.syn_stats[k], step.real_statistic(k, w0[k], True)) for k in range(len(w0)))
    g_m = flat(torch.autograd.grad(total, params, retain_graph=True))
    h = torch.linalg.solve(H + damping * torch.eye(len(g), dtype=H.dtype), g_m)
    per_sample = []
    for j in range(len(y)):  # independent reference: one backward per sample
        lj = step.instance_loss(x[j:j + 1], y[j:j + 1]).sum()
        per_sample.append(-(h @ flat(torch.autograd.grad(lj, params))))
    expected = torch.stack(per_sample)
    got = torch.cat(scores)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)
    # step_scores (explicit and g_M from one shared backward) = the FD-checked explicit path + the implicit term
    from influence.scores import step_scores
    total_scores, info = step_scores(step, w0, SolverConfig("exact", damping=damping))
    explicit = torch.cat([explicit_scores(step, k, w0[k]) for k in range(len(w0))])
    assert info["implicit"] and torch.allclose(torch.cat(total_scores), explicit + expected, rtol=1e-6, atol=1e-9)
    # a stochastic Hessian on evenly spaced rows = the dense Hessian of those rows
    rows = torch.linspace(0, len(y) - 1, 7).round().long()
    gs = flat(torch.autograd.grad(step.instance_loss(x[rows], y[rows]).mean(), params, create_graph=True))
    Hs = torch.stack([flat(torch.autograd.grad(gs[i], params, retain_graph=True)) for i in range(len(gs))])
    hs = torch.linalg.solve(Hs + damping * torch.eye(len(gs), dtype=Hs.dtype), g_m)
    sub, _ = implicit_scores(step, w0, SolverConfig("exact", damping=damping, hessian_batch=7))
    per_sample_grads = [flat(torch.autograd.grad(step.instance_loss(x[j:j + 1], y[j:j + 1]).sum(), params))
                        for j in range(len(y))]
    assert torch.allclose(torch.cat(sub), torch.stack([-(hs @ gj) for gj in per_sample_grads]), rtol=1e-6,
                          atol=1e-9)
    # CG agrees at a damping that makes H + damping I positive definite (H itself is indefinite here, so the
    # damping is set from its spectrum: the comparison always runs)
    lam_min = float(torch.linalg.eigvalsh(H).min())
    assert lam_min < 0  # the case CG's adaptive damping exists for
    d_pd = 1.0 - lam_min
    h_pd = torch.linalg.solve(H + d_pd * torch.eye(len(g), dtype=H.dtype), g_m)
    cg, info = implicit_scores(step, w0, SolverConfig("cg", damping=d_pd, max_iter=500, tol=1e-10))
    assert info.damping == d_pd and torch.allclose(torch.cat(cg), torch.stack([-(h_pd @ gj) for gj in per_sample_grads]),
                                                    rtol=1e-4, atol=1e-7)


def test_implicit_scores_with_gauss_newton_match_dense_jacobian(digits64, task_of):
    """The implicit term with curvature='gauss-newton' on a real IDC step: -<(G + damping I)^{-1} g_M, grad l_j> with
    G = J^T H_z J from a dense Jacobian of the network (torch.func.jacrev) on the step's Hessian rows."""
    m, step = _dc_step(digits64, task_of, "idc", ["network=ConvNetD1"])
    w0 = uniform_weights(step)
    net = step.instance_outputs
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = step.train_params
    x = torch.cat([b.x for b in step.batches])
    y = torch.cat([b.y for b in step.batches])
    rows = torch.linspace(0, len(y) - 1, 7).round().long()
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    jac = torch.func.jacrev(lambda *ps: torch.func.functional_call(net, dict(zip(names, ps)), (x[rows],)),
                            argnums=tuple(range(len(params))))(*[p.detach() for p in params])
    n, c = len(rows), 10
    J = torch.cat([j.reshape(n * c, -1) for j in jac], 1)
    p = torch.softmax(net(x[rows]), 1).detach()
    G = J.T @ (torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / n) @ J
    damping = 0.1
    total = sum(step.distance(step.syn_stats[k], step.real_statistic(k, w0[k], True)) for k in range(len(w0)))
    g_m = flat(torch.autograd.grad(total, params, retain_graph=True))
    h = torch.linalg.solve(G + damping * torch.eye(len(g_m), dtype=G.dtype), g_m)
    expected = torch.stack([-(h @ flat(torch.autograd.grad(step.instance_loss(x[j:j + 1], y[j:j + 1]).sum(), params)))
                            for j in range(len(y))])
    got, info = implicit_scores(step, w0, SolverConfig("cg", damping=damping, max_iter=500, tol=1e-11,
                                                       hessian_batch=7, curvature="gauss-newton"))
    assert info.converged and info.damping == damping  # PSD: no damping raised
    assert torch.allclose(torch.cat(got), expected, rtol=1e-5, atol=1e-8)


def test_influence_predicts_retraining_logistic_regression(digits64):
    """Upweighting an instance of L2-regularised logistic regression trained to convergence: the implicit influence
    (one iHVP, batched over instances) against actually retraining with the instance upweighted."""
    from scipy.stats import pearsonr, spearmanr
    ds = digits64
    n = 400
    X = ds.x_train[:n].reshape(n, -1)
    Y = ds.y_train[:n]
    Xt, Yt = ds.x_test[:200].reshape(200, -1), ds.y_test[:200]
    lam = 1e-2

    def fit(extra_w=None):
        W = torch.zeros(64, 10, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                history_size=50, line_search_fn="strong_wolfe")
        ew = torch.zeros(n, dtype=torch.float64) if extra_w is None else extra_w

        def closure():
            opt.zero_grad()
            per = F.cross_entropy(X @ W, Y, reduction="none") + 0.5 * lam * (W ** 2).sum()
            loss = per.mean() + (ew * per).sum()
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        return W.detach()

    W0 = fit().requires_grad_(True)
    test_loss = lambda W: F.cross_entropy(Xt @ W, Yt)  # noqa: E731
    step = MatchingStep(
        iteration=0, params=[W0], batches=[RealBatch(X, Y, torch.arange(n), 0)],
        real_statistic=lambda g, w, cg=False: (test_loss(W0),), distance=lambda s, r: r[0] - s[0],
        syn_stats=[(torch.zeros((), dtype=torch.float64),)], inner_data="real",
        instance_loss=lambda x, y: F.cross_entropy(x @ W0, y, reduction="none") + 0.5 * lam * (W0 ** 2).sum())
    (pred,), info = implicit_scores(step, uniform_weights(step), SolverConfig("cg", damping=1e-12, max_iter=500,
                                                                            tol=1e-12))
    base = float(test_loss(W0).detach())
    order = pred.abs().argsort(descending=True)[:12].tolist() + pred.abs().argsort()[:4].tolist()
    eps = 0.01
    actual = []
    for j in order:
        ew = torch.zeros(n, dtype=torch.float64)
        ew[j] = eps
        actual.append((float(test_loss(fit(ew))) - base) / eps)
    p = pred[order].numpy()
    assert pearsonr(p, actual)[0] > 0.9 and spearmanr(p, actual)[0] > 0.9, (p, actual)


def test_weights_softmax_and_tau_limits():
    s = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    w = influence_weights(s, 1.0, standardize=False)
    assert torch.allclose(w, torch.softmax(s, 0)) and math.isclose(float(w.sum()), 1.0)
    assert torch.equal(influence_weights(s, math.inf), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert influence_weights(s, 1e-3, standardize=False).argmax() == 2
    # shift invariance: adding a constant to every score changes nothing
    assert torch.allclose(influence_weights(s + 5, 0.7, False), influence_weights(s, 0.7, False))
    # standardize=True (the default): weights depend on within-group z-scores only, so any positive affine map of
    # the scores gives the same weights, and they equal softmax of the z-scores / tau
    z = (s - s.mean()) / s.std()
    assert torch.allclose(influence_weights(40 * s - 7, 0.5), influence_weights(s, 0.5))
    assert torch.allclose(influence_weights(s, 0.5), torch.softmax(z / 0.5, 0))


def test_tau_infinity_reproduces_base_method_exactly(digits, task_of):
    over = ["iterations=2", "net_width=8", "batch_real=8", "outer_loop=2", "inner_loop=2"]
    base = create_method("dc", None, over).distill(task_of(digits, 1, 3))
    iwd = create_method("iwd+dc", None, over + ["tau=inf"]).distill(task_of(digits, 1, 3))
    assert torch.equal(base.images, iwd.images)
    # tau large but finite: scores and statistics run on IWD's per-instance path, equal to rounding. In float32 the
    # rounding grows through the steps (5e-5 on images of size 6), so the check runs in float64
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ds64 = dataclasses.replace(digits, x_train=digits.x_train.double(), x_test=digits.x_test.double())
        base64 = create_method("dc", None, over).distill(task_of(ds64, 1, 3))
        near = create_method("iwd+dc", None, over + ["tau=1e9"]).distill(task_of(ds64, 1, 3))
    finally:
        torch.set_default_dtype(default)
    assert torch.allclose(base64.images, near.images, atol=1e-6)
    assert not torch.allclose(base64.images, base.images.double(), atol=1e-6)  # float64 is what ran
    tracked = iwd.extras["influence"]
    assert int(tracked["count"].sum()) == 2 * 2 * 10 * 8  # iterations x outer steps x classes x batch


@pytest.mark.parametrize("network", ["ConvNet", "ConvNetBN"])
def test_whole_set_scores_do_not_depend_on_chunking_and_are_deterministic(digits, task_of, network):
    """Also with BatchNorm (frozen on a few real images first, as matching does; train-mode BN made the scores
    depend on the chunk's composition by ~55%)."""
    from methods.ablations import reference_set, score_training_set
    m = create_method("dc", None, ["net_width=8", f"network={network}"])
    task = task_of(digits, 1, 0)
    syn = reference_set(task)
    a = score_training_set(m, task, syn, num_nets=1, chunk=40)
    b = score_training_set(m, task, syn, num_nets=1, chunk=1000)
    c = score_training_set(m, task, syn, num_nets=1, chunk=40)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * float(a.abs().max()))  # float32 sums in another order
    assert torch.equal(a, c)
    assert np.isfinite(a.numpy()).all() and (a != 0).all()


def test_iwd_decorator_for_a_user_method(digits, task_of):
    """A user's own method gets its IWD variant with one line, and its weights are non-uniform."""
    from benchmark.core.registry import get_method, register_method
    from influence import influence_weighted
    from methods.dm import DM

    @register_method("my-dm-test")
    class MyDM(DM):
        """A user's method."""

    iwd_cls = influence_weighted(MyDM)
    assert get_method("iwd+my-dm-test") is iwd_cls
    m = iwd_cls(iwd_cls.make_config(None, ["iterations=2", "net_width=8", "batch_real=8", "tau=0.1"]))
    seen = []
    orig = m.instance_weights

    def spy(step):
        w = orig(step)
        seen.append(w)
        return w
    m.instance_weights = spy
    m.distill(task_of(digits, 1, 0))
    w = seen[0][0]
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6) and float(w.max() - w.min()) > 1e-3


def test_bad_tau_is_a_clear_error():
    from benchmark.platform.errors import BenchmarkError
    with pytest.raises(BenchmarkError, match="tau must be > 0"):
        create_method("iwd+dc", None, ["tau=0"])
    with pytest.raises(BenchmarkError, match="unknown solver"):
        create_method("iwd+idc", None, ["solver=magic"])


def _dense_gn(net, x, params):
    """The Gauss-Newton matrix of the mean CE of net over x, materialised column by column (tiny nets only)."""
    from influence.ihvp import GaussNewtonVP
    y = torch.zeros(len(x), dtype=torch.long)
    op = GaussNewtonVP(net(x), lambda z: F.cross_entropy(z, y), params, 0.0)
    sizes = [p.numel() for p in params]
    cols = [torch.cat([c.reshape(-1) for c in op([e.view_as(p) for e, p in zip(col.split(sizes), params)])])
            for col in torch.eye(sum(sizes), dtype=torch.float64)]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kfac_is_the_exact_gauss_newton_where_its_factorisation_is(curvature):
    """One instance through one Linear layer, and one through a Conv2d with a single output location: the layer's
    GN block IS A (x) G, so K-FAC's (and EK-FAC's) direct inverse equals the dense GN solve."""
    from influence.kfac import kfac_inverse
    torch.manual_seed(0)
    for net, x in ((torch.nn.Linear(5, 4).double(), torch.randn(1, 5, dtype=torch.float64)),
                   (torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten()).double(),
                    torch.randn(1, 2, 3, 3, dtype=torch.float64))):
        params = list(net.parameters())
        v = [torch.randn_like(p) for p in params]
        h, _ = kfac_inverse(net, x, params, v, 0.1, eigen_correct=curvature == "ekfac")
        dense = torch.linalg.solve(_dense_gn(net, x, params) + 0.1 * torch.eye(sum(p.numel() for p in params),
                                                                                 dtype=torch.float64),
                                   torch.cat([t.reshape(-1) for t in v]))
        assert torch.allclose(torch.cat([t.reshape(-1) for t in h]), dense, atol=1e-9), type(net)


def test_kfac_factors_and_ekfac_eigenvalues_against_brute_force():
    """A conv layer over several instances and locations. References built independently: A from patches cut out by
    hand (not unfold), G from per-instance, per-class output gradients, the layer's GN block dense. K-FAC must equal
    Q diag(1 / (gamma alpha + lambda)) Q^T v and EK-FAC Q diag(1 / (d + lambda)) Q^T v with Q = Q_A (x) Q_G and
    d = diag(Q^T block Q); GroupNorm's affine parameters get the dense GN's diagonal."""
    from influence.kfac import kfac_inverse
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    net = torch.nn.Sequential(conv, torch.nn.GroupNorm(3, 3).double(), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).double()
    n, lam = 4, 0.01
    x = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    params = list(net.parameters())
    gn = _dense_gn(net, x, params)
    xp = F.pad(x, (1, 1, 1, 1))
    rows = torch.stack([torch.cat([xp[i, :, r:r + 3, c:c + 3].reshape(-1), torch.ones(1, dtype=torch.float64)])
                        for i in range(n) for r in range(4) for c in range(4)])
    alpha, qa = torch.linalg.eigh(rows.T @ rows / len(rows))
    G = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(n):
        s = conv(x[i:i + 1])
        z = net[1:](s)
        p = torch.softmax(z, 1)[0].detach()
        for k in range(3):
            r = p[k].sqrt() * (torch.eye(3, dtype=torch.float64)[k] - p)
            (g,) = torch.autograd.grad(z[0] @ r, s, retain_graph=True)
            g = g[0].reshape(3, -1)  # (out, locations)
            G += g @ g.T / n
    gamma, qg = torch.linalg.eigh(G)
    n_w = conv.weight.numel() + conv.bias.numel()
    # the flat parameter vector is [weight (out, 18) row-major, bias]; kron(A, G) acts on vec([W b]) column-major
    perm = torch.tensor([o * 18 + j if j < 18 else 54 + o for j in range(19) for o in range(3)])
    block = gn[:n_w, :n_w][perm][:, perm]
    Q = torch.kron(qa, qg)
    v = [torch.randn_like(p) for p in params]
    vcol = torch.cat([v[0].reshape(3, -1), v[1].reshape(3, 1)], 1).T.reshape(-1)
    for eigen_correct, scale in ((False, torch.kron(alpha, gamma)), (True, torch.diagonal(Q.T @ block @ Q))):
        h, _ = kfac_inverse(net, x, params, v, lam, eigen_correct=eigen_correct)
        hcol = torch.cat([h[0].reshape(3, -1), h[1].reshape(3, 1)], 1).T.reshape(-1)
        assert torch.allclose(hcol, Q @ ((Q.T @ vcol) / (scale.clamp_min(0) + lam)), atol=1e-8), eigen_correct
        got = torch.cat([h[2].reshape(-1), h[3].reshape(-1)])
        want = torch.cat([v[2].reshape(-1), v[3].reshape(-1)]) / (torch.diagonal(gn)[n_w:] + lam)
        assert torch.allclose(got, want, atol=1e-10)


def test_kfac_refuses_layers_it_does_not_cover():
    from influence.ihvp import InfluenceError
    from influence.kfac import kfac_inverse
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                              torch.nn.LazyLinear(3))
    x = torch.randn(2, 1, 4, 4)
    net(x)
    with pytest.raises(InfluenceError, match="Use solver=cg"):
        kfac_inverse(net, x, list(net.parameters()), [torch.zeros_like(p) for p in net.parameters()], 0.1)


def test_woodbury_is_the_dense_gauss_newton_solve():
    """Several instances through a small ConvNet (conv, GroupNorm, ReLU, pooling, linear): the Woodbury solve equals
    the dense GN solve (materialised column by column), to float64 precision."""
    from influence.kfac import woodbury_inverse
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.GroupNorm(3, 3), torch.nn.ReLU(),
                              torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4)).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    params = [p for p in net.parameters()][:-1]  # a subset, as IDC's train_params may be
    v = [torch.randn_like(p) for p in params]
    h, _ = woodbury_inverse(net, x, params, v, 0.05)
    dense = torch.linalg.solve(_dense_gn(net, x, params) + 0.05 * torch.eye(sum(p.numel() for p in params),
                                                                              dtype=torch.float64),
                               torch.cat([t.reshape(-1) for t in v]))
    assert torch.allclose(torch.cat([t.reshape(-1) for t in h]), dense, atol=1e-9)


TINY_BASES = {"dc": ["outer_loop=2", "inner_loop=2"], "dsa": ["outer_loop=2", "inner_loop=2"], "dm": [],
              "idc": ["inner_loop=2", "n_data=16", "factor=1"],
              "pdd": ["inner_loop=2", "n_data=16", "factor=1", "stages=2", "condition_epochs=1"],
              "pdd-dc": ["outer_loop=2", "inner_loop=2", "stages=2", "condition_epochs=1"]}


@pytest.mark.parametrize("base", sorted(TINY_BASES))
def test_every_weighting_reproduces_every_base_at_its_limit(digits, task_of, base):
    """All six IWD variants, each weighting rule at its limit (tau = inf; trim with both fractions 0), give the base
    method's set bit for bit."""
    over = ["iterations=1", "net_width=8", "batch_real=8"] + TINY_BASES[base]
    base_set = create_method(base, None, over).distill(task_of(digits, 2, 1))
    over += ["solver_max_iter=3"]  # the implicit term's solves still run (and must not change anything)
    for rule in ("weighting=paper", "weighting=inverse", "weighting=two-tail"):
        iwd = create_method("iwd+" + base, None, over + ["tau=inf", rule])
        assert torch.equal(iwd.distill(task_of(digits, 2, 1)).images, base_set.images), (base, rule)
    trim = create_method("iwd+" + base, None, over + ["weighting=trim", "trim_top=0"])
    assert torch.equal(trim.distill(task_of(digits, 2, 1)).images, base_set.images), (base, "trim")


def test_weighting_rules_move_weight_where_they_say():
    """A group with one outlier high score and one outlier low score: paper favours the high one, inverse the low
    one, two-tail down-weights both against the middle, trim drops the chosen tails; all sum to 1."""
    s = torch.tensor([-3.0, 0.0, 0.1, -0.1, 3.0], dtype=torch.float64)
    paper, inverse, two = (influence_weights(s, 1.0, True, rule) for rule in ("paper", "inverse", "two-tail"))
    assert paper.argmax() == 4 and inverse.argmax() == 0
    assert two[0] < two[1] and two[4] < two[1]
    trim = influence_weights(s, 1.0, True, "trim", trim_top=0.2, trim_bottom=0.2)
    assert torch.equal(trim, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0], dtype=torch.float64))
    for w in (paper, inverse, two, trim):
        assert math.isclose(float(w.sum()), 1.0)


@pytest.mark.parametrize("bad, message", [("damping=0", "damping must be > 0"), ("damping=-1", "damping must be > 0"),
                                          ("solver_tol=0", "solver_tol"), ("solver_max_iter=0", "solver_max_iter"),
                                          ("track_beta=1", "track_beta"), ("weighting=magic", "unknown weighting"),
                                          ("trim_top=1", "trim_top"), ("hessian_batch=0", "hessian_batch"),
                                          ("lissa_scale=0", "lissa_scale")])
def test_bad_iwd_options_are_one_line_errors_from_the_cli(bad, message):
    """Exit code 2 and one line naming the option, before any work (a zero damping used to make CG on the exact
    Hessian raise it forever)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "run.py", "distill", "-m", "iwd+idc", "-o", "/tmp/never.pt", "--set", bad],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_lissa_that_stalls_without_diverging_falls_back_and_says_so():
    """A scale far above the top eigenvalue keeps LiSSA stable but too slow for its depth: not converged, so CG
    takes over (and says why); with the fallback off the unconverged answer is returned flagged."""
    H, theta, loss, v = _spd_problem()
    cfg = SolverConfig("lissa", damping=0.01, lissa_scale=1e4, lissa_depth=20, max_iter=100, tol=1e-8,
                       lissa_fallback=False)
    h, info = inverse_hvp(loss, [theta], [v], cfg)
    assert info.solver == "lissa" and not info.converged
    cfg.lissa_fallback = True
    h, info = inverse_hvp(loss, [theta], [v], cfg)
    exact = torch.linalg.solve(H + 0.01 * torch.eye(len(H), dtype=H.dtype), v)
    assert "did not converge" in info.note and "fell back to CG" in info.note
    assert (h[0] - exact).norm() / exact.norm() < 1e-6


def test_whole_set_scores_of_an_idc_base_include_the_implicit_term(digits, task_of):
    """For a base whose network trains on real data, whole-set scores are what its IWD variant computes on one step
    holding every training instance: explicit + implicit with g_M of the whole objective (here with the exact GN
    solve on the same 7 evenly spaced rows), however the set is chunked."""
    from methods.ablations import reference_set, score_training_set
    from influence.scores import step_scores
    task = task_of(digits, 1, 0)  # float32: the scoring networks are the method's own
    m = create_method("idc", None, ["net_width=4", "network=ConvNetD1", "factor=1"])
    syn = reference_set(task)
    cfg = SolverConfig("exact", damping=0.1, curvature="gauss-newton", hessian_batch=7)
    whole = score_training_set(m, task, syn, num_nets=1, chunk=300, solver=cfg)
    r = m.for_task(task)
    from benchmark.core import seeds
    step = r.scoring_step(task, syn, seeds.scoring_network(0), dict(enumerate(digits.class_indices)),
                          seeds.scoring_generator(0, 0))
    w0 = uniform_weights(step)
    expected, info = step_scores(step, w0, cfg)
    assert info["implicit"]
    expected = torch.cat(expected)[torch.argsort(torch.cat(list(digits.class_indices)))]  # by training index
    assert torch.allclose(whole, expected.double(), rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("network,subset", [("ConvNetD2", "all"), ("ConvNetGN", "all"), ("MLP", "all"),
                                            ("ConvNetD2", "conv weights")])
def test_per_instance_gradients_against_a_per_sample_loop(digits64, network, subset):
    """One forward + one backward to the layers' outputs (influence.per_instance) against one autograd backward per
    instance (float64), for every parameter or IDC's conv weights only; sums with weights against autograd's
    gradient of the weighted loss. BatchNorm (its statistics mix instances) is refused."""
    from benchmark.nn.networks import get_network
    from influence.per_instance import cross_entropy, output_loss_gradients, supports
    net = get_network(network, 1, 10, 8, seed=0, width=8).double()
    params = [p for p in net.parameters() if subset == "all" or p.dim() == 4]
    x, y = digits64.x_train[:9], digits64.y_train[:9]
    grads = output_loss_gradients(net, x, y, params, cross_entropy)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    loop = torch.stack([flat(torch.autograd.grad(F.cross_entropy(net(x[j:j + 1]), y[j:j + 1]), params))
                        for j in range(len(y))])
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    assert torch.allclose(grads.dot(v), loop @ flat(v), rtol=1e-10, atol=1e-12)
    from influence.per_instance import flatten
    rows = sum(r @ f for r, f in zip(grads.rows(), flatten(grads.blocks, params, v)))  # the materialised layout
    assert torch.allclose(rows, loop @ flat(v), rtol=1e-10, atol=1e-12)
    w = torch.rand(len(y), generator=gen, dtype=x.dtype)
    summed = torch.autograd.grad((w * F.cross_entropy(net(x), y, reduction="none")).sum(), params)
    assert torch.allclose(flat(grads.weighted_sum(w)), flat(summed), rtol=1e-10, atol=1e-12)
    assert torch.allclose(flat(grads.weighted_sum(w)), w @ loop, rtol=1e-10, atol=1e-12)
    bn = get_network("ConvNetBN", 1, 10, 8, seed=0, width=8)
    assert supports(net, params) and not supports(bn, list(bn.parameters()))


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_explicit_scores_from_per_instance_gradients_match_the_double_backward(digits64, task_of, method):
    """The fast explicit path (per-instance gradients: no double backward) gives the FD-checked double-backward
    scores, the real statistic at the weights it returns, and so the same image gradient as the base's own pass."""
    from influence.scores import weigh_by_explicit_scores
    m, step = _dc_step(digits64, task_of, method)
    assert step.instance_gradients is not None
    scores, weights, stats = weigh_by_explicit_scores(step, lambda s: influence_weights(s, 0.5))
    for g in range(len(step.batches)):
        expected = explicit_scores(step, g, uniform_weights(step)[g])
        assert torch.allclose(scores[g], expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
        assert torch.allclose(weights[g], influence_weights(expected, 0.5), rtol=1e-9)
        for a, b in zip(stats[g], step.real_statistic(g, weights[g], False)):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    base = m.matching_loss(step, weights)  # the base's own pass over the real batch
    from benchmark.core.protocol import InstanceWeights
    assert torch.allclose(m.matching_loss(step, InstanceWeights(weights, stats)), base, rtol=1e-12)
    poisoned = InstanceWeights(weights, [[-t for t in s] for s in stats])  # the statistics they carry are used ...
    assert not torch.allclose(m.matching_loss(step, poisoned), base, rtol=1e-3)
    assert torch.allclose(m.matching_loss(step, list(poisoned)), base, rtol=1e-12)  # ... only by those weights


def test_a_held_solution_scores_like_the_solve_that_made_it(digits, digits64, task_of):
    """solve_every: a step scored with a held h (no g_M, no solve) is explicit + <h, grad l_j>; held at the step
    that solved it, it reproduces that step's scores. An iwd+idc run with solve_every=2 solves on every other
    matching step only."""
    from influence.scores import step_scores
    m, step = _dc_step(digits64, task_of, "idc", ["network=ConvNetD1"])
    w0 = uniform_weights(step)
    cfg = SolverConfig("cg", damping=0.1, curvature="gauss-newton", max_iter=50, tol=1e-10)
    solved, info = step_scores(step, w0, cfg)
    held, held_info = step_scores(step, w0, cfg, held=info["solution"])
    assert held_info["held"] and not info["held"]
    assert torch.allclose(torch.cat(held), torch.cat(solved), rtol=1e-8, atol=1e-10 * float(torch.cat(solved).abs().max()))
    out = create_method("iwd+idc", "quick", ["iterations=2", "inner_loop=5", "net_width=8", "solve_every=2"])
    syn = out.distill(task_of(digits, 1, 0))
    assert syn.metadata["solver_summary"]["steps"] == 2 * 3  # steps 0, 2, 4 of each iteration


def test_the_solver_registry_refuses_what_cannot_work():
    """Every (solver, curvature) pair is checked against influence.solvers.SOLVERS, and damping <= 0 is refused at
    every entry point (IWD's options, SolverConfig, the inverse-HVP function, whole-set scoring)."""
    from influence.ihvp import InfluenceError, SolverConfig, inverse_hvp
    from influence.solvers import SOLVERS, check_solver
    with pytest.raises(InfluenceError, match="solver=woodbury inverts the Gauss-Newton matrix only"):
        check_solver("woodbury", "hessian", 0.01)  # it used to invert GN silently
    with pytest.raises(InfluenceError, match="use solver=kfac"):
        check_solver("cg", "kfac", 0.01)  # curvature=kfac used to override the solver silently
    with pytest.raises(InfluenceError, match="unknown solver 'newton'"):
        check_solver("newton", "hessian", 0.01)
    for name, solver in SOLVERS.items():
        for curvature in solver.curvatures:
            check_solver(name, curvature, 0.01)
    for damping in (0.0, -1.0):
        with pytest.raises(InfluenceError, match="damping must be > 0"):
            SolverConfig("cg", damping=damping)
        with pytest.raises(BenchmarkError, match="damping must be > 0"):
            create_method("iwd+idc", None, [f"damping={damping}"])
    cfg = SolverConfig("cg", damping=0.01)
    cfg.damping = 0.0  # a config changed after construction is still refused by the function itself
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(InfluenceError, match="damping must be > 0"):
        inverse_hvp(lambda: (w ** 4).sum(), [w], [torch.ones(3, dtype=torch.float64)], cfg)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_an_approximate_solve_records_its_true_residual(solver):
    """K-FAC and EK-FAC are approximate inverses of GN: their record says not converged, with the relative residual
    ||(GN + damping I) h - v|| / ||v|| measured against the dense GN (they used to record converged, residual 0)."""
    from influence.ihvp import SolverConfig
    from influence.solvers import solve
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(48, 4)).double()
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(4, (6,))
    params = list(net.parameters())
    v = [torch.randn_like(p) for p in params]
    outputs = (lambda: net(x), lambda z: F.cross_entropy(z, y))
    h, info = solve(SolverConfig(solver, damping=0.05, curvature="gauss-newton"), params, v, None, outputs, (net, x))
    dense = _dense_gn(net, x, params) + 0.05 * torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    flat_v = torch.cat([t.reshape(-1) for t in v])
    want = float((dense @ torch.cat([t.reshape(-1) for t in h]) - flat_v).norm() / flat_v.norm())
    assert info.residual == pytest.approx(want, rel=1e-6) and want > 1e-3
    assert not info.converged and "approximate" in info.note
    exact, winfo = solve(SolverConfig("woodbury", damping=0.05, curvature="gauss-newton"), params, v, None, outputs,
                         (net, x))
    assert winfo.converged and torch.allclose(torch.cat([t.reshape(-1) for t in exact]),
                                              torch.linalg.solve(dense, flat_v), atol=1e-9)


def test_per_instance_gradients_refuse_batchnorm_in_training_mode():
    """A BatchNorm in training mode mixes the batch into every output: no per-instance gradient path, even when
    its own parameters are not among the ones differentiated; in eval mode (frozen statistics) it is supported."""
    from influence import per_instance
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, affine=False), torch.nn.Flatten(),
                              torch.nn.Linear(8, 3))
    params = [p for p in net.parameters()]
    assert not per_instance.supports(net.train(), params)
    assert per_instance.supports(net.eval(), params)
