"""MTT and PDD-over-MTT: the unrolled student's gradients against finite differences, the expert buffer (built once,
reused by a second cell, resumed exactly after a kill), PDD's frozen stages and start windows, and the error for
iwd+mtt."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from benchmark.platform.errors import BenchmarkError
from benchmark.core.method import Task
from benchmark.core.registry import create_method, get_method
from methods import experts
from methods.mtt import Student

TINY = {"network": "ConvNetD1", "net_width": 4, "num_experts": 2, "syn_steps": 2, "max_start_epoch": 2,
        "expert_epochs": 1, "batch_train": 128, "iterations": 2}


def test_unrolled_student_gradients_match_finite_differences(digits64):
    """d loss / d (images, learned lr) through syn_steps differentiable SGD steps, against central differences
    (float64, no augmentation, the same batch order for every evaluation)."""
    task = Task(digits64, 1, 0)
    m = create_method("mtt", None, {**TINY, "syn_steps": 3, "batch_syn": 4, "dsa": False}).for_task(task)
    net = experts.new_network(task, m.expert_spec(task), seed=1).double()
    student = Student(net)
    start = experts.flat_params(net)
    target = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    images = digits64.x_train[:10].clone()
    labels = digits64.y_train[:10].clone()

    def loss(x, lr):
        end = m.unroll(student, start, x, labels, lr, torch.Generator().manual_seed(3), task)
        return ((end - target) ** 2).sum() / ((start - target) ** 2).sum()

    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    gx, glr = torch.autograd.grad(loss(x, lr), (x, lr))
    eps = 1e-6
    # the unroll builds a graph (differentiable SGD steps) even for detached inputs: detach the differences
    fd_lr = ((loss(images, lr.detach() + eps) - loss(images, lr.detach() - eps)) / (2 * eps)).detach()
    assert float(glr) == pytest.approx(float(fd_lr), rel=1e-6)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fd_x = ((loss(images + eps * direction, lr.detach()) - loss(images - eps * direction, lr.detach()))
            / (2 * eps)).detach()
    assert float((gx * direction).sum()) == pytest.approx(float(fd_x), rel=1e-6)


def _spec(task, method="mtt"):
    m = create_method(method, None, TINY).for_task(task)
    return m, m.expert_spec(task)


def test_the_buffer_is_built_once_and_reused_by_a_second_cell(digits, tmp_path, monkeypatch):
    """A suite of two MTT cells (seeds 0 and 1) trains each expert once; rerunning a cell trains none."""
    import yaml

    from benchmark.grid.runner import run_suite
    from benchmark.grid.suites import load_suite
    trained = []
    real_train = experts._train
    monkeypatch.setattr(experts, "_train", lambda *a: trained.append(a[2]) or real_train(*a))
    spec = {"datasets": ["digits"], "methods": ["mtt"], "ipc": [1], "seeds": [0, 1], "preset": "reference",
            "protocol": "mtt-quick", "num_eval": 1, "eval_networks": ["ConvNetD1"], "reduced": True,
            "overrides": {"mtt": [f"{k}={v}" for k, v in TINY.items()]}, "description": "mtt buffer test"}
    (tmp_path / "mttbuf.yaml").write_text(yaml.safe_dump(spec))
    runs = str(tmp_path / "runs")
    done, failures = run_suite(load_suite(str(tmp_path / "mttbuf.yaml")), runs, progress=False,
                               echo=lambda *_: None)
    assert done == 2 and not failures
    assert sorted(trained) == [0, 1]  # two experts, each trained once for both cells
    folder = os.path.join(runs, "cache", "experts")
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs if f.endswith(".pt")]
    assert len(files) == 2
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    task = Task(digits, 1, 5, cache_dir=os.path.join(runs, "cache"))
    m, _ = _spec(task)
    m.distill(task)  # a third cell, another seed: reads the buffer
    assert sorted(trained) == [0, 1] and stamps == {f: os.stat(f).st_mtime_ns for f in files}


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads({threads})  # the parent's: float sums depend on the thread count
    from benchmark.data.datasets import get_dataset
    from benchmark.core.method import Task
    from benchmark.core.registry import create_method
    from methods import experts
    experts.SAVE_EVERY_S = 0.0  # save after every epoch
    real = experts.train_steps
    def slow(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)
    experts.train_steps = slow
    ds = get_dataset("digits")
    task = Task(ds, 1, 0, cache_dir={cache!r})
    m = create_method("mtt", None, {tiny!r}).for_task(task)
    experts.expert_trajectory(task, m.expert_spec(task), 0, 400)
""")


def test_a_killed_expert_build_resumes_exactly(digits, tmp_path):
    """SIGKILL a process while it trains an expert (saving every epoch); the next request continues from the saved
    epochs (taking over the dead process's lock) and gives exactly the uninterrupted trajectory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = str(tmp_path / "killed")
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=root, cache=cache, tiny=TINY,
                                                                     threads=torch.get_num_threads())])
    task = Task(digits, 1, 0, cache_dir=cache)
    m, spec = _spec(task)
    path = os.path.join(spec.folder(task), "expert_0000.pt")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            stored = experts._read(path, spec) if os.path.exists(path) else None
            if stored is not None and len(stored["params"]) >= 3:
                break
            assert child.poll() is None, "the child ended before it was killed"
            time.sleep(0.05)
        else:
            pytest.fail("the child never saved two epochs")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    saved = len(experts._read(path, spec)["params"])
    assert os.path.exists(path + ".lock")  # the dead process's lock is still there ...
    resumed = experts.expert_trajectory(task, spec, 0, saved + 2)  # ... and is taken over
    assert len(experts._read(path, spec)["params"]) == saved + 3
    fresh = experts.expert_trajectory(Task(digits, 1, 0, cache_dir=str(tmp_path / "fresh")), spec, 0, saved + 2)
    assert len(resumed) == len(fresh) == saved + 3
    assert [i for i, (a, b) in enumerate(zip(resumed, fresh)) if not torch.equal(a, b)] == []


def test_an_unwritable_cache_stops_an_expert_before_it_trains(digits, tmp_path, monkeypatch):
    """Experts are read back every iteration, so they must be stored: a cache that cannot be written is a clear
    error naming the fix, raised before any epoch is trained (a file where the cache folder should be makes it
    unwritable even for root)."""
    (tmp_path / "not-a-folder").write_text("")
    task = Task(digits, 1, 0, cache_dir=str(tmp_path / "not-a-folder"))
    m, spec = _spec(task)
    monkeypatch.setattr(experts, "_train", lambda *a: pytest.fail("trained with nowhere to store the expert"))
    with pytest.raises(BenchmarkError, match="cannot be written.*IWD_CACHE"):
        experts.expert_trajectory(task, spec, 0, 2)


def test_pdd_mtt_freezes_earlier_stages_and_matches_later_epochs(digits):
    task = Task(digits, 2, 0)
    m = create_method("pdd-mtt", None, {**TINY, "iterations": 1, "stages": 2}).for_task(task)
    seen, orig = [], m.iteration

    def record(task, state, it, gen):
        before = state["images"].clone()
        out = orig(task, state, it, gen)
        seen.append((before, state["images"].clone(), out["start_epoch"], out["stage"]))
        return out
    m.iteration = record
    synset = m.distill(task)
    stage_of = synset.extras["stage_of"]
    assert synset.extras["stages"] == [1, 1] and stage_of.tolist() == [0] * 10 + [1] * 10
    (b0, a0, t0, s0), (b1, a1, t1, s1) = seen
    assert (s0, s1) == (0.0, 1.0)
    assert 0 <= t0 < 2 <= t1 < 4  # stage k draws start epochs from [2k, 2k + 2)
    assert not torch.equal(a0[:10], b0[:10]) and torch.equal(a0[10:], b0[10:])  # stage 0 trains its rows only
    assert torch.equal(a1[:10], b1[:10]) and not torch.equal(a1[10:], b1[10:])  # then stays frozen
    assert synset.metadata["expert_buffer"]["epochs"] == 3 + 1  # start < 4, plus expert_epochs


def test_iwd_mtt_is_refused_with_the_reason(digits):
    with pytest.raises(BenchmarkError, match="no per-step statistic of real instances"):
        get_method("iwd+mtt")
    with pytest.raises(BenchmarkError, match="unknown method"):
        get_method("iwd+nonsense")


def test_a_negative_learned_learning_rate_stops_with_advice(digits):
    task = Task(digits, 1, 0)
    m = create_method("mtt", None, {**TINY, "lr_lr": 1e3, "iterations": 3})
    with pytest.raises(BenchmarkError, match="learned learning rate fell to .* Lower lr_lr"):
        m.distill(task)


def test_plan_times_the_expert_buffer_without_touching_the_users_cache(tmp_path, monkeypatch):
    """`run.py plan`'s calibration probe trains its experts in a temporary folder (timed like they are counted)
    and leaves the cache as it was."""
    import yaml

    from benchmark.tools.plan import calibrate_method
    from benchmark.grid.suites import load_suite
    monkeypatch.setenv("IWD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "datasets": ["digits"], "methods": ["mtt"], "ipc": [1], "seeds": [0], "preset": "reference",
        "protocol": "mtt-quick", "num_eval": 1, "eval_networks": ["ConvNetD1"], "reduced": True,
        "overrides": {"mtt": [f"{k}={v}" for k, v in TINY.items()]}, "description": "plan probe test"}))
    suite = load_suite(str(tmp_path / "p.yaml"))
    rate = calibrate_method(suite, suite.cells()[0], "cpu", 1)
    assert rate["probe_s"] > 0 and rate["other"] > 0
    assert not (tmp_path / "cache").exists()


def test_plan_counts_the_expert_buffer_once_and_not_what_is_stored(digits, tmp_path):
    """Cells sharing a buffer (seeds 0, 1) train its experts once: the plan counts that training in the first cell
    only; with the buffer built in the run root's cache, neither cell counts it; with a shorter buffer stored, only
    the missing epochs are counted."""
    import yaml

    from benchmark.tools.plan import plan_suite
    from benchmark.grid.runner import RunPaths
    from benchmark.grid.suites import load_suite
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "datasets": ["digits"], "methods": ["mtt"], "ipc": [1], "seeds": [0, 1], "preset": "reference",
        "protocol": "mtt-quick", "num_eval": 1, "eval_networks": ["ConvNetD1"], "reduced": True,
        "overrides": {"mtt": [f"{k}={v}" for k, v in TINY.items()] + ["dsa=false"]},  # DSA's draws move FLOPs
        "description": "plan buffer test"}))
    suite = load_suite(str(tmp_path / "p.yaml"))
    cache = RunPaths(str(tmp_path / "runs"), suite.name).cache
    flops = lambda: [r["distill_flops"] for r in plan_suite(  # noqa: E731
        suite, suite.cells(), "cpu", calibrate=False, cache_dir=cache)[0]]
    cold = flops()
    m = create_method("mtt", "reference", {**TINY, "dsa": False}).for_task(Task(digits, 1, 0))
    epochs = m.expert_epochs_needed(Task(digits, 1, 0))
    task = Task(digits, 1, 0, cache_dir=cache)
    for k in range(TINY["num_experts"]):
        experts.build_expert(task, m.expert_spec(task), k, epochs - 1)  # one epoch short
    short = flops()
    for k in range(TINY["num_experts"]):
        experts.build_expert(task, m.expert_spec(task), k, epochs)
    warm = flops()
    buffer = cold[0] - warm[0]
    assert buffer > 0 and cold[1] == warm[0] == warm[1]  # the second seed loads what the first one trains
    one_epoch_each = short[0] - warm[0]
    assert buffer == pytest.approx(epochs * one_epoch_each, rel=1e-6) and short[1] == warm[1]
