"""What a suite will cost before it runs: FLOPs counted, time calibrated on the device, peak memory estimated.

For every pending cell:
- FLOPs per iteration are COUNTED (torch's FLOP formulas) by running the method's real iteration code at the
  cell's exact settings on the `meta` device (shapes only: no data, no arithmetic, seconds for any dataset), over a
  dataset of the real one's shape. Multi-stage methods count one iteration per stage (`cost_iterations`).
- Peak memory of an iteration is tracked on the same meta run (`CostCounter`: every storage created inside, alive
  until freed: activations, the graphs kept for double backward), plus the dataset resident on the device.
- Evaluation FLOPs: networks x stages x epochs x training images x (forward+backward per image, counted) + the
  test split's forward.
- Time = FLOPs / the FLOP rate a short calibration run achieves ON THE DEVICE, per component: SGD training loops
  (many small steps: a lower rate) and everything else, each counted and timed apart. Per (method, dataset,
  variant, IPC), the cell's settings with the loop counts shrunk (one iteration, <= 2 matching/inner steps; batch
  sizes, network and image size unchanged) on random data of the dataset's shape (one rate per method measured at
  IPC 1 put IPC-10 cells at up to 3.8x their time: small batches run at a lower rate); per evaluation network and
  protocol batch, a few timed SGD steps. Data-dependent work (CG stopping early, DM's cheap iterations
  dominated by launch overhead) is where the estimate can miss; `plan --all` puts measured times of finished cells
  beside it. Peak memory misses what a library allocates inside one op: LAPACK's copy of the Gram matrix in IWD's
  Woodbury solve (one (nC x nC) float64 matrix: 13 MB at 128 instances x 10 classes).
"""
import contextlib
import dataclasses
import functools
import math
import tempfile
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmark.data.datasets import Dataset, dataset_spec
from benchmark.platform.errors import BenchmarkError
from benchmark.platform.device import meta_host_reads, synchronize
from benchmark.platform.observe import Observer
from .smoke import LOOP_CAPS, shrunk
from benchmark.core.method import IterativeMethod, Task
from benchmark.core.registry import create_method
from benchmark.data import corruptions
from benchmark.nn.networks import get_network
from evaluation import resolve_protocol


def shape_dataset(name, per_class=None, device="meta", gen=None):
    """A dataset with the shape of `name` (real class count, image size; the real split sizes, or per_class
    images per class) filled with random data (or nothing, on meta). Labels are balanced."""
    base = corruptions.parse(name)[0]
    spec = dataset_spec(base)
    n_train, n_test = spec.splits
    c = spec.num_classes
    n_train = per_class * c if per_class else n_train
    n_test = min(n_test, 2 * c) if per_class else n_test
    shape = (spec.channels, spec.size, spec.size)
    labels = lambda n: torch.arange(c).repeat_interleave(math.ceil(n / c))[:n]  # noqa: E731
    if device == "meta":
        x_tr, x_te = torch.zeros(1, *shape).expand(n_train, *shape), torch.zeros(1, *shape).expand(n_test, *shape)
    else:
        x_tr, x_te = torch.randn(n_train, *shape, generator=gen), torch.randn(n_test, *shape, generator=gen)
    ds = Dataset(base, x_tr, labels(n_train), x_te, labels(n_test), spec.mean, spec.std)
    # on meta (nothing is stored or loaded there) the real name: an artefact's cache key is the real run's, so the
    # planner knows what that run would load; random data elsewhere never shares a name with the real data
    ds.full_name = name if device == "meta" else f"{base}@shape-only"
    return ds.on(device)


class CostObserver(Observer):
    """The planner's observer (benchmark.platform.observe) while it counts on meta: a loop of n alike steps counts
    one and scales it (nested loops scale with it); a cached artefact (a feature network, an expert trajectory) is
    counted once, in the first cell that makes it: `planned` (path -> units planned: 1 for a network, epochs for a
    trajectory) is shared by the cells of one plan."""
    counting = True

    def __init__(self, counter, planned):
        self.counter, self.planned, self.scaled = counter, planned, dict.fromkeys(COMPONENTS, 0)

    def totals(self):
        return {k: self.counter.by_component[k] + self.scaled[k] for k in COMPONENTS}

    def repeat(self, n, run_one, component=None):
        before, outer = self.totals(), self.counter.component
        self.counter.component = component or outer
        try:
            run_one()
        finally:
            self.counter.component = outer
        after = self.totals()
        for k in COMPONENTS:
            self.scaled[k] += (n - 1) * (after[k] - before[k])

    def units_to_make(self, path, amount, stored, device="meta"):
        have = max(stored, self.planned.get(path, 0))
        if amount > have:
            self.planned[path] = amount
        return max(0, amount - have)


@contextlib.contextmanager
def _counting(planned=None):
    """FLOPs (in all, and inside training loops) and peak memory of what runs inside (on meta); out['observer'] is
    the observer a task must carry for its loops to be counted once and scaled."""
    out = {"flops": 0, "train_flops": 0, "peak_bytes": None}
    counter = CostCounter()
    observer = out["observer"] = CostObserver(counter, {} if planned is None else planned)
    with meta_host_reads(), counter:
        yield out
    t = observer.totals()
    out["flops"], out["train_flops"] = sum(t.values()), t["train"]
    out["peak_bytes"] = counter.peak


class TrainTimer(Observer):
    """The planner's observer while it calibrates: the seconds spent in training loops (section 'train')."""

    def __init__(self, device):
        self.device, self.seconds = device, 0.0

    @contextlib.contextmanager
    def section(self, component):
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            if component == "train":
                self.seconds += time.perf_counter() - t0


# FLOPs are counted, and time calibrated, per component: SGD training loops (benchmark.nn.training.train_steps: many
# small steps, a lower FLOP rate) and everything else (matching, influence: large batched passes)
COMPONENTS = ("train", "other")


# ops that only read metadata: no FLOPs, no storage (torch's FlopCounterMode skips the same set)
_METADATA_OPS = {getattr(torch.ops.aten, n).default for n in (
    "is_contiguous", "sym_is_contiguous", "is_non_overlapping_and_dense", "size", "sym_size", "stride", "sym_stride",
    "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim")}


class CostCounter(TorchDispatchMode):
    """FLOPs and peak memory of the ops run inside, in ONE dispatch mode.

    FLOPs: torch's FLOP formulas (`torch.utils.flop_counter.flop_registry`); an op without a formula is decomposed
    first, as FlopCounterMode does, so composite ops count their matmuls. We do not use FlopCounterMode itself: its
    module tracker hooks every module output's autograd node and keeps them reachable, so under double backward
    (IWD's weight-leaf pass) whole graphs stayed alive and the peak grew ~3.7 GiB per DC outer step on CIFAR-10
    shapes (real RSS stays flat).
    Memory: peak bytes of the tensor storages alive at once among those created inside (what a caching allocator
    must hold, before fragmentation): each op's outputs count once per storage and are released when the storage is
    freed (weakref). Tensors made before entering (model parameters, the dataset) are not counted."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        self.registry = flop_registry
        self.by_component, self.component = dict.fromkeys(COMPONENTS, 0), "other"
        self.live, self.current, self.peak = {}, 0, 0

    @property
    def flops(self):
        return sum(self.by_component.values())

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_OPS or func is torch.ops.prim.layout.default:
            return NotImplemented
        packet = func._overloadpacket
        if packet not in self.registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in self.registry:
            self.by_component[self.component] += self.registry[packet](*args, **kwargs, out_val=out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _distill_cost(method, task, planned=None):
    """(FLOPs of the whole distillation, iterations, peak bytes, the set, FLOPs inside training loops). The method's
    own loop counts each distinct-cost iteration once and scales it (through the task's observer), so does a base
    method it runs."""
    with _counting(planned) as c:
        synset = method.distill(dataclasses.replace(task, observer=c["observer"]))
    iterations = method.for_task(task).num_iterations(task) if isinstance(method, IterativeMethod) else 1
    return c["flops"], iterations, c["peak_bytes"], synset, c["train_flops"]


@functools.lru_cache(maxsize=None)
def _eval_flops_per_image(dataset_name, network, batch):
    """(forward+backward FLOPs per training image, forward FLOPs per test image) of the evaluation network."""
    import torch.nn.functional as F

    dataset = shape_dataset(dataset_name, 1)
    net = get_network(network, dataset.channels, dataset.num_classes, dataset.image_size, seed=0).to("meta")
    x = torch.zeros(batch, dataset.channels, *dataset.image_size, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    with _counting() as c:
        F.cross_entropy(net(x), y).backward()
    with _counting() as f, torch.no_grad():
        net(x)
    return c["flops"] / batch, f["flops"] / batch


def _method_for(suite, cell, overrides=None):
    return create_method(cell.method, suite.preset, suite.method_overrides(cell.method, cell.variant) +
                         [f"{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in (overrides or {}).items()])


def count_cell(suite, cell, cache_dir=None, planned=None):
    """Counted cost of one cell (no device time): distillation FLOPs, evaluation FLOPs, peak memory. `cache_dir`:
    the run's artefact cache (what is stored there is not counted); `planned`: what earlier cells of the plan make
    (CostObserver)."""
    ds = shape_dataset(cell.dataset)
    method = _method_for(suite, cell)
    task = Task(ds, cell.ipc, cell.seed, "meta", cache_dir=cache_dir)
    flops, iters, peak, synset, train_flops = _distill_cost(method, task, planned)
    with meta_host_reads():
        stages = [len(y) for _, y in synset.stage_data(ds)]
    proto = resolve_protocol(suite.protocol, synset)
    evals = []
    for net in suite.eval_networks:
        train_img, test_img = _eval_flops_per_image(cell.dataset, net, proto.batch)
        per_net = sum(proto.epochs * n * train_img for n in stages) + len(ds.y_test) * test_img
        evals.append((net, proto.batch, per_net * suite.num_eval))
    data_bytes = ds.x_train.numel() * 4 + ds.x_test.numel() * 4
    return {"key": cell.key, "method": cell.method, "dataset": cell.dataset, "ipc": cell.ipc,
            "iterations": iters, "distill_flops": flops, "train_flops": train_flops,
            "flops_per_iteration": flops / max(iters, 1),
            "eval": evals, "eval_flops": sum(e[2] for e in evals), "train_images": stages[-1],
            "peak_bytes": None if peak is None else peak + data_bytes, "data_bytes": data_bytes}


def _time(fn, device, repeats, with_index=False):
    """The fastest of `repeats` runs of fn (and which run it was)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    best = min(range(repeats), key=times.__getitem__)
    return (times[best], best) if with_index else times[best]


def calibrate_method(suite, cell, device, repeats):
    """FLOP rates of the cell's method on `device`, per component (COMPONENTS): a shrunk run (LOOP_CAPS; batch
    sizes, network and image size unchanged) timed on random data of the dataset's shape, its time inside training
    loops measured apart, and its FLOPs counted on meta the same way. Returns {'train': rate or None (no training in
    the probe), 'other': rate, 'probe_s': seconds}."""
    method = _method_for(suite, cell, shrunk(_method_for(suite, cell).config, LOOP_CAPS))
    per_class = max(300, 8 * cell.ipc)
    probe = shape_dataset(cell.dataset, per_class, device, torch.Generator().manual_seed(0))
    timers = []  # one per timed run: its seconds inside training loops

    def run():
        timers.append(TrainTimer(device))
        method.distill(Task(probe, cell.ipc, cell.seed, device, cache_dir=tempfile.mkdtemp(dir=cache),
                            observer=timers[-1]))
    with tempfile.TemporaryDirectory() as cache:  # a method's reusable artefacts (MTT's experts) are timed
        # being made, as they are counted, and never land in the user's cache
        if getattr(method.config, "real_pass", "eager") == "compile":
            run()  # compiling is once per process and shape, not per iteration: not in the rate
            timers.clear()
        seconds, best = _time(run, device, repeats, with_index=True)
        train_s = timers[best].seconds
        # counted the same way, against an empty cache (the timed run made every artefact)
        flops, _, _, _, train_flops = _distill_cost(method, Task(
            shape_dataset(cell.dataset, per_class), cell.ipc, cell.seed, "meta", cache_dir=tempfile.mkdtemp(dir=cache)))
    other_s = max(seconds - train_s, 1e-9)
    return {"train": train_flops / train_s if train_flops > 0 and train_s > 0 else None,
            "other": (flops - train_flops) / other_s if flops > train_flops else 0.0, "probe_s": seconds}


def estimate_seconds(row, rate):
    """Distillation seconds of a counted cell from its method's calibrated rates (per component)."""
    other = row["distill_flops"] - row["train_flops"]
    if row["distill_flops"] <= 0:
        return rate["probe_s"]  # nothing counted (random, full): the probe's own time stands for the cell's
    if rate["train"] is None:  # the probe trained nothing: the cell's training at the other work's rate
        return row["distill_flops"] / max(rate["other"], 1e-9)
    return row["train_flops"] / rate["train"] + (other / rate["other"] if other > 0 else 0.0)


def calibrate_eval(dataset_name, network, batch, device, steps=5):
    """FLOP rate of evaluation training (SGD steps of the evaluation network at the protocol's batch) on device."""
    import torch.nn.functional as F

    ds = shape_dataset(dataset_name, 1, "meta")
    net = get_network(network, ds.channels, ds.num_classes, ds.image_size, seed=0).to(device)
    x = torch.randn(batch, ds.channels, *ds.image_size, device=device)
    y = torch.randint(ds.num_classes, (batch,)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    run(2)
    seconds = _time(lambda: run(steps), device, 1)
    return _eval_flops_per_image(dataset_name, network, batch)[0] * batch * steps / seconds


def plan_suite(suite, cells, device="cpu", calibrate=True, repeats=None, progress=None, cache_dir=None):
    """Counted and estimated cost of `cells` of `suite` on `device` (`cache_dir`: the run root's cache, as
    runner.RunPaths names it). Returns a list of per-cell dicts (with 'distill_s', 'eval_s' when calibrated) and
    the calibration rates."""
    say = progress or (lambda *_: None)
    repeats = repeats or (2 if str(device).startswith("cuda") else 1)
    planned = {}  # artefacts the cells counted so far make (CostObserver)
    rows, counted = [], {}
    for cell in cells:  # the seed changes no shape: each (method, dataset, IPC, variant) is counted once ...
        shape = (cell.method, cell.dataset, cell.ipc, cell.variant)
        row = counted.get(shape)
        if row is None:
            say(f"counting {cell.key}")
            before = dict(planned)
            row = count_cell(suite, cell, cache_dir, planned)
            if planned == before:  # ... unless it made a cached artefact: the next cell may load it
                counted[shape] = row
        rows.append({**row, "key": cell.key})
    rates = {"method": {}, "eval": {}}
    if calibrate:
        probes = {}  # per IPC: batches grow with it, and small batches run at a lower FLOP rate (launch-bound)
        for cell in cells:
            probes.setdefault((cell.method, cell.dataset, cell.variant, cell.ipc), cell)
        failed = {}
        for key, cell in probes.items():
            say(f"calibrating {cell.method} on {cell.dataset} (IPC {cell.ipc}, {device})")
            try:
                rates["method"][key] = calibrate_method(suite, cell, device, repeats)
            except BenchmarkError as e:  # a method's own guard tripped on the probe's random data
                say(f"  that probe failed on random data ({e}); its cells take the rate of the nearest IPC")
                failed[key] = str(e)
        for key, error in failed.items():
            near = sorted((abs(k[3] - key[3]), k) for k in rates["method"] if k[:3] == key[:3] and k not in failed)
            if not near:
                raise BenchmarkError(f"plan: every calibration probe of {key[0]} on {key[1]} failed on random data "
                                     f"({error}); use --no-calibrate for its FLOPs and memory")
            rates["method"][key] = {**rates["method"][near[0][1]], "borrowed_from_ipc": near[0][1][3]}
        for row, cell in zip(rows, cells):
            rate = rates["method"][(cell.method, cell.dataset, cell.variant, cell.ipc)]
            row["distill_s"] = estimate_seconds(row, rate)
            if "borrowed_from_ipc" in rate:
                row["rate_from_ipc"] = rate["borrowed_from_ipc"]
            row["eval_s"] = 0.0
            for net, batch, flops in row["eval"]:
                k = (cell.dataset, net, batch)
                if k not in rates["eval"]:
                    say(f"calibrating evaluation of {net} at batch {batch} on {cell.dataset}")
                    rates["eval"][k] = calibrate_eval(cell.dataset, net, batch, device)
                row["eval_s"] += flops / rates["eval"][k]
    return rows, rates


def _fmt_time(s):
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fmt_bytes(b):
    return "-" if b is None else (f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.0f} MiB")


def format_plan(suite, rows, device, measured=None):
    """A readable report: per cell, per method, the suite's total, the largest cell. measured: key -> seconds of
    finished cells (distill + eval), shown beside the estimate."""
    measured = measured or {}
    lines = [f"plan for suite {suite.name} on {device}: {len(rows)} cell(s)", ""]
    head = f"{'cell':<52} {'iters':>6} {'GFLOP/iter':>11} {'PFLOP':>8} {'distill':>9} {'eval':>9} {'peak mem':>9}"
    if measured:
        head += f" {'measured':>9} {'est/meas':>8}"
    lines.append(head)
    for r in rows:
        line = (f"{r['key']:<52} {r['iterations']:>6} {r['flops_per_iteration'] / 1e9:>11.2f} "
                f"{(r['distill_flops'] + r['eval_flops']) / 1e15:>8.4f} {_fmt_time(r.get('distill_s')):>9} "
                f"{_fmt_time(r.get('eval_s')):>9} {_fmt_bytes(r['peak_bytes']):>9}")
        if measured:
            m = measured.get(r["key"])
            est = r.get("distill_s", 0) + r.get("eval_s", 0)
            line += f" {_fmt_time(m):>9} " + (f"{est / m:>8.2f}" if m else f"{'-':>8}")  # '-': not finished
        lines.append(line)
    lines.append("")
    per = {}
    for r in rows:
        p = per.setdefault(r["method"], [0, 0.0, 0])
        p[0] += r["distill_flops"] + r["eval_flops"]
        p[1] += r.get("distill_s", 0) + r.get("eval_s", 0)
        p[2] = max(p[2], r["peak_bytes"] or 0)
    total_s = sum(v[1] for v in per.values())
    lines.append(f"{'method':<30} {'PFLOP':>10} {'time':>10} {'share':>6} {'max peak mem':>13}")
    for m, (f, s, peak) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{m:<30} {f / 1e15:>10.3f} {_fmt_time(s):>10} {100 * s / max(total_s, 1e-9):>5.0f}% "
                     f"{_fmt_bytes(peak):>13}")
    total_f = sum(v[0] for v in per.values())
    lines.append(f"{'total':<30} {total_f / 1e15:>10.3f} {_fmt_time(total_s):>10}")
    if rows:
        big = max(rows, key=lambda r: r.get("distill_s", 0) + r.get("eval_s", 0) or r["distill_flops"])
        lines.append(f"largest cell: {big['key']} ({_fmt_time(big.get('distill_s', 0) + big.get('eval_s', 0))}); "
                     f"highest peak memory: {_fmt_bytes(max((r['peak_bytes'] or 0) for r in rows))}")
    borrowed = [f"{r['key']} (IPC {r['rate_from_ipc']}'s)" for r in rows if "rate_from_ipc" in r]
    if borrowed:
        lines.append("timed at another IPC's rate (their calibration probe failed on random data): "
                     + ", ".join(borrowed))
    return "\n".join(lines)
