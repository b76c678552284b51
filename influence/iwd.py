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

from benchmark.platform.device import to_device
from benchmark.platform.errors import BenchmarkError
from benchmark.platform.logging import log_histogram
from benchmark.core.method import NonFiniteError
from benchmark.core.protocol import InstanceWeights, IterationContext, WeightedMatching, uniform_weights
from benchmark.core.registry import register_method

from .ihvp import SolverConfig
from .scores import step_scores, weigh_by_explicit_scores
from .solvers import check_solver


@dataclass
class IWDOptions:
    tau: float = 1.0              # softmax temperature (the paper sweeps 0.01 .. 100)
    standardize: bool = True      # z-score scores within a group before the softmax
    weighting: str = "paper"      # how scores become weights (WEIGHTINGS); every rule gives the base method's
                                  # uniform weights as tau -> infinity (trim: with both fractions 0)
    trim_top: float = 0.1         # weighting=trim: the fraction of each group's highest-scored instances dropped
    trim_bottom: float = 0.0      # ... and of its lowest-scored ones; uniform weights on the rest
    implicit: str = "auto"        # auto: implicit term iff the inner training uses real data; on; off
    track_beta: float = 0.9       # EMA factor of the per-instance score tracking
    per_instance: bool = True     # per-instance gradients from one pass where the network allows
                                  # (influence.per_instance): explicit scores with no double backward, the real
                                  # statistic reused, the implicit term's products as matrix products. False:
                                  # autograd's double backward everywhere (the pre-#18 path; same scores to rounding)
    solve_every: int = 1          # the implicit term's iHVP h = (H + damping I)^{-1} g_M is solved on every k-th
                                  # matching step of an iteration and held in between (the network moves a few SGD
                                  # steps per matching step); held steps still score every instance (explicit term +
                                  # <h, grad l_j>). 1: every step, as Algorithm 1
    warm_start: bool = False      # CG starts from the previous matching step's solution (the same network a few
                                  # SGD steps later). Measured NOT to pay (results/warm-start/bench.md: ranks worse
                                  # than cold CG at equal iterations), so off


# The implicit term's solver options are SolverConfig's (influence.ihvp, documented there), embedded in IWD's config
# under these keys (IWD key -> SolverConfig field), with IWD's own defaults where they differ.
SOLVER_KEYS = {"solver": "solver", "damping": "damping", "solver_max_iter": "max_iter", "solver_tol": "tol",
               "lissa_scale": "lissa_scale", "hessian_batch": "hessian_batch", "curvature": "curvature",
               "woodbury_max_mb": "woodbury_max_mb"}
IWD_SOLVER_DEFAULTS = {"solver": "auto", "curvature": "gauss-newton", "hessian_batch": 128}


def solver_config(cfg, **changes):
    """The SolverConfig an IWD config embeds (validated by SolverConfig itself), with `changes` by SolverConfig name."""
    return SolverConfig(**{**{field: getattr(cfg, key) for key, field in SOLVER_KEYS.items()}, **changes})


# score z (z-scored within the group when standardize) -> unnormalised log-weight; each sums to 1 after softmax
WEIGHTINGS = {
    "paper": lambda z, tau: z / tau,                     # softmax(z / tau): toward the high-influence tail
    "inverse": lambda z, tau: -z / tau,                  # softmax(-z / tau): toward what the set already explains
    "two-tail": lambda z, tau: -z ** 2 / (2 * tau ** 2),  # exp(-z^2 / 2 tau^2): away from both tails
}


def influence_weights(scores, tau, standardize=True, weighting="paper", trim_top=0.0, trim_bottom=0.0):
    """Weights of one group's instances from their scores (sum 1, like the base method's uniform weights).
    trim: uniform on the instances left after dropping the top trim_top and bottom trim_bottom fractions."""
    if tau <= 0:
        raise BenchmarkError(f"tau must be > 0 (got {tau}); tau -> infinity gives the base method's uniform weights")
    n = len(scores)
    if weighting == "trim":
        order = scores.argsort()
        lo, hi = int(math.floor(trim_bottom * n)), n - int(math.floor(trim_top * n))
        if lo == 0 and hi == n:
            return torch.full_like(scores, 1.0 / n)  # bit for bit the base method's uniform weights
        keep = torch.zeros(n, dtype=scores.dtype, device=scores.device)
        keep[order[lo:max(hi, lo + 1)]] = 1.0  # never drop the whole group
        return keep / keep.sum()
    if math.isinf(tau):
        return torch.full_like(scores, 1.0 / n)
    s = scores
    if standardize and n > 1:
        s = (s - s.mean()) / (s.std() + 1e-12)
    return torch.softmax(WEIGHTINGS[weighting](s, tau), dim=0)


def effective_sample_size(weights):
    """Kish's effective sample size of normalised weights: 1 / sum w^2 (n for uniform weights, 1 for a one-hot), as
    a 0-d tensor on the weights' device (no host read inside a matching step)."""
    return 1.0 / (weights ** 2).sum()


def check_iwd_options(cfg):
    """One line per bad IWD option, before anything runs (a zero damping would make CG on the exact Hessian raise
    it forever; a zero tolerance never stops)."""
    checks = [
        (cfg.tau > 0, f"tau must be > 0 (got {cfg.tau}); tau -> infinity gives the base method"),
        (cfg.weighting in (*WEIGHTINGS, "trim"), f"unknown weighting {cfg.weighting!r} "
                                                 f"({', '.join([*WEIGHTINGS, 'trim'])})"),
        (0 <= cfg.trim_top < 1 and 0 <= cfg.trim_bottom < 1 and cfg.trim_top + cfg.trim_bottom < 1,
         f"trim_top and trim_bottom must be in [0, 1) with a sum below 1 (got {cfg.trim_top}, {cfg.trim_bottom})"),
        (cfg.implicit in ("auto", "on", "off"), f"implicit must be auto, on or off (got {cfg.implicit!r})"),
        (cfg.solver_max_iter >= 1, f"solver_max_iter must be >= 1 (got {cfg.solver_max_iter})"),
        (cfg.solver_tol > 0 and cfg.lissa_scale > 0 and cfg.woodbury_max_mb > 0,
         f"solver_tol, lissa_scale and woodbury_max_mb must be > 0 (got {cfg.solver_tol}, {cfg.lissa_scale}, "
         f"{cfg.woodbury_max_mb})"),
        (cfg.hessian_batch is None or cfg.hessian_batch >= 1,
         f"hessian_batch must be >= 1, or none for the whole real batch (got {cfg.hessian_batch})"),
        (cfg.solve_every >= 1, f"solve_every must be >= 1 (got {cfg.solve_every}; 1: solve at every step)"),
        (0 <= cfg.track_beta < 1, f"track_beta must be in [0, 1) (got {cfg.track_beta})"),
    ]
    for ok, message in checks:
        if not ok:
            raise BenchmarkError(message)
    check_solver(cfg.solver, cfg.curvature, cfg.damping)  # the solver registry's own check of the pair


def iwd_config(base_config):
    """The base method's config plus IWDOptions. Its validate checks the base's keys, then IWD's (named functions,
    no super(type(self)) lookup, so a user's subclass of the generated config validates normally)."""
    base_validate = getattr(base_config, "validate", None)

    def validate(self):
        if base_validate is not None:
            base_validate(self)
        check_iwd_options(self)
    solver_fields = {f.name: f for f in dataclasses.fields(SolverConfig)}
    fields = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(IWDOptions)] + [
        (key, solver_fields[name].type, dataclasses.field(default=IWD_SOLVER_DEFAULTS.get(key, solver_fields[name].default)))
        for key, name in SOLVER_KEYS.items()]
    return dataclasses.make_dataclass("IWD" + base_config.__name__, fields, bases=(base_config,),
                                      namespace={"validate": validate})


def _raise_if_nonfinite(name, checks):
    """checks: [(0-d bool tensor, (iteration, step, solver note))], read on the host in one go."""
    if not checks:
        return
    ok = torch.stack([f for f, _ in checks]).cpu()
    if bool(ok.all()):
        return
    it, k, note = checks[int((~ok).nonzero()[0])][1]
    raise NonFiniteError(f"{name}: non-finite influence scores at iteration {it} (matching step "
                         f"{k}{', solver: ' + note if note else ''})",
                         hint="Lower lr_img, raise damping, or use solver=cg.")


def track_scores(state, step, scores, weights, beta):
    """Per instance, keyed by training index, in the method state: an exponential moving average of the raw scores
    and of the within-group z-scores the weights are made from (raw scores drift in scale between steps; z-scores
    are comparable across steps and classes), and the sum of the weights applied, relative to uniform (n w)."""
    ema, z_ema, count = state["influence_ema"], state["influence_z_ema"], state["influence_count"]  # on the device
    for b, s, w in zip(step.batches, scores, weights):
        idx, s = to_device(b.index, ema.device), s.detach().to(ema.dtype)
        z = (s - s.mean()) / (s.std() + 1e-12) if len(s) > 1 else torch.zeros_like(s)
        fresh = count[idx] == 0
        ema[idx] = torch.where(fresh, s, beta * ema[idx] + (1 - beta) * s)
        z_ema[idx] = torch.where(fresh, z, beta * z_ema[idx] + (1 - beta) * z)
        state["weight_relative_sum"][idx] += len(w) * w.detach().to(ema.dtype)
        count[idx] += 1


def influence_weighted(cls=None, *, name=None):
    """Turn a method following the weighted-statistic protocol into its IWD variant, registered as iwd+<name>."""
    if cls is None:
        return lambda c: influence_weighted(c, name=name)
    if not issubclass(cls, WeightedMatching):
        raise TypeError(f"{cls.__name__} does not follow the weighted-statistic protocol (benchmark.core.protocol."
                        f"WeightedMatching); IWD needs its real statistic as a function of instance weights")

    class IWDMethod(cls):
        Config = iwd_config(cls.Config)
        presets = dict(cls.presets)

        def resolve(self, task):
            cfg = super().resolve(task)
            if cfg.implicit == "auto":  # the implicit term iff the inner training uses real data (S_inner = D)
                cfg.implicit = "on" if self.inner_data == "real" else "off"
            return cfg

        def instance_weights(self, step):
            """softmax(I / tau) per group; I from one batched pass over the step (influence.scores). Solver memory
            comes from and goes to step.context; a step without a context is checked at once."""
            c, t0 = self.config, time.perf_counter()
            ctx = step.context if step.context is not None else IterationContext()
            # within an iteration, CG starts from the damping the previous step needed (divided by the growth, so it
            # can fall again); each iteration (a fresh network, a fresh context) starts from c.damping
            cfg = solver_config(c, damping=max(c.damping, ctx.damping))
            implicit = None if c.implicit == "auto" else (c.implicit == "on")
            x0 = ctx.solution if c.warm_start else None
            weigh = lambda s: influence_weights(s, c.tau, c.standardize, c.weighting, c.trim_top,  # noqa: E731
                                                c.trim_bottom)
            explicit_only = implicit is False or (implicit is None and step.inner_data != "real")
            if explicit_only and c.per_instance and step.instance_gradients is not None:
                # per-instance gradients: scores, weights and the real statistic at those weights in one pass per
                # group. At the weighting's limit the base's own statistic is used, so the set is the base's bit for bit
                scores, weights, stats = weigh_by_explicit_scores(step, weigh, statistics=not self._at_limit())
                info = {"implicit": False}
                weights = InstanceWeights(weights, stats)
            else:
                held = ctx.solution if step.local_step % c.solve_every else None
                scores, info = step_scores(step, uniform_weights(step), cfg, implicit, x0, c.per_instance, held)
                weights = None
            ctx.solution = info.get("solution")
            solved = info.get("implicit") and not info.get("held")
            if solved:
                ctx.damping = info["solver_damping"] / cfg.damping_growth
            finite = torch.stack([torch.isfinite(s).all() for s in scores]).all()
            ctx.checks.append((finite, (step.iteration, step.local_step, info.get("solver_note") or "")))
            if step.context is None:
                _raise_if_nonfinite(self.name, ctx.checks)
            if weights is None:
                weights = [weigh(s) for s in scores]
            if "influence_ema" in ctx.state:
                track_scores(ctx.state, step, scores, weights, c.track_beta)
            stats = ctx.stats
            stats["time/influence_s"] = stats.get("time/influence_s", 0.0) + time.perf_counter() - t0
            stats["iwd/relative_ess"] = torch.stack([effective_sample_size(w) / len(w) for w in weights]).mean()
            if solved:
                stats["iwd/solver_iterations"] = float(info["solver_iterations"])
                stats["iwd/solver_residual"] = float(info["solver_residual"])
                stats["iwd/solver_residual_max"] = max(stats.get("iwd/solver_residual_max", 0.0),
                                                       float(info["solver_residual"]))
                stats["iwd/solver_damping"] = float(info["solver_damping"])
                if "solves" in ctx.state:  # the run's summary (checkpointed): a truncated CG is not a converged one
                    s = ctx.state["solves"]
                    s["steps"] += 1
                    s["unconverged"] += 0 if info["solver_converged"] else 1
                    s["max_residual"] = max(s["max_residual"], float(info["solver_residual"]))
                    s["solver"], s["why"] = info["solver"], info["solver_note"]  # which ran (solver auto: and why)
            if step.writer is not None and step.local_step == 0:
                log_histogram(step.writer, "iwd/scores", torch.cat(scores), step.iteration)
                log_histogram(step.writer, "iwd/weights", torch.cat(weights), step.iteration)
            return weights

        def steps_alike(self):
            """Held iHVP solutions (solve_every > 1) make solving and held steps differ in cost."""
            return self.config.solve_every == 1 and getattr(super(), "steps_alike", lambda: True)()

        def _at_limit(self):
            """Whether the weighting gives the base method's uniform weights whatever the scores."""
            c = self.config
            return math.isinf(c.tau) or (c.weighting == "trim" and c.trim_top == 0 and c.trim_bottom == 0)

        def finish_iteration(self, context):
            out = super().finish_iteration(context)
            _raise_if_nonfinite(self.name, context.checks)  # one host read per iteration, before any checkpoint
            out.update({k: float(v) for k, v in context.stats.items()})
            out["time/matching_s"] = (time.perf_counter() - context.started
                                      - context.stats.get("time/influence_s", 0.0))
            return out

        def init_state(self, task, gen):
            state = super().init_state(task, gen)
            n = len(task.dataset.y_train)
            state["influence_ema"] = torch.zeros(n, dtype=torch.float64, device=task.device)
            state["influence_count"] = torch.zeros(n, dtype=torch.int64, device=task.device)
            for k in ("influence_z_ema", "weight_relative_sum"):
                state[k] = torch.zeros(n, dtype=torch.float64, device=task.device)
            state["solves"] = {"steps": 0, "unconverged": 0, "max_residual": 0.0}
            return state

        def result(self, task, state):
            out = super().result(task, state)
            count = state["influence_count"].cpu().clone()
            out.extras["influence"] = {"ema": state["influence_ema"].cpu().clone(), "count": count,
                                       "z_ema": state["influence_z_ema"].cpu().clone(),
                                       "weight_relative_mean": state["weight_relative_sum"].cpu() / count.clamp_min(1)}
            if state.get("solves", {}).get("steps"):
                out.metadata["solver_summary"] = dict(state["solves"])
            return out

    IWDMethod.__name__ = IWDMethod.__qualname__ = "IWD" + cls.__name__
    IWDMethod.__module__ = cls.__module__  # listed with its base method's family
    IWDMethod.__doc__ = f"IWD+{cls.name.upper()}: {cls.__doc__ or ''}"
    register_method(name or f"iwd+{cls.name}")(IWDMethod)
    return IWDMethod
