"""The leaderboard (benchmark.report.leaderboard): formats, reported rows, comparisons with the base, traits."""
import pytest

from helpers import tiny_suite as _suite


def test_reported_rows_are_marked_and_keep_a_missing_std_missing(tmp_path):
    """Published numbers appear as '(reported)' rows in all three formats; IDC's Fashion-MNIST numbers come without
    a std in its paper, and the table must not invent one."""
    from benchmark.report.leaderboard import write_leaderboard
    from benchmark.grid.runner import run_cell
    suite = _suite(tmp_path, methods=["random"])
    record = dict(run_cell(suite, suite.cells()[0], str(tmp_path / "runs"), log=False), dataset="fashion-mnist")
    md = open(write_leaderboard([record], str(tmp_path / "out"), suite, "cmd")).read()
    assert "| DC (reported) | 70.5 ± 0.6 |" in md and "| IDC (reported) | 81.0 |" in md
    assert "IDC (reported) & 81.0 \\\\" in open(tmp_path / "out" / "leaderboard.tex").read()
    assert "IDC,fashion-mnist,1,81.0,,,,,reported,," in open(tmp_path / "out" / "leaderboard.csv").read()


def test_gain_over_random_and_reported_table1_rows():
    """The gain line subtracts random's mean in each column from every ranked row (selection rows are not listed);
    the IWD paper's Table-1 rows we do not run are reported where their datasets appear."""
    from benchmark.report.leaderboard import REPORTED, gain_over_random
    cols = [("cifar10", 1), ("cifar10", 10)]
    rows = {"random": {cols[0]: {"mean": 14.0}, cols[1]: {"mean": 26.0}},
            "herding": {cols[0]: {"mean": 20.0}}, "dc": {cols[0]: {"mean": 28.5}}}
    traits = {"random": {"ranked": False}, "herding": {"ranked": False}, "dc": {"ranked": True}}  # as records say
    lines = gain_over_random(rows, cols, traits)
    assert "| dc | +14.5 | — |" in lines and not any(line.startswith("| herding") for line in lines)
    assert REPORTED["MTT"][("cifar10", 10)] == (65.6, 0.7) and ("svhn", 1) not in REPORTED["MTT"]


def test_an_iwd_row_is_compared_with_its_base_over_the_seeds_both_have():
    """A partly run suite: the base has seeds 0-2, the IWD row seed 0 only. The difference is seed 0's (not one seed
    against three), and the table says so."""
    from benchmark.report.leaderboard import _fmt, build_table

    def rec(method, seed, accs):
        return {"method": method, "dataset": "digits", "ipc": 1, "seed": seed, "variant": "",
                "accuracy": {"accuracies": accs}, "evaluations": {}}
    records = [rec("dc", 0, [0.60, 0.61]), rec("dc", 1, [0.70, 0.71]), rec("dc", 2, [0.72, 0.73]),
               rec("iwd+dc", 0, [0.64, 0.65])]
    _, rows = build_table(records)
    cell = rows["iwd+dc"][("digits", 1)]
    assert cell["diff"] == pytest.approx(4.0) and cell["diff_seeds"] == 1
    text = _fmt(cell, "md")
    assert "(+4.0" in text and text.endswith("on 1 common seed)")
    records.append(rec("iwd+dc", 1, [0.70, 0.71]))
    records.append(rec("iwd+dc", 2, [0.72, 0.73]))
    _, rows = build_table(records)
    assert "diff_seeds" not in rows["iwd+dc"][("digits", 1)]


def test_the_leaderboard_reads_traits_from_the_records():
    """A record carries its method's traits, so a table built where that method is not registered (a plugin not
    loaded) still leaves an unranked row unranked and keeps a one-IPC method in every column."""
    from benchmark.report.leaderboard import build_table

    def rec(method, ipc, acc, traits):
        return {"method": method, "dataset": "digits", "ipc": ipc, "seed": 0, "variant": "", "traits": traits,
                "accuracy": {"accuracies": [acc]}, "evaluations": {}}
    plain = {"evaluation": "dc", "ranked": True, "uses_ipc": True}
    records = [rec("dc", 1, 0.5, plain), rec("dc", 10, 0.8, plain),
               rec("my-upper-bound", 1, 0.97, {**plain, "ranked": False, "uses_ipc": False})]
    cols, rows = build_table(records)
    assert cols == [("digits", 1), ("digits", 10)]
    assert all(c in rows["my-upper-bound"] and "rank" not in rows["my-upper-bound"][c] for c in cols)
    assert rows["dc"][("digits", 1)]["rank"] == 1


def test_cells_name_their_commits_and_dirty_ones_are_marked(tmp_path):
    """A cell with a record from a tree with uncommitted changes is marked † in the table, the csv names every
    cell's commits, and the footer says whether it was rechecked at a clean commit (results/<suite>/recheck.md)."""
    import csv
    import types

    from benchmark.report.leaderboard import write_leaderboard

    def rec(method, seed, commit):
        return {"method": method, "dataset": "digits", "ipc": 1, "seed": seed, "variant": "", "commit": commit,
                "accuracy": {"accuracies": [0.5], "num_eval": 1, "protocol": {"name": "dc"}, "network": "ConvNet"},
                "evaluations": {}}
    suite = types.SimpleNamespace(name="t", description="", reduced=True, preset="quick")
    records = [rec("dc", 0, "abc1234"), rec("dm", 0, "abc1234"), rec("dm", 1, "def5678+dirty")]
    for recheck in (False, True):
        if recheck:
            (tmp_path / "recheck.md").write_text("rechecked")
        md = open(write_leaderboard(records, str(tmp_path), suite, "cmd")).read()
        lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| d")}
        assert lines["dm"].endswith(" † |") and "†" not in lines["dc"]
        assert ("rechecked at a clean commit: [recheck.md](recheck.md)" in md) == recheck
        assert ("not rechecked" in md) != recheck
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "leaderboard.csv"))}
    assert rows["dm"]["commits"] == "abc1234 def5678+dirty" and rows["dm"]["dirty"] == "yes"
    assert rows["dc"]["commits"] == "abc1234" and rows["dc"]["dirty"] == "no"



def test_cost_figure_labels_of_close_points_do_not_overlap():
    """A base and its IWD row often sit almost on one spot of the accuracy-vs-cost figure: their labels are placed
    where no label covers another or a marker, inside the axes."""
    from benchmark.report.figures import _label_points, _plt
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    points = {"dc": (1000.0, 75.3), "idc": (1050.0, 75.31), "iwd+dc": (1100.0, 75.6), "dsa": (90.0, 65.9),
              "iwd+dsa": (120.0, 66.8), "random": (0.1, 52.4), "mtt": (2400.0, 81.6)}
    for x, y in points.values():
        ax.scatter([x], [y])
    ax.set_xscale("log")
    fig.tight_layout()
    _label_points(fig, ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    frame = ax.get_window_extent(renderer)
    plt.close(fig)
    assert sorted(boxes) == sorted(points)
    overlapping = [(a, b) for a in boxes for b in boxes if a < b and boxes[a].overlaps(boxes[b])]
    assert overlapping == []
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
               for b in boxes.values())
