"""`run.py bench`'s studies of the implicit term's estimator (issue #18's curvature, damping and warm-start
questions; their results are committed in results/curvature, results/damping, results/warm-start): how much the
implicit scores of an IDC step depend on the curvature, the solver, the Hessian batch, the damping and a CG warm
start, and what each costs."""
import statistics
import time

import torch
import torch.nn.functional as F

from benchmark.core.method import Task
from benchmark.core.protocol import uniform_weights
from benchmark.core.registry import create_method
from influence import SolverConfig, implicit_scores
from influence.iwd import solver_config
from influence.kfac import woodbury_inverse
from influence.scores import hessian_rows, implicit_products, objective_gradient

from .timing import iteration_times, timed


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

