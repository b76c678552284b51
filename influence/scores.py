"""Distillation influence scores (paper section 4.2, eqs. 8-12 and 24-25).

I(z_j) = d M / d eps for w -> w + eps e_j, with M = sum_g Dist(Phi_syn_g, Phi_real_g(w)).
Sign convention: a POSITIVE score means upweighting the instance RAISES the distillation objective (it carries
information the synthetic set does not yet match); IWD gives such instances larger weights.

Explicit term (eq. 24): <grad_2 Dist, d Phi_real / d w_j>, for all j of a group in O(1) passes: w is a leaf,
Phi_real(w) is built with create_graph, and one backward of Dist gives every d Dist / d w_j (for gradient matching
that is a double backward through the real batch). Faster where the step offers per-instance gradients g_j
(gradient matching, Phi_real(w) = sum_j w_j g_j; influence.per_instance): one forward and one backward give every
g_j, then d Dist / d w_j = <grad_2 Dist, g_j> and Phi_real at the new weights are matrix products
(`weigh_by_explicit_scores`): no double backward, and no second pass for the matching step's real statistic.

Implicit term (eq. 25, inner training on real data): u_j = -H^{-1} grad l_j, so
I_j(implicit) = <g_M, u_j> = -<H^{-1} g_M, grad l_j>, with g_M the total derivative of M wrt theta (through both
statistics). ONE inverse-HVP h = (H + damping I)^{-1} g_M per step (H: the exact Hessian, or its Gauss-Newton approximation), shared by the whole batch; then all
<h, grad l_j> at once through the same weight-leaf trick (d/dw of <h, grad sum_i w_i l_i>).
"""
import torch

from . import per_instance
from benchmark.platform.device import to_device

from .ihvp import SolverConfig
from .solvers import solve

SCORE_CHUNK = 128  # instances per double backward of the implicit term's per-instance products (bounds memory)


def explicit_scores(step, g, weights):
    """d Dist_g / d w_j for every instance j of group g, at the given weights."""
    w = weights.detach().clone().requires_grad_(True)
    real = step.real_statistic(g, w, True)
    syn = [s.detach() for s in step.syn_stats[g]]
    (scores,) = torch.autograd.grad(step.distance(syn, real), w)
    return scores.detach()


def _explicit_from_instance_gradients(step, g, weights, grads=None):
    """d Dist_g / d w_j = <d Dist / d Phi_real, g_j> at Phi_real(w) = sum_j w_j g_j (gradient matching)."""
    grads = grads if grads is not None else step.instance_gradients(g)
    real = [t.detach().requires_grad_(True) for t in grads.weighted_sum(weights)]
    syn = [s.detach() for s in step.syn_stats[g]]
    v = torch.autograd.grad(step.distance(syn, real), real, allow_unused=True)
    return grads.dot([torch.zeros_like(r) if d is None else d for d, r in zip(v, real)]).detach()


def weigh_by_explicit_scores(step, weigh, statistics=True):
    """Group by group, from group g's per-instance gradients (step.instance_gradients): explicit scores at uniform
    weights, the weights weigh(scores) gives, and (statistics) Phi_real_g at those weights. Only one group's
    per-instance gradients are alive at a time. Returns (scores, weights, statistics or None)."""
    scores, weights, stats = [], [], []
    for g, b in enumerate(step.batches):
        uniform = torch.full((len(b.y),), 1.0 / len(b.y), dtype=b.x.dtype, device=b.x.device)
        grads = step.instance_gradients(g)
        scores.append(_explicit_from_instance_gradients(step, g, uniform, grads))
        weights.append(weigh(scores[-1]))
        if statistics:
            stats.append([t.detach() for t in grads.weighted_sum(weights[-1])])
    return scores, weights, (stats if statistics else None)


def explicit_and_objective_gradient(step, weights):
    """Explicit scores of every group AND g_M = d (sum_g Dist_g) / d theta (through both statistics), one backward
    per group: the group's weights are leaves, its real statistic's graph is built once and freed before the next
    group's (one group's double-backward graph alive at a time); g_M sums the groups' shares. The synthetic
    statistics' graphs are kept for the image update."""
    params, explicit, g_m = list(step.train_params), [], None
    for g, w in enumerate(weights):
        w = w.detach().clone().requires_grad_(True)
        grads = torch.autograd.grad(step.distance(step.syn_stats[g], step.real_statistic(g, w, True)), [w] + params,
                                    retain_graph=True, allow_unused=True)
        explicit.append(torch.zeros_like(w) if grads[0] is None else grads[0].detach())
        share = [torch.zeros_like(p) if gr is None else gr.detach() for gr, p in zip(grads[1:], params)]
        g_m = share if g_m is None else [a + b for a, b in zip(g_m, share)]
    return explicit, g_m


def objective_gradient(step, weights):
    """g_M = d (sum_g Dist_g) / d theta, through both the synthetic and the real statistics."""
    return explicit_and_objective_gradient(step, weights)[1]


def implicit_scores(step, weights, solver: SolverConfig, g_m=None, x0=None, per_instance_grads=True):
    """-<(H + damping I)^{-1} g_M, grad l_j> for every instance of every group (one iHVP for the whole step; x0:
    a CG warm start, e.g. the previous matching step's solution). The products <h, grad l_j> come from per-instance
    gradients where the network allows (per_instance_grads), else from a double backward per chunk. Returns (list
    of per-group score tensors, SolveInfo; info.solution is h)."""
    if step.instance_loss is None:
        raise ValueError("implicit influence needs step.instance_loss (inner training on real data)")
    x = torch.cat([b.x for b in step.batches])
    y = torch.cat([b.y for b in step.batches])
    if g_m is None:
        g_m = objective_gradient(step, weights)
    xh, yh = x, y
    if solver.hessian_batch is not None and solver.hessian_batch < len(y):  # a stochastic Hessian estimate
        rows = to_device(hessian_rows(len(y), solver.hessian_batch), y.device)
        xh, yh = x[rows], y[rows]
    outputs = None
    if step.instance_outputs is not None and step.output_loss is not None:
        outputs = (lambda: step.instance_outputs(xh), lambda z: step.output_loss(z, yh).mean())
    h, info = solve(solver, step.train_params, g_m, lambda: step.instance_loss(xh, yh).mean(), outputs,
                    (step.instance_outputs, xh), x0)
    return implicit_products(step, h, per_instance_grads), info


def implicit_products(step, h, per_instance_grads=True):
    """-<h, grad l_j> for every instance of every group (per-group tensors)."""
    x = torch.cat([b.x for b in step.batches])
    y = torch.cat([b.y for b in step.batches])
    net = step.instance_outputs if isinstance(step.instance_outputs, torch.nn.Module) else None
    products = gradient_products(x, y, h, step.train_params, step.instance_loss, net, step.output_loss,
                                 per_instance_grads)
    return list(products.split([len(b.y) for b in step.batches]))


def gradient_products(x, y, h, params, instance_loss, net=None, output_loss=None, per_instance_grads=True,
                      chunk=SCORE_CHUNK):
    """-<h, grad l_j> for every row j of (x, y), by chunks (they bound memory): from per-instance gradients (one
    forward and one backward per chunk) where the network allows, else a double backward per chunk."""
    fast = per_instance_grads and net is not None and output_loss is not None and per_instance.supports(net, params)
    products = []
    for rows in torch.arange(len(y)).split(chunk):
        rows = to_device(rows, x.device)
        if fast:
            grads = per_instance.output_loss_gradients(net, x[rows], y[rows], params, output_loss)
            products.append(grads.dot(h).detach())
            continue
        w = torch.ones(len(rows), dtype=x.dtype, device=x.device, requires_grad=True)
        grads = torch.autograd.grad((w * instance_loss(x[rows], y[rows])).sum(), params, create_graph=True)
        (s,) = torch.autograd.grad(sum((gr * hi).sum() for gr, hi in zip(grads, h)), w)
        products.append(s.detach())
    return -torch.cat(products)


def hessian_rows(n, hessian_batch):
    """The rows of a batch of n that the curvature is estimated on: `hessian_batch` evenly spaced ones (they cover
    every class of a class-sorted batch), or all n (hessian_batch None, or not below n)."""
    return torch.linspace(0, n - 1, hessian_batch).round().long() if (hessian_batch or n) < n else torch.arange(n)


def step_scores(step, weights, solver: SolverConfig = None, implicit=None, x0=None, per_instance_grads=True,
                held=None):
    """Influence of every real instance of the step: explicit, plus implicit when the inner training uses real data
    (or when implicit=True). held: an iHVP solution h from an earlier step to use instead of solving (no g_M, no
    solve: the explicit scores and the products <h, grad l_j> only). Returns (per-group scores, info dict;
    info['solution']: the iHVP solution, info['held']: whether h was held)."""
    info = {"implicit": False}
    use_implicit = (step.inner_data == "real") if implicit is None else implicit
    if not use_implicit or held is not None:  # group by group: only one group's real graph alive at a time
        fast = per_instance_grads and step.instance_gradients is not None
        explicit = [_explicit_from_instance_gradients(step, g, weights[g]) if fast else
                    explicit_scores(step, g, weights[g]) for g in range(len(step.batches))]
        if not use_implicit:
            return explicit, info
        imp = implicit_products(step, held, per_instance_grads)
        info.update(implicit=True, held=True, solution=held)
        return [e + i for e, i in zip(explicit, imp)], info
    explicit, g_m = explicit_and_objective_gradient(step, weights)
    imp, solved = implicit_scores(step, weights, solver or SolverConfig(), g_m, x0, per_instance_grads)
    info.update(implicit=True, held=False, solution=solved.solution, solver=solved.solver,
                solver_iterations=solved.iterations, solver_residual=solved.residual,
                solver_converged=solved.converged, solver_note=solved.note, solver_damping=solved.damping)
    return [e + i for e, i in zip(explicit, imp)], info
