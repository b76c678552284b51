"""`run.py bench`: fixed speed and memory workloads, measured side by side in one process, written to results/bench.md.

Every section reports medians over repeats (after one warm-up) on the same machine in the same run, so ratios are
meaningful even where absolute times drift. Baselines that exist only to be beaten (a per-sample loop for the
influence scores, a plain per-class DC iteration) live here, never in the library.

Sections: machine and peak (matmul probe vs ConvNet-3 forward+backward), distillation iterations (each method and
its IWD variant, with the IWD ratio and the share spent on influence), explicit influence scores (O(1) passes vs a
per-sample loop, with their max difference), inverse-HVPs (CG, LiSSA), the implicit scores' dependence on the
curvature and on a CG warm start, evaluation (one network's training on an
IPC-10 set, test throughput), the allocator (glibc default / tuned / tcmalloc, in subprocesses), DC at the
reference settings against a plain per-class implementation, and the memory of a DC IPC-10 run over iterations.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmark.platform import allocator
from benchmark.platform.device import synchronize as _sync
from benchmark.platform.errors import BenchmarkError
from benchmark.platform.files import utc_now
from benchmark.core.method import Task
from benchmark.core.protocol import uniform_weights
from benchmark.core.registry import create_method, get_method, list_methods
from benchmark.core.synthetic import SyntheticSet, provenance
from benchmark.data.datasets import Dataset, get_dataset
from benchmark.nn.networks import get_network
from benchmark.nn.real_pass import REAL_PASSES
from benchmark.nn.training import accuracy
from evaluation.harness import resolve_protocol, train_and_test
from influence import SolverConfig, implicit_scores, influence_weights
from influence.ihvp import inverse_hvp
from influence.iwd import solver_config
from influence.kfac import woodbury_inverse
from methods.matching import GradientMatching, match_distance
from methods.pdd import Progressive
from influence.scores import (explicit_scores, hessian_rows, implicit_products, objective_gradient,
                              weigh_by_explicit_scores)


@dataclass
class BenchSettings:
    quick: bool = True
    dataset: str = "fashion-mnist"   # Fashion-MNIST-shaped random data when the real files are not installed
    repeats: int = 0                 # 0: 2 (quick) or 3 (full)
    device: str = "cpu"
    sections: tuple = ()             # () = all
    bases: tuple = ()                # the iterations section's base methods; () = iwd_bases()
    data_root: str = None
    notes: list = field(default_factory=list)

    @property
    def n(self):
        return self.repeats or (2 if self.quick else 3)


def timed(fn, repeats, device="cpu", warmup=1):
    """Median wall seconds of fn() over `repeats` calls after `warmup` calls; also returns the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def rss_mb():
    """Current resident set size of this process (Linux), MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_data(settings):
    """The named dataset; for fashion-mnist without its files, random data of its shape (stated in the report)."""
    try:
        return get_dataset(settings.dataset, settings.data_root)
    except BenchmarkError:
        if settings.dataset != "fashion-mnist":
            raise
    settings.notes.append("Fashion-MNIST files not installed: random data of its shape (60000 x 1 x 28 x 28) "
                          "was used; speed does not depend on pixel values.")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(6000)
    return Dataset("fashion-mnist-shaped", torch.randn(60000, 1, 28, 28, generator=g), y,
                   torch.randn(10000, 1, 28, 28, generator=g), torch.arange(10).repeat(1000), (0.0,), (1.0,))


# ---------------------------------------------------------------------------------------------------------------
# machine peak vs the ConvNet-3 step

def matmul_peak_gflops(device, repeats):
    n = 2048 if str(device) == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    t, _ = timed(lambda: a @ b, repeats, device)
    return 2 * n ** 3 / t / 1e9


def convnet_step_flops(ds, device, batch=256, width=128):
    """FLOPs (counted by torch's FlopCounterMode) and median seconds of one forward+backward+SGD step."""
    from torch.utils.flop_counter import FlopCounterMode

    net = get_network("ConvNet", ds.channels, ds.num_classes, ds.image_size, seed=0, width=width).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = ds.x_train[:batch].to(device), ds.y_train[:batch].to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops(), step


def section_peak(s, ds):
    peak = matmul_peak_gflops(s.device, s.n + 2)
    flops, step = convnet_step_flops(ds, s.device)
    t, _ = timed(step, s.n + 1, s.device)
    return {"matmul_gflops": peak, "convnet3_step_s": t, "convnet3_step_gflop": flops / 1e9,
            "convnet3_gflops": flops / t / 1e9, "fraction_of_peak": flops / t / 1e9 / peak}


# ---------------------------------------------------------------------------------------------------------------
# distillation iterations

def iwd_bases():
    """The iterations section's methods: every registered method with an IWD variant (plugins too)."""
    return [name[len("iwd+"):] for name in list_methods("iwd+*")]


def iteration_times(name, preset, ds, ipc, device, repeats, overrides=None):
    """Median seconds per iteration of a method, its influence share (IWD), and matching steps per iteration."""
    task = Task(ds, ipc, 0, device)
    method = create_method(name, preset, dict(overrides or {})).for_task(task)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(task, gen)
    times, infl = [], []
    for it in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = method.iteration(task, state, it, gen) or {}
        _sync(device)
        if it:  # the first is warm-up
            times.append(time.perf_counter() - t0)
            infl.append(out.get("time/influence_s", 0.0))
    steps = method.match_steps(task) if hasattr(method, "match_steps") else 1
    return {"s_per_iteration": statistics.median(times), "influence_s": statistics.median(infl),
            "matching_steps": steps}


def section_iterations(s, ds):
    settings = [("cpu preset, IPC 10", "cpu", 10)]
    if not s.quick:
        settings.insert(0, ("reference, IPC 1", None, 1))
    rows, known = [], iwd_bases()
    for label, preset, ipc in settings:
        for base in s.bases or known:
            if base not in known:
                raise BenchmarkError(f"{base!r} has no IWD variant to time ({', '.join(known)})")
            cls = get_method(base)
            # inner training on real data (IDC, PDD): an iteration is 100 matching steps with network training
            # between (minutes on a CPU), so the bench caps them and reports seconds per matching step
            over = {"inner_loop": 4} if cls.inner_data == "real" else {}
            if issubclass(cls, Progressive):
                over["iterations"] = 1000  # stage 0 throughout the measurement (no conditioning phase)
            r0 = iteration_times(base, preset, ds, ipc, s.device, s.n, over)
            r1 = iteration_times("iwd+" + base, preset, ds, ipc, s.device, s.n, over)
            row = {"setting": label, "method": base, **r0, "iwd_s_per_iteration": r1["s_per_iteration"],
                   "iwd_ratio": r1["s_per_iteration"] / r0["s_per_iteration"],
                   "influence_share": r1["influence_s"] / r1["s_per_iteration"],
                   "note": f"inner_loop={over['inner_loop']} (cap)" if "inner_loop" in over else ""}
            if issubclass(cls, GradientMatching):  # IWD's per-instance path against its baseline: autograd's
                # double backward, no per-instance gradients (influence.per_instance)
                rb = iteration_times("iwd+" + base, preset, ds, ipc, s.device, s.n, {**over, "per_instance": False})
                row["iwd_double_backward_ratio"] = rb["s_per_iteration"] / r0["s_per_iteration"]
            if cls.inner_data == "real":  # the implicit term: the default (solver auto: Woodbury where it
                # fits) against the exact Hessian
                # with CG, GN with 20 CG iterations, and the explicit term alone (implicit=off, the cheap option)
                for key, extra in (("iwd_hessian_ratio", {"curvature": "hessian", "solver": "cg"}),
                                   ("iwd_cg_ratio", {"solver": "cg"}), ("iwd_explicit_only_ratio", {"implicit": "off"})):
                    r = iteration_times("iwd+" + base, preset, ds, ipc, s.device, s.n, {**over, **extra})
                    row[key] = r["s_per_iteration"] / r0["s_per_iteration"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# explicit influence scores: O(1) passes vs a per-sample loop (the baseline lives only here)

def per_sample_loop_scores(step, g, weights):
    """Baseline: d Dist / d w_j = <d Dist / d Phi_real, grad l_j> with one backward pass per instance."""
    real = [r.detach().requires_grad_(True) for r in step.real_statistic(g, weights, False)]
    v = torch.autograd.grad(step.distance([t.detach() for t in step.syn_stats[g]], real), real, allow_unused=True)
    v = [torch.zeros_like(r) if gi is None else gi for gi, r in zip(v, real)]
    one = torch.ones(1, dtype=weights.dtype, device=weights.device)
    out = []
    for j in range(len(weights)):
        grad_j = step.real_statistic(g, one, False, rows=torch.tensor([j]))
        out.append(sum((a * b).sum() for a, b in zip(v, grad_j)))
    return torch.stack(out).detach()


def explicit_workload(ds, device, width, batch=256):
    """One DC step of one class (`batch` real images, one synthetic image): the step and its uniform weights."""
    task = Task(ds, 1, 0, device)
    method = create_method("dc", None, {"net_width": width}).for_task(task)
    gen = torch.Generator().manual_seed(0)
    idx = ds.sample_class(0, batch, gen)
    syn = SyntheticSet(ds.x_train[idx[:1]].clone(), torch.tensor([0]), "normalized", {}, {})
    step = method.scoring_step(task, syn, 0, {0: idx}, gen)
    return step, torch.full((len(idx),), 1.0 / len(idx), device=device)


def section_explicit(s, ds):
    """Per class and matching step: the base's real statistic (one forward+backward), IWD's work on the real batch
    before #18 (double-backward scores + the matching step's own statistic) and now (per-instance gradients:
    scores AND the statistic at the new weights), and a per-sample loop; ratios to the base's pass. Repeats of the
    three IWD/base workloads are interleaved, so a busy machine slows them alike."""
    rows = []
    for width in ((32,) if s.quick else (32, 128)):
        step, w = explicit_workload(ds, s.device, width)
        weigh = lambda sc: influence_weights(sc, 1.0)  # noqa: E731
        work = {"base": lambda: step.real_statistic(0, w, False),
                "double": lambda: (explicit_scores(step, 0, w), step.real_statistic(0, weigh(w), False))[0],
                "per_instance": lambda: weigh_by_explicit_scores(step, weigh)[0][0]}
        times, out = {k: [] for k in work}, {}
        for _ in range(2 * s.n + 1):
            for k, fn in work.items():
                t, out[k] = timed(fn, 1, s.device, warmup=0)
                times[k].append(t)
        t = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
        t_loop, loop = timed(lambda: per_sample_loop_scores(step, 0, w), max(1, s.n - 1), s.device)
        rel = lambda a: float((a - loop).abs().max() / loop.abs().max().clamp_min(1e-30))  # noqa: E731
        rows.append({"network": f"ConvNet-3 width {width}", "batch": len(w), "base_s": t["base"],
                     "double_s": t["double"], "per_instance_s": t["per_instance"], "loop_s": t_loop,
                     "double_ratio": t["double"] / t["base"], "per_instance_ratio": t["per_instance"] / t["base"],
                     "speedup": t_loop / t["per_instance"],
                     "max_rel_diff_double": rel(out["double"]), "max_rel_diff_per_instance": rel(out["per_instance"])})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# inverse-HVPs on the IDC inner-training loss

def section_ihvp(s, ds):

    width = 32 if s.quick else 128
    net = get_network("ConvNet", ds.channels, ds.num_classes, ds.image_size, seed=0, width=width).to(s.device)
    params = [p for p in net.parameters()]
    gen = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(ds.y_train), generator=gen)[:128]  # IWD's default hessian_batch
    x, y = ds.x_train[idx].to(s.device), ds.y_train[idx].to(s.device)
    v = [t.detach() for t in torch.autograd.grad(F.cross_entropy(net(x[:64]), y[:64]), params)]
    rows = []
    outputs = (lambda: net(x), lambda z: F.cross_entropy(z, y))
    for solver, curvature in (("cg", "hessian"), ("cg", "gauss-newton"), ("lissa", "hessian")):
        cfg = SolverConfig(solver=solver, damping=0.01, max_iter=20, tol=1e-3, lissa_depth=200, curvature=curvature)
        t, (h, info) = timed(lambda: inverse_hvp(lambda: F.cross_entropy(net(x), y), params, v, cfg, outputs),
                             max(1, s.n - 1), s.device)
        rows.append({"solver": solver, "curvature": curvature, "network": f"ConvNet-3 width {width}",
                     "batch": len(y), "s": t, "iterations": info.iterations, "residual": info.residual,
                     "converged": info.converged, "damping": info.damping, "note": info.note})
    return rows


def section_curvature(s, ds):
    """How much the implicit scores of one IDC step depend on the curvature and solver, and what each costs.
    Spearman correlations of the per-instance implicit scores against the converged Gauss-Newton solution (CG to
    1e-6, the default Hessian batch), against the exact GN of the step's whole real batch, and against the identity
    solver (TracIn-like), on a fresh network and after 200 SGD steps on real data,
    with the seconds of one implicit_scores call (median of s.n; g_M, the solve and the per-instance dot products:
    the identity row is everything but the solve)."""
    from scipy.stats import spearmanr

    hb = 128  # IWD's default hessian_batch
    solvers = {"gauss-newton, CG to 1e-6": SolverConfig("cg", 0.01, 500, 1e-6, hessian_batch=hb,
                                                        curvature="gauss-newton"),
               "gauss-newton, CG 20 (default)": SolverConfig("cg", 0.01, 20, 1e-4, hessian_batch=hb,
                                                             curvature="gauss-newton"),
               "hessian, CG 20, adaptive damping": SolverConfig("cg", 0.01, 20, 1e-4, hessian_batch=hb),
               "gauss-newton, Woodbury (exact, direct)": SolverConfig("woodbury", 0.01, hessian_batch=hb,
                                                                     curvature="gauss-newton"),
               "K-FAC (direct)": SolverConfig("kfac", 0.01, hessian_batch=hb, curvature="gauss-newton"),
               "EK-FAC (direct)": SolverConfig("ekfac", 0.01, hessian_batch=hb, curvature="gauss-newton"),
               "identity (TracIn-like)": SolverConfig("identity", 0.01)}
    rows = []
    for phase, step, w0 in _idc_steps(s, ds):
        scores = {}
        for name, cfg in solvers.items():
            t, (sc, info) = timed(lambda: implicit_scores(step, w0, cfg), 1 if "1e-6" in name else s.n, s.device)
            scores[name] = (torch.cat(sc).cpu(), info, t)
        scores.update(_hessian_batch_scores(step, w0, hb))
        ref, ident = scores["gauss-newton, CG to 1e-6"][0], scores["identity (TracIn-like)"][0]
        whole = scores[WHOLE_BATCH][0]
        for name, (sc, info, t) in scores.items():
            rows.append({"network": phase, "solver": name, "damping": info.damping, "iterations": info.iterations,
                         "residual": info.residual, "s": t, "spearman_vs_converged_gn": float(spearmanr(sc, ref)[0]),
                         "spearman_vs_whole_batch_gn": float(spearmanr(sc, whole)[0]),
                         "spearman_vs_identity": float(spearmanr(sc, ident)[0])})
    return rows


WHOLE_BATCH = "gauss-newton on the whole real batch (Woodbury, exact)"


def _idc_steps(s, ds):
    """One IDC matching step (IPC 10, synthetic images = real ones + 0.1) on a fresh network and again after 200 SGD
    steps on real data: yields (phase, step, uniform weights)."""
    task = Task(ds, 10, 0, s.device)
    m = create_method("idc", "quick" if ds.image_size[0] < 16 else "cpu").for_task(task)
    gen = torch.Generator().manual_seed(0)
    net = m.fresh_net(task, 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    syn = {c: (ds.x_train[ds.class_indices[c][:10]].to(s.device) + 0.1, torch.full((10,), c, device=s.device))
           for c in range(ds.num_classes)}
    for phase, steps in (("fresh network", 0), ("after 200 SGD steps", 200)):
        for _ in range(steps):
            idx = torch.randint(len(ds.y_train), (128,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(ds.x_train[idx].to(s.device)), ds.y_train[idx].to(s.device)).backward()
            opt.step()
        step = m.build_step(task, net, syn, gen, 0)
        yield phase, step, uniform_weights(step)


def _hessian_batches(step, hb):
    """Rows of the step's real batch: the default Hessian batch (hb evenly spaced), two disjoint ones (shifted by 2
    and 4), and all of them (every class's instances: the best estimate of the training loss's curvature the step
    has)."""
    n = sum(len(b.y) for b in step.batches)
    rows = hessian_rows(n, hb)
    return {"default": rows, "another": (rows + 2).clamp(max=n - 1), "third": (rows + 4).clamp(max=n - 1),
            "whole": torch.arange(n)}


def _exact_gn_scores(step, g_m, rows, damping):
    """Implicit scores of every instance of the step from the exact damped GN solve (Woodbury) on `rows`."""
    x = torch.cat([b.x for b in step.batches])
    h, info = woodbury_inverse(step.instance_outputs, x[rows.to(x.device)], step.train_params, g_m, damping)
    return torch.cat(implicit_products(step, h)).cpu(), info


def _hessian_batch_scores(step, w0, hb):
    """How much the implicit scores depend on WHICH instances estimate H: the exact GN solve (Woodbury) on two other
    Hessian batches of hb instances, disjoint from the default one, and on the step's whole real batch.
    Returns {name: (scores, SolveInfo, seconds)}."""
    g_m = objective_gradient(step, w0)
    batches = _hessian_batches(step, hb)
    out = {}
    for name, key in ((f"gauss-newton, another {hb} (Woodbury, exact)", "another"),
                      (f"gauss-newton, a third {hb} (Woodbury, exact)", "third"), (WHOLE_BATCH, "whole")):
        t0 = time.perf_counter()
        scores, info = _exact_gn_scores(step, g_m, batches[key], 0.01)
        out[name] = (scores, info, time.perf_counter() - t0)
    return out


DAMPINGS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0)


def section_damping(s, ds):
    """The implicit term's estimator vs its damping (exact GN solves, no solver error), on the curvature section's
    two IDC steps: how well two disjoint 128-instance Hessian batches agree, how well one agrees with the whole real
    batch (640), how far the whole batch's answer moves from the default damping's, and how close it is to the
    identity (TracIn-like: infinite damping). Spearman of the 640 per-instance scores."""
    from scipy.stats import spearmanr

    rows = []
    for phase, step, w0 in _idc_steps(s, ds):
        g_m = objective_gradient(step, w0)
        batches = _hessian_batches(step, 128)
        identity = torch.cat(implicit_products(step, g_m)).cpu()
        wholes = {}
        for damping in DAMPINGS:
            sc = {k: _exact_gn_scores(step, g_m, r, damping)[0] for k, r in batches.items()}
            wholes[damping] = sc["whole"]
            rows.append({"network": phase, "damping": damping,
                         "another_batch": float(spearmanr(sc["default"], sc["another"])[0]),
                         "third_batch": float(spearmanr(sc["default"], sc["third"])[0]),
                         "default_vs_whole": float(spearmanr(sc["default"], sc["whole"])[0]),
                         "whole_vs_identity": float(spearmanr(sc["whole"], identity)[0])})
        for r in rows:
            if r["network"] == phase:
                r["whole_vs_whole_at_0.01"] = float(spearmanr(wholes[r["damping"]], wholes[0.01])[0])
    return rows


def section_warm_start(s, ds):
    """Not only a timing: CG warm-started from the previous matching step's solution (IWD option warm_start) vs
    cold CG, at k = 5, 10, 20 iterations, along the matching steps of real IWD+IDC iterations (the network trains on
    real data between steps). Per step: Spearman of the implicit scores against CG converged to 1e-6 on the same
    step; mean over the steps after the first (the first has nothing to start from). Then the iteration time of
    iwd+idc at (cold, 20), (warm, 10) and (warm, 5)."""
    from scipy.stats import spearmanr


    preset = "quick" if ds.image_size[0] < 16 else "cpu"
    task = Task(ds, 10, 0, s.device)
    m = create_method("iwd+idc", preset, {"iterations": 2}).for_task(task)
    c = m.config
    cfg = lambda k, tol=c.solver_tol: solver_config(c, max_iter=k, tol=tol)  # noqa: E731
    ks = (5, 10, 20)
    chains, rows = {k: None for k in ks}, {(k, w): [] for k in ks for w in ("cold", "warm")}
    base_weights = m.instance_weights

    def measure(step):
        w0 = uniform_weights(step)
        ref = last["ref"] = torch.cat(implicit_scores(step, w0, cfg(500, 1e-6))[0]).cpu()
        for k in ks:
            cold, info_c = implicit_scores(step, w0, cfg(k))
            last[k] = info_c.solution
            warm, info_w = implicit_scores(step, w0, cfg(k), x0=chains[k])
            if chains[k] is not None:
                for name, sc, info in (("cold", cold, info_c), ("warm", warm, info_w)):
                    rows[(k, name)].append((float(spearmanr(torch.cat(sc).cpu(), ref)[0]), info.residual))
            chains[k] = info_w.solution
        return base_weights(step)

    def measure_and_hold(step):
        weights = measure(step)  # the reference scores and the cold CG solutions of this step
        for k in holds:
            if step.local_step % k == 0:
                held[k] = last[c.solver_max_iter]
            elif held[k] is not None:
                sc = torch.cat(implicit_products(step, held[k])).cpu()
                rows[(c.solver_max_iter, f"held, solved every {k} steps")].append(
                    (float(spearmanr(sc, last["ref"])[0]), float("nan")))
        return weights

    last = {}
    holds = (2, 4, 10)  # solve_every: h solved on every k-th matching step, held in between
    held = {k: None for k in holds}
    rows.update({(c.solver_max_iter, f"held, solved every {k} steps"): [] for k in holds})
    m.instance_weights = measure_and_hold
    gen = torch.Generator().manual_seed(0)
    state = m.init_state(task, gen)
    for it in range(2):
        chains.update({k: None for k in ks})  # a fresh network each iteration: no warm start across iterations
        held.update({k: None for k in holds})
        m.iteration(task, state, it, gen)
    out = [{"cg": f"{w}, {k} iterations" if not w.startswith("held") else f"{w} (CG {k})", "steps": len(v),
            "spearman_mean": statistics.mean(r for r, _ in v), "spearman_min": min(r for r, _ in v),
            "residual_mean": statistics.mean(res for _, res in v)} for (k, w), v in rows.items() if v]
    times = [{"cg": name, **iteration_times("iwd+idc", preset, ds, 10, s.device, s.n, over)}
             for name, over in (("cold, 20 (default)", {}), ("warm, 10", {"warm_start": True, "solver_max_iter": 10}),
                                ("warm, 5", {"warm_start": True, "solver_max_iter": 5}),
                                *((f"cold 20, solved every {k} steps", {"solve_every": k}) for k in holds))]
    base = iteration_times("idc", preset, ds, 10, s.device, s.n)
    for row in times:
        row["ratio_to_idc"] = row["s_per_iteration"] / base["s_per_iteration"]
    return {"ranking": out, "iterations": times}


# ---------------------------------------------------------------------------------------------------------------
# evaluation training and test throughput

def section_evaluation(s, ds):

    proto = resolve_protocol("dc-quick" if s.quick else "dc")
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat([ds.sample_class(c, 10, gen) for c in range(ds.num_classes)])
    stages = [(ds.x_train[idx], ds.y_train[idx])]
    t0 = time.perf_counter()
    acc = train_and_test(ds, stages, proto, "ConvNet", seed=0, device=s.device)
    t_train = time.perf_counter() - t0
    net = get_network("ConvNet", ds.channels, ds.num_classes, ds.image_size, seed=0).to(s.device)
    xt, yt = ds.x_test.to(s.device), ds.y_test.to(s.device)
    t_test, _ = timed(lambda: accuracy(net, xt, yt), max(1, s.n - 1), s.device)
    return {"protocol": proto.name, "epochs": proto.epochs, "train_s": t_train, "accuracy": acc,
            "test_images_per_s": len(yt) / t_test}


# ---------------------------------------------------------------------------------------------------------------
# the allocator, and DC against a plain per-class implementation of the reference (subprocesses)

def plain_dc_iteration(net, ds, syn_x, syn_y, opt_img, batch_real=256, gen=None):
    """The reference algorithm written plainly (DC's main loop at IPC 1: one outer step): per class, the mean-loss
    gradient of 256 real images and the synthetic gradient with graph, the layer-wise distance; one image step."""
    params = list(net.parameters())

    loss = 0.0
    for c in range(ds.num_classes):
        idx = ds.sample_class(c, batch_real, gen)
        g_real = torch.autograd.grad(F.cross_entropy(net(ds.x_train[idx]), ds.y_train[idx]), params)
        g_real = [t.detach() for t in g_real]
        xs = syn_x[syn_y == c]
        g_syn = torch.autograd.grad(F.cross_entropy(net(xs), syn_y[syn_y == c]), params, create_graph=True)
        loss = loss + match_distance(g_syn, g_real)  # DC's layer-wise 'ours' distance
    opt_img.zero_grad()
    loss.backward()
    opt_img.step()


def probe(kind, dataset, repeats):
    """Runs in a subprocess with the allocator configuration under test; prints JSON."""
    settings = BenchSettings(dataset=dataset)
    ds = load_data(settings)
    if kind == "convnet_step":
        _, step = convnet_step_flops(ds, "cpu")
        t, _ = timed(step, repeats)
    elif kind.startswith("ours_dc:"):  # ours at the reference settings, IPC 1, with real_pass after the colon
        t = iteration_times("dc", None, ds, 1, "cpu", repeats, {"real_pass": kind.split(":", 1)[1]})["s_per_iteration"]
    elif kind == "plain_dc":
        gen = torch.Generator().manual_seed(0)
        syn_y = torch.arange(ds.num_classes)
        syn_x = torch.randn(ds.num_classes, ds.channels, *ds.image_size, generator=gen).requires_grad_(True)
        opt = torch.optim.SGD([syn_x], lr=0.1, momentum=0.5)
        it = [0]

        def one():
            net = get_network("ConvNet", ds.channels, ds.num_classes, ds.image_size, seed=it[0])
            it[0] += 1
            plain_dc_iteration(net, ds, syn_x, syn_y, opt, gen=gen)
        t, _ = timed(one, repeats)
    else:
        raise ValueError(kind)
    print(json.dumps({"s": t, "allocator": allocator.mode(), "peak_rss_mb": peak_rss_mb()}))


ALLOCATORS = {"glibc default": {"IWD_NO_MALLOC_TUNING": "1"}, "glibc tuned (mallopt)": {}}


def run_probe(kind, env_extra, s):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IWD_NO_MALLOC_TUNING")}
    env.update(env_extra)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    code = (f"from benchmark.platform import allocator; allocator.tune(); from benchmark.tools.perf import probe; "
            f"probe({kind!r}, {s.dataset!r}, {s.n})")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=3600)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _allocators():
    configs = dict(ALLOCATORS)
    tc = allocator.tcmalloc_path()
    if tc:
        configs["tcmalloc"] = {"LD_PRELOAD": tc}
    return configs


def section_allocator(s, ds):
    rows = []
    for name, env in _allocators().items():
        r = run_probe("convnet_step", env, s)
        rows.append({**r, "allocator": name, "mode": r.get("allocator", "")})
    return rows


def section_dc_vs_plain(s, ds):
    """Ours (this process, with the allocator run.py chose: tcmalloc where installed, else tuned glibc) with each
    real_pass (eager: the faithful loop; compile; bf16) vs the plain per-class reference loop with glibc's default
    and tuned settings; and ours eager and compiled in a fresh process with the other allocator (tuned glibc when
    this process has tcmalloc; tcmalloc, where installed, when it has glibc). The compile rows' warm-up iteration
    compiles."""
    rows = []
    for mode in REAL_PASSES:
        ours = iteration_times("dc", None, ds, 1, s.device, s.n, {"real_pass": mode})
        rows.append({"implementation": f"ours, real_pass={mode} (run.py: allocator {allocator.mode()})",
                     "s": ours["s_per_iteration"]})
    for name, env in ALLOCATORS.items():
        r = run_probe("plain_dc", env, s)
        rows.append({"implementation": f"plain per-class loop ({name})", "s": r.get("s", float("nan")),
                     "error": r.get("error", "")})
    tc = allocator.tcmalloc_path()
    other = ("glibc tuned (mallopt)", {}) if "tcmalloc" in allocator.mode() else \
        ("tcmalloc preloaded", {"LD_PRELOAD": tc}) if tc else None
    if other:  # the allocator is the other lever (section allocator): ours in a fresh process with the other one
        for mode in ("eager", "compile"):
            r = run_probe(f"ours_dc:{mode}", other[1], s)
            rows.append({"implementation": f"ours, real_pass={mode}, {other[0]} (fresh process)",
                         "s": r.get("s", float("nan")), "error": r.get("error", "")})
    plain = next(r["s"] for r in rows if r["implementation"] == "plain per-class loop (glibc default)")
    eager = rows[0]["s"]
    for r in rows:
        r["speedup_vs_plain_default"] = plain / r["s"] if r["s"] == r["s"] else float("nan")
        r["speedup_vs_eager"] = eager / r["s"] if r["s"] == r["s"] else float("nan")
    return rows


def section_memory(s, ds):
    """RSS after each iteration of DC at IPC 10 (cpu preset; a reference-preset iteration at IPC 10 takes ~90 s
    here): a run that keeps graphs alive grows; ours must stay flat after the first iterations."""
    out = []
    for preset in ("cpu",):
        task = Task(ds, 10, 0, s.device)
        method = create_method("dc", preset, {}).for_task(task)
        gen = torch.Generator().manual_seed(0)
        state = method.init_state(task, gen)
        trace = []
        for it in range(s.n + 3):
            method.iteration(task, state, it, gen)
            trace.append(rss_mb())
        out.append({"preset": preset or "reference", "rss_mb": trace, "rss": ", ".join(f"{v:.0f}" for v in trace),
                    "growth_after_2_mb": trace[-1] - trace[1],
                    "peak_rss_mb": peak_rss_mb(),
                    "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if s.device.startswith("cuda")
                    else None})
    return out


SECTIONS = {"peak": section_peak, "iterations": section_iterations, "explicit": section_explicit,
            "ihvp": section_ihvp, "curvature": section_curvature, "damping": section_damping,
            "warm_start": section_warm_start,
            "evaluation": section_evaluation,
            "allocator": section_allocator, "dc_vs_plain": section_dc_vs_plain, "memory": section_memory}
# run only when named: converges CG to 1e-6 at every matching step of two IWD+IDC iterations, minutes on digits but
# hours on Fashion-MNIST (its committed result, results/warm-start/bench.md, is on digits); damping: 56 exact GN
# solves, minutes (results/damping/bench.md)
OPT_IN_SECTIONS = ("warm_start", "damping")


def run_bench(s: BenchSettings, progress=print):
    unknown = [k for k in s.sections if k not in SECTIONS]
    if unknown:
        raise BenchmarkError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    ds = load_data(s)
    res = {"settings": {"quick": s.quick, "dataset": ds.name, "repeats": s.n, "device": s.device},
           "machine": {**provenance(), "cpu": _cpu_name(), "date": utc_now()},
           "sections": {}}
    for name in (s.sections or [k for k in SECTIONS if k not in OPT_IN_SECTIONS]):
        progress(f"bench: {name} ...")
        t0 = time.perf_counter()
        res["sections"][name] = SECTIONS[name](s, ds)
        progress(f"bench: {name} done in {time.perf_counter() - t0:.0f} s")
    res["notes"] = s.notes
    return res


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------------------------
# the report

def _f(v, d=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{d}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{d}f}".rstrip("0").rstrip(".")
    return str(v)


def _table(rows, cols):
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_f(r.get(k)) for _, k in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# the report's tables: (section, part or None) -> (heading, [(column title, row key)]), in report order
TABLES = {
    ("iterations", None): (
        "Distillation iterations (seconds per iteration; IWD ratio = iwd+X / X at its defaults: for idc and pdd the "
        "implicit term with solver auto, Woodbury where it fits)",
        [("setting", "setting"), ("method", "method"), ("matching steps", "matching_steps"),
         ("X s/it", "s_per_iteration"), ("iwd+X s/it", "iwd_s_per_iteration"), ("IWD ratio", "iwd_ratio"),
         ("IWD ratio, double backward (before #18)", "iwd_double_backward_ratio"),
         ("influence share of iwd+X", "influence_share"), ("IWD ratio, exact Hessian (CG)", "iwd_hessian_ratio"),
         ("IWD ratio, GN with CG 20", "iwd_cg_ratio"), ("IWD ratio, implicit=off", "iwd_explicit_only_ratio"),
         ("note", "note")]),
    ("explicit", None): (
        "IWD's explicit scores on one class's real batch (DC step): work per class and matching step, relative to "
        "the base's real statistic (one forward+backward)",
        [("network", "network"), ("batch", "batch"), ("base s", "base_s"),
         ("IWD before #18 s (double backward + statistic)", "double_s"),
         ("IWD per-instance s (scores + statistic)", "per_instance_s"), ("before / base", "double_ratio"),
         ("per-instance / base", "per_instance_ratio"), ("per-sample loop s", "loop_s"),
         ("loop / per-instance", "speedup"), ("max rel. diff vs loop, before", "max_rel_diff_double"),
         ("max rel. diff vs loop, per-instance", "max_rel_diff_per_instance")]),
    ("ihvp", None): (
        "Inverse-HVP (requested damping 0.01, tol 1e-3, cross-entropy at initialisation)",
        [("solver", "solver"), ("curvature", "curvature"), ("network", "network"), ("batch", "batch"), ("s", "s"),
         ("iterations", "iterations"), ("rel. residual", "residual"), ("converged", "converged"),
         ("damping used", "damping"), ("note", "note")]),
    ("curvature", None): (
        "Implicit scores vs curvature and solver (one IDC step, IPC 10, Hessian batch 128; Spearman of per-instance "
        "scores; s: one implicit_scores call, the identity row being all but the solve)",
        [("network", "network"), ("solver", "solver"), ("damping used", "damping"), ("CG iterations", "iterations"),
         ("rel. residual", "residual"), ("s", "s"), ("vs converged Gauss-Newton", "spearman_vs_converged_gn"),
         ("vs whole-batch Gauss-Newton", "spearman_vs_whole_batch_gn"), ("vs identity", "spearman_vs_identity")]),
    ("damping", None): (
        "The implicit term's estimator vs damping (one IDC step, IPC 10; exact Gauss-Newton solves; Spearman of the "
        "step's per-instance scores)",
        [("network", "network"), ("damping", "damping"), ("default 128 vs another 128", "another_batch"),
         ("default 128 vs a third 128", "third_batch"), ("default 128 vs whole batch", "default_vs_whole"),
         ("whole batch vs whole batch at 0.01", "whole_vs_whole_at_0.01"),
         ("whole batch vs identity", "whole_vs_identity")]),
    ("warm_start", "ranking"): (
        "CG warm start and held solutions (solve_every) along IWD+IDC's matching steps (Spearman of the implicit "
        "scores vs CG to 1e-6 on the same step; mean and min over steps)",
        [("CG", "cg"), ("steps", "steps"), ("mean Spearman", "spearman_mean"), ("min Spearman", "spearman_min"),
         ("mean rel. residual", "residual_mean")]),
    ("warm_start", "iterations"): (
        None, [("iwd+idc CG", "cg"), ("s/iteration", "s_per_iteration"), ("of which influence s", "influence_s"),
               ("ratio to idc", "ratio_to_idc")]),
    ("evaluation", None): None,
    ("allocator", None): (
        "Allocator (ConvNet-3 forward+backward+SGD, batch 256, fresh subprocess each)",
        [("allocator", "allocator"), ("s per step", "s"), ("peak RSS MB", "peak_rss_mb"), ("error", "error")]),
    ("dc_vs_plain", None): (
        "DC at the reference settings (IPC 1, ConvNet-3, real batch 256) vs a plain per-class loop",
        [("implementation", "implementation"), ("s per iteration", "s"),
         ("speedup vs ours eager (today's loop)", "speedup_vs_eager"),
         ("speedup vs plain (glibc default)", "speedup_vs_plain_default")]),
    ("memory", None): (
        "Memory of DC at IPC 10 over iterations",
        [("preset", "preset"), ("RSS after each iteration (MB)", "rss"),
         ("growth after iteration 2 (MB)", "growth_after_2_mb"), ("process peak RSS so far (MB)", "peak_rss_mb"),
         ("CUDA peak MB", "cuda_peak_mb")]),
}


def report_markdown(res, command):
    m, st, sec = res["machine"], res["settings"], res["sections"]
    lines = ["# Performance benchmark", "",
             f"`{command}` — {'quick' if st['quick'] else 'full'} mode, {st['repeats']} timed repeats after one "
             f"warm-up (medians), data: {st['dataset']}, device {st['device']}.", "",
             f"Machine: {m['cpu']} ({m['hardware']}, {m['threads']} torch threads), torch {m['torch']}, "
             f"allocator in this process: {m['allocator']}. Commit {m['commit']}, {m['date']}.", ""]
    lines += [line for n in res.get("notes", []) for line in (f"Note: {n}", "")]
    if "peak" in sec:
        p = sec["peak"]
        lines += ["## Peak", "", f"matmul probe {p['matmul_gflops']:.0f} GFLOP/s; ConvNet-3 (width 128) "
                  f"forward+backward+SGD at batch 256: {p['convnet3_step_s'] * 1e3:.0f} ms for "
                  f"{p['convnet3_step_gflop']:.1f} GFLOP = {p['convnet3_gflops']:.0f} GFLOP/s, "
                  f"{100 * p['fraction_of_peak']:.0f}% of the matmul peak.", ""]
    for (name, part), table in TABLES.items():
        if name not in sec:
            continue
        if name == "evaluation":
            e = sec[name]
            lines += ["## Evaluation", "", f"Training one ConvNet-3 on an IPC-10 set (random real images) with "
                      f"protocol {e['protocol']} ({e['epochs']} epochs): {e['train_s']:.1f} s (accuracy "
                      f"{100 * e['accuracy']:.1f}%). Test throughput: {e['test_images_per_s']:.0f} images/s.", ""]
            continue
        heading, cols = table
        lines += ([f"## {heading}", ""] if heading else []) + [_table(sec[name][part] if part else sec[name], cols),
                                                                 ""]
    return "\n".join(lines)


def write_report(res, out_dir, command):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({**res, "command": command}, f, indent=1, default=str)
    path = os.path.join(out_dir, "bench.md")
    with open(path, "w") as f:
        f.write(report_markdown(res, command) + "\n")
    return path
