"""Leaderboards in the shape of the IWD paper's Table 1: rows are methods, columns dataset x IPC, cells mean +- std
(percent) of the final-epoch test accuracy pooled over seeds and evaluation networks; best bold, second underlined
(selection rows and the Full-Dataset bound excluded from ranking); each IWD row shows its difference from its base
row (over the seeds both rows have) and marks it * when a two-sided Welch t-test over those pooled accuracies
gives p < 0.05.
Rows quoted from papers are marked "(reported)" and never ranked with measured rows.
"""
import csv
import os
from collections import OrderedDict

from evaluation.stats import summarize, welch_test

from benchmark.platform.files import utc_now
from benchmark.core.method import Method
from benchmark.core.registry import get_method
from benchmark.platform.errors import BenchmarkError

# Published numbers (ConvNet-3), from the papers (docs/reference-settings.md) and the IWD paper's Table 1: (dataset, ipc) -> (mean, std)
def _table1(cifar10=(), cifar100=(), svhn=()):
    """A row of the IWD paper's Table 1: (mean, std) per IPC 1, 10, 50 for each dataset (None where not given)."""
    return {(d, ipc): v for d, vals in (("cifar10", cifar10), ("cifar100", cifar100), ("svhn", svhn))
            for ipc, v in zip((1, 10, 50), vals) if v is not None}


REPORTED = {
    # the IWD paper's Table 1 rows we do not run (all taken there from the methods' own papers or benchmarks)
    "Random (paper)": _table1(((14.4, 2.0), (26.0, 1.2), (43.4, 1.0)), ((4.2, 0.3), (14.6, 0.5), (30.0, 0.4)),
                              ((14.6, 1.6), (35.1, 4.1), (70.9, 0.9))),
    "Herding (paper)": _table1(((21.5, 1.2), (31.6, 0.7), (40.4, 0.6)), ((8.4, 0.3), (17.3, 0.3), (33.7, 0.5)),
                               ((20.9, 1.3), (50.5, 3.3), (72.6, 0.8))),
    "IDM": _table1(((45.6, 0.7), (58.6, 0.1), (67.5, 0.5)), ((20.1, 0.3), (45.1, 0.1), (50.0, 0.2))),
    "KIP": _table1(((49.9, 0.2), (62.7, 0.3), (68.6, 0.2)), ((15.7, 0.2), (28.3, 0.1), None),
                   ((57.3, 0.1), (75.0, 0.1), (80.5, 0.1))),
    "MTT": _table1(((46.3, 0.8), (65.6, 0.7), (71.6, 0.2)), ((24.3, 0.3), (40.1, 0.4), (47.7, 0.2))),
    "FRePo": _table1(((46.8, 0.7), (65.5, 0.4), (71.7, 0.2)), ((28.7, 0.1), (42.5, 0.2), (44.3, 0.2))),
    "PDD": _table1((None, (67.9, 0.2), (76.5, 0.4)), (None, (45.8, 0.5), (53.1, 0.4))),
    "IWD+PDD (paper)": _table1((None, (68.8, 0.2), (76.9, 0.3)), (None, (46.7, 0.4), (53.5, 0.3))),
    "Full Dataset (paper)": _table1(((84.8, 0.1),) * 3, ((56.2, 0.3),) * 3, ((95.4, 0.1),) * 3),
    "DC": {("mnist", 1): (91.7, 0.5), ("mnist", 10): (97.4, 0.2), ("mnist", 50): (98.8, 0.1),
           ("fashion-mnist", 1): (70.5, 0.6), ("fashion-mnist", 10): (82.3, 0.4), ("fashion-mnist", 50): (83.6, 0.4),
           ("cifar10", 1): (28.3, 0.5), ("cifar10", 10): (44.9, 0.5), ("cifar10", 50): (53.9, 0.5),
           ("cifar100", 1): (12.8, 0.3), ("cifar100", 10): (25.2, 0.3), ("cifar100", 50): (32.1, 0.3),
           ("svhn", 1): (31.2, 1.4), ("svhn", 10): (76.1, 0.6), ("svhn", 50): (82.3, 0.3)},
    "DSA": {("fashion-mnist", 1): (70.6, 0.6), ("fashion-mnist", 10): (84.6, 0.3), ("fashion-mnist", 50): (88.7, 0.2),
            ("cifar10", 1): (28.8, 0.7), ("cifar10", 10): (52.1, 0.5), ("cifar10", 50): (60.6, 0.5)},
    "IWD+DC (paper)": {("cifar10", 1): (29.6, 0.6), ("cifar10", 10): (52.7, 0.6), ("cifar10", 50): (61.0, 0.4),
                       ("cifar100", 1): (14.2, 0.5), ("cifar100", 10): (32.4, 0.2), ("cifar100", 50): (36.5, 0.3),
                       ("svhn", 1): (34.4, 1.4), ("svhn", 10): (78.6, 0.1), ("svhn", 50): (83.4, 0.3)},
    "IDC": {("mnist", 1): (94.2, None), ("mnist", 10): (98.4, None), ("mnist", 50): (99.1, None),  # std not given
            ("fashion-mnist", 1): (81.0, None), ("fashion-mnist", 10): (86.0, None), ("fashion-mnist", 50): (86.2, None),
            ("cifar10", 1): (50.6, 0.4), ("cifar10", 10): (67.5, 0.5), ("cifar10", 50): (74.5, 0.1),
            ("cifar100", 1): (28.4, 0.1), ("cifar100", 10): (45.1, 0.3),
            ("svhn", 1): (68.5, 0.9), ("svhn", 10): (87.5, 0.3), ("svhn", 50): (90.1, 0.1)},
    "IWD+IDC (paper)": {("cifar10", 1): (51.5, 0.5), ("cifar10", 10): (68.3, 0.6), ("cifar10", 50): (74.9, 0.3),
                        ("cifar100", 1): (29.1, 0.3), ("cifar100", 10): (46.1, 0.5),
                        ("svhn", 1): (70.1, 0.3), ("svhn", 10): (88.2, 0.4), ("svhn", 50): (90.8, 0.1)},
}


def _reported(mean_std, pm):
    mean, std = mean_std
    return f"{mean:.1f}" if std is None else f"{mean:.1f}{pm}{std:.1f}"


def method_traits(records):
    """Method name -> its declared traits (`ranked`: selection baselines and the upper bound are not; `uses_ipc`:
    the upper bound's one cell spans every IPC column), as the records carry them. Records made before they did:
    the registry's, and for a method not registered here (a plugin not loaded) the defaults."""
    out = {}
    for r in records:
        if r.get("traits"):
            out[r["method"]] = r["traits"]
        elif r["method"] not in out:
            try:
                out[r["method"]] = get_method(r["method"]).traits()
            except BenchmarkError:
                out[r["method"]] = Method.traits()
    return out


def row_name(rec):
    return rec["method"] + (f"@{rec['variant']}" if rec.get("variant") else "")


def base_row(record, rows):
    """The row an IWD (iwd+X) or base-running (config key `base`) record is compared with: X's row in the same
    variant, else X's row in another variant (a suite that runs the base once, in one variant), else none."""
    m, variant = record["method"], record.get("variant")
    base = m[4:] if m.startswith("iwd+") else (record.get("config") or {}).get("base")
    if not base:
        return None
    for cand in ([f"{base}@{variant}"] if variant else []) + [base] + sorted(r for r in rows
                                                                           if r.split("@")[0] == base):
        if cand in rows and cand != row_name(record):
            return cand
    return None


def build_table(records, methods_order=None, network=None):
    """-> (columns [(dataset, ipc)], rows OrderedDict name -> {col: summary dict with 'accs'})."""
    traits = method_traits(records)
    cols = sorted({(r["dataset"], r["ipc"]) for r in records if traits[r["method"]]["uses_ipc"]} or
                  {(r["dataset"], r["ipc"]) for r in records})
    rows = OrderedDict()
    names = sorted({row_name(r) for r in records},
                   key=lambda n: (methods_order.index(n.split("@")[0]) if methods_order and n.split("@")[0]
                                  in methods_order else 999, n))
    for name in names:
        rows[name] = {}
        for col in cols:
            accs, by_seed, commits = [], {}, set()
            for r in records:
                if row_name(r) != name or r["dataset"] != col[0]:
                    continue
                if traits[r["method"]]["uses_ipc"] and r["ipc"] != col[1]:
                    continue
                ev = r["evaluations"].get(network) if network else r["accuracy"]
                if ev:
                    accs += [100 * a for a in ev["accuracies"]]
                    by_seed.setdefault(r["seed"], []).extend(100 * a for a in ev["accuracies"])
                    commits.add(str(r.get("commit", "?")))
            if accs:
                rows[name][col] = {**summarize(accs), "accs": accs, "by_seed": by_seed, "commits": sorted(commits)}
    bases = {row_name(r): base_row(r, rows) for r in records}
    for name in rows:  # IWD and prune-then-distill rows: difference from their base method's row, significance
        base = bases.get(name)
        if base:
            for col, cell in rows[name].items():
                if col in rows[base]:  # over the seeds both rows have (a partly run suite must not compare
                    other = rows[base][col]["by_seed"]  # one seed with another's three)
                    common = sorted(set(cell["by_seed"]) & set(other))
                    if not common:
                        continue
                    cell["diff"], cell["p"] = welch_test([a for k in common for a in cell["by_seed"][k]],
                                                         [a for k in common for a in other[k]])
                    if len(common) < max(len(cell["by_seed"]), len(other)):
                        cell["diff_seeds"] = len(common)
    for col in cols:  # ranks among distillation rows
        ranked = sorted((c[col]["mean"], n) for n, c in rows.items()
                        if col in c and traits[n.split("@")[0]]["ranked"])
        ranked.reverse()
        for i, (_, n) in enumerate(ranked[:2]):
            rows[n][col]["rank"] = i + 1
    return cols, rows


def _fmt(cell, style):
    if cell is None:
        return "—" if style != "csv" else ""
    s = f"{cell['mean']:.1f} ± {cell['std']:.1f}" if style != "tex" else f"{cell['mean']:.1f}$\\pm${cell['std']:.1f}"
    if cell.get("rank") == 1:
        s = f"**{s}**" if style == "md" else f"\\textbf{{{s}}}"
    elif cell.get("rank") == 2:
        s = f"<u>{s}</u>" if style == "md" else f"\\underline{{{s}}}"
    if "diff" in cell:
        star = "*" if cell["p"] == cell["p"] and cell["p"] < 0.05 else ""
        on = f" on {cell['diff_seeds']} common seed{'s' if cell['diff_seeds'] > 1 else ''}" \
            if cell.get("diff_seeds") else ""
        s += f" ({cell['diff']:+.1f}{star}{on})"
    if _dirty(cell):
        s += "$^\\dagger$" if style == "tex" else " †"
    return s


def _date_range(records):
    days = sorted({str(r.get("date", "?"))[:10] for r in records}) or ["?"]
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _dirty(cell):
    """Whether a record of the cell was made from a tree with uncommitted changes."""
    return any(c.endswith("+dirty") for c in cell.get("commits", ()))


def gain_over_random(rows, cols, traits):
    """Each measured distillation row's gain over `random` in each column (what a method adds over real images,
    DD-Ranking's point). traits: method_traits(records)."""
    base = rows.get("random") or next((r for n, r in rows.items() if n.split("@")[0] == "random"), None)
    if not base:
        return []
    shown = [n for n, r in rows.items() if traits[n.split("@")[0]]["ranked"] and any(c in r for c in cols)]
    if not shown:
        return []
    out = ["", "Gain over random (points): each row's mean minus random's in its column. Random's sets are evaluated "
           "under the DC protocol and each method's under its own, so for DSA, DM and IDC rows part of the gain is "
           "their protocol's augmentation (random under each protocol is not run yet).", "",
           "| Method | " + " | ".join(f"{d} IPC {i}" for d, i in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for n in shown:
        out.append(f"| {n} | " + " | ".join(f"{rows[n][c]['mean'] - base[c]['mean']:+.1f}"
                                            if c in rows[n] and c in base else "—" for c in cols) + " |")
    return out


def corruption_section(records):
    """Robustness suites: how well the influence tracked by each IWD cell separates corrupted from clean instances."""
    recs = [r for r in records if r.get("corruption_auc") is not None]
    if not recs:
        return []
    out = ["", "Influence vs corruption, over the training instances scored at least once. AUC (raw): ROC AUC of the "
           "tracked (EMA) raw score as a detector of corrupted instances, pooled over classes and steps (raw scores "
           "drift in scale: read with care). AUC z per class: the same for the EMA of the within-class z-scores the "
           "weights are made from, per class, mean ± std over classes. 0.5 = no separation; > 0.5: corrupted "
           "instances in the HIGH-score tail. Weight: the mean weight IWD applied to corrupted / clean instances, "
           "relative to uniform (1.00 = the base method's; < 1: down-weighted, the paper's claim).", "",
           "| Method | Dataset | IPC | seed | AUC (raw) | AUC z per class | weight corrupted | weight clean | "
           "scored (corrupted) |", "|---|---|---|---|---|---|---|---|---|"]

    def num(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if r.get(k) is not None else "—"
    for r in sorted(recs, key=lambda r: (r["method"], r["dataset"], r["ipc"], r["seed"])):
        z = (f"{r['corruption_auc_z_class_mean']:.3f} ± {r['corruption_auc_z_class_std']:.3f}"
             if r.get("corruption_auc_z_class_mean") is not None else "—")
        out.append(f"| {row_name(r)} | {r['dataset']} | {r['ipc']} | {r['seed']} | {r['corruption_auc']:.3f} | {z} | "
                   f"{num(r, 'corruption_weight_corrupted')} | {num(r, 'corruption_weight_clean')} | "
                   f"{r['corruption_scored']} ({r['corruption_scored_corrupted']}) |")
    return out


def write_leaderboard(records, out_dir, suite, command, methods_order=None, figures=(), wall_seconds=None):
    """Write leaderboard.md, .csv and .tex under out_dir. Returns the Markdown path."""
    os.makedirs(out_dir, exist_ok=True)
    cols, rows = build_table(records, methods_order)
    datasets = sorted({c[0] for c in cols})
    reported = OrderedDict((k, v) for k, v in REPORTED.items() if any(d in datasets for d, _ in v))
    head = ["Method"] + [f"{d} IPC {i}" for d, i in cols]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in rows.items():
        md.append("| " + " | ".join([n] + [_fmt(r.get(c), "md") for c in cols]) + " |")
    for n, r in reported.items():
        md.append("| " + " | ".join([f"{n} (reported)"] + [
            (_reported(r[c], " ± ") if c in r else "—") for c in cols]) + " |")
    extra_nets = sorted({n for r in records for n in r.get("evaluations", {})} -
                        {r["accuracy"]["network"] for r in records})
    for net in extra_nets:  # cross-architecture: the same sets evaluated on another network
        ecols, erows = build_table(records, methods_order, network=net)
        md += ["", f"Cross-architecture: the same synthetic sets evaluated on {net}:", "",
               "| " + " | ".join(["Method"] + [f"{d} IPC {i}" for d, i in ecols]) + " |", "|" + "---|" * (len(ecols) + 1)]
        for n, r in erows.items():
            md.append("| " + " | ".join([n] + [_fmt(r.get(c), "md") for c in ecols]) + " |")
    md += gain_over_random(rows, cols, method_traits(records))
    md += corruption_section(records)
    prov = records[0] if records else {}
    seeds = sorted({r["seed"] for r in records})
    nets = sorted({r["accuracy"]["num_eval"] for r in records}) if records else []
    protos = sorted({r["accuracy"]["protocol"]["name"] for r in records})
    eval_nets = sorted({r["accuracy"]["network"] for r in records})
    footer = [
        "",
        f"Final-epoch test accuracy (%), mean ± std over {len(seeds)} seed(s) x {', '.join(map(str, nets))} "
        f"evaluation network(s), pooled. In IWD and prune-then-distill rows, (+d) is the difference from the base "
        f"method's row over the seeds both rows have ('on k common seeds' where a row has others too); * marks "
        f"p < 0.05 (two-sided Welch t-test over those pooled accuracies). Best **bold**, "
        f"second <u>underlined</u> among distillation rows (selection rows and Full Dataset not ranked). Rows marked "
        f"(reported) are published numbers under the references' full protocols, not measured here.",
        "",
        f"- suite: `{suite.name}` ({'REDUCED CPU settings' if suite.reduced else 'reference settings'}); "
        f"preset `{suite.preset}`; evaluation protocol(s) {', '.join(protos)} on {', '.join(eval_nets)}",
        f"- seeds: {seeds}; methods: {len(rows)} rows; cells: {len(records)}",
        f"- commit(s) {', '.join(sorted({str(r.get('commit', '?')) for r in records}))}; torch {prov.get('torch', '?')}; "
        f"hardware {', '.join(sorted({str(r.get('hardware', '?')) for r in records}) or ['?'])}, "
        f"{'/'.join(sorted({str(r.get('threads', '?')) for r in records})) or '?'} torch threads",
        f"- date: cells finished {_date_range(records)}; table written {utc_now()[:10]}"
        + (f"; wall time of the cells: {wall_seconds / 60:.1f} min" if wall_seconds else ""),
        f"- command: `{command}`",
    ]
    if any(_dirty(c) for r in rows.values() for c in r.values()):
        recheck = os.path.exists(os.path.join(out_dir, "recheck.md"))
        footer.append("- † a record of the cell was made from a tree with uncommitted changes (its commit ends in "
                      "+dirty; leaderboard.csv names each cell's commits)" +
                      ("; rechecked at a clean commit: [recheck.md](recheck.md)" if recheck else
                       "; not rechecked at a clean commit"))
    for f in figures:
        footer.append(f"- figure: [{os.path.basename(f)}](figures/{os.path.basename(f)})")
    md_path = os.path.join(out_dir, "leaderboard.md")
    with open(md_path, "w") as fh:
        fh.write(f"# Leaderboard: {suite.name}\n\n{suite.description.strip()}\n\n" + "\n".join(md + footer) + "\n")
    with open(os.path.join(out_dir, "leaderboard.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "dataset", "ipc", "mean", "std", "n", "diff_vs_base", "p_value", "source", "commits",
                    "dirty"])
        for n, r in rows.items():
            for c in cols:
                if c in r:
                    w.writerow([n, c[0], c[1], f"{r[c]['mean']:.3f}", f"{r[c]['std']:.3f}", r[c]["n"],
                                f"{r[c].get('diff', float('nan')):.3f}", f"{r[c].get('p', float('nan')):.4g}",
                                "measured", " ".join(r[c]["commits"]), "yes" if _dirty(r[c]) else "no"])
        for n, r in reported.items():
            for c in cols:
                if c in r:
                    w.writerow([n, c[0], c[1], r[c][0], "" if r[c][1] is None else r[c][1], "", "", "", "reported",
                                "", ""])
    tex = ["\\begin{tabular}{l" + "c" * len(cols) + "}", "\\toprule",
           " & ".join(["Method"] + [f"{d} {i}" for d, i in cols]) + " \\\\", "\\midrule"]
    for n, r in rows.items():
        tex.append(" & ".join([n.replace("_", "\\_")] + [_fmt(r.get(c), "tex") for c in cols]) + " \\\\")
    for n, r in reported.items():
        tex.append(" & ".join([f"{n} (reported)"] + [
            (_reported(r[c], "$\\pm$") if c in r else "--") for c in cols]) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}"]
    with open(os.path.join(out_dir, "leaderboard.tex"), "w") as fh:
        fh.write("\n".join(tex).replace("—", "--") + "\n")
    return md_path
