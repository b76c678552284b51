"""The real-scale path: every method on a second device (meta stands in for CUDA), no host reads inside matching
steps, the data root over packaged copies, --download, CUDA checks and determinism settings, GPU scheduling for the
process and Ray executors (fake GPUs, CPU tensors), and the allocator preload."""
import gzip
import os
import struct

import pytest
import torch
import yaml

from benchmark.platform import device as devices
from benchmark.platform.errors import BenchmarkError
from benchmark.core.registry import list_methods, register_method
from benchmark.tools.smoke import run_on_device


# ------------------------------------------------------------------------------------------- the device guard
@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_with_its_data_on_another_device(method, digits):
    """Distil one tiny iteration and evaluate one epoch with the task on `meta` while the dataset was loaded on
    the CPU: any op mixing the two raises, exactly as CPU vs CUDA does."""
    synset = run_on_device(method, digits, "meta")
    assert len(synset.labels) > 0


def test_the_guard_catches_a_plugin_method_that_mixes_devices(digits):
    """A plugin method with a device bug (a tensor built on the CPU, mixed with the task's data) fails the guard."""
    from benchmark.core import registry
    from benchmark.core.method import Method
    from benchmark.core.synthetic import SyntheticSet

    @register_method("test-device-leak")
    class Leaky(Method):
        def distill(self, task):
            x = task.dataset.x_train[:10] + torch.zeros(10, *task.dataset.x_train.shape[1:])  # CPU zeros: the bug
            return SyntheticSet(x, torch.arange(10), "normalized", {}, self.metadata(task))
    try:
        with pytest.raises(RuntimeError, match="device"):
            run_on_device("test-device-leak", digits, "meta")
        run_on_device("test-device-leak", digits, "cpu")  # the same method is fine where nothing moves
    finally:
        registry._METHODS.pop("test-device-leak")


@pytest.mark.parametrize("method,loop_key", [("dc", "outer_loop"), ("idc", "inner_loop"), ("dm", "iterations"),
                                             ("iwd+dc", "outer_loop"), ("pdd", "inner_loop")])
def test_no_host_reads_inside_matching_steps(method, loop_key, digits):
    """Host reads (item, float, bool, .cpu()) of device tensors per iteration must not grow with the number of
    matching steps: scalars are read once per iteration. Counted on meta, where every read goes through the shim.
    DM makes one matching step per iteration: its reads per iteration must be no more than DC's at a fixed number
    of steps (the loop's own reads), so a read per class or per step shows."""
    from benchmark.core.method import Task
    from benchmark.core.registry import create_method, get_method
    from benchmark.tools.smoke import tiny_config_overrides

    def reads_at(name, **over):
        with devices.meta_host_reads() as reads:
            create_method(name, "quick", {**tiny_config_overrides(get_method(name)), **over}).distill(
                Task(digits, 2, 0, "meta"))
        return reads["n"]
    # one step or iteration more is enough: a read per step (or per network update between steps) shows as a
    # difference, and meta runs ops through Python (~25x slower than the CPU), so each extra step costs seconds
    if loop_key == "iterations":
        per_iteration = reads_at(method, iterations=2) - reads_at(method, iterations=1)
        loop_own = reads_at("dc", iterations=2, outer_loop=2) - reads_at("dc", iterations=1, outer_loop=2)
        assert 0 < per_iteration <= loop_own, (per_iteration, loop_own)
    else:
        counts = [reads_at(method, **{loop_key: steps, "iterations": 1}) for steps in (1, 2)]
        assert counts[0] == counts[1], counts


# ------------------------------------------------------------------------------------------- data and download
def _write_idx(path, array):
    array = array.astype("uint8")
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_data_root_wins_over_the_packaged_copy(tmp_path):
    """A user's own (here: re-labelled, 100-image) Fashion-MNIST under --data-root is what loads, whether or not
    Debian's copy is installed (CI installs it; the code used to search Debian's folder first)."""
    import numpy as np

    from benchmark.data.datasets import get_dataset
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.arange(100) % 10
    _write_idx(str(raw / "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (100, 28, 28)))
    _write_idx(str(raw / "train-labels-idx1-ubyte.gz"), labels[::-1].copy())  # changed labels
    _write_idx(str(raw / "t10k-images-idx3-ubyte.gz"), rng.integers(0, 256, (20, 28, 28)))
    _write_idx(str(raw / "t10k-labels-idx1-ubyte.gz"), np.arange(20) % 10)
    ds = get_dataset("fashion-mnist", str(tmp_path))
    assert len(ds.y_train) == 100 and ds.y_train.tolist() == labels[::-1].tolist()
    assert ds.source == str(raw)


def test_run_download_reaches_the_loader_once_before_the_cells(tmp_path, monkeypatch):
    from benchmark.grid import runner
    from benchmark.grid.runner import run_suite
    from benchmark.grid.suites import load_suite
    seen = []
    real = runner.get_dataset

    def spy(name, data_root=None, download=False):
        seen.append(download)
        return real(name, data_root, download)
    monkeypatch.setattr(runner, "get_dataset", spy)
    path = tmp_path / "dl.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "methods": ["random"], "ipc": [1, 2],
                                    "protocol": "dc-quick", "num_eval": 1, "eval_networks": ["ConvNetW32"]}))
    done, failures = run_suite(load_suite(str(path)), str(tmp_path / "runs"), progress=False,
                               echo=lambda *_: None, download=True)
    assert done == 2 and not failures and seen and all(seen)


# ------------------------------------------------------------------------------------------- CUDA facts
def test_cuda_asked_for_and_absent_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchmarkError, match="no GPU"):
        devices.resolve("cuda")
    with pytest.raises(BenchmarkError, match="unknown device"):
        devices.resolve("gpu0")
    assert devices.resolve("cpu") == "cpu"


def test_cuda_determinism_flags_are_set_and_recorded(monkeypatch):
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        settings = devices.configure("cuda:0")
        assert settings["cudnn_deterministic"] and not settings["cudnn_benchmark"]
        assert settings["deterministic_algorithms"] and settings["cublas_workspace_config"] == ":4096:8"
        assert not settings["tf32_matmul"] and not settings["tf32_cudnn"]
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4:]
    assert devices.configure("cpu") == {}


def test_provenance_names_the_gpu_that_ran_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: f"GPU number {torch.device(d).index}")
    assert devices.device_name("cuda:1") == "GPU number 1"
    from benchmark.core.synthetic import provenance
    assert provenance("cuda:1")["hardware"].endswith("GPU number 1")


# ------------------------------------------------------------------------------------------- scheduling
def test_process_executor_pins_each_worker_to_one_gpu():
    from benchmark.grid.runner import gpu_slots
    assert gpu_slots("cpu") == []
    assert gpu_slots("cuda", visible="", count=3) == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(3)]
    assert gpu_slots("cuda", visible="4,6", count=2) == [{"CUDA_VISIBLE_DEVICES": "4"},
                                                         {"CUDA_VISIBLE_DEVICES": "6"}]
    assert gpu_slots("cuda:1", visible="4,6", count=2) == [{"CUDA_VISIBLE_DEVICES": "6"}]
    assert gpu_slots("cuda", workers=1, visible="", count=2) == [{"CUDA_VISIBLE_DEVICES": "0"}]
    # more workers than GPUs: round-robin, so each GPU runs workers // GPUs cells at a time
    assert [s["CUDA_VISIBLE_DEVICES"] for s in gpu_slots("cuda", workers=5, visible="4,6", count=2)] == \
        ["4", "6", "4", "6", "4"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in gpu_slots("cuda:1", workers=3, visible="4,6", count=2)] == \
        ["6", "6", "6"]


def _tiny_suite(tmp_path, name, ipcs):
    from benchmark.grid.suites import load_suite
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "methods": ["random"], "ipc": ipcs,
                                    "protocol": "dc-quick", "num_eval": 1, "eval_networks": ["ConvNetW32"]}))
    return load_suite(str(path))


def _intervals_per_gpu(records):
    import datetime
    per = {}
    for r in records:
        t = lambda s: datetime.datetime.fromisoformat(s).timestamp()  # noqa: E731
        per.setdefault(r["cuda_visible_devices"], []).append((t(r["started"]), t(r["date"])))
    return per


def test_process_workers_are_pinned_one_per_gpu_slot(tmp_path):
    """Spawned workers inherit their slot's CUDA_VISIBLE_DEVICES (fake ids, CPU tensors); a slot runs one cell at
    a time."""
    from benchmark.grid.runner import RunOptions, _run_processes, read_records
    suite = _tiny_suite(tmp_path, "pinned", [1, 2, 3, 4])
    runs = str(tmp_path / "runs")
    results = []
    _run_processes(suite, suite.cells(), runs, RunOptions(log=False, threads=1),
                   [{"CUDA_VISIBLE_DEVICES": "7"}, {"CUDA_VISIBLE_DEVICES": "9"}],
                   lambda cell, status, payload: results.append(status))
    records = read_records(runs, "pinned")
    assert results == ["ok"] * 4 and len(records) == 4
    assert {r["cuda_visible_devices"] for r in records} <= {"7", "9"}


@pytest.mark.xdist_group("ray")  # one local Ray cluster at a time: two on one machine can pick the same ports
def test_ray_cells_request_one_gpu_each_on_a_fake_gpu_cluster(tmp_path, monkeypatch):
    """A real local Ray cluster with two fake GPUs: every cell asks for one, so Ray pins one per task
    (CUDA_VISIBLE_DEVICES in the record) and never runs two cells on one GPU at once."""
    ray = pytest.importorskip("ray")
    import tempfile

    from benchmark.grid.runner import read_records, run_suite
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        suite = _tiny_suite(tmp_path, "gpus", [1, 2, 3, 4])
        runs = str(tmp_path / "runs")
        done, failures = run_suite(suite, runs, executor="ray", progress=False, echo=lambda *_: None,
                                   gpus_per_cell=1)
        assert done == 4 and not failures
        per_gpu = _intervals_per_gpu(read_records(runs, "gpus"))
        assert set(per_gpu) <= {"0", "1"} and sum(len(v) for v in per_gpu.values()) == 4
        with pytest.raises(BenchmarkError, match="no GPU resource"):
            monkeypatch.setattr(devices, "resolve", lambda d: d)  # past the local check, to the cluster's
            monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
            run_suite(_tiny_suite(tmp_path, "nogpu", [1]), runs, executor="ray", device="cuda", progress=False,
                      echo=lambda *_: None)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------- the allocator
def test_run_py_preloads_tcmalloc_where_installed_and_results_are_bit_for_bit_glibcs(tmp_path):
    """run.py re-executes itself with tcmalloc preloaded (the faster allocator; benchmark.platform.allocator) where the
    library is installed; the synthetic set is bit for bit the one a glibc process makes, and the record says
    which allocator ran. IWD_NO_TCMALLOC=1 keeps glibc."""
    import subprocess
    import sys

    from benchmark.platform import allocator
    if allocator.tcmalloc_path() is None:
        pytest.skip("tcmalloc is not installed here (Debian: libtcmalloc-minimal4)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sets = {}
    for name, extra in (("auto", {}), ("glibc", {"IWD_NO_TCMALLOC": "1"})):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IWD_TCMALLOC_REEXEC")}
        out = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, os.path.join(root, "run.py"), "--threads", "1", "distill", "-m", "idc",
                            "-d", "digits", "--ipc", "1", "--preset", "quick", "--set", "iterations=2", "-o",
                            str(out)], env={**env, **extra}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        sets[name] = torch.load(out, weights_only=False)
    assert sets["auto"]["metadata"]["allocator"] == "tcmalloc (LD_PRELOAD)"
    assert sets["glibc"]["metadata"]["allocator"].startswith("glibc tuned")
    assert torch.equal(sets["auto"]["images"], sets["glibc"]["images"])
