"""Influence-Weighted Distillation (Algorithm 1) as a method decorator.

    @influence_weighted          # registers "iwd+<name>"
    @register_method("mymethod")
    class MyMethod(WeightedMatching, IterativeMethod): ...

The IWD variant replaces the base method's uniform real-instance weights, at every matching step, with
w = softmax(I / tau) over each group's real batch (per class for per-class matching), where I are the distillation
influence scores of influence.scores (explicit term; plus the implicit term when the inner training uses real data).
tau -> infinity recovers the base method exactly. With standardize=True (default) the scores are z-scored within the
group first, so tau is on a fixed scale whatever the method's distance magnitude (softmax is shift-invariant, so
only the division by the std changes anything); standardize=False is the paper's literal softmax(I / tau).
Scores are also tracked per training instance (exponential moving average, keyed by dataset index) and saved with
the synthetic set in extras['influence'].
"""
import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from benchmark.device import to_device
from benchmark.errors import BenchmarkError
from benchmark.logging import log_histogram
from benchmark.method import NonFiniteError
from benchmark.protocol import WeightedMatching, uniform_weights
from benchmark.registry import register_method

from .ihvp import CURVATURES, SolverConfig
from .scores import step_scores


@dataclass
class IWDOptions:
    tau: float = 1.0              # softmax temperature (the paper sweeps 0.01 .. 100)
    standardize: bool = True      # z-score scores within a group before the softmax
    implicit: str = "auto"        # auto: implicit term iff the inner training uses real data; on; off
    solver: str = "cg"            # inverse-HVP solver: cg | lissa | exact | identity
    curvature: str = "gauss-newton"  # implicit term's curvature: gauss-newton (PSD; default) | hessian (the exact H:
                                     # indefinite mid-training, CG then raises damping until it is nearly identity)
    damping: float = 0.01
    solver_max_iter: int = 20
    solver_tol: float = 1e-4
    lissa_scale: float = 10.0
    hessian_batch: int = 128      # real instances H is estimated on (0: the whole real batch of the step; 128
                                  # evenly spaced ones: a stochastic estimate, ~4x cheaper at IDC settings)
    track_beta: float = 0.9       # EMA factor of the per-instance score tracking
    warm_start: bool = False      # CG starts from the previous matching step's solution (the same network a few
                                  # SGD steps later). Measured NOT to pay (results/warm-start/bench.md: ranks worse
                                  # than cold CG at equal iterations), so off


def influence_weights(scores, tau, standardize=True):
    """softmax(score / tau) within one group; sums to 1 like the base method's uniform weights."""
    if tau <= 0:
        raise BenchmarkError(f"tau must be > 0 (got {tau}); tau -> infinity gives the base method's uniform weights")
    if math.isinf(tau):
        return torch.full_like(scores, 1.0 / len(scores))
    s = scores
    if standardize and len(s) > 1:
        s = (s - s.mean()) / (s.std() + 1e-12)
    return torch.softmax(s / tau, dim=0)


def effective_sample_size(weights):
    """Kish's effective sample size of normalised weights: 1 / sum w^2 (n for uniform weights, 1 for a one-hot), as
    a 0-d tensor on the weights' device (no host read inside a matching step)."""
    return 1.0 / (weights ** 2).sum()


def _validate(self):
    base_validate = getattr(super(type(self), self), "validate", None)
    if base_validate is not None:
        base_validate()
    if self.tau <= 0:
        raise BenchmarkError(f"tau must be > 0 (got {self.tau}); tau -> infinity gives the base method")
    if self.implicit not in ("auto", "on", "off"):
        raise BenchmarkError(f"implicit must be auto, on or off (got {self.implicit!r})")
    if self.solver not in ("cg", "lissa", "exact", "identity"):
        raise BenchmarkError(f"unknown solver {self.solver!r} (cg, lissa, exact, identity)")
    if self.curvature not in CURVATURES:
        raise BenchmarkError(f"unknown curvature {self.curvature!r} ({', '.join(CURVATURES)})")


def iwd_config(base_config):
    fields = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(IWDOptions)]
    return dataclasses.make_dataclass("IWD" + base_config.__name__, fields, bases=(base_config,),
                                      namespace={"validate": _validate})


def influence_weighted(cls=None, *, name=None):
    """Turn a method following the weighted-statistic protocol into its IWD variant, registered as iwd+<name>."""
    if cls is None:
        return lambda c: influence_weighted(c, name=name)
    if not issubclass(cls, WeightedMatching):
        raise TypeError(f"{cls.__name__} does not follow the weighted-statistic protocol (benchmark.protocol."
                        f"WeightedMatching); IWD needs its real statistic as a function of instance weights")

    class IWDMethod(cls):
        Config = iwd_config(cls.Config)
        presets = dict(cls.presets)
        base_method = cls

        def solver_config(self):
            c = self.config
            # within an iteration, CG starts from the damping the previous step needed (divided by the growth, so
            # it can fall again); each iteration (a fresh network) starts from c.damping: resume stays exact
            damping = max(c.damping, getattr(self, "_damping_now", 0.0))
            return SolverConfig(solver=c.solver, damping=damping, max_iter=c.solver_max_iter, tol=c.solver_tol,
                                lissa_scale=c.lissa_scale, hessian_batch=c.hessian_batch, curvature=c.curvature)

        def instance_weights(self, step):
            c = self.config
            t0 = time.perf_counter()
            implicit = None if c.implicit == "auto" else (c.implicit == "on")
            cfg = self.solver_config()
            x0 = getattr(self, "_h_prev", None) if c.warm_start else None
            scores, info = step_scores(step, uniform_weights(step), cfg, implicit, x0)
            self._h_prev = info.get("solution")
            finite = torch.stack([torch.isfinite(s).all() for s in scores]).all()
            where = (step.iteration, step.local_step, info.get("solver_note") or "")
            pending = getattr(self, "_finite_checks", None)
            if pending is None:  # called outside an iteration: check now
                self._raise_if_nonfinite([(finite, where)])
            else:  # read on the host once per iteration (no sync per matching step); nothing is saved before it
                pending.append((finite, where))
            if info.get("implicit"):
                self._damping_now = info["solver_damping"] / cfg.damping_growth
            weights = [influence_weights(s, c.tau, c.standardize) for s in scores]
            self._track(step, scores)
            stats = getattr(self, "_iwd_stats", None)
            if stats is not None:
                stats["time/influence_s"] = stats.get("time/influence_s", 0.0) + time.perf_counter() - t0
                ess = torch.stack([effective_sample_size(w) / len(w) for w in weights])
                stats["iwd/relative_ess"] = ess.mean()  # a device scalar, read once per iteration
                if info.get("implicit"):
                    stats["iwd/solver_iterations"] = float(info["solver_iterations"])
                    stats["iwd/solver_residual"] = float(info["solver_residual"])
                    stats["iwd/solver_damping"] = float(info["solver_damping"])
                if step.writer is not None and step.local_step == 0:
                    log_histogram(step.writer, "iwd/scores", torch.cat(scores), step.iteration)
                    log_histogram(step.writer, "iwd/weights", torch.cat(weights), step.iteration)
            return weights

        def _raise_if_nonfinite(self, checks):
            if not checks:
                return
            ok = torch.stack([f for f, _ in checks]).cpu()
            if bool(ok.all()):
                return
            it, k, note = checks[int((~ok).nonzero()[0])][1]
            raise NonFiniteError(
                f"{self.name}: non-finite influence scores at iteration {it} (matching step "
                f"{k}{', solver: ' + note if note else ''}); last good checkpoint: "
                f"{getattr(self, '_last_ckpt', None) or 'none (set --checkpoint-every)'}."
                f" Lower lr_img, raise damping, or use solver=cg.")

        def _track(self, step, scores):
            state = getattr(self, "_iwd_state", None)
            if state is None:
                return
            beta = self.config.track_beta
            ema, count = state["influence_ema"], state["influence_count"]  # on the task's device
            for b, s in zip(step.batches, scores):
                idx, s = to_device(b.index, ema.device), s.detach().to(ema.dtype)
                fresh = count[idx] == 0
                ema[idx] = torch.where(fresh, s, beta * ema[idx] + (1 - beta) * s)
                count[idx] += 1

        def init_state(self, task, gen):
            state = super().init_state(task, gen)
            n = len(task.dataset.y_train)
            state["influence_ema"] = torch.zeros(n, dtype=torch.float64)
            state["influence_count"] = torch.zeros(n, dtype=torch.int64)
            return state

        def iteration(self, task, state, it, gen):
            # per-iteration solver memory (damping, warm start) starts afresh: a resumed run stays exact
            self._iwd_state, self._iwd_stats, self._damping_now, self._h_prev = state, {}, 0.0, None
            self._finite_checks = []
            for k in ("influence_ema", "influence_count"):
                state[k] = state[k].to(task.device)
            t0 = time.perf_counter()
            try:
                out = super().iteration(task, state, it, gen)
            finally:
                checks, self._finite_checks = self._finite_checks, None
            self._raise_if_nonfinite(checks)
            out.update({k: float(v) for k, v in self._iwd_stats.items()})
            out["time/matching_s"] = time.perf_counter() - t0 - self._iwd_stats.get("time/influence_s", 0.0)
            self._iwd_state = self._iwd_stats = None
            return out

        def result(self, task, state):
            out = super().result(task, state)
            out.extras["influence"] = {"ema": state["influence_ema"].cpu().clone(),
                                       "count": state["influence_count"].cpu().clone()}
            return out

    IWDMethod.__name__ = IWDMethod.__qualname__ = "IWD" + cls.__name__
    IWDMethod.__doc__ = f"IWD+{cls.name.upper()}: {cls.__doc__ or ''}"
    register_method(name or f"iwd+{cls.name}")(IWDMethod)
    return IWDMethod
