"""The solver registry: every way to get h ~= (C + damping I)^{-1} v for the implicit term, what each needs, whether
its answer is exact, and the one `solve` that validates a (solver, curvature) pair and dispatches.

Curvatures C: 'hessian' (the exact H) and 'gauss-newton' (GN, PSD; influence.ihvp). Iterative solvers (cg, lissa)
work with either; `exact` materialises C (tiny models); `identity` ignores C (C = I, the TracIn-like ablation); the
direct solvers of influence.kfac invert GN only: woodbury exactly, kfac / ekfac approximately (their relative
residual against the true GN is measured and recorded, so an approximate solve never looks converged by fiat).
IWD's options, `run.py influence` and the docs all read SOLVERS.
"""
import dataclasses
from dataclasses import dataclass

import torch

from . import per_instance
from .ihvp import CURVATURES, GaussNewtonVP, InfluenceError, inverse_hvp
from .kfac import kfac_inverse, woodbury_inverse


@dataclass(frozen=True)
class Solver:
    curvatures: tuple  # the curvatures it can invert
    exact: bool        # (C + damping I)^{-1} v to rounding; otherwise truncated (iterative) or an approximation
    needs: str         # what the matching step must offer
    cost: str


_ANY = ("hessian", "gauss-newton")
SOLVERS = {
    "auto": Solver(_ANY, False, "nothing more than cg", "woodbury where the network allows it and its n*C rows fit "
                   "woodbury_max_mb (curvature gauss-newton), else cg; the record says which ran and why"),
    "cg": Solver(_ANY, False, "curvature-vector products", "up to solver_max_iter products; stops at solver_tol"),
    "lissa": Solver(_ANY, False, "curvature-vector products", "up to lissa_depth products; falls back to CG"),
    "exact": Solver(_ANY, True, "curvature-vector products", "one product per parameter: tiny models only"),
    "identity": Solver(_ANY, False, "nothing (C = I)", "free: the TracIn-like ablation"),
    "woodbury": Solver(("gauss-newton",), True, "the network (Linear, Conv2d, GroupNorm layers)",
                       "one (n C x n C) Cholesky solve; memory n C parameter-sized rows"),
    "kfac": Solver(("gauss-newton",), False, "the network (Linear, Conv2d, GroupNorm layers)",
                   "C backward passes and per-layer eigendecompositions (Kronecker-factored GN)"),
    "ekfac": Solver(("gauss-newton",), False, "the network (Linear, Conv2d, GroupNorm layers)",
                    "as kfac, with the eigenvalues corrected to the exact second moments"),
}


def check_solver(solver, curvature, damping):
    """The one validation of a solver configuration (IWD's options, SolverConfig, whole-set scoring)."""
    if solver not in SOLVERS:
        raise InfluenceError(f"unknown solver {solver!r} ({', '.join(SOLVERS)})")
    if curvature in ("kfac", "ekfac"):
        raise InfluenceError(f"curvature={curvature} is a solver: use solver={curvature} (it approximates the "
                             f"gauss-newton curvature)")
    if curvature not in CURVATURES:
        raise InfluenceError(f"unknown curvature {curvature!r} ({', '.join(CURVATURES)})")
    if curvature not in SOLVERS[solver].curvatures:
        raise InfluenceError(f"solver={solver} inverts the Gauss-Newton matrix only, not curvature={curvature}: use "
                             f"curvature=gauss-newton, or solver=cg for the exact Hessian")
    if not damping > 0:
        raise InfluenceError(f"damping must be > 0 (got {damping}): it keeps C + damping I invertible")


def solve(cfg, params, v, loss_fn=None, outputs=None, network=None, x0=None):
    """h ~= (C + damping I)^{-1} v as cfg says. loss_fn() -> the scalar loss (hessian); outputs = (outputs_fn,
    loss_of_outputs) (gauss-newton); network = (net, x) (direct solvers); x0: a CG warm start. Returns (h,
    SolveInfo with .solution = h)."""
    check_solver(cfg.solver, cfg.curvature, cfg.damping)
    if cfg.solver == "auto":
        name, why = choose(cfg, params, network)
        h, info = solve(dataclasses.replace(cfg, solver=name), params, v, loss_fn, outputs, network, x0)
        info.note = f"auto: {why}" + (f"; {info.note}" if info.note else "")
        return h, info
    if cfg.solver not in ("woodbury", "kfac", "ekfac"):
        return inverse_hvp(loss_fn, params, v, cfg, outputs, x0)
    if network is None or not isinstance(network[0], torch.nn.Module):
        raise InfluenceError(f"solver={cfg.solver} needs the network (MatchingStep.instance_outputs as a module)")
    net, x = network
    if cfg.solver == "woodbury":
        h, info = woodbury_inverse(net, x, params, v, cfg.damping)
    else:
        h, info = kfac_inverse(net, x, params, v, cfg.damping, eigen_correct=cfg.solver == "ekfac")
        info.converged = False
        if outputs is not None:  # the true relative residual against (GN + damping I): one GN product
            op = GaussNewtonVP(outputs[0](), outputs[1], params, cfg.damping)
            r = [a - b.detach() for a, b in zip(op(h), v)]
            vn = sum((t ** 2).sum() for t in v).sqrt()
            info.residual = float(sum((t ** 2).sum() for t in r).sqrt() / vn.clamp_min(1e-30))
            info.converged = info.residual <= cfg.tol
        info.note = f"approximate inverse ({cfg.solver}, Kronecker-factored Gauss-Newton)"
    info.solution = h
    return h, info


def choose(cfg, params, network):
    """Solver 'auto': (name, why). Woodbury, the exact GN inverse, where the curvature is GN, the network's layers are
    covered and its memory (n*C parameter-sized rows, the (n*C)^2 Gram matrix in float64) fits cfg.woodbury_max_mb,
    computed before the solve; CG otherwise."""
    if cfg.curvature != "gauss-newton":
        return "cg", f"curvature={cfg.curvature} (woodbury inverts gauss-newton only)"
    net, x = network if network is not None else (None, None)
    if not isinstance(net, torch.nn.Module) or not per_instance.supports(net, params):
        return "cg", "the network has layers woodbury does not cover"
    with torch.no_grad():
        classes = net(x[:1]).shape[1]
    rows, p = len(x) * classes, sum(t.numel() for t in params)
    need = (rows * p * x.element_size() + rows * rows * 8) / 2 ** 20
    if need > cfg.woodbury_max_mb:
        return "cg", f"woodbury would need {need:.0f} MB > woodbury_max_mb {cfg.woodbury_max_mb:g}"
    return "woodbury", f"{rows} rows x {p} parameters: {need:.0f} MB <= woodbury_max_mb {cfg.woodbury_max_mb:g}"
