"""Figures like the paper's (matplotlib, PNG)."""
import math
import os

import torch
from benchmark.core.synthetic import SyntheticSet
from .leaderboard import base_row, row_name


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_path):
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    _plt().close(fig)
    return out_path


def influence_figure(scores, dataset, cls, out_path, n_tail=8, title=None,
                     xlabel="influence score (positive: upweighting raises the distillation objective)"):
    """The paper's Figure 1: the distribution of per-instance influence scores of one class, with the real images
    of both tails (lowest scores left, highest right). scores: one per training instance."""
    plt = _plt()
    ix = dataset.class_indices[cls]
    s = torch.as_tensor(scores)[ix].double()
    scored = ~torch.isnan(s)  # NaN: not scored (a tracked score for an instance never sampled)
    ix, s = ix[scored], s[scored]
    order = s.argsort()
    low, high = ix[order[:n_tail]], ix[order.flip(0)[:n_tail]]
    fig = plt.figure(figsize=(10, 5.2))
    ax = fig.add_axes([0.08, 0.42, 0.88, 0.5])
    ax.hist(s.numpy(), bins=40, color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("instances")
    name = dataset.class_names[cls] if dataset.class_names else str(cls)
    ax.set_title(title or f"{dataset.name}, class {name}: {len(ix)} instances")
    for row, (idx, label) in enumerate(((low, "lowest influence"), (high, "highest influence"))):
        for k, i in enumerate(idx.tolist()):
            a = fig.add_axes([0.02 + row * 0.5 + k * 0.058, 0.05, 0.055, 0.2])
            img = dataset.denormalize(dataset.x_train[i:i + 1])[0].clamp(0, 1)
            a.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
            a.set_xticks([])
            a.set_yticks([])
            a.set_xlabel(f"{float(torch.as_tensor(scores)[i]):.2g}", fontsize=7)
        fig.text(0.02 + row * 0.5, 0.28, label, fontsize=9)
    return _save(fig, out_path)


def _accuracies(records, network):
    """All evaluation accuracies (percent) of the records on one evaluation network (pooled over seeds and nets)."""
    out = []
    for r in records:
        ev = r.get("evaluations", {}).get(network)
        if ev:
            out += [100 * a for a in ev["accuracies"]]
    return out


def _mean_std(v):
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(v) > 1 else 0.0)


def tau_figure(records, out_path, network, base="dc", dataset=None):
    """The paper's Figure 4a: accuracy of iwd+<base> against tau, one line per IPC, with the base method
    (tau -> infinity) as a dashed line of the same colour; runs on raw (not z-scored) scores as dotted lines with
    crosses. Error bars: std over evaluation nets and seeds."""
    plt = _plt()
    iwd = "iwd+" + base
    recs = [r for r in records if r["method"] in (base, iwd) and (dataset is None or r["dataset"] == dataset)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, ipc in enumerate(sorted({r["ipc"] for r in recs})):
        colour = f"C{k}"
        for standardize, style in ((True, dict(marker="o")), (False, dict(marker="x", ls=":"))):
            taus = {}
            for r in recs:
                if r["method"] == iwd and r["ipc"] == ipc and bool(r["config"].get("standardize", True)) == standardize:
                    taus.setdefault(float(r["config"]["tau"]), []).append(r)
            if not taus:
                continue
            xs = sorted(taus)
            stats = [_mean_std(_accuracies(taus[t], network)) for t in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], color=colour, capsize=3, **style,
                        label=f"{iwd}, IPC {ipc}" + ("" if standardize else ", raw scores (standardize=false)"))
        b = _accuracies([r for r in recs if r["method"] == base and r["ipc"] == ipc], network)
        if b:
            ax.axhline(_mean_std(b)[0], color=colour, ls="--", lw=1, label=f"{base} (tau = inf), IPC {ipc}")
    ax.set_xscale("log")
    ax.set_xlabel("softmax temperature tau")
    ax.set_ylabel(f"test accuracy on {network} (%)")
    ax.set_title(f"Accuracy vs tau ({(dataset or recs[0]['dataset']) if recs else ''})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_path)


def architecture_figure(records, out_path, networks, pairs=(("dc", "iwd+dc"),), variant=None):
    """The paper's Figure 4b: base vs IWD accuracy on each evaluation architecture, grouped by IPC."""
    plt = _plt()
    recs = [r for r in records if variant is None or r.get("variant", "") in (variant, "")]
    ipcs = sorted({r["ipc"] for r in recs})
    bars = [(m, net) for net in networks for pair in pairs for m in pair]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.4 * len(ipcs) * len(bars) / 4), 4))
    width = 0.8 / len(bars)
    for j, (method, net) in enumerate(bars):
        ms = []
        for ipc in ipcs:
            acc = _accuracies([r for r in recs if r["method"] == method and r["ipc"] == ipc], net)
            ms.append(_mean_std(acc) if acc else (float("nan"), 0.0))
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(ipcs))], [m for m, _ in ms], width,
               yerr=[s for _, s in ms], capsize=2, label=f"{method} on {net}",
               color=f"C{networks.index(net)}", alpha=1.0 if method.startswith("iwd+") else 0.45)
    ax.set_xticks(range(len(ipcs)))
    ax.set_xticklabels([f"IPC {i}" for i in ipcs])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Base (light) vs IWD (dark) on each evaluation network")
    ax.legend(fontsize=7)
    lo = min((p.get_height() for p in ax.patches if p.get_height() == p.get_height()), default=0)
    ax.set_ylim(max(0, lo - 10), 100)
    fig.tight_layout()
    return _save(fig, out_path)


def sorted_by_influence_figure(synset, scores, dataset, out_path, n_show=12, title=None):
    """Figure 5 in our form: per class, the synthetic image(s) (left, framed) and then real instances of that
    class ordered from lowest to highest influence (n_show evenly spaced ranks, so both tails and the middle
    show). scores: one per training instance (run.py influence, or the EMA an IWD set carries)."""
    plt = _plt()
    x, y = synset.training_data(dataset)
    scores = torch.as_tensor(scores).double()
    classes = list(range(dataset.num_classes))
    fig, axes = plt.subplots(len(classes), n_show + 1, figsize=(0.75 * (n_show + 1), 0.8 * len(classes) + 0.6))

    def show(a, img):
        img = dataset.denormalize(img[None])[0].clamp(0, 1)
        a.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        a.set_xticks([])
        a.set_yticks([])
    for row, c in enumerate(classes):
        show(axes[row, 0], x[y == c][0])
        for side in axes[row, 0].spines.values():
            side.set_color("red")
            side.set_linewidth(2)
        ix = dataset.class_indices[c]
        ix = ix[~torch.isnan(scores[ix])]  # NaN: never scored
        order = ix[scores[ix].argsort()]
        picks = torch.linspace(0, len(order) - 1, n_show).round().long()
        for k, p in enumerate(picks.tolist()):
            show(axes[row, k + 1], dataset.x_train[order[p]])
    axes[0, 0].set_title("synthetic", fontsize=7)
    axes[0, 1].set_title("lowest", fontsize=7)
    axes[0, n_show].set_title("highest", fontsize=7)
    fig.suptitle(title or "Synthetic images and real instances sorted by influence (low -> high)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_path)


def tracked_influence_figures(records, sets_dir, dataset_of, out_dir, cls=0):
    """Figures 1 and 5 from the influence an IWD set tracked during distillation (extras['influence']: an EMA per
    training instance, NaN where never sampled), for the first IWD cell at the smallest IPC (iwd+dc preferred)."""
    cells = sorted((r for r in records if r["method"].startswith("iwd+") and not r.get("variant", "").startswith("tau")
                    and os.path.exists(os.path.join(sets_dir, r["key"] + ".pt"))),
                   key=lambda r: (r["method"] != "iwd+dc", r["ipc"], r["dataset"], r["seed"], r["key"]))
    if not cells:
        return []
    r = cells[0]
    syn = SyntheticSet.load(os.path.join(sets_dir, r["key"] + ".pt"))
    inf = syn.extras.get("influence")
    if not inf:
        return []
    ds = dataset_of(r["dataset"])
    scores = torch.where(inf["count"] > 0, inf["ema"].double(), torch.tensor(float("nan"), dtype=torch.float64))
    tag = f"{r['method'].replace('+', '-')}_ipc{r['ipc']}"
    what = f"{r['method']} IPC {r['ipc']}, influence tracked during distillation (EMA)"
    fig1 = os.path.join(out_dir, "figures", f"tracked_influence_{tag}_class{cls}.png")
    fig5 = os.path.join(out_dir, "figures", f"tracked_sorted_by_influence_{tag}.png")
    return [influence_figure(scores, ds, cls, fig1, title=f"{ds.name} class {cls}: {what}",
                             xlabel="tracked influence (EMA over the matching steps that sampled the instance)"),
            sorted_by_influence_figure(syn, scores, ds, fig5,
                                       title=f"{ds.name}, {what}: synthetic | real, low -> high")]


def cost_figure(records, out_path, network):
    """Accuracy against distillation cost, one panel per (dataset, IPC) column: each row (method@variant) a point
    at its mean distillation time (wall seconds, log scale) and mean accuracy on `network` over its records; an
    IWD row is joined to its base row (same variant) by a line. Rows without a distillation (random, full) sit at
    their recorded time (seconds). Returns the path, or None when no record has a time."""
    plt = _plt()
    from matplotlib import ticker
    cols = sorted({(r["dataset"], r["ipc"]) for r in records if r.get("distill_seconds") is not None})
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 4.4), squeeze=False)
    all_points = []
    for ax, (dataset, ipc) in zip(axes[0], cols):
        points, first = {}, {}
        all_points.append(points)
        for n in sorted({row_name(r) for r in records if (r["dataset"], r["ipc"]) == (dataset, ipc)}):
            recs = [r for r in records if row_name(r) == n and (r["dataset"], r["ipc"]) == (dataset, ipc)]
            accs = _accuracies(recs, network)
            if accs:
                first[n] = recs[0]
                points[n] = (max(sum(r["distill_seconds"] for r in recs) / len(recs), 0.1), sum(accs) / len(accs))
        for n, (x, y) in points.items():
            iwd = n.startswith("iwd+")
            ax.scatter([x], [y], color="#c44e52" if iwd else "#4c72b0", zorder=3)
            base = base_row(first[n], points) if iwd else None  # the leaderboard's own comparison
            if base:
                ax.plot([points[base][0], x], [points[base][1], y], color="#c44e52", lw=1, alpha=0.6, zorder=2)
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.1)  # room for the labels of the outermost points
        xs = [x for x, _ in points.values()]
        decades = math.log10(max(xs) / min(xs)) if xs else 0
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5) if decades <= 3 else (1,)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("distillation time per cell (s, log scale; as recorded; 0.1 s: none)")
        ax.set_ylabel(f"accuracy on {network} (%)")
        ax.set_title(f"{dataset}, IPC {ipc}")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against distillation cost (red: IWD variants, joined to their base)", fontsize=10)
    fig.tight_layout()
    for ax, labels in zip(axes[0], all_points):
        _label_points(fig, ax, labels)
    return _save(fig, out_path)


LABEL_OFFSETS = [((dx, dy), "left" if dx > 0 else "right", "bottom" if dy > 0 else "top")
                 for dy in (3, -3, 9, -9) for dx in (4, -4)]  # points: nearest the marker first


def _label_points(fig, ax, points, fontsize=6.5):
    """Name each point beside it, at the one of LABEL_OFFSETS (first first) where its text stays inside the axes
    and covers no marker and no label placed before (top to bottom), so that close points (a base and its IWD row)
    stay readable; where none is free, the one covering least (text outside the axes counts as covered)."""
    from matplotlib.transforms import Bbox
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    r = 3.5 * fig.dpi / 72  # a marker's half-width in pixels
    placed = [Bbox.from_extents(px - r, py - r, px + r, py + r)
              for px, py in (ax.transData.transform(p) for p in points.values())]

    def area(b):
        return max(b.width, 0) * max(b.height, 0)

    def covered(box):
        outside = area(box) - area(Bbox.intersection(box, frame) or Bbox.from_extents(0, 0, 0, 0))
        return outside + sum(area(Bbox.intersection(box, other) or Bbox.from_extents(0, 0, 0, 0))
                             for other in placed)

    for n, (x, y) in sorted(points.items(), key=lambda kv: -kv[1][1]):
        best = None
        for offset, ha, va in LABEL_OFFSETS:
            text = ax.annotate(n, (x, y), textcoords="offset points", xytext=offset, ha=ha, va=va,
                               fontsize=fontsize)
            box = text.get_window_extent(renderer)
            cost = covered(box)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        placed.append(best[2])


def suite_figures(records, out_dir, eval_networks, sets_dir=None, dataset_of=None):
    """The figures a suite's records support, drawn next to its leaderboard: accuracy against distillation cost,
    Figure 4a for every base whose IWD
    variant ran at more than one tau, Figure 4b when there are several evaluation networks, and Figures 1 and 5
    from the tracked influence of an IWD cell's set (when sets_dir and dataset_of are given)."""
    made = []
    if sets_dir and dataset_of:
        made += tracked_influence_figures(records, sets_dir, dataset_of, out_dir)
    cost = cost_figure(records, os.path.join(out_dir, "figures", "accuracy_vs_cost.png"), eval_networks[0])
    made += [cost] if cost else []
    bases = sorted({r["method"][4:] for r in records if r["method"].startswith("iwd+")})
    for base in bases:
        taus = {float(r["config"]["tau"]) for r in records if r["method"] == "iwd+" + base}
        if len(taus) > 1:
            made.append(tau_figure(records, os.path.join(out_dir, "figures", f"tau_{base}.png"),
                                   eval_networks[0], base))
    pairs = tuple((b, "iwd+" + b) for b in bases if any(r["method"] == b for r in records))
    if len(eval_networks) > 1 and pairs:
        made.append(architecture_figure(records, os.path.join(out_dir, "figures", "architectures.png"),
                                        list(eval_networks), pairs, variant="base"))
    return made
