"""`run.py bench`'s report: bench.json as measured, and bench.md with one table per section (TABLES)."""
import json
import os



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
         ("share of iwd+X in IWD's weighting call (explicit per-instance path: with the real statistic)",
          "influence_share"), ("IWD ratio, exact Hessian (CG)", "iwd_hessian_ratio"),
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
    ("processes", None): (
        "1-thread processes at once (the same workload in n fresh processes started together; median seconds per "
        "call of each; throughput vs one = n x alone / each)",
        [("workload", "workload"), ("processes", "processes"), ("s each (median)", "s_each"),
         ("slowest s", "slowest"), ("throughput vs one process", "throughput_vs_one"), ("error", "error")]),
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
