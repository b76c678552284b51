"""Two runs of one suite, cell by cell: are the synthetic sets bit-identical and the accuracies the same?

For determinism checks (one machine, twice) and portability checks (CPU against GPU, one GPU against another):
`run.py reproduce`. A set that differs is described by its largest pixel difference; accuracies by the
difference of the cell means, in points.
"""
import torch


def compare_runs(records_a, records_b, images_a, images_b):
    """records_x: finished records of each run; images_x(key): that run's synthetic images of the cell, or None
    where the set is not stored. Returns (rows for the cells both runs finished, keys only one run finished)."""
    a = {r["key"]: r for r in records_a}
    b = {r["key"]: r for r in records_b}
    rows = []
    for key in sorted(set(a) & set(b)):
        acc_a, acc_b = a[key]["accuracy"]["accuracies"], b[key]["accuracy"]["accuracies"]
        xa, xb = images_a(key), images_b(key)
        if xa is None or xb is None:
            set_state, max_diff = "not stored", None
        elif xa.shape != xb.shape:
            set_state, max_diff = f"shapes differ {tuple(xa.shape)} / {tuple(xb.shape)}", None
        elif torch.equal(xa, xb):
            set_state, max_diff = "bit-identical", 0.0
        else:
            set_state, max_diff = "differs", float((xa.double() - xb.double()).abs().max())
        rows.append({"key": key, "accuracies_a": acc_a, "accuracies_b": acc_b,
                     "same_accuracies": acc_a == acc_b,
                     "mean_diff_points": 100 * (b[key]["accuracy"]["mean"] - a[key]["accuracy"]["mean"]),
                     "set": set_state, "max_pixel_diff": max_diff,
                     "device_a": a[key].get("device_name", "?"), "device_b": b[key].get("device_name", "?")})
    return rows, sorted(set(a) ^ set(b))


def format_reproduction(rows, only_one, label_a, label_b):
    lines = [f"# Reproduction: {label_a} (A) against {label_b} (B)", "",
             "| cell | set | largest pixel difference | accuracies A (%) | accuracies B (%) | B - A (points) |",
             "|---|---|---|---|---|---|"]
    pct = lambda accs: ", ".join(f"{100 * x:.2f}" for x in accs)  # noqa: E731
    for r in rows:
        diff = "" if r["max_pixel_diff"] is None else f"{r['max_pixel_diff']:.3g}"
        b = "same" if r["same_accuracies"] else pct(r["accuracies_b"])
        lines.append(f"| {r['key']} | {r['set']} | {diff} | {pct(r['accuracies_a'])} | {b} | "
                     f"{r['mean_diff_points']:+.2f} |")
    n = len(rows)
    identical = sum(r["set"] == "bit-identical" for r in rows)
    same = sum(r["same_accuracies"] for r in rows)
    mean_abs = sum(abs(r["mean_diff_points"]) for r in rows) / n if n else 0.0
    largest = max((abs(r["mean_diff_points"]) for r in rows), default=0.0)
    devices = sorted({f"{r['device_a']} / {r['device_b']}" for r in rows})
    lines += ["", f"{n} cells in both runs: {identical} bit-identical sets, {same} with the same per-network "
                  f"accuracies; cell means differ by {mean_abs:.2f} points on average (largest {largest:.2f}). "
                  f"Devices (A / B): {'; '.join(devices) or '-'}."]
    if only_one:
        lines.append(f"Finished in one run only ({len(only_one)}): {', '.join(only_one)}.")
    return "\n".join(lines) + "\n"
