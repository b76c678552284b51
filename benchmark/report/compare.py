"""Two rows of a suite side by side, as a study's verdict quotes them: per seed each row's accuracy (mean over its
evaluation networks) and distillation time, the per-seed difference and time ratio; then, over the seeds both rows
have, the difference of the pooled accuracies with a two-sided Welch t-test (as the leaderboard marks it), a paired
t-test over the per-seed differences (seeds move both rows alike, so pairing removes the seed-to-seed spread the
Welch test counts as noise), and the ratio of total distillation times. A row is a leaderboard row name: `method` or
`method@variant`."""
from collections import defaultdict

import numpy as np

from evaluation.stats import paired_test, welch_test

from benchmark.platform.errors import BenchmarkError
from benchmark.report.leaderboard import row_name


def compare_rows(records, a, b):
    """-> one dict per (dataset, ipc) both rows have: `rows` (a, b as resolved: a bare method name with one variant
    becomes `method@variant`), `seeds` [(seed, {row: (accuracies %, distill s)})], `diff`
    and `p` (Welch over the pooled accuracies of the common seeds), `paired_p` (paired t-test over the seeds' mean
    accuracies; nan below 2 seeds or with identical differences), `ratio` (total distillation time a / b)."""
    a, b = (_resolve_row(records, row) for row in (a, b))
    cells = defaultdict(dict)  # (dataset, ipc) -> {(row, seed): (accs, seconds)}
    for r in records:
        if row_name(r) in (a, b) and r.get("accuracy"):
            cells[(r["dataset"], r["ipc"])][(row_name(r), r["seed"])] = (
                [100 * x for x in r["accuracy"]["accuracies"]], r["distill_seconds"])
    out = []
    for (dataset, ipc), got in sorted(cells.items()):
        common = sorted({s for (row, s) in got if row == a} & {s for (row, s) in got if row == b})
        if not common:
            continue
        seeds = [(s, {row: got[(row, s)] for row in (a, b)}) for s in common]
        diff, p = welch_test([x for _, g in seeds for x in g[a][0]], [x for _, g in seeds for x in g[b][0]])
        per_seed = np.array([np.mean(g[a][0]) - np.mean(g[b][0]) for _, g in seeds])
        paired_p = paired_test(per_seed)
        ratio = sum(g[a][1] for _, g in seeds) / max(sum(g[b][1] for _, g in seeds), 1e-9)
        out.append({"rows": (a, b), "dataset": dataset, "ipc": ipc, "seeds": seeds, "diff": diff, "p": p,
                    "paired_p": paired_p, "ratio": ratio})
    if not out:
        raise BenchmarkError(f"rows {a!r} and {b!r} share no finished (dataset, IPC, seed): nothing to compare yet")
    return out


def _resolve_row(records, row):
    """A row name as the records have it: `method@variant`, or a bare method name that has one variant only."""
    rows = sorted({row_name(r) for r in records if r.get("accuracy")})
    if row in rows:
        return row
    variants = [r for r in rows if r.split("@")[0] == row]
    if len(variants) == 1:
        return variants[0]
    raise BenchmarkError(f"no finished cell of row {row!r}" + (" (name its variant)" if variants else "")
                         + f"; rows with finished cells: {', '.join(rows)}")


def format_comparison(comparisons):
    """Markdown: a table per (dataset, ipc), a row per common seed and one for all of them."""
    lines = []
    for c in comparisons:
        a, b = c["rows"]
        lines += [f"### {c['dataset']}, IPC {c['ipc']}: {a} vs {b}", "",
                  f"| seed | {a} | {b} | difference | {a} distill (min) | {b} distill (min) | time ratio |",
                  "|---|---|---|---|---|---|---|"]
        for seed, g in c["seeds"]:
            (acc_a, t_a), (acc_b, t_b) = g[a], g[b]
            lines.append(f"| {seed} | {np.mean(acc_a):.2f} | {np.mean(acc_b):.2f} | "
                         f"{np.mean(acc_a) - np.mean(acc_b):+.2f} | {t_a / 60:.1f} | {t_b / 60:.1f} | "
                         f"{t_a / max(t_b, 1e-9):.2f}x |")
        pooled = {row: [x for _, g in c["seeds"] for x in g[row][0]] for row in (a, b)}
        p, paired = ("n/a" if np.isnan(x) else f"{x:.3f}" for x in (c["p"], c["paired_p"]))
        minutes = {row: sum(g[row][1] for _, g in c["seeds"]) / 60 for row in (a, b)}
        lines += [f"| all {len(c['seeds'])} | {np.mean(pooled[a]):.2f} ± {np.std(pooled[a]):.2f} (n={len(pooled[a])}) "
                  f"| {np.mean(pooled[b]):.2f} ± {np.std(pooled[b]):.2f} (n={len(pooled[b])}) | "
                  f"**{c['diff']:+.2f}** (Welch p = {p}; paired over seeds p = {paired}) | {minutes[a]:.1f} | "
                  f"{minutes[b]:.1f} | **{c['ratio']:.2f}x** |", ""]
    lines.append("Accuracy: final-epoch test accuracy (%), per seed the mean over its evaluation networks; 'all' pools "
                 "every network of the common seeds (mean ± population std); Welch p: a two-sided Welch t-test over "
                 "those pooled values; paired p: a two-sided t-test of the per-seed differences against 0. "
                 "Distillation times are wall times as the records measured them: a ratio is only fair between cells "
                 "run under the same load.")
    return "\n".join(lines) + "\n"
