"""`run.py bench` (benchmark.tools.perf, perf_implicit, timing, perf_report): its sections run and their known
answers hold (no timing is asserted)."""
import json

from helpers import cli as _cli


def test_bench_damping_section_known_answers(digits, monkeypatch):
    """The opt-in damping section on digits with two dampings: each whole-batch answer against itself is 1, and a
    very large damping makes the solve the identity's (h = g_M / damping: the same ranking as TracIn-like)."""
    from benchmark.tools import perf_implicit
    from benchmark.tools.timing import BenchSettings
    import itertools
    monkeypatch.setattr(perf_implicit, "DAMPINGS", (0.01, 1e6))
    steps = perf_implicit._idc_steps
    monkeypatch.setattr(perf_implicit, "_idc_steps", lambda s, ds: itertools.islice(steps(s, ds), 1))  # fresh net
    rows = perf_implicit.section_damping(BenchSettings(dataset="digits", repeats=1), digits)
    assert [(r["network"], r["damping"]) for r in rows] == [("fresh network", 0.01), ("fresh network", 1e6)]
    for r in rows:
        if r["damping"] == 0.01:
            assert r["whole_vs_whole_at_0.01"] == 1.0
        else:
            assert r["whole_vs_identity"] > 0.999 and r["another_batch"] > 0.999


def test_bench_processes_section_runs_one_to_cpu_count_processes_at_once(monkeypatch):
    """The opt-in processes section (how many 1-thread processes to start): the workload alone, then 2 .. CPU count
    processes together, each a fresh 1-thread process; one process alone is throughput 1 by definition."""
    import os
    from benchmark.tools import perf
    from benchmark.tools.timing import BenchSettings
    monkeypatch.setattr(perf, "PROCESS_WORKLOADS", {"convnet_step": "ConvNet-3 step"})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rows = perf.section_processes(BenchSettings(dataset="digits", repeats=1), None)
    assert [(r["workload"], r["processes"], r["error"]) for r in rows] == [("ConvNet-3 step", 1, ""),
                                                                           ("ConvNet-3 step", 2, "")]
    assert rows[0]["throughput_vs_one"] == 1.0 and all(r["s_each"] > 0 and r["slowest"] >= r["s_each"] for r in rows)
    assert rows[1]["throughput_vs_one"] == 2 * rows[0]["s_each"] / rows[1]["s_each"]


def test_bench_curvature_section_known_answers(digits, monkeypatch):
    """The curvature section on one IDC step of a fresh network (the bench adds a second step after 200 SGD steps:
    the same code on other weights): 7 solvers, 2 other Hessian batches and the whole batch, each with the known
    answers that hold whatever the step: the converged reference against itself, the exact direct solve against it,
    the identity against itself, the whole-batch solve against itself, and one pair read from either side."""
    import itertools
    from benchmark.tools import perf_implicit
    from benchmark.tools.timing import BenchSettings
    steps = perf_implicit._idc_steps
    monkeypatch.setattr(perf_implicit, "_idc_steps", lambda s, ds: itertools.islice(steps(s, ds), 1))  # fresh net
    rows = perf_implicit.section_curvature(BenchSettings(dataset="digits", repeats=1), digits)
    curv = {r["solver"]: r for r in rows}
    assert len(curv) == len(rows) == 10 and {r["network"] for r in rows} == {"fresh network"}
    assert curv["gauss-newton, CG to 1e-6"]["spearman_vs_converged_gn"] == 1.0
    assert curv["gauss-newton, Woodbury (exact, direct)"]["spearman_vs_converged_gn"] > 0.999
    assert curv["identity (TracIn-like)"]["spearman_vs_identity"] == 1.0
    whole = curv["gauss-newton on the whole real batch (Woodbury, exact)"]
    assert whole["spearman_vs_whole_batch_gn"] == 1.0
    assert abs(curv["gauss-newton, CG to 1e-6"]["spearman_vs_whole_batch_gn"]
               - whole["spearman_vs_converged_gn"]) < 1e-12


def test_bench_quick_smoke_writes_report(tmp_path):
    """`run.py bench --quick` end to end on digits (a smoke check: no timing is asserted). The per-sample-loop
    baseline must agree with the O(1) influence path; the allocator probes run in subprocesses. (The curvature
    section, the slowest, is checked in process above.)"""
    out = _cli("bench", "--quick", "-d", "digits", "--repeats", "1", "--out", str(tmp_path),
               "--sections", "peak,explicit,ihvp,evaluation,allocator,memory")
    assert out.returncode == 0, out.stderr
    res = json.load(open(tmp_path / "bench.json"))
    sec = res["sections"]
    ex = sec["explicit"][0]
    assert ex["max_rel_diff_double"] < 1e-4 and ex["max_rel_diff_per_instance"] < 1e-4 and ex["speedup"] > 0
    assert {r["allocator"] for r in sec["allocator"]} >= {"glibc default", "glibc tuned (mallopt)"}
    assert all("error" not in r for r in sec["allocator"])
    assert "default" in sec["allocator"][0]["mode"] and "tuned" in sec["allocator"][1]["mode"]
    assert sec["memory"][0]["growth_after_2_mb"] < 50
    gn = [r for r in sec["ihvp"] if r["curvature"] == "gauss-newton"]
    assert gn and gn[0]["damping"] == 0.01  # PSD: CG never has to raise the damping
    md = open(tmp_path / "bench.md").read()
    assert "IWD's explicit scores" in md and res["machine"]["commit"] in md
    bad = _cli("bench", "--sections", "nosuch", "--out", str(tmp_path))
    assert bad.returncode == 2 and "unknown bench section" in bad.stderr


def test_iteration_timing_covers_iwd_and_plain_dc(digits):
    from benchmark.tools.timing import iteration_times
    r = iteration_times("iwd+dc", "quick", digits, 2, "cpu", 1)
    assert r["s_per_iteration"] > 0 and 0 < r["influence_s"] < r["s_per_iteration"]
    plain = iteration_times("dc", "quick", digits, 2, "cpu", 1)  # plain DC: timed, no influence share
    assert plain["s_per_iteration"] > 0 and plain["influence_s"] == 0 and plain["matching_steps"] == 1  # IPC 2: the
