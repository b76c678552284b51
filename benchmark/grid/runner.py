"""The grid runner: cells -> records, resumable, on one process, a local process pool, or a Ray cluster.

Each finished cell writes ONE JSON record atomically (temp file + rename) under <run_root>/<suite>/records/, so a
crash never leaves half a record and two workers never clobber each other (one file per cell, unique temp names).
Rerunning a suite skips cells that have a record and resumes interrupted ones from their checkpoints
(<run_root>/<suite>/checkpoints/). A failing cell writes <key>.failed.json with its error; the others go on.
"""
import contextlib
import dataclasses
import json
import os
import resource
import time
import traceback

from benchmark.platform.errors import BenchmarkError
from benchmark.platform.files import check_writable, read_json, utc_now, write_json_atomic
from benchmark.platform.locks import file_lock, holder_alive
from .suites import Cell, Suite
from benchmark.core.method import Task
from benchmark.core.registry import LOADED_PLUGINS, create_method, get_method, load_plugin
from benchmark.core.synthetic import SyntheticSet, provenance, safe_load
from benchmark.data.datasets import get_dataset
from benchmark.platform import allocator, device as devices
from benchmark.platform.device import device_record
from benchmark.platform.logging import image_grid, make_writer, progress_bar
from evaluation import evaluate
from evaluation.stats import roc_auc

CHECKPOINT_MINUTES = 10  # a cell also checkpoints every 10 minutes of wall time: an abrupt stop loses at most that


@dataclasses.dataclass
class RunOptions:
    """How a suite's cells run (the same for every cell): where the data is, whether torchvision may download it,
    the device, TensorBoard logging, torch threads per cell."""
    data_root: str = None
    download: bool = False
    device: str = "cpu"
    log: bool = True
    threads: int = None


class RunPaths:
    def __init__(self, run_root, suite_name):
        self.root = os.path.join(run_root, suite_name)
        self.cache = os.path.join(run_root, "cache")  # shared by every suite of the run root (MTT's expert buffers)
        self.records = os.path.join(self.root, "records")
        self.checkpoints = os.path.join(self.root, "checkpoints")
        self.sets = os.path.join(self.root, "sets")
        self.tensorboard = os.path.join(self.root, "tensorboard")

    def ensure(self):
        for d in (self.records, self.checkpoints, self.sets, self.tensorboard):
            check_writable(d, "--run-root")

    def record(self, cell):
        return os.path.join(self.records, cell.key + ".json")

    def failed(self, cell):
        return os.path.join(self.records, cell.key + ".failed.json")

    def checkpoint(self, cell):
        return os.path.join(self.checkpoints, cell.key + ".pt")

    def synthetic_set(self, cell):
        return os.path.join(self.sets, cell.key + ".pt")

    def eval_progress(self, cell):
        return os.path.join(self.checkpoints, cell.key + ".eval.json")

    def lock(self, cell):
        return os.path.join(self.checkpoints, cell.key + ".lock")


def read_records(run_root, suite_name):
    paths = RunPaths(run_root, suite_name)
    out = []
    if not os.path.isdir(paths.records):
        return out
    for f in sorted(os.listdir(paths.records)):
        if f.endswith(".json") and not f.endswith(".failed.json"):
            record = read_json(os.path.join(paths.records, f))
            if record is not None:  # a foreign or damaged file is not a record; the cell will simply rerun
                out.append(record)
    return out


def run_cell(suite: Suite, cell: Cell, run_root, options: RunOptions = None, **option_fields):
    """Distil and evaluate one cell; returns the record (also written to disk). options: RunOptions, or its fields
    as keywords."""
    return _run_cell(suite, cell, run_root, options, **option_fields)[1]


def _run_cell(suite, cell, run_root, options=None, **option_fields):
    """(ran, record): ran is False when another run of the suite finished the cell since this one listed it."""
    import torch


    opts = dataclasses.replace(options or RunOptions(), **option_fields)
    allocator.tune()  # workers (Ray, spawned processes) do not go through run.py
    for module in suite.plugins:  # nor through --plugin
        load_plugin(module)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.device = devices.resolve(opts.device)
    devices.configure(opts.device)
    if devices.is_cuda(opts.device):
        torch.cuda.reset_peak_memory_stats(torch.device(opts.device))
    paths = RunPaths(run_root, suite.name)
    paths.ensure()  # a Ray worker on another machine may not have the run root yet
    with cell_lock(paths, cell):
        finished = read_json(paths.record(cell))
        if finished is not None:
            return False, finished  # another run of the suite finished it since this one listed its pending cells
        return True, _run_cell_locked(suite, cell, paths, opts)


def _run_cell_locked(suite, cell, paths, opts):
    started = utc_now()
    ds, method, task = _setup_cell(suite, cell, paths, opts)
    synset = distill_cell(method, task, paths, cell)
    evals = evaluate_cell(suite, cell, synset, ds, paths, opts.device)
    record = make_record(suite, cell, synset, ds, evals, started, opts.device)
    if task.writer is not None:
        log_cell(task.writer, suite, cell, synset, ds, record)
    write_json_atomic(paths.record(cell), record)
    for done in (paths.failed(cell), paths.eval_progress(cell)):
        if os.path.exists(done):
            os.remove(done)
    return record


def _setup_cell(suite, cell, paths, opts):
    """The cell's dataset, method (config resolved for the task: what runs and what the record holds) and task."""
    ds = get_dataset(cell.dataset, opts.data_root or suite.data_root or None, opts.download)
    method = create_method(cell.method, suite.preset, suite.method_overrides(cell.method, cell.variant))
    writer = make_writer(paths.tensorboard if opts.log else None, cell.key)
    every = max(1, getattr(method.config, "iterations", 10) // 10)
    task = Task(ds, cell.ipc, cell.seed, opts.device, writer, paths.checkpoint(cell), checkpoint_every=every,
                checkpoint_minutes=CHECKPOINT_MINUTES, log_images_every=every if writer is not None else 0,
                cache_dir=paths.cache)
    return ds, method, task


def distill_cell(method, task, paths, cell):
    """The cell's synthetic set: the one saved by an earlier run that stopped after distilling (if made with this
    resolved config: a stop during evaluation must not cost the distillation), else distilled now (resuming from
    the checkpoint) and saved."""
    set_path = paths.synthetic_set(cell)
    synset = _distilled_before(set_path, method.for_task(task))
    if synset is not None:
        return synset
    if os.path.exists(paths.eval_progress(cell)):
        os.remove(paths.eval_progress(cell))  # evaluations of another set
    t0 = time.perf_counter()
    synset = method.distill(task)
    # iterative methods report their time across resumed segments; others are timed here
    synset.metadata.setdefault("distill_seconds", time.perf_counter() - t0)
    synset.save(set_path)
    return synset


def evaluate_cell(suite, cell, synset, ds, paths, device):
    """{network: evaluation} under the suite's protocol, each network resuming from the models already trained
    (saved after every model; networks trained under another protocol are not reused)."""
    progress_path = paths.eval_progress(cell)
    progress = read_json(progress_path) or {}
    evals = {}
    for net in suite.eval_networks:
        key = f"{net} | {suite.protocol}"

        def save_progress(state, key=key):
            progress[key] = state
            write_json_atomic(progress_path, progress)
        evals[net] = evaluate(synset, ds, suite.protocol, net, suite.num_eval, seed=cell.seed, device=device,
                              resume=progress.get(key), on_model=save_progress)
    return evals


def make_record(suite, cell, synset, ds, evals, started, device):
    """The cell's JSON record: what ran (the resolved config), the accuracies, times and provenance."""
    main = evals[suite.eval_networks[0]]
    record = {
        "key": cell.key, "suite": suite.name, "method": cell.method, "dataset": cell.dataset, "ipc": cell.ipc,
        "seed": cell.seed, "variant": cell.variant, "preset": suite.preset, "reduced": suite.reduced,
        "config": synset.metadata.get("config"), "accuracy": main, "evaluations": evals,
        "distill_seconds": synset.metadata.get("distill_seconds", 0.0),
        "distill_segments": synset.metadata.get("distill_segments"),
        "eval_seconds": sum(e["seconds"] for e in evals.values()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "started": started, "date": utc_now(), **provenance(device), **device_record(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "data_source": getattr(ds, "source", None),
        "solver_summary": synset.metadata.get("solver_summary"),  # IWD's implicit-term solves: truncated or not
        "traits": get_method(cell.method).traits(),  # what the leaderboard reads (ranked, uses_ipc)
    }
    if ds.corruption:
        record.update(corruption_stats(ds, synset))
    return record


def log_cell(writer, suite, cell, synset, ds, record):
    """The cell's TensorBoard summary: accuracy, time, the final images, and its hyperparameters."""
    from torch.utils.tensorboard.summary import hparams

    main = record["accuracy"]
    writer.add_scalar("eval/accuracy_mean", main["mean"], 0)
    writer.add_scalar("eval/accuracy_std", main["std"], 0)
    writer.add_scalar("time/distill_s", record["distill_seconds"], 0)
    x, _ = synset.training_data(ds)
    if len(x) <= 1000:
        writer.add_image("synthetic/final", image_grid(ds.denormalize(x), nrow=min(cell.ipc, 50)), 0)
    hp = {"method": cell.method, "dataset": cell.dataset, "ipc": cell.ipc, "seed": cell.seed,
          "variant": cell.variant or "-", "preset": suite.preset}
    for s in hparams(hp, {"hparam/accuracy": main["mean"]}):
        writer.file_writer.add_summary(s)
    writer.add_scalar("hparam/accuracy", main["mean"], 0)
    writer.close()


class CellBusy(BenchmarkError):
    """Another live process runs this cell."""


def cell_lock(paths, cell):
    """One process per cell: two runs of a suite (started twice, or from two machines on a shared disk) must never
    write the same checkpoint. A cell held by a live process raises CellBusy naming the holder: the runner skips
    it (not a failure: the holder finishes it) and the other cells go on (benchmark.platform.locks)."""
    return file_lock(paths.lock(cell), f"cell {cell.key}", "let that run finish it", busy_error=CellBusy)


def suite_status(suite, run_root):
    """One row per cell of the suite: done (accuracy), running (the lock's live holder, the checkpoint's
    iteration), interrupted (resumes from its checkpoint or evaluations on the next run), failed, or pending."""
    import types

    paths = RunPaths(run_root, suite.name)
    rows = []
    for cell in suite.cells():
        ck_path = paths.checkpoint(cell)
        record, failed = read_json(paths.record(cell)), read_json(paths.failed(cell))
        holder = read_json(paths.lock(cell))
        running = holder is not None and holder_alive(holder)
        progress = []
        if record is None and os.path.exists(ck_path):
            try:
                ck = safe_load(ck_path)
                method = create_method(cell.method, suite.preset, suite.method_overrides(cell.method, cell.variant))
                total = method.num_iterations(types.SimpleNamespace(ipc=cell.ipc)) \
                    if hasattr(method, "num_iterations") else "?"
                saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(ck_path)))
                done_it, elapsed = ck["next_iteration"], float(ck.get("elapsed_s", 0.0))
                line = f"checkpoint at iteration {done_it}/{total} ({saved})"
                if done_it > 0 and elapsed > 0:  # the pace so far, over every resumed segment
                    pace = elapsed / done_it
                    line += f", {pace / 60:.1f} min per iteration"
                    if isinstance(total, int) and total > done_it:
                        line += f", about {(total - done_it) * pace / 60:.0f} min of distillation left"
                progress.append(line)
            except (BenchmarkError, KeyError, TypeError) as e:
                progress.append(f"checkpoint unreadable ({e})")
        evals = read_json(paths.eval_progress(cell)) or {}
        distilled = os.path.exists(paths.synthetic_set(cell)) and not os.path.exists(ck_path)
        if record is None and (evals or distilled):
            trained = sum(len(e.get("accuracies", [])) for e in evals.values())
            progress.append(f"distilled; {trained} of {len(suite.eval_networks) * suite.num_eval} evaluation "
                            f"network(s) trained")
        if record is not None:
            a = record["accuracy"]
            state, detail = "done", (f"{100 * a['mean']:.2f} +- {100 * a['std']:.2f} (distill "
                                     f"{record['distill_seconds'] / 60:.1f} min, eval {record['eval_seconds'] / 60:.1f} min)")
        elif running:
            state = "running"
            detail = "; ".join([f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}",
                                *progress])
        elif progress:
            state, detail = "interrupted", "; ".join(progress) + ": resumes on the next run"
        elif failed is not None:
            state, detail = "failed", failed.get("error", "").splitlines()[0][:200]
        else:
            state, detail = "pending", ""
        rows.append({"key": cell.key, "state": state, "detail": detail})
    return rows


def _distilled_before(path, method):
    """The set saved at `path` if it was made with exactly `method.config` (resolved); None if absent or damaged."""
    if not os.path.exists(path):
        return None
    try:
        synset = SyntheticSet.load(path)
    except BenchmarkError:
        return None  # damaged: distil again
    same = json.dumps(synset.metadata.get("config"), sort_keys=True, default=str) == \
        json.dumps(dataclasses.asdict(method.config), sort_keys=True, default=str)
    return synset if same else None


def corruption_stats(ds, synset):
    """For a corrupted dataset: the corruption, and for IWD sets how well the influence tracked during distillation
    separates corrupted from clean instances: ROC AUC of the EMA score as a detector of 'corrupted', over the
    instances that were scored at least once. AUC > 0.5: corrupted instances sit in the HIGH-score tail (IWD
    upweights them); < 0.5: in the low tail (IWD downweights them, the paper's claim)."""
    import torch

    out = {"corruption": ds.corruption}
    inf = synset.extras.get("influence")
    if inf is not None:
        seen = inf["count"] > 0
        out["corruption_auc"] = roc_auc(inf["ema"][seen], ds.corrupted[seen])
        out["corruption_scored"] = int(seen.sum())
        out["corruption_scored_corrupted"] = int((seen & ds.corrupted).sum())
        if "z_ema" in inf:  # what the weights are made from: within-class z-scores, AUC per class
            y = ds.host.y_train
            per_class = [roc_auc(inf["z_ema"][seen & (y == c)], ds.corrupted[seen & (y == c)])
                         for c in range(ds.num_classes)]
            per_class = torch.tensor([a for a in per_class if a == a], dtype=torch.float64)  # classes with both
            if len(per_class):
                out["corruption_auc_z_class_mean"] = float(per_class.mean())
                out["corruption_auc_z_class_std"] = float(per_class.std()) if len(per_class) > 1 else 0.0
            # the weights themselves: mean applied weight relative to uniform (1 = uniform), corrupted vs clean
            rel = inf["weight_relative_mean"]
            bad, good = seen & ds.corrupted, seen & ~ds.corrupted
            if bad.any() and good.any():
                out["corruption_weight_corrupted"] = float(rel[bad].mean())
                out["corruption_weight_clean"] = float(rel[good].mean())
    return out


def _safe_run_cell(suite, cell, run_root, opts: RunOptions):
    """Run one cell; never raises: returns ('ok', record), ('elsewhere', record: another process finished it since
    this one listed it), ('busy', message: another process runs it) or ('failed', message)."""
    try:
        ran, record = _run_cell(suite, cell, run_root, opts)
        return ("ok" if ran else "elsewhere"), record
    except CellBusy as e:
        return "busy", str(e)
    except Exception as e:  # noqa: BLE001 - a failing cell must not stop the others
        msg = f"{type(e).__name__}: {e}"
        detail = traceback.format_exc()
        try:
            write_json_atomic(RunPaths(run_root, suite.name).failed(cell),
                              {"key": cell.key, "error": msg, "traceback": detail,
                               "date": utc_now()})
        except OSError:
            pass
        return "failed", msg


def pending_cells(suite, run_root):
    paths = RunPaths(run_root, suite.name)
    return [c for c in suite.cells() if not os.path.exists(paths.record(c))]


def run_suite(suite: Suite, run_root="runs", options: RunOptions = None, *, executor="inline", workers=None,
              address=None, progress=True, echo=print, gpus_per_cell=None, **option_fields):
    """Run every pending cell of the suite. Returns (n_done, failures: list of (cell key, message)); n_done counts
    the cells this run finished. A cell another live process runs is skipped (reported busy), and one another
    process finished meanwhile is reported as such: neither is done by this run nor failed.
    options: how cells run (RunOptions; or its fields as keywords: data_root, download, device, log). With
    download, torchvision may fetch missing datasets (once, here in the driver, before any cell starts).
    gpus_per_cell: the Ray executor's GPU request per cell (default 1 on CUDA, 0 otherwise; a test sets it to
    exercise GPU scheduling on a CPU machine with fake GPU resources)."""
    opts = dataclasses.replace(options or RunOptions(), **option_fields)
    if executor not in ("inline", "process", "ray"):
        raise BenchmarkError(f"unknown executor {executor!r} (inline, process, ray)")
    if not (executor == "ray" and address):  # a remote cluster's head may have no GPU: its workers are checked
        opts.device = devices.resolve(opts.device)
    suite = dataclasses.replace(suite, plugins=list(dict.fromkeys([*suite.plugins, *LOADED_PLUGINS])))
    paths = RunPaths(run_root, suite.name)
    paths.ensure()
    cells = pending_cells(suite, run_root)
    if opts.download and cells:  # fetch once, not once per worker at the same time
        for name in dict.fromkeys(c.dataset for c in cells):
            get_dataset(name, opts.data_root or suite.data_root or None, download=True)
    total = len(suite.cells())
    echo(f"suite {suite.name}: {total} cells, {total - len(cells)} already done, {len(cells)} to run "
         f"({executor} executor, device {opts.device})")
    failures, done = [], 0
    bar = progress_bar(len(cells), f"suite {suite.name}", leave=True) if progress and cells else None

    def report(cell, status, payload):
        nonlocal done
        if status == "ok":
            done += 1
            a = payload["accuracy"]
            echo(f"  done  {cell.key}: {100 * a['mean']:.2f} +- {100 * a['std']:.2f} "
                 f"(distill {payload['distill_seconds']:.0f}s, eval {payload['eval_seconds']:.0f}s)")
        elif status == "elsewhere":  # not counted as done by this run: it did not run the cell
            echo(f"  done  {cell.key}: finished by another run of the suite")
        elif status == "busy":  # another run of the suite has it: that run finishes it
            echo(f"  busy  {cell.key}: {payload}")
        else:
            failures.append((cell.key, payload))
            echo(f"  FAIL  {cell.key}: {payload}")
        if bar is not None:
            bar.update(1)

    if executor == "inline":
        for cell in cells:
            report(cell, *_safe_run_cell(suite, cell, run_root, opts))
    elif executor == "process":
        slots = gpu_slots(opts.device, workers)
        n = len(slots) if slots else (workers or max(1, (os.cpu_count() or 2) // 2))
        opts.threads = max(1, (os.cpu_count() or 2) // n)
        if slots:
            opts.device = "cuda"  # each worker sees exactly one GPU (CUDA_VISIBLE_DEVICES), as cuda:0
        _run_processes(suite, cells, run_root, opts, slots or [{}] * n, report)
    else:
        _run_ray(suite, cells, run_root, opts, address, workers, report, gpus_per_cell)
    if bar is not None:
        bar.close()
    return done, failures


def gpu_slots(device, workers=None, visible=None, count=None):
    """The process executor's worker slots on CUDA, each an environment pinning one GPU
    ({'CUDA_VISIBLE_DEVICES': physical id}). 'cuda' uses every visible GPU, 'cuda:N' only GPU N; ids are
    translated through the parent's own CUDA_VISIBLE_DEVICES. One slot per GPU by default; `workers` slots
    round-robin over them otherwise (more workers than GPUs share them: small networks leave a GPU mostly idle).
    [] for the CPU."""
    if not devices.is_cuda(device):
        return []
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    count = torch.cuda.device_count() if count is None else count
    ids = [v.strip() for v in visible.split(",") if v.strip()][:count] if visible else [str(i) for i in range(count)]
    index = torch.device(device).index
    if index is not None:
        ids = [ids[index]]
    return [{"CUDA_VISIBLE_DEVICES": ids[k % len(ids)]} for k in range(workers or len(ids))]


def _cell_process(conn, suite, cell, run_root, opts):
    conn.send(_safe_run_cell(suite, cell, run_root, opts))
    conn.close()


def _receive(conn):
    """The worker's (status, payload) if it sent one; None if nothing yet or the worker is gone (EOF)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


@contextlib.contextmanager
def _environment(env):
    """Set environment variables for a child about to be spawned (it copies the environment when it starts)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_processes(suite, cells, run_root, opts, slots, report):
    """One fresh (spawned) process per cell, at most one per slot at a time (a slot: an environment, e.g. the GPU
    it pins). A worker that dies (kill -9, OOM killer, a segfault in a library) fails only its own cell; a pool
    whose broken worker takes every pending cell down with it (concurrent.futures) is exactly what this avoids.
    The cell's checkpoint stays for the next run."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, running, free = list(cells), {}, list(range(len(slots)))
    while queue or running:
        while queue and free:
            cell, slot = queue.pop(0), free.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_cell_process, args=(send, suite, cell, run_root, opts))
            with _environment(slots[slot]):
                p.start()
            send.close()
            running[p] = (cell, recv, slot)
        for p in list(running):
            cell, recv, slot = running[p]
            result = _receive(recv)
            if result is None and p.is_alive():
                continue
            p.join()
            del running[p]
            free.append(slot)
            result = result or _receive(recv) or (
                "failed", f"worker died (exit code {p.exitcode}); its checkpoint is kept: rerun the suite to resume")
            recv.close()
            report(cell, *result)
        time.sleep(0.05)


def _run_ray(suite, cells, run_root, opts, address, workers, report, gpus_per_cell=None):
    """Every cell is a Ray task. On CUDA each task requests one GPU; Ray pins it (CUDA_VISIBLE_DEVICES) and the
    task runs on 'cuda' (its only visible GPU), whatever index --device named."""
    try:
        import ray
    except ImportError:
        raise BenchmarkError("the Ray executor needs ray: pip install -e '.[ray]'") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": workers or os.cpu_count(), "include_dashboard": False}
        if not address and os.environ.get("RAY_TMPDIR"):
            kw["_temp_dir"] = os.environ["RAY_TMPDIR"]
        ray.init(ignore_reinit_error=True, log_to_driver=False, **kw)
        started = True
    cuda = devices.is_cuda(opts.device)
    gpus = (1 if cuda else 0) if gpus_per_cell is None else gpus_per_cell
    if cuda and ray.cluster_resources().get("GPU", 0) < 1:
        if started:
            ray.shutdown()
        raise BenchmarkError(f"--device {opts.device}: the Ray cluster has no GPU resource; start its nodes on GPU "
                             f"machines (ray start ... detects them) or use --device cpu")
    opts = dataclasses.replace(opts, device="cuda" if cuda else opts.device, threads=1)
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_safe_run_cell)
    # the driver's working directory and sys.path are the workers' too on a local cluster; on a remote cluster the
    # package must be installed on every node (pip install -e .).
    refs = {remote.remote(suite, c, os.path.abspath(run_root), opts): c for c in cells}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                try:
                    status, payload = ray.get(r)
                except Exception as e:  # noqa: BLE001 - worker crash after retries
                    status, payload = "failed", f"worker died: {type(e).__name__}: {e}"
                report(refs[r], status, payload)
    finally:
        if started:
            ray.shutdown()
