"""`run.py bench`: fixed speed and memory workloads, measured side by side in one process, written to results/bench.md.

Every section reports medians over repeats (after one warm-up) on the same machine in the same run, so ratios are
meaningful even where absolute times drift. Baselines that exist only to be beaten (a per-sample loop for the
influence scores, a plain per-class DC iteration) live here, never in the library.

Sections: machine and peak (matmul probe vs ConvNet-3 forward+backward), distillation iterations (each method and
its IWD variant, with the IWD ratio and the share spent on influence), explicit influence scores (O(1) passes vs a
per-sample loop, with their max difference), inverse-HVPs (CG, LiSSA), the implicit scores' dependence on the
curvature, damping and a CG warm start (perf_implicit), evaluation (one network's training on an IPC-10 set, test
throughput), the allocator (glibc default / tuned / tcmalloc, in subprocesses), DC at the reference settings against
a plain per-class implementation, and the memory of a DC IPC-10 run over iterations. The timer and settings are in
timing, the report in perf_report.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmark.platform import allocator
from benchmark.platform.errors import BenchmarkError
from benchmark.platform.files import utc_now
from benchmark.core.method import Task
from benchmark.core.registry import create_method, get_method, list_methods
from benchmark.core.synthetic import SyntheticSet, provenance
from benchmark.nn.networks import get_network
from benchmark.nn.real_pass import REAL_PASSES
from benchmark.nn.training import accuracy
from evaluation.harness import resolve_protocol, train_and_test
from influence import SolverConfig, influence_weights
from influence.ihvp import inverse_hvp
from influence.scores import explicit_scores, weigh_by_explicit_scores
from methods.matching import GradientMatching, match_distance
from methods.pdd import Progressive

from .perf_implicit import section_curvature, section_damping, section_warm_start
from .timing import BenchSettings, iteration_times, load_data, peak_rss_mb, rss_mb, timed


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


def run_probes_at_once(kind, n, s, threads=1):
    """The probe `kind` in `n` fresh processes started together, each with `threads` torch threads (the allocator
    run.py chooses); their results in start order."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IWD_NO_MALLOC_TUNING")}
    tc = allocator.tcmalloc_path()
    if tc:
        env["LD_PRELOAD"] = tc
    env["OMP_NUM_THREADS"] = str(threads)
    code = (f"import torch; torch.set_num_threads({threads}); from benchmark.platform import allocator; "
            f"allocator.tune(); from benchmark.tools.perf import probe; probe({kind!r}, {s.dataset!r}, {s.n})")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=3600)
        out.append(json.loads(stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                   {"error": (stderr.strip().splitlines() or ["failed"])[-1]})
    return out


PROCESS_WORKLOADS = {"convnet_step": "ConvNet-3 forward+backward+SGD, batch 256",
                     "ours_dc:eager": "DC iteration, reference settings, IPC 1"}


def section_processes(s, ds):
    """How many 1-thread processes to start on this machine (a suite started N times): the same workload in one
    process alone, then in 2, ... up to the CPU count at once. Throughput vs one = n x (s alone) / (s each). Only
    meaningful on an otherwise idle machine, hence opt-in."""
    rows = []
    for kind, label in PROCESS_WORKLOADS.items():
        alone = None
        for n in range(1, (os.cpu_count() or 1) + 1):
            results = run_probes_at_once(kind, n, s)
            errors = [r["error"] for r in results if "error" in r]
            each = sorted(r["s"] for r in results if "s" in r)
            t = each[len(each) // 2] if each else float("nan")
            alone = t if n == 1 else alone
            rows.append({"workload": label, "processes": n, "s_each": t, "slowest": each[-1] if each else None,
                         "throughput_vs_one": n * alone / t if each and alone else float("nan"),
                         "error": errors[0] if errors else ""})
    return rows


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
            "allocator": section_allocator, "dc_vs_plain": section_dc_vs_plain, "memory": section_memory,
            "processes": section_processes}
# run only when named: converges CG to 1e-6 at every matching step of two IWD+IDC iterations, minutes on digits but
# hours on Fashion-MNIST (its committed result, results/warm-start/bench.md, is on digits); damping: 56 exact GN
# solves, minutes (results/damping/bench.md); processes: needs an otherwise idle machine
OPT_IN_SECTIONS = ("warm_start", "damping", "processes")


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


