"""Measurement primitives of `run.py bench` (benchmark.tools.perf): its settings, a median timer that synchronizes
the device, the process's memory, the data the workloads use, and the seconds per iteration of a method."""
import os
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from benchmark.platform.device import synchronize as _sync
from benchmark.platform.errors import BenchmarkError
from benchmark.core.method import Task
from benchmark.core.registry import create_method
from benchmark.data.datasets import Dataset, get_dataset


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
