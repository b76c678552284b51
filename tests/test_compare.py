"""run.py compare: two rows of a suite side by side, checked against a hand-computed Welch test; run.py reproduce:
two runs of a suite cell by cell, against sets built with known differences."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from benchmark.grid.runner import RunPaths
from benchmark.platform.errors import BenchmarkError
from benchmark.report.compare import compare_rows, format_comparison
from tests.helpers import cli, tiny_suite


def rec(method, seed, accs, seconds, key=None):
    return {"key": key or f"{method}-{seed}", "method": method, "dataset": "digits", "ipc": 1, "seed": seed,
            "variant": "", "accuracy": {"accuracies": accs}, "evaluations": {}, "distill_seconds": seconds}


def welch_by_hand(a, b):
    """The Welch t statistic and Welch-Satterthwaite degrees of freedom, from their textbook formulas."""
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), dof)


def test_rows_are_compared_over_their_common_seeds():
    """dc has seeds 0-1, iwd+dc seeds 0-2: seed 2 is left out of the difference, the p-value and the time ratio."""
    records = [rec("dc", 0, [0.60, 0.62], 60.0), rec("dc", 1, [0.70, 0.69], 120.0),
               rec("iwd+dc", 0, [0.64, 0.65], 300.0), rec("iwd+dc", 1, [0.71, 0.73], 300.0),
               rec("iwd+dc", 2, [0.10, 0.10], 9999.0)]
    (c,) = compare_rows(records, "iwd+dc", "dc")
    assert [s for s, _ in c["seeds"]] == [0, 1]
    a, b = [64.0, 65.0, 71.0, 73.0], [60.0, 62.0, 70.0, 69.0]
    assert c["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert c["p"] == pytest.approx(welch_by_hand(a, b), rel=1e-9)
    assert c["ratio"] == pytest.approx(600.0 / 180.0)
    d = np.array([64.5 - 61.0, 72.0 - 69.5])  # per-seed differences of the networks' means
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert c["paired_p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1), rel=1e-9)
    text = format_comparison([c])
    assert "| 0 | 64.50 | 61.00 | +3.50 | 5.0 | 1.0 | 5.00x |" in text
    assert f"**{np.mean(a) - np.mean(b):+.2f}**" in text and "**3.33x**" in text


def test_one_seed_has_no_paired_test():
    (c,) = compare_rows([rec("dc", 0, [0.6, 0.7], 1.0), rec("iwd+dc", 0, [0.65, 0.7], 2.0)], "iwd+dc", "dc")
    assert math.isnan(c["paired_p"]) and "paired over seeds p = n/a" in format_comparison([c])


def test_an_unknown_row_names_the_rows_there_are_and_a_bare_method_finds_its_one_variant():
    records = [rec("dc", 0, [0.6, 0.6], 1.0), rec("iwd+dc", 1, [0.6, 0.6], 1.0)]
    with pytest.raises(BenchmarkError, match="no finished cell of row 'dsa'.*dc, iwd\\+dc"):
        compare_rows(records, "dsa", "dc")
    variants = [{**rec("dc", 0, [0.6, 0.7], 1.0), "variant": "clean"},
                {**rec("iwd+dc", 0, [0.7, 0.72], 2.0), "variant": "clean"},
                {**rec("iwd+dc", 0, [0.5, 0.5], 2.0), "variant": "noisy"}]
    (c,) = compare_rows(variants, "iwd+dc@clean", "dc")
    assert c["rows"] == ("iwd+dc@clean", "dc@clean") and c["diff"] == pytest.approx(6.0)
    with pytest.raises(BenchmarkError, match="row 'iwd\\+dc' \\(name its variant\\)"):
        compare_rows(variants, "iwd+dc", "dc")
    with pytest.raises(BenchmarkError, match="share no finished"):
        compare_rows(records, "iwd+dc", "dc")


def test_the_command_reads_a_suites_records_and_writes_markdown(tmp_path):
    s = tiny_suite(tmp_path, seeds=[0, 1])
    paths = RunPaths(str(tmp_path / "runs"), s.name)
    paths.ensure()
    accs = {("dc", 0): [0.5, 0.52], ("dc", 1): [0.6, 0.58], ("iwd+dc", 0): [0.55, 0.57], ("iwd+dc", 1): [0.6, 0.62]}
    for cell in s.cells():
        if (cell.method, cell.seed) in accs:
            with open(paths.record(cell), "w") as f:
                json.dump(rec(cell.method, cell.seed, accs[(cell.method, cell.seed)], 90.0, cell.key), f)
    out = tmp_path / "cmp.md"
    p = cli("compare", "iwd+dc", "dc", "--suite", str(tmp_path / "tiny.yaml"), "--run-root", str(tmp_path / "runs"),
            "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "| all 2 |" in p.stdout and "**+3.50**" in p.stdout and "**1.00x**" in p.stdout
    assert out.read_text().startswith("### digits, IPC 1: iwd+dc vs dc")
    p = cli("compare", "iwd+dc", "dm", "--suite", str(tmp_path / "tiny.yaml"), "--run-root", str(tmp_path / "runs"))
    assert p.returncode == 2 and "no finished cell of row 'dm'" in p.stderr
    p = cli("compare", "iwd+dc", "dc", "--suite", str(tmp_path / "tiny.yaml"), "--run-root", str(tmp_path / "none"))
    assert p.returncode == 2 and "no finished cells for suite" in p.stderr
    assert f"python run.py run --suite {s.name} --run-root {tmp_path / 'none'}" in p.stderr


# ------------------------------------------------------------------------------------------- run.py reproduce
def test_reproduce_finds_identical_and_differing_sets_and_accuracies(tmp_path):
    """Two run roots of one suite: random is bit-identical, dc's set differs by a known pixel and one network's
    accuracy, iwd+dc is finished in one run only."""
    import torch

    from benchmark.core.synthetic import SyntheticSet
    s = tiny_suite(tmp_path)
    cells = {c.method: c for c in s.cells()}
    images = torch.randn(10, 1, 8, 8)
    for root, dc_shift, dc_accs, with_iwd in (("a", 0.0, [0.5, 0.6], True), ("b", 0.25, [0.5, 0.7], False)):
        paths = RunPaths(str(tmp_path / root), s.name)
        paths.ensure()
        for method, x, accs in (("random", images, [0.4, 0.4]), ("dc", images + dc_shift * (images == images.max()),
                                                                  dc_accs), ("iwd+dc", images, [0.5, 0.5])):
            if method == "iwd+dc" and not with_iwd:
                continue
            cell = cells[method]
            r = {**rec(method, 0, accs, 1.0, cell.key), "device_name": f"device {root}"}
            r["accuracy"]["mean"] = sum(accs) / len(accs)
            with open(paths.record(cell), "w") as f:
                json.dump(r, f)
            SyntheticSet(x.clone(), torch.arange(10)).save(paths.synthetic_set(cell))
    p = cli("reproduce", str(tmp_path / "b"), "--suite", str(tmp_path / "tiny.yaml"), "--run-root", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"| {cells['random'].key} | bit-identical | 0 | 40.00, 40.00 | same | +0.00 |" in out
    assert f"| {cells['dc'].key} | differs | 0.25 | 50.00, 60.00 | 50.00, 70.00 | +5.00 |" in out
    assert "2 cells in both runs: 1 bit-identical sets, 1 with the same per-network accuracies" in out
    assert "(largest 5.00)" in out and "device a / device b" in out
    assert f"Finished in one run only (1): {cells['iwd+dc'].key}." in out
    p = cli("reproduce", str(tmp_path / "none"), "--suite", str(tmp_path / "tiny.yaml"),
            "--run-root", str(tmp_path / "a"))
    assert p.returncode == 2 and "no finished cells for suite" in p.stderr
