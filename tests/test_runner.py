"""The grid runner: records, resume after kill -9, failures, locks, Ray and process executors, TensorBoard, figures."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from benchmark.grid.runner import read_records, run_suite

from helpers import ROOT, TINY_DC, cli as _cli, cli_in_process, tiny_suite as _suite


def test_suite_runs_writes_atomic_records_table_and_tensorboard(tmp_path):
    suite = _suite(tmp_path)
    runs = str(tmp_path / "runs")
    done, failures = run_suite(suite, runs, progress=False, echo=lambda *_: None)
    assert done == 3 and not failures
    recs = read_records(runs, "tiny")
    assert {r["method"] for r in recs} == {"random", "dc", "iwd+dc"}
    for r in recs:
        assert len(r["accuracy"]["accuracies"]) == 2 and r["commit"] and r["torch"] and r["seed"] == 0
    assert not glob.glob(os.path.join(runs, "tiny", "records", "*.tmp*"))
    # rerun: nothing left to do
    assert run_suite(suite, runs, progress=False, echo=lambda *_: None) == (0, [])
    # leaderboard in three formats
    from benchmark.report.leaderboard import write_leaderboard
    md = write_leaderboard(recs, str(tmp_path / "results"), suite, "python run.py run --suite tiny", suite.methods)
    text = open(md).read()
    assert "| iwd+dc |" in text and "**" in text and "REDUCED" in text and "Welch" in text
    csv_text = open(tmp_path / "results" / "leaderboard.csv").read()
    assert csv_text.startswith("method,dataset,ipc,mean,std")
    assert "\\begin{tabular}" in open(tmp_path / "results" / "leaderboard.tex").read()
    # Figures 1 and 5 from the influence the IWD set tracked (what `run.py table` draws)
    from benchmark.data.datasets import get_dataset
    from benchmark.report.figures import suite_figures
    from benchmark.grid.runner import RunPaths
    figs = suite_figures(recs, str(tmp_path / "results"), suite.eval_networks, RunPaths(runs, "tiny").sets,
                         get_dataset)
    assert sorted(os.path.basename(f) for f in figs) == ["accuracy_vs_cost.png",
                                                         "tracked_influence_iwd-dc_ipc1_class0.png",
                                                         "tracked_sorted_by_influence_iwd-dc_ipc1.png"]
    for f in figs:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # TensorBoard's own reader finds the expected tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = glob.glob(os.path.join(runs, "tiny", "tensorboard", "*iwd-plus-dc*"))[0]
    acc = EventAccumulator(logdir, size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"distill/loss", "eval/accuracy_mean", "distill/iwd/relative_ess", "distill/time/influence_s"} \
        <= set(tags["scalars"])
    assert "iwd/scores" in tags["histograms"] and "synthetic/final" in tags["images"]
    assert "distill/synthetic" in tags["images"]  # the grid during distillation (every iterations // 10)


def test_a_narrowed_run_keeps_the_whole_suite_in_its_table(tmp_path, monkeypatch):
    """`run --seeds S` adds S's cells to the suite: its leaderboard still shows every finished cell, and its footer
    names the command for the whole suite (without the narrowing option)."""
    _suite(tmp_path, methods=["random"], seeds=[0, 1], num_eval=1)
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    for seed in ("0", "1"):
        args = ["run", "--suite", str(tmp_path / "tiny.yaml"), "--seeds", seed, "--run-root", runs, "--results-root",
                results, "--no-tensorboard"]
        monkeypatch.setattr(sys, "argv", ["run.py", *args])  # what the footer's command is read from
        out = cli_in_process(*args)
        assert out.returncode == 0, out.stderr
    text = open(os.path.join(results, "tiny", "leaderboard.md")).read()
    assert "seeds: [0, 1]" in text and "cells: 2" in text
    command = re.search(r"command: `([^`]*)`", text).group(1)
    assert "--seeds" not in command and f"run --suite {tmp_path / 'tiny.yaml'} --run-root {runs}" in command


def test_a_failing_cell_does_not_stop_the_others(tmp_path):
    suite = _suite(tmp_path, name="faulty", methods=["dc", "random"],
                   overrides={"dc": TINY_DC + ["lr_img=1e30"]})
    runs = str(tmp_path / "runs")
    done, failures = run_suite(suite, runs, progress=False, echo=lambda *_: None)
    assert done == 1 and len(failures) == 1 and "non-finite" in failures[0][1]
    failed = glob.glob(os.path.join(runs, "faulty", "records", "*.failed.json"))
    assert len(failed) == 1 and "iteration" in json.load(open(failed[0]))["error"]


def test_a_stop_during_evaluation_keeps_the_set_and_the_evaluated_networks(tmp_path, monkeypatch):
    """Interrupted before the first, then after one of two evaluation networks (status says so each time): the
    reruns neither distil again nor retrain network 0, and end with exactly the accuracies of an uninterrupted run."""
    import evaluation.harness as harness
    from benchmark.core.method import IterativeMethod
    from benchmark.grid.runner import run_cell
    suite = _suite(tmp_path, methods=["dc"])
    cell = suite.cells()[0]
    fresh = run_cell(suite, cell, str(tmp_path / "fresh"), log=False)
    runs = str(tmp_path / "runs")
    real_train, trained = harness.train_and_test, []

    def stop_at(n):
        def train(*a, **kw):
            trained.append(kw["seed"])
            if len(trained) == n:
                raise KeyboardInterrupt
            return real_train(*a, **kw)
        return train
    from benchmark.grid.runner import suite_status
    for stop, status in ((1, "distilled; 0 of 2"), (2, "distilled; 1 of 2")):  # stop at the first, then the second
        trained.clear()
        monkeypatch.setattr(harness, "train_and_test", stop_at(stop))
        with pytest.raises(KeyboardInterrupt):
            run_cell(suite, cell, runs, log=False)
        (row,) = suite_status(suite, runs)
        assert row["state"] == "interrupted" and status + " evaluation network(s) trained" in row["detail"]
    assert os.path.exists(os.path.join(runs, "tiny", "checkpoints", cell.key + ".eval.json"))
    trained.clear()
    monkeypatch.setattr(harness, "train_and_test", lambda *a, **kw: trained.append(kw["seed"]) or real_train(*a, **kw))
    monkeypatch.setattr(IterativeMethod, "distill", lambda *a: pytest.fail("distilled again"))
    rec = run_cell(suite, cell, runs, log=False)
    assert trained == [18]  # network 1 only (network i has the seed seed * 1000 + 17 + i)
    assert rec["accuracy"]["accuracies"] == fresh["accuracy"]["accuracies"]
    assert rec["distill_seconds"] > 0
    assert not os.path.exists(os.path.join(runs, "tiny", "checkpoints", cell.key + ".eval.json"))


def test_a_saved_set_is_reused_only_under_the_same_config(tmp_path, digits):
    import dataclasses
    from benchmark.core.registry import create_method
    from benchmark.grid.runner import _distilled_before
    from benchmark.core.synthetic import SyntheticSet
    m = create_method("dc", None, TINY_DC)
    path = str(tmp_path / "cell.pt")
    assert _distilled_before(path, m) is None  # nothing saved
    SyntheticSet(digits.x_train[:10].clone(), torch.arange(10), metadata={"config": dataclasses.asdict(m.config)}
                 ).save(path)
    assert _distilled_before(path, m) is not None
    assert _distilled_before(path, create_method("dc", None, TINY_DC + ["lr_img=0.5"])) is None  # config changed
    open(path, "wb").write(b"truncated")
    assert _distilled_before(path, m) is None  # damaged: distil again


def test_two_runs_of_a_suite_never_run_one_cell_at_once(tmp_path, monkeypatch):
    """A cell another live process holds is skipped as busy, with a message naming the holder: not a failure (no
    failed record; the holder finishes it) and the other cells go on; a lock whose process is gone is taken over;
    a cell another run finished meanwhile is not run again."""
    import socket
    import benchmark.grid.runner as runner
    suite = _suite(tmp_path, methods=["random"])
    cell, runs = suite.cells()[0], str(tmp_path / "runs")
    lock = os.path.join(runs, "tiny", "checkpoints", cell.key + ".lock")
    os.makedirs(os.path.dirname(lock))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host, pid in ((socket.gethostname(), holder.pid), ("another-machine", 4242)):
            with open(lock, "w") as f:
                json.dump({"pid": pid, "host": host, "started": "2026-11-29T00:00:00+00:00"}, f)
            said = []
            done, failures = run_suite(suite, runs, progress=False, echo=said.append)
            assert done == 0 and not failures and os.listdir(os.path.join(runs, "tiny", "records")) == []
            busy = [line for line in said if line.startswith("  busy  ")]
            assert len(busy) == 1 and f"being run by pid {pid} on {host}" in busy[0] and "delete the lock" in busy[0]
        out = _cli("run", "--suite", str(tmp_path / "tiny.yaml"), "--run-root", runs, "--results-root",
                   str(tmp_path / "results"), "--no-tensorboard")  # the CLI: exit 0, and it says where the cell is
        assert out.returncode == 0 and "0 failed; 1 still running in another process" in out.stdout, out.stderr
        # the pid is alive but is not the holder (its process died; the pid was reused after a restart): stale
        # (a holder killed outright, pid gone, is the kill -9 test below)
        with open(lock, "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "process": "another-boot/1",
                       "started": "2026-11-29T00:00:00+00:00"}, f)
        done, failures = run_suite(suite, runs, progress=False, echo=lambda *_: None)
        assert done == 1 and not failures and not os.path.exists(lock)
    finally:
        holder.kill()
        holder.wait()
    record = read_records(runs, "tiny")[0]
    monkeypatch.setattr(runner, "_run_cell_locked", lambda *a: pytest.fail("ran a finished cell again"))
    assert runner.run_cell(suite, cell, runs, log=False) == record
    # listed as pending, finished by another run before this one took it: reported so, not counted as this run's
    monkeypatch.setattr(runner, "pending_cells", lambda *a: [cell])
    said = []
    done, failures = run_suite(suite, runs, progress=False, echo=said.append)
    assert done == 0 and not failures and f"  done  {cell.key}: finished by another run of the suite" in said


def test_status_says_where_each_cell_stands(tmp_path, interrupt_at):
    import socket
    from benchmark.core.method import Task
    from benchmark.core.registry import create_method
    from benchmark.grid.runner import run_cell
    from benchmark.data.datasets import get_dataset
    suite = _suite(tmp_path, methods=["random", "dc"], ipc=[1, 2, 3])
    runs = str(tmp_path / "runs")
    cells = {c.key: c for c in suite.cells()}
    run_cell(suite, cells["digits__random__ipc1__seed0"], runs, log=False)
    ckdir = os.path.join(runs, "tiny", "checkpoints")
    with open(os.path.join(runs, "tiny", "records", "digits__random__ipc2__seed0.failed.json"), "w") as f:
        json.dump({"error": "BenchmarkError: something named\ntraceback"}, f)
    m = interrupt_at(create_method("dc", None, TINY_DC), 2)
    with pytest.raises(KeyboardInterrupt):
        m.distill(Task(get_dataset("digits"), 1, 0, checkpoint_path=os.path.join(ckdir, "digits__dc__ipc1__seed0.pt"),
                       checkpoint_every=1))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(ckdir, "digits__dc__ipc2__seed0.lock"), "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "started": "2026-11-29T03:00:00+00:00"}, f)
        out = _cli("status", "--suite", str(tmp_path / "tiny.yaml"), "--run-root", runs)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 0, out.stderr
    state = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines() if "__" in line}
    assert state["digits__random__ipc1__seed0"][0] == "done"
    assert state["digits__random__ipc2__seed0"] == ["failed", "BenchmarkError: something named"]
    assert state["digits__dc__ipc1__seed0"][0] == "interrupted" and "iteration 2/3" in state["digits__dc__ipc1__seed0"][1]
    assert re.search(r"min per iteration, about \d+ min of distillation left", state["digits__dc__ipc1__seed0"][1])
    assert state["digits__dc__ipc2__seed0"][0] == "running" and f"pid {holder.pid}" in state["digits__dc__ipc2__seed0"][1]
    assert [state[k][0] for k in ("digits__random__ipc3__seed0", "digits__dc__ipc3__seed0")] == ["pending"] * 2
    assert out.stdout.strip().splitlines()[-1] == "1 done, 1 running, 1 interrupted, 1 failed, 2 pending"


def test_kill_minus_9_mid_cell_then_rerun_resumes_to_the_same_set(tmp_path):
    over = ["iterations=40", "net_width=8", "batch_real=8", "outer_loop=1"]
    suite_path = tmp_path / "killme.yaml"
    suite_path.write_text(yaml.safe_dump({"datasets": ["digits"], "methods": ["dc"], "ipc": [1], "seeds": [0],
                                          "protocol": "dc-quick", "num_eval": 1, "eval_networks": ["ConvNetW32"],
                                          "overrides": {"dc": over}}))
    runs = str(tmp_path / "runs")
    # the child at this process's thread count: CPU reductions split by thread, and the set is compared bit for bit
    args = [sys.executable, os.path.join(ROOT, "run.py"), "--threads", str(torch.get_num_threads()), "run",
            "--suite", str(suite_path), "--run-root", runs, "--results-root", str(tmp_path / "res"), "--no-tensorboard"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(runs, "killme", "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and not glob.glob(os.path.join(ckpt_dir, "*.pt")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert glob.glob(os.path.join(ckpt_dir, "*.pt")), "no checkpoint was written before the kill"
    assert not read_records(runs, "killme")
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert len(read_records(runs, "killme")) == 1
    from benchmark.data.datasets import get_dataset
    from benchmark.core.method import Task
    from benchmark.core.registry import create_method
    from benchmark.core.synthetic import SyntheticSet
    resumed = SyntheticSet.load(glob.glob(os.path.join(runs, "killme", "sets", "*.pt"))[0])
    fresh = create_method("dc", None, over).distill(Task(get_dataset("digits"), 1, 0))
    assert torch.equal(resumed.images, fresh.images)


@pytest.mark.xdist_group("ray")  # one local Ray cluster at a time: two on one machine can pick the same ports
def test_ray_executor_on_a_local_cluster(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import tempfile
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # AF_UNIX paths < 108 bytes
    suite = _suite(tmp_path, name="rayed", methods=["random", "herding"], ipc=[1, 2], seeds=[0],
                   overrides={"herding": ["feature_epochs=1", "network=ConvNetW32"]})
    runs = str(tmp_path / "runs")
    done, failures = run_suite(suite, runs, executor="ray", workers=2, progress=False, echo=lambda *_: None)
    assert done == 4 and not failures
    assert len(read_records(runs, "rayed")) == 4


def test_process_executor_survives_a_killed_worker(tmp_path):
    """Fault injection: one cell's worker is killed with SIGKILL (a plugin method loaded with --plugin, which the
    workers must import too); that cell fails with a clear message, every other cell writes its record."""
    from benchmark.core.registry import load_plugin
    load_plugin("killer_plugin")
    suite = _suite(tmp_path, name="pooled", methods=["random", "test-killer"], ipc=[1, 2, 3], num_eval=1)
    runs = str(tmp_path / "runs")
    done, failures = run_suite(suite, runs, executor="process", workers=2, progress=False, echo=lambda *_: None)
    assert done == 3 and len(read_records(runs, "pooled")) == 3
    assert len(failures) == 3 and all("worker died (exit code -9)" in msg for _, msg in failures)


def test_influence_figure_is_a_png(tmp_path, digits):
    from benchmark.report.figures import influence_figure
    scores = torch.linspace(-1, 1, len(digits.y_train))
    out = influence_figure(scores, digits, 3, str(tmp_path / "fig.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


    # reference table's nearest entry (IPC 1) has one outer step


def _hammer(args):
    """One writer process: many atomic writes, half of them to keys the other writer also writes."""
    from benchmark.grid.runner import write_json_atomic
    folder, who = args
    for i in range(60):
        key = f"shared{i % 10}" if i % 2 else f"{who}_{i}"
        write_json_atomic(os.path.join(folder, key + ".json"), {"writer": who, "i": i, "pad": "x" * 20000})
    return who


def test_two_writers_never_clobber_or_tear_records(tmp_path):
    """Two processes writing records at once (what the process pool and Ray workers do): every file is complete
    JSON written by one of them, no temp file is left, and no record of one writer is lost to the other."""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(2) as pool:
        assert sorted(pool.map(_hammer, [(str(tmp_path), "a"), (str(tmp_path), "b")])) == ["a", "b"]
    files = os.listdir(tmp_path)
    assert not [f for f in files if ".tmp" in f]
    for f in files:
        rec = json.load(open(tmp_path / f))
        assert rec["writer"] in ("a", "b") and len(rec["pad"]) == 20000
    assert len([f for f in files if f.startswith("a_")]) == 30 and len([f for f in files if f.startswith("b_")]) == 30
    assert len([f for f in files if f.startswith("shared")]) == 5  # odd i -> i % 10 in {1, 3, 5, 7, 9}


def test_nan_in_influence_scores_stops_the_cell_keeping_the_checkpoint(tmp_path, monkeypatch, digits):
    """A NaN score never reaches the weights: the cell stops naming the iteration and the last good checkpoint,
    which is kept; the other cells of the suite still finish."""
    import influence.iwd as iwd
    from benchmark.core.method import NonFiniteError, Task
    from benchmark.core.registry import create_method
    real, real_fast = iwd.step_scores, iwd.weigh_by_explicit_scores

    def poisoned(step, *a, **k):  # the double-backward path
        scores, info = real(step, *a, **k)
        if step.iteration >= 2:
            scores[0][0] = float("nan")
        return scores, info

    def poisoned_fast(step, *a, **k):  # the per-instance path (iwd+dc on a ConvNet)
        scores, weights, stats = real_fast(step, *a, **k)
        if step.iteration >= 2:
            scores[0][0] = float("nan")
        return scores, weights, stats
    monkeypatch.setattr(iwd, "step_scores", poisoned)
    monkeypatch.setattr(iwd, "weigh_by_explicit_scores", poisoned_fast)
    ckpt = str(tmp_path / "c.pt")
    m = create_method("iwd+dc", None, TINY_DC + ["iterations=4"])
    with pytest.raises(NonFiniteError, match=f"influence scores at iteration 2 .*last good checkpoint: {ckpt}"):
        m.distill(Task(digits, 1, 0, checkpoint_path=ckpt, checkpoint_every=1))
    assert os.path.exists(ckpt)
    suite = _suite(tmp_path, name="poisoned", methods=["random", "iwd+dc"], num_eval=1,
                   overrides={"iwd+dc": TINY_DC + ["iterations=4"]})
    runs = str(tmp_path / "runs")
    done, failures = run_suite(suite, runs, progress=False, echo=lambda *_: None)
    assert done == 1 and len(failures) == 1 and "influence scores" in str(failures[0])
    assert [r["method"] for r in read_records(runs, "poisoned")] == ["random"]


def test_tau_architecture_and_sorted_figures(tmp_path, digits):
    """Figures 4a, 4b (from records, as the table command draws them) and 5 (from a set and scores) are PNGs."""
    from benchmark.report.figures import sorted_by_influence_figure, suite_figures
    from benchmark.core.synthetic import SyntheticSet

    def rec(method, ipc, tau, accs):
        ev = {net: {"accuracies": [a - k for a in accs]} for k, net in enumerate(["ConvNet", "ResNet10"])}
        return {"method": method, "ipc": ipc, "dataset": "digits", "variant": "base" if tau == 1 else f"tau{tau}",
                "config": {"tau": tau} if method.startswith("iwd+") else {}, "evaluations": ev}
    records = [rec("dc", i, None, [0.8, 0.82]) for i in (1, 10)]
    records += [rec("iwd+dc", i, t, [0.8 + 0.01 * t ** 0.1, 0.83]) for i in (1, 10) for t in (0.1, 1, 10)]
    made = suite_figures(records, str(tmp_path), ["ConvNet", "ResNet10"])
    assert sorted(os.path.basename(m) for m in made) == ["architectures.png", "tau_dc.png"]
    syn = SyntheticSet(digits.x_train[[int(ix[0]) for ix in digits.class_indices]].clone(), torch.arange(10))
    out = sorted_by_influence_figure(syn, torch.randn(len(digits.y_train)), digits, str(tmp_path / "f5.png"))
    for path in [*made, out]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_corrupted_cell_records_the_corruption_and_influence_auc(tmp_path):
    suite = _suite(tmp_path, name="robust", methods=["iwd+dc"], datasets=["digits@label-noise=0.2"], num_eval=1)
    runs = str(tmp_path / "runs")
    done, failures = run_suite(suite, runs, progress=False, echo=lambda *_: None)
    assert done == 1 and not failures
    (rec,) = read_records(runs, "robust")
    assert rec["corruption"]["kind"] == "label-noise" and rec["corruption_auc"] == rec["corruption_auc"]  # not NaN
    assert 0 < rec["corruption_scored_corrupted"] < rec["corruption_scored"]
    assert 0 < rec["corruption_auc_z_class_mean"] < 1 and rec["corruption_auc_z_class_std"] >= 0
    assert rec["corruption_weight_corrupted"] > 0 and rec["corruption_weight_clean"] > 0
    from benchmark.report.leaderboard import corruption_section
    assert any("ROC AUC" in line for line in corruption_section([rec]))


def test_every_committed_suite_builds_every_cell():
    """Every suite under benchmark/suites loads, and every cell's method (and the base a method runs) builds its
    config from the suite's preset, overrides and variant: a typo in a key fails here, not hours into a run."""
    from benchmark.core.registry import create_method
    from benchmark.grid.suites import list_suites, load_suite
    for name in list_suites():
        suite = load_suite(name)
        for cell in suite.cells():
            m = create_method(cell.method, suite.preset, suite.method_overrides(cell.method, cell.variant))
            if hasattr(m, "base_method"):
                m.base_method()
    study = load_suite("iwd-study")
    assert len(study.cells()) == 108 and len(load_suite("iwd-study-dm10").cells()) == 54


def test_a_suite_name_means_the_built_in_suite_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """`run.py status --suite quick` run inside a run root (which holds a `quick/` folder) reads the built-in suite;
    a suite file given by path is read, named after the file; a name that is neither is a clear error."""
    from benchmark.grid.suites import load_suite
    from benchmark.platform.errors import BenchmarkError
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").mkdir()
    assert load_suite("quick").name == "quick" and load_suite("quick").methods
    (tmp_path / "mine.yml").write_text(yaml.safe_dump({"methods": ["random"], "datasets": ["digits"], "ipc": [1]}))
    assert load_suite(str(tmp_path / "mine.yml")).name == "mine"
    with pytest.raises(BenchmarkError, match="unknown suite"):
        load_suite("no-such-suite")
