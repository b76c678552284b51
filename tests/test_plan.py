"""`run.py plan` (benchmark.tools.plan): counted FLOPs and memory against known cases and the allocator, the
report, calibration fallbacks, and artefacts counted once."""
import os

import pytest
import torch
import yaml

from benchmark.platform.errors import BenchmarkError


def _allocator_peak(fn):
    """Peak bytes the CPU allocator holds while fn runs, from torch.profiler's allocation events (an independent
    count: the allocator's own malloc/free records, op temporaries included)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def test_peak_memory_tracker_on_a_known_case():
    from benchmark.tools.plan import CostCounter
    mib = 2 ** 20
    with CostCounter() as pm:
        a = torch.zeros(1024, 256, device="meta")        # 1 MiB
        b = torch.zeros(1024, 512, device="meta")        # 2 MiB, both alive: 3 MiB
        del a, b
        c = torch.zeros(1024, 1024, device="meta")       # 4 MiB alone
        v = c.view(-1)                                   # a view: no new storage
        del c, v
    assert pm.peak == 4 * mib and pm.current == 0


def test_plan_peak_memory_matches_the_allocator_under_double_backward(digits):
    """The plan's peak (counted on meta, shapes only) against the CPU allocator's own records of the same
    distillation on real data, IWD's double backward included. The FLOP counter that used to run beside the
    tracker (torch's FlopCounterMode) kept every double-backward graph reachable through its module hooks, so
    IWD's counted peak grew with the outer loop although real memory did not. iwd+idc is pinned to CG: Woodbury's
    Cholesky solve copies the (nC x nC) Gram matrix inside LAPACK, which no meta count sees (tools/plan.py says so)."""
    from benchmark.core.method import Task
    from benchmark.tools.plan import _distill_cost, shape_dataset
    from benchmark.core.registry import create_method
    for name, over in (("dc", ["outer_loop=3"]), ("iwd+dc", ["outer_loop=3"]), ("iwd+idc", ["n_data=64", "solver=cg"])):
        over = ["iterations=1", "inner_loop=2", "net_width=16"] + over
        planned = _distill_cost(create_method(name, "quick", over), Task(shape_dataset("digits"), 5, 0, "meta"))[2]
        real = _allocator_peak(lambda: create_method(name, "quick", over).distill(Task(digits, 5, 0, "cpu")))
        assert abs(planned - real) <= 0.05 * real, (name, planned, real)


def test_plan_counts_the_same_flops_on_meta_as_on_real_data(digits):
    """The meta count (shapes only) equals FlopCounterMode over the same iteration run on real CPU data (an
    independent count: real tensors, real control flow, every matching step walked; the count walks one of the
    identical steps and scales it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark.core.method import Task
    from benchmark.tools.plan import _distill_cost, shape_dataset
    from benchmark.core.registry import create_method
    for name, over in (("dc", ["iterations=1", "inner_loop=2", "outer_loop=4", "net_width=8"]),
                       ("iwd+idc", ["iterations=1", "inner_loop=4", "net_width=8", "n_data=64"])):
        meta_flops = _distill_cost(create_method(name, "quick", over), Task(shape_dataset("digits"), 2, 0, "meta"))[0]
        task = Task(digits, 2, 0, "cpu")
        method = create_method(name, "quick", over).for_task(task)  # the loop's parts run on a resolved config
        gen = torch.Generator().manual_seed(0)
        state = method.init_state(task, gen)
        with FlopCounterMode(display=False) as real:
            method.iteration(task, state, 0, gen)
        # exact for DC; the implicit term's solver is data-dependent (1e-5 apart here)
        assert abs(meta_flops - real.get_total_flops()) <= 1e-4 * real.get_total_flops() and meta_flops > 0, name


def test_plan_reports_cells_methods_totals_and_memory(tmp_path):
    from benchmark.tools.plan import format_plan, plan_suite
    from benchmark.grid.suites import load_suite
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "methods": ["random", "dc", "iwd+dc"], "ipc": [1, 2],
                                    "preset": "quick", "protocol": "dc-quick", "num_eval": 2,
                                    "eval_networks": ["ConvNetW32"],
                                    "overrides": {"dc": ["iterations=3", "outer_loop=2"],
                                                  "iwd+dc": ["iterations=3", "outer_loop=2"]}}))
    suite = load_suite(str(path))
    rows, rates = plan_suite(suite, suite.cells(), "cpu")
    by = {r["key"]: r for r in rows}
    dc1, dc2 = by["digits__dc__ipc1__seed0"], by["digits__dc__ipc2__seed0"]
    assert dc1["iterations"] == 3 and dc2["flops_per_iteration"] > dc1["flops_per_iteration"] > 0
    assert by["digits__iwd-plus-dc__ipc1__seed0"]["flops_per_iteration"] > dc1["flops_per_iteration"]
    assert by["digits__random__ipc1__seed0"]["distill_flops"] == 0
    assert 0 < dc1["train_flops"] < dc1["distill_flops"]  # DC trains on its set between matching steps
    assert {k[3] for k in rates["method"] if k[0] == "dc"} == {1, 2}  # calibrated per IPC (batches grow with it)
    dc_rate = rates["method"][("dc", "digits", "", 1)]
    assert dc_rate["train"] > 0 and dc_rate["other"] > 0  # each component timed apart
    assert all(r["distill_s"] >= 0 and r["eval_s"] > 0 and r["peak_bytes"] > r["data_bytes"] for r in rows)
    text = format_plan(suite, rows, "cpu", {"digits__dc__ipc1__seed0": 10.0})
    assert "total" in text and "largest cell" in text and "iwd+dc" in text and "est/meas" in text
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("digits__")}
    est = dc1["distill_s"] + dc1["eval_s"]
    assert float(lines["digits__dc__ipc1__seed0"][-1]) == pytest.approx(est / 10.0, abs=0.006)  # measured beside
    assert lines["digits__dc__ipc2__seed0"][-2:] == ["-", "-"]  # not finished: no ratio


def test_plan_a_probe_failing_on_random_data_borrows_the_nearest_ipcs_rate(tmp_path, monkeypatch):
    """A method's own guard can trip on the probe's random data (pdd-mtt's learned learning rate at IPC 10): its
    cells take the rate of the nearest calibrated IPC, and the report says which; no probe left: a clear error."""
    import benchmark.tools.plan as plan
    from benchmark.grid.suites import load_suite
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "methods": ["dc"], "ipc": [1, 2, 5], "preset": "quick",
                                    "protocol": "dc-quick", "num_eval": 1, "eval_networks": ["ConvNetW32"]}))
    suite = load_suite(str(path))
    real = plan.calibrate_method
    monkeypatch.setattr(plan, "calibrate_method", lambda suite, cell, *a: real(suite, cell, *a) if cell.ipc == 1
                        else (_ for _ in ()).throw(BenchmarkError("learned learning rate fell")))
    monkeypatch.setattr(plan, "count_cell", lambda suite, cell, cache_dir=None, planned=None: {
        "key": cell.key, "method": cell.method, "iterations": 1, "distill_flops": 1e9, "train_flops": 0,
        "flops_per_iteration": 1e9, "eval": [], "eval_flops": 0, "peak_bytes": 1, "data_bytes": 1})
    rows, rates = plan.plan_suite(suite, suite.cells(), "cpu")
    by = {r["key"]: r for r in rows}
    assert "rate_from_ipc" not in by["digits__dc__ipc1__seed0"]
    assert by["digits__dc__ipc2__seed0"]["rate_from_ipc"] == by["digits__dc__ipc5__seed0"]["rate_from_ipc"] == 1
    assert by["digits__dc__ipc5__seed0"]["distill_s"] == by["digits__dc__ipc1__seed0"]["distill_s"] > 0
    assert "digits__dc__ipc5__seed0 (IPC 1's)" in plan.format_plan(suite, rows, "cpu")
    monkeypatch.setattr(plan, "calibrate_method", lambda *a: (_ for _ in ()).throw(BenchmarkError("fell")))
    with pytest.raises(BenchmarkError, match="every calibration probe of dc on digits failed.*--no-calibrate"):
        plan.plan_suite(suite, suite.cells(), "cpu")


def test_plan_counts_a_cached_feature_network_once_and_not_at_all_when_on_disk(tmp_path):
    """Herding and loss-prune-then-distill train a feature network per (dataset, network, epochs, seed) and cache
    it on disk: the plan counts that training in the first cell that makes it, not in later cells that load it,
    and not at all when the real dataset's network is already cached (the iwd-study's loss-prune cells were
    estimated at 6.3x their measured time for this)."""
    from benchmark.data.datasets import get_dataset
    from benchmark.core.method import Task
    from benchmark.tools.plan import plan_suite
    from benchmark.core.registry import create_method
    from benchmark.grid.suites import load_suite
    cache = tmp_path / "cache"
    path = tmp_path / "p.yaml"
    over = ["base_set=iterations=1"]
    path.write_text(yaml.safe_dump({
        "datasets": ["digits"], "methods": ["loss-prune-then-distill"], "ipc": [1], "preset": "quick",
        "protocol": "dc-quick", "num_eval": 1, "eval_networks": ["ConvNetW32"],
        "variants": {"a": {"loss-prune-then-distill": over}, "b": {"loss-prune-then-distill": over + ["base=dm"]}}}))
    suite = load_suite(str(path))
    flops = lambda: {r["key"].split("@")[1][0]: r["distill_flops"]  # noqa: E731
                     for r in plan_suite(suite, suite.cells(), "cpu", calibrate=False, cache_dir=str(cache))[0]}
    cold = flops()
    create_method("loss-prune-then-distill", "quick", over).distill(Task(get_dataset("digits"), 1, 0, cache_dir=str(cache)))
    warm = flops()  # the real run's cache file now exists
    assert os.listdir(cache)
    training = cold["a"] - warm["a"]  # the feature network's training, counted in the first cell only
    assert training > 0 and cold["b"] == warm["b"]
    assert warm["a"] < cold["a"] and warm["b"] < cold["a"]
