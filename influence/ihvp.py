"""Hessian-vector products and inverse-Hessian-vector products (iHVP) for the implicit influence term.

All solvers return h ~= (C + damping * I)^{-1} v for a list of parameter-shaped tensors v, where the curvature C is
either
- 'hessian': H, the exact Hessian of a scalar loss with respect to `params` (double backward through one retained
  gradient graph). A network mid-training has an indefinite H: CG meets negative curvature and cg_adaptive raises
  the damping until it does not, which can leave (H + damping I)^{-1} close to a scaled identity; or
- 'gauss-newton': G = J^T H_z J, the generalised Gauss-Newton matrix (J = d outputs / d params, H_z = the Hessian of
  the loss in the network's outputs; for softmax cross-entropy diag(p) - p p^T per instance). G is positive
  semi-definite at every theta, so CG converges at the requested damping; it equals H for a model linear in its
  parameters and approximates it near a minimum (Martens 2020). Products cost a double backward plus a backward.

Solvers: 'cg' (default; relative-residual stop), 'lissa' (Agarwal et al. 2017; needs scale > top eigenvalue of
H + damping*I, detects NaN/divergence), 'exact' (dense Hessian, tiny models and tests only), 'identity' (H = I:
the TracIn-like ablation).
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from benchmark.platform.errors import BenchmarkError


class InfluenceError(BenchmarkError):
    """A solver configuration or an influence computation that cannot work, with the fix (one line in the CLI)."""


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _axpy(alpha, x, y):
    return [alpha * xi + yi for xi, yi in zip(x, y)]


@dataclass
class SolveInfo:
    solver: str
    iterations: int = 0
    residual: float = 0.0
    converged: bool = True
    note: str = ""
    damping: float = 0.0      # the damping the returned solution is for (CG may have raised it)
    solution: list = None     # the returned h (what the next solve can warm-start from)


class GaussNewtonVP:
    """v -> (G + damping I) v for the generalised Gauss-Newton matrix G of loss_of_outputs(outputs(params)).

    Jv by the double-vjp trick: J^T u is linear in a dummy u, so d<J^T u, v>/du = J v; the graph of J^T u is built
    once and shared by all products. Then H_z (Jv) by a double backward through the (cheap) loss in output space,
    and J^T (H_z J v) by one backward through the retained forward graph."""

    def __init__(self, outputs, loss_of_outputs, params, damping=0.0):
        self.params = list(params)
        self.outputs = outputs
        self.u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, self.params, grad_outputs=self.u, create_graph=True, allow_unused=True)
        self.used = [i for i, g in enumerate(jtu) if g is not None]  # parameters the outputs depend on
        self.jtu = [jtu[i] for i in self.used]
        self.z = outputs.detach().requires_grad_(True)
        (self.dz,) = torch.autograd.grad(loss_of_outputs(self.z), self.z, create_graph=True)
        self.damping = damping

    def __call__(self, v):
        (jv,) = torch.autograd.grad(self.jtu, self.u, grad_outputs=[v[i] for i in self.used], retain_graph=True)
        (hjv,) = torch.autograd.grad(self.dz, self.z, grad_outputs=jv, retain_graph=True)
        gv = torch.autograd.grad(self.outputs, self.params, grad_outputs=hjv, retain_graph=True, allow_unused=True)
        return [(torch.zeros_like(vi) if g is None else g.detach()) + self.damping * vi for g, vi in zip(gv, v)]


class HVP:
    """v -> (H + damping I) v for H = Hessian of loss wrt params; one gradient graph shared by all products."""

    def __init__(self, loss, params, damping=0.0):
        self.params = list(params)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.damping = damping

    def __call__(self, v):
        hv = torch.autograd.grad(self.grads, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return [(torch.zeros_like(vi) if h is None else h.detach()) + self.damping * vi for h, vi in zip(hv, v)]


def cg_solve(hvp, v, max_iter=20, tol=1e-4, x0=None, check_every=10):
    """Conjugate gradient on (H + damping I) h = v, stopping at ||r|| <= tol * ||v||. x0: the starting point (a
    warm start: a previous, nearby system's solution; costs one extra product), zeros by default.

    No host read per iteration: the stopping tests (converged, non-positive curvature) are device flags that freeze
    the iterate (torch.where), read on the host every `check_every` iterations (to skip products once every test
    has stopped) and once at the end. The iterates are exactly those of a CG that breaks at the same test."""
    if x0 is None:
        x = [torch.zeros_like(t) for t in v]
        r = [t.clone() for t in v]
    else:
        x = [t.detach().clone() for t in x0]
        r = [vi - ai for vi, ai in zip(v, hvp(x))]
    p = [t.clone() for t in r]
    rs = _dot(r, r)
    vn = _dot(v, v).sqrt()
    vnorm = torch.where(vn > 0, vn, torch.ones_like(vn))  # relative to ||v||, not to the (warm) start's residual
    active = torch.ones((), dtype=torch.bool, device=rs.device)
    nonpositive_at = torch.zeros((), dtype=torch.long, device=rs.device)  # 1 + the iteration; 0: none met
    iterations = torch.zeros((), dtype=torch.long, device=rs.device)
    for i in range(max_iter):
        if i and i % check_every == 0 and not bool(active):
            break
        active = active & (rs.sqrt() > tol * vnorm) & (rs != 0)
        ap = hvp(p)
        pap = _dot(p, ap)
        bad = ~torch.isfinite(pap) | (pap <= 0)
        nonpositive_at = torch.where(active & bad & (nonpositive_at == 0), i + 1, nonpositive_at)
        active = active & ~bad
        alpha = rs / pap
        x = [torch.where(active, xi, xo) for xi, xo in zip(_axpy(alpha, p, x), x)]
        r_new = [torch.where(active, ri, ro) for ri, ro in zip(_axpy(-alpha, ap, r), r)]
        rs_new = _dot(r_new, r_new)
        p = [torch.where(active, pi, po) for pi, po in zip(_axpy(rs_new / rs, p, r_new), p)]
        r, rs = r_new, torch.where(active, rs_new, rs)
        iterations = iterations + active.long()
    # one host read per solve
    its, bad_at, residual = torch.stack([iterations.double(), nonpositive_at.double(),
                                         (rs.sqrt() / vnorm).double()]).tolist()
    info = SolveInfo("cg", iterations=int(its), residual=residual)
    if bad_at > 0:
        info.note = f"non-positive curvature at CG iteration {int(bad_at) - 1} (raise damping)"
        info.converged = False
    info.converged = info.converged and info.residual <= tol
    return x, info


def lissa_solve(hvp, v, scale=10.0, depth=1000, tol=1e-4, check_every=10):
    """LiSSA fixed point h <- v + h - (H + damping I) h / scale; h/scale -> (H + damping I)^{-1} v when
    0 < eig((H + damping I) / scale) < 2. Stops on the residual; raises InfluenceError on NaN/divergence."""
    h = [t.clone() for t in v]
    vnorm = float(_dot(v, v).sqrt()) or 1.0
    info = SolveInfo("lissa", damping=hvp.damping)
    for i in range(depth):
        hh = hvp(h)
        h = [vi + hi - hhi / scale for vi, hi, hhi in zip(v, h, hh)]
        info.iterations = i + 1
        if (i + 1) % check_every == 0 or i == depth - 1:
            norm = float(_dot(h, h).sqrt())
            if not torch.isfinite(torch.tensor(norm)) or norm > 1e12 * vnorm:
                raise InfluenceError(f"LiSSA diverged after {i + 1} iterations (|h| = {norm:.3g}); increase "
                                     f"lissa_scale above the top eigenvalue of H + damping, or use solver=cg")
            sol = [t / scale for t in h]
            res = [a - b for a, b in zip(hvp(sol), v)]
            info.residual = float(_dot(res, res).sqrt()) / vnorm
            if info.residual <= tol:
                break
    info.converged = info.residual <= tol
    return [t / scale for t in h], info


def dense_solve(op, v):
    """Materialise a curvature operator column by column (op(e_i)) and solve: tiny models only."""
    sizes = [t.numel() for t in v]
    flat_v = torch.cat([t.reshape(-1) for t in v])
    eye = torch.eye(flat_v.numel(), dtype=flat_v.dtype, device=flat_v.device)
    cols = []
    for e in eye:
        col = op([part.view_as(t) for part, t in zip(e.split(sizes), v)])
        cols.append(torch.cat([c.reshape(-1) for c in col]))
    sol = torch.linalg.solve(torch.stack(cols, 1), flat_v)
    return [part.view_as(t) for part, t in zip(sol.split(sizes), v)], SolveInfo("exact")


def exact_solve(loss_fn, params, v, damping=0.0):
    """Dense Hessian of loss_fn() wrt params (one HVP per basis vector), then a linear solve. Tiny models only."""
    return dense_solve(HVP(loss_fn(), params, damping), v)


@dataclass
class SolverConfig:
    """How the implicit term's iHVP is solved. IWD embeds these options (influence.iwd.SOLVER_KEYS)."""
    solver: str = "cg"            # influence.solvers.SOLVERS: auto | cg | lissa | exact | identity | woodbury | kfac |
                                  # ekfac (kfac/ekfac: approximate GN inverses, measured far less faithful)
    damping: float = 0.01         # C + damping I: keeps the system invertible (> 0)
    max_iter: int = 20            # CG iterations at most (IWD: solver_max_iter)
    tol: float = 1e-4             # CG / LiSSA relative-residual stop (IWD: solver_tol)
    lissa_scale: float = 10.0
    lissa_depth: int = 200
    lissa_fallback: bool = True   # on LiSSA divergence, fall back to CG and say so
    damping_growth: float = 10.0  # CG on non-positive curvature: damping x this, restart (Levenberg-Marquardt style)
    max_damping: float = 100.0    # ... up to this; beyond it the identity solver's answer, flagged not converged
    hessian_batch: Optional[int] = None  # implicit term: H from this many evenly spaced real instances of the step
                                         # (a stochastic estimate, ~4x cheaper at IDC settings); None: all of them
    curvature: str = "hessian"    # hessian (exact H) | gauss-newton (PSD generalised Gauss-Newton; needs outputs)
    woodbury_max_mb: float = 1024.0  # solver auto: Woodbury where its n*C pseudo-gradient rows fit this, else CG
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if not self.damping > 0:  # CG's adaptive damping would multiply 0 by damping_growth forever
            raise InfluenceError(f"damping must be > 0 (got {self.damping}): it keeps C + damping I invertible")


def cg_adaptive(hvp, v, cfg: SolverConfig, x0=None):
    """CG with damping raised on non-positive curvature. A network mid-training (near initialisation above all) has
    an indefinite H, and CG on an indefinite system breaks down at once (it would return 0: a silently empty
    implicit term). So the damping is multiplied by cfg.damping_growth and CG restarts, up to cfg.max_damping; the
    damping actually used is in info.damping and info.note. Past max_damping: v / max_damping (identity solver),
    flagged not converged."""
    requested = hvp.damping
    while True:
        h, info = cg_solve(hvp, v, cfg.max_iter, cfg.tol, x0)
        info.damping = hvp.damping
        if not info.note.startswith("non-positive curvature"):
            if hvp.damping != requested:
                info.note = f"damping raised from {requested:g} to {hvp.damping:g} (H indefinite)"
            return h, info
        if hvp.damping * cfg.damping_growth > cfg.max_damping:
            info = SolveInfo("identity", converged=False, damping=hvp.damping,
                             note=f"CG met non-positive curvature up to damping {hvp.damping:g}; identity solver used")
            return [t / hvp.damping for t in v], info
        hvp.damping *= cfg.damping_growth


CURVATURES = ("hessian", "gauss-newton")  # the direct solvers of influence.kfac invert GN (influence.solvers)


def inverse_hvp(loss_fn, params, v, cfg: SolverConfig, outputs=None, x0=None):
    """h = (C + damping I)^{-1} v with the configured curvature C and solver. Returns (h, SolveInfo).
    loss_fn() -> the scalar loss (curvature 'hessian'); outputs = (outputs_fn, loss_of_outputs) with
    loss_fn() == loss_of_outputs(outputs_fn()) (curvature 'gauss-newton'). x0: a CG warm start (ignored by the
    other solvers)."""
    h, info = _inverse_hvp(loss_fn, params, v, cfg, outputs, x0)
    info.solution = h
    return h, info


def _inverse_hvp(loss_fn, params, v, cfg, outputs, x0):
    v = [t.detach() for t in v]
    if not cfg.damping > 0:
        raise InfluenceError(f"damping must be > 0 (got {cfg.damping}): it keeps C + damping I invertible")
    if cfg.curvature not in CURVATURES:
        raise InfluenceError(f"unknown curvature {cfg.curvature!r} ({', '.join(CURVATURES)})")
    if cfg.solver == "identity":
        return [t / (1.0 + cfg.damping) for t in v], SolveInfo("identity", damping=cfg.damping)
    if cfg.curvature == "gauss-newton":
        if outputs is None:
            raise InfluenceError("curvature='gauss-newton' needs the network outputs and the loss of outputs "
                                 "(MatchingStep.instance_outputs / output_loss); use curvature='hessian'")
        hvp = GaussNewtonVP(outputs[0](), outputs[1], params, cfg.damping)
    if cfg.solver == "exact":
        if cfg.curvature == "gauss-newton":
            h, info = dense_solve(hvp, v)
        else:
            h, info = exact_solve(loss_fn, params, v, cfg.damping)
        info.damping = cfg.damping
        return h, info
    if cfg.curvature == "hessian":
        hvp = HVP(loss_fn(), params, cfg.damping)
    if x0 is not None and any(a.shape != b.shape for a, b in zip(x0, v)):
        raise InfluenceError("warm start x0 does not match the parameters' shapes")
    if cfg.solver == "cg":
        return cg_adaptive(hvp, v, cfg, x0)
    if cfg.solver == "lissa":
        try:
            h, info = lissa_solve(hvp, v, cfg.lissa_scale, cfg.lissa_depth, cfg.tol)
            if info.converged or not cfg.lissa_fallback:
                return h, info
            why = (f"LiSSA did not converge in {info.iterations} iterations (relative residual "
                   f"{info.residual:.2g} > tol {cfg.tol:g})")
        except InfluenceError as e:
            if not cfg.lissa_fallback:
                raise
            why = f"LiSSA diverged: {e}"
        h, info = cg_adaptive(hvp, v, cfg)
        info.note = f"{why}; fell back to CG" + (f"; {info.note}" if info.note else "")
        return h, info
    raise InfluenceError(f"unknown solver {cfg.solver!r} (cg, lissa, exact, identity)")
