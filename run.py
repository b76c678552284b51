#!/usr/bin/env python
"""iwd-bench command line: distil, evaluate, score influence, and fill benchmark tables.

  python run.py list
  python run.py distill --method dc --dataset digits --ipc 10 --preset quick --out dc.pt
  python run.py evaluate dc.pt --protocol auto --network ConvNet --num-eval 5
  python run.py influence --method dc --dataset digits --synset dc.pt --out scores.csv
  python run.py run --suite quick            # fill the table (resumable), then writes results/quick/
  python run.py table --suite quick
  python run.py compare iwd+dc dc --suite quick  # two rows: per-seed differences, Welch test, time ratio
  python run.py tensorboard --suite quick
"""
import os
import shlex
import sys

from benchmark.platform import allocator  # noqa: E402  (before torch: the allocator comes first)

# deferred (whole file): each command imports what it uses, so torch (~2 s) loads only in the commands that use it
# and --help answers at once

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "iwd-bench":  # a program, not an import
    allocator.use_tcmalloc()
allocator.tune()

import click  # noqa: E402

from benchmark.platform.errors import BenchmarkError  # noqa: E402

COMMAND = "python run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class Main(click.Group):
    """Turns BenchmarkError into one line and exit code 2 (tracebacks only with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BenchmarkError as e:
            if ctx.params.get("debug") or os.environ.get("IWD_DEBUG"):
                raise
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=Main)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--plugin", multiple=True, default=(), help="Import a module that registers your own methods (repeatable).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
def cli(debug, plugin, threads):
    """Dataset-distillation benchmark with Influence-Weighted Distillation (IWD)."""
    from benchmark.core.registry import load_plugin
    if threads:
        import torch
        torch.set_num_threads(threads)
    for p in plugin:
        load_plugin(p)


def _task(dataset, ipc, seed, device, data_root, download, log_dir, name, checkpoint=None, checkpoint_every=0,
          checkpoint_minutes=0.0):
    from benchmark.platform import device as devices
    from benchmark.data.datasets import get_dataset
    from benchmark.platform.logging import make_writer
    from benchmark.core.method import Task
    device = devices.resolve(device)
    devices.configure(device)
    ds = get_dataset(dataset, data_root, download)
    return Task(ds, ipc, seed, device, make_writer(log_dir, name), checkpoint, checkpoint_every, checkpoint_minutes,
                progress=True, log_images_every=50 if log_dir else 0)


data_options = [
    click.option("--dataset", "-d", default="digits", show_default=True, help="A registered dataset (run.py list)."),
    click.option("--data-root", default=None, help="Folder with the dataset files (torchvision layout)."),
    click.option("--download", is_flag=True, help="Allow torchvision to download a missing dataset."),
    click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
]


def with_options(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@cli.command("list")
def list_cmd():
    """List methods, datasets, networks, protocols and suites."""
    from benchmark.data.datasets import list_datasets
    from benchmark.nn.networks import list_networks
    from benchmark.core.registry import family, get_method, list_methods
    from benchmark.grid.suites import list_suites
    from evaluation import list_protocols
    click.echo("methods, by family (the module that registers them; eval: the protocol 'auto' picks):")
    by_family = {}
    for m in list_methods():
        by_family.setdefault(family(get_method(m)), []).append(m)
    for fam, names in sorted(by_family.items()):
        click.echo(f"  {fam}:")
        for m in names:
            cls = get_method(m)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            presets = ", ".join(["reference"] + sorted(cls.presets)) if cls.presets else "-"
            traits = f"eval {cls.evaluation or '?'}{'' if cls.ranked else ', unranked'}"
            click.echo(f"    {m:28s} {traits:20s} presets: {presets:22s} {doc[:60]}")
    click.echo("datasets:  " + ", ".join(list_datasets()))
    click.echo("networks:  " + ", ".join(list_networks()))
    click.echo("protocols: " + ", ".join(list_protocols()))
    click.echo("suites:    " + ", ".join(list_suites()))


def _check_writable(path, option):
    from benchmark.platform.files import check_writable
    check_writable(os.path.dirname(os.path.abspath(path)), f"{option} path")


@cli.command()
@click.option("--method", "-m", required=True, help="A registered method (run.py list).")
@with_options(data_options)
@click.option("--ipc", type=int, default=1, show_default=True, help="Synthetic images per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the run's networks and draws.")
@click.option("--preset", default="reference", show_default=True, help="reference, or a reduced preset (cpu, quick).")
@click.option("--set", "overrides", multiple=True, default=(), metavar="KEY=VALUE",
              help="Override a config key (repeatable).")
@click.option("--out", "-o", required=True, help="Where to write the synthetic set (.pt).")
@click.option("--log-dir", default=None, help="TensorBoard log root (off by default).")
@click.option("--checkpoint-every", type=int, default=0, help="Also checkpoint every K iterations (to OUT.ckpt).")
@click.option("--checkpoint-minutes", type=float, default=10.0, show_default=True,
              help="Checkpoint every M minutes of wall time (to OUT.ckpt; 0: off), so an interrupted run resumes.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT.ckpt if present.")
def distill(method, dataset, data_root, download, device, ipc, seed, preset, overrides, out, log_dir,
            checkpoint_every, checkpoint_minutes, resume):
    """Distil a synthetic set and save it."""
    from benchmark.core.registry import create_method
    m = create_method(method, preset, list(overrides))
    _check_writable(out, "--out")  # before hours of distillation, not after
    ckpt = out + ".ckpt"
    if not resume and os.path.exists(ckpt):
        os.remove(ckpt)
    task = _task(dataset, ipc, seed, device, data_root, download, log_dir, f"{dataset}-{method}-ipc{ipc}-s{seed}",
                 ckpt, checkpoint_every, checkpoint_minutes)
    if m.uses_ipc:
        task.dataset.check_ipc(ipc)
    syn = m.distill(task)
    syn.save(out)
    click.echo(f"saved {len(syn.labels)} synthetic images ({method}, {dataset}, IPC {ipc}, seed {seed}) to {out}")


@cli.command()
@click.argument("synset")
@with_options(data_options)
@click.option("--protocol", "-p", default="auto", show_default=True,
              help="auto (the method's own), dc, dsa, idc, mtt, paper, full, or their -quick variants (run.py list). "
                   "The full protocols train each network for up to 1000 epochs (minutes each on a CPU): for a quick "
                   "look, --protocol auto-quick --num-eval 1.")
@click.option("--network", "-n", default="ConvNet", show_default=True, help="Evaluation network (cross-architecture).")
@click.option("--num-eval", type=int, default=5, show_default=True, help="Fresh networks to train.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the evaluation networks.")
@click.option("--factor", type=int, default=None, help="IDC multi-formation factor for IDC-format files.")
def evaluate(synset, dataset, data_root, download, device, protocol, network, num_eval, seed, factor):
    """Train fresh networks on a synthetic set (ours, DC/DSA/DM's, IDC's or MTT's format) and test them. The
    default (the method's full protocol, 5 networks) takes minutes to an hour on a CPU; --protocol auto-quick
    --num-eval 1 answers in seconds to minutes."""
    from benchmark.data.datasets import get_dataset
    from benchmark.core.synthetic import SyntheticSet
    from benchmark.platform import device as devices
    from evaluation import evaluate as run_eval
    device = devices.resolve(device)
    devices.configure(device)
    syn = SyntheticSet.load(synset, factor)
    dataset = syn.metadata.get("dataset", dataset) if dataset == "digits" else dataset
    ds = get_dataset(dataset, data_root, download)
    r = run_eval(syn, ds, protocol, network, num_eval, seed, device, progress=True)
    p = r["protocol"]
    click.echo(f"{dataset} {syn.metadata.get('method', '?')} -> {network}, protocol {p['name']} ({p['epochs']} epochs, "
               f"lr {p['lr']}, batch {p['batch']}, dsa {p['dsa']}, cutmix {p['cutmix_p']}): "
               f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f} % over {num_eval} nets "
               f"({', '.join(f'{100 * a:.1f}' for a in r['accuracies'])})")


@cli.command()
@click.option("--method", "-m", required=True, help="Whose matching statistic defines influence (e.g. dc, dm).")
@with_options(data_options)
@click.option("--synset", required=True, help="The synthetic set to score the training set against.")
@click.option("--preset", default="reference", show_default=True, help="The method's preset (its networks' settings).")
@click.option("--set", "overrides", multiple=True, default=(), metavar="KEY=VALUE",
              help="Override a config key (repeatable).")
@click.option("--num-nets", type=int, default=2, show_default=True, help="Fresh networks to average over.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the scoring networks.")
@click.option("--out", "-o", required=True, help="CSV of index,label,score (a .pt with the tensor is written beside).")
@click.option("--figure", default=None, help="Also draw the paper's Figure 1 (histogram + tail images) to this PNG.")
@click.option("--figure-class", type=int, default=0, show_default=True, help="The class drawn in --figure.")
@click.option("--sorted-figure", default=None,
              help="Also draw Figure 5: per class, the synthetic image and real images sorted by influence (PNG).")
def influence(method, dataset, data_root, download, device, synset, preset, overrides, num_nets, seed, out, figure,
              figure_class, sorted_figure):
    """Score every training instance's explicit influence against a synthetic set (the data of the paper's Fig. 1).
    A positive score: upweighting the instance raises the distillation objective."""
    import torch

    from benchmark.core.registry import create_method
    from benchmark.core.synthetic import SyntheticSet
    from methods.ablations import score_training_set
    m = create_method(method, preset, list(overrides))
    syn = SyntheticSet.load(synset)
    task = _task(syn.metadata.get("dataset", dataset), syn.ipc or 1, seed, device, data_root, download, None, "")
    syn.check_fits(task.dataset)
    scores = score_training_set(m, task, syn, num_nets, progress=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("index,label,score\n")
        for i, (y, s) in enumerate(zip(task.dataset.y_train.tolist(), scores.tolist())):
            f.write(f"{i},{y},{s:.8g}\n")
    torch.save({"scores": scores, "labels": task.dataset.y_train, "method": method, "synset": synset},
               os.path.splitext(out)[0] + ".pt")
    click.echo(f"scored {len(scores)} instances -> {out}")
    if figure:
        from benchmark.report.figures import influence_figure
        influence_figure(scores, task.dataset, figure_class, figure,
                         title=f"{task.dataset.name} class {figure_class}: influence under {method} vs {synset}")
        click.echo(f"figure -> {figure}")
    if sorted_figure:
        from benchmark.report.figures import sorted_by_influence_figure
        sorted_by_influence_figure(syn, scores, task.dataset, sorted_figure,
                                   title=f"{task.dataset.name}: {os.path.basename(synset)} (red frame) and real "
                                         f"images sorted by influence under {method}, low -> high")
        click.echo(f"figure -> {sorted_figure}")


suite_options = [
    click.option("--suite", "-s", default="quick", show_default=True, help="A suite name (run.py list) or a YAML path."),
    click.option("--methods", default=None, help="Comma list to narrow the suite's methods."),
    click.option("--datasets", default=None, help="Comma list of datasets."),
    click.option("--ipc", default=None, help="Comma list of IPCs."),
    click.option("--seeds", default=None, help="Comma list of seeds."),
    click.option("--variants", default=None, help="Comma list of the suite's variants."),
    click.option("--num-eval", type=int, default=None, help="Evaluation networks per cell."),
    click.option("--run-root", default="runs", show_default=True, help="Where records, sets, checkpoints, logs go."),
    click.option("--results-root", default="results", show_default=True, help="Where leaderboards and figures go."),
]


def _suite(suite, methods, datasets, ipc, seeds, variants, num_eval):
    from benchmark.grid.suites import load_suite, narrow
    return narrow(load_suite(suite), methods, datasets, ipc, seeds, num_eval, variants=variants)


@cli.command("run")
@with_options(suite_options)
@click.option("--executor", type=click.Choice(["inline", "process", "ray"]), default="inline", show_default=True,
              help="inline: one cell after another here; process: a local pool; ray: a Ray cluster.")
@click.option("--workers", type=int, default=None,
              help="Parallel cells (process pool / local Ray). Process pool on CUDA: default one per visible GPU; "
                   "more workers than GPUs share them round-robin.")
@click.option("--address", default=None, help="Ray cluster address (default: start a local one).")
@click.option("--data-root", default=None, help="Folder with the dataset files (wins over any packaged copy).")
@click.option("--download", is_flag=True, help="Let torchvision fetch missing datasets (once, before any cell).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda (process executor: workers pinned to the visible GPUs; Ray: one GPU per cell) or "
                   "cuda:N.")
@click.option("--no-tensorboard", is_flag=True, help="Do not write TensorBoard logs.")
def run_cmd(suite, methods, datasets, ipc, seeds, variants, num_eval, run_root, results_root, executor, workers,
            address, data_root, download, device, no_tensorboard):
    """Run a suite's pending cells (finished cells are skipped, interrupted ones resume), then write its table: every
    finished cell of the suite, whatever --methods/--datasets/--ipc/--seeds/--variants narrowed this run to."""
    import time

    from benchmark.grid.runner import RunOptions, pending_cells, run_suite
    s = _suite(suite, methods, datasets, ipc, seeds, variants, num_eval)
    t0 = time.time()
    options = RunOptions(data_root=data_root, download=download, device=device, log=not no_tensorboard)
    done, failures = run_suite(s, run_root, options, executor=executor, workers=workers, address=address)
    elsewhere = len(pending_cells(s, run_root)) - len(failures)  # busy: another run of the suite has them
    click.echo(f"{done} cells finished in {(time.time() - t0) / 60:.1f} min; {len(failures)} failed"
               + (f"; {elsewhere} still running in another process (run.py status)" if elsewhere > 0 else ""))
    # a narrowed run adds cells to the suite: its table keeps the others (`run.py table --methods ...` narrows one)
    whole = _suite(suite, None, None, None, None, None, num_eval)
    path = _write_table(whole, run_root, results_root, _whole_suite_command(sys.argv[1:]))
    if path:
        click.echo(f"leaderboard: {path}")
    if failures:
        for k, msg in failures:
            click.secho(f"failed: {k}: {msg}", fg="red", err=True)
        sys.exit(1)


NARROWING_OPTIONS = ("--methods", "--datasets", "--ipc", "--seeds", "--variants")


def _whole_suite_command(argv):
    """The command line that reproduces a whole suite's table: argv without the options that narrow its cells."""
    out, skip = [], False
    for a in argv:
        if skip or a in NARROWING_OPTIONS:
            skip = not skip
            continue
        if not a.startswith(tuple(o + "=" for o in NARROWING_OPTIONS)):
            out.append(a)
    return "python run.py " + " ".join(shlex.quote(a) for a in out)


def _write_table(s, run_root, results_root, command=None):
    from benchmark.report.leaderboard import write_leaderboard
    from benchmark.grid.runner import read_records
    wanted = {c.key for c in s.cells()}
    recs = [r for r in read_records(run_root, s.name) if r["key"] in wanted]
    if not recs:
        return None
    wall = sum(r["distill_seconds"] + r["eval_seconds"] for r in recs)
    out = os.path.join(results_root, s.name)
    from benchmark.data.datasets import get_dataset
    from benchmark.report.figures import suite_figures
    from benchmark.grid.runner import RunPaths
    suite_figures(recs, out, s.eval_networks, RunPaths(run_root, s.name).sets,
                  lambda name: get_dataset(name, s.data_root or None))
    figs = sorted(os.path.join(out, "figures", f) for f in os.listdir(os.path.join(out, "figures"))) \
        if os.path.isdir(os.path.join(out, "figures")) else []
    return write_leaderboard(recs, out, s, command or COMMAND, s.methods, figs, wall)


@cli.command()
@with_options(suite_options)
def table(suite, methods, datasets, ipc, seeds, variants, num_eval, run_root, results_root):
    """Write results/<suite>/leaderboard.{md,csv,tex} from the finished cells."""
    s = _suite(suite, methods, datasets, ipc, seeds, variants, num_eval)
    # the footer names the command that produced the numbers, not this one
    args = [("run" if a == "table" else a) for a in sys.argv[1:]]  # (after any global option such as --threads)
    path = _write_table(s, run_root, results_root, "python run.py " + " ".join(shlex.quote(a) for a in args))
    if not path:
        raise _no_finished_cells(s, run_root)
    click.echo(open(path).read())


def _no_finished_cells(s, run_root):
    root = "" if run_root == "runs" else f" --run-root {shlex.quote(run_root)}"
    return BenchmarkError(f"no finished cells for suite {s.name!r} under {run_root}; run: python run.py run "
                          f"--suite {s.name}{root}")


@cli.command()
@click.argument("row_a")
@click.argument("row_b")
@with_options(suite_options)
@click.option("--out", default=None, help="Also write the comparison to this Markdown file.")
def compare(row_a, row_b, suite, methods, datasets, ipc, seeds, variants, num_eval, run_root, results_root, out):
    """Two rows of a suite side by side (ROW_A, ROW_B: leaderboard row names, `method@variant`, or `method` where it
    has one variant): per seed the accuracy and distillation time of each, the difference and time ratio; over the
    common seeds the difference with a two-sided Welch t-test, a paired t-test over the seeds, and the ratio of total
    times."""
    from benchmark.grid.runner import read_records
    from benchmark.report.compare import compare_rows, format_comparison
    s = _suite(suite, methods, datasets, ipc, seeds, variants, num_eval)
    wanted = {c.key for c in s.cells()}
    records = [r for r in read_records(run_root, s.name) if r["key"] in wanted]
    if not records:
        raise _no_finished_cells(s, run_root)
    text = format_comparison(compare_rows(records, row_a, row_b))
    text += f"\nSuite `{s.name}`, records under `{run_root}`; command: `{COMMAND}`\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    click.echo(text)


@cli.command()
@click.argument("other_run_root")
@with_options(suite_options)
@click.option("--out", default=None, help="Also write the comparison to this Markdown file.")
def reproduce(other_run_root, suite, methods, datasets, ipc, seeds, variants, num_eval, run_root, results_root, out):
    """Does another run of the suite (under OTHER_RUN_ROOT) give the same results as the one under --run-root? Cell
    by cell: bit-identical synthetic sets (else the largest pixel difference) and the same per-network accuracies
    (else both, and the difference of the means). For determinism (one machine, twice) and portability (CPU
    against GPU) checks."""
    from benchmark.core.synthetic import SyntheticSet
    from benchmark.grid.runner import RunPaths, read_records
    from benchmark.report.reproduce import compare_runs, format_reproduction
    s = _suite(suite, methods, datasets, ipc, seeds, variants, num_eval)
    wanted = {c.key for c in s.cells()}

    def finished(root):
        records = [r for r in read_records(root, s.name) if r["key"] in wanted]
        if not records:
            raise _no_finished_cells(s, root)
        return records

    def images(root):
        sets = RunPaths(root, s.name)
        return lambda key: SyntheticSet.load(os.path.join(sets.sets, key + ".pt")).images \
            if os.path.exists(os.path.join(sets.sets, key + ".pt")) else None
    rows, only_one = compare_runs(finished(run_root), finished(other_run_root), images(run_root),
                                  images(other_run_root))
    text = format_reproduction(rows, only_one, run_root, other_run_root)
    text += f"\nSuite `{s.name}`; command: `{COMMAND}`\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    click.echo(text)


@cli.command()
@with_options(suite_options)
@click.option("--device", default="cpu", show_default=True, help="The device to estimate time on (calibrated there).")
@click.option("--all", "all_cells", is_flag=True,
              help="Also finished cells, with their measured time beside the estimate (checks the estimate).")
@click.option("--no-calibrate", is_flag=True, help="Count FLOPs and memory only (no timed run on the device).")
def plan(suite, methods, datasets, ipc, seeds, variants, num_eval, run_root, results_root, device, all_cells,
         no_calibrate):
    """What a suite will cost before it runs: per pending cell its FLOPs per iteration (counted), iterations,
    estimated distillation and evaluation time on DEVICE (from a short calibration run there) and peak memory;
    totals per method and for the suite."""
    from benchmark.platform import device as devices
    from benchmark.tools.plan import format_plan, plan_suite
    from benchmark.grid.runner import RunPaths, pending_cells, read_records
    device = devices.resolve(device)
    devices.configure(device)
    s = _suite(suite, methods, datasets, ipc, seeds, variants, num_eval)
    cells = s.cells() if all_cells else pending_cells(s, run_root)
    if not cells:
        click.echo(f"suite {s.name}: every cell is finished under {run_root} (use --all to see their cost)")
        return
    import time
    t0 = time.time()
    rows, _ = plan_suite(s, cells, device, calibrate=not no_calibrate, cache_dir=RunPaths(run_root, s.name).cache,
                         progress=lambda m: click.echo(f"[{time.time() - t0:6.1f} s] {m}", err=True))
    measured = {r["key"]: r["distill_seconds"] + r["eval_seconds"] for r in read_records(run_root, s.name)} \
        if all_cells else None
    click.echo(format_plan(s, rows, device, measured))


@cli.command()
@with_options(suite_options)
def status(suite, methods, datasets, ipc, seeds, variants, num_eval, run_root, results_root):
    """Where each cell of a suite stands: done, running (which process, which iteration), interrupted, failed,
    pending."""
    from benchmark.grid.runner import suite_status
    s = _suite(suite, methods, datasets, ipc, seeds, variants, num_eval)
    rows = suite_status(s, run_root)
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        click.echo(f"{r['key']:<{width}}  {r['state']:<11}  {r['detail']}")
    counts = {st: sum(r["state"] == st for r in rows) for st in ("done", "running", "interrupted", "failed", "pending")}
    click.echo(", ".join(f"{n} {st}" for st, n in counts.items() if n))


@cli.command()
@click.option("--suite", "-s", default=None, help="Show one suite's logs (default: all under the run root).")
@click.option("--run-root", default="runs", show_default=True, help="The run root the suites ran under.")
@click.option("--port", type=int, default=6006, show_default=True, help="TensorBoard's port.")
@click.option("--host", default=None, help="Interface to serve on (e.g. 0.0.0.0 on a remote machine; default: "
                                           "TensorBoard's, localhost).")
@click.option("--start", is_flag=True, help="Start TensorBoard instead of printing the command.")
def tensorboard(suite, run_root, port, host, start):
    """Print (or run) the TensorBoard command for the logs of every run."""
    logdir = os.path.join(run_root, suite, "tensorboard") if suite else run_root
    cmd = ["tensorboard", "--logdir", logdir, "--port", str(port)] + (["--host", host] if host else [])
    if start:
        os.execvp(cmd[0], cmd)
    click.echo(" ".join(cmd))


@cli.command()
@click.option("--device", default="cpu", show_default=True, help="The device to check: cpu, cuda[:N], or meta.")
@click.option("--methods", "pattern", default="*", show_default=True,
              help="Which registered methods (a glob or comma list; loaded plugins included).")
def check(device, pattern):
    """First thing on a new machine: run every method for one tiny iteration and one evaluation epoch on DEVICE
    (digits, IPC 2) and print, per method, ok or the one-line error, and the seconds it took. Exit code 1 if any
    failed."""
    import fnmatch
    import time

    from benchmark.core.registry import list_methods
    from benchmark.data.datasets import get_dataset
    from benchmark.platform import device as devices
    from benchmark.tools.smoke import run_on_device
    if device != "meta":
        device = devices.resolve(device)
        devices.configure(device)
    names = [m for m in list_methods() if any(fnmatch.fnmatch(m, p) for p in pattern.split(","))]
    if not names:
        raise BenchmarkError(f"no registered method matches {pattern!r} (run.py list)")
    ds, failed = get_dataset("digits"), 0
    click.echo(f"{'method':<30} {'result':<8} {'seconds':>8}  (device {device})")
    for name in names:
        t0 = time.perf_counter()
        try:
            run_on_device(name, ds, device)
            result, why = "ok", ""
        except Exception as e:  # noqa: BLE001 - any failure is this method's row, not the end of the check
            failed += 1
            result, why = "FAILED", f"  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        click.echo(f"{name:<30} {result:<8} {time.perf_counter() - t0:8.1f}{why}")
    click.echo(f"{len(names) - failed} of {len(names)} methods ran on {device}")
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--quick/--full", default=True, show_default=True,
              help="quick: CPU presets and width-32 networks (a few minutes); full: adds the reference settings.")
@click.option("-d", "--dataset", default="fashion-mnist", show_default=True,
              help="Data the workloads use (Fashion-MNIST-shaped random data when its files are missing).")
@click.option("--data-root", default=None, help="Folder with the dataset files (torchvision layout).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--repeats", type=int, default=0, help="Timed repeats per workload (0: 2 quick, 3 full).")
@click.option("--sections", default=None,
              help="Comma list of sections (default: all but warm_start, damping and processes, which run only when "
                   "named).")
@click.option("--bases", default=None, help="Comma list narrowing the iterations section's base methods (default: "
                                         "every method with an IWD variant).")
@click.option("--out", default="results", show_default=True, help="Folder for bench.md and bench.json.")
def bench(quick, dataset, data_root, device, repeats, sections, bases, out):
    """Measure speed and memory side by side (iterations, IWD overhead, influence vs a per-sample loop, iHVPs,
    evaluation, allocator, DC vs a plain loop) and write OUT/bench.md + bench.json."""
    from benchmark.tools.perf import BenchSettings, run_bench
    from benchmark.tools.perf_report import write_report
    s = BenchSettings(quick=quick, dataset=dataset, repeats=repeats, device=device, data_root=data_root,
                      sections=tuple(x for x in (sections or "").split(",") if x),
                      bases=tuple(x for x in (bases or "").split(",") if x))
    res = run_bench(s, progress=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {write_report(res, out, COMMAND)}")


if __name__ == "__main__":
    cli()
