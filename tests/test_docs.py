"""The documentation site: it builds strictly (a broken link, a missing anchor or a page left out of the navigation
fails), every run.py command is in its CLI reference, and its generated parts come from the code and results/."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_every_command_is_in_the_cli_reference(site):
    import run
    html = open(site / "cli" / "index.html", encoding="utf-8").read()
    missing = [name for name in run.cli.commands if f'id="python-runpy-{name}"' not in html]
    assert not missing and len(run.cli.commands) >= 11, missing
    assert "Sentinel" not in html and "<em>required</em>" in html  # distill's --method shows as required


def test_generated_pages_follow_the_code_and_the_results(site):
    """A method page's config table is the Config dataclass (DC's 1000 iterations, the cpu preset's 200); the
    solver table is the registry; every results folder has its page with its figures."""
    from benchmark.report.site import result_folders
    from influence.solvers import SOLVERS
    dc = open(site / "methods" / "dc" / "index.html", encoding="utf-8").read()
    assert "<code>iterations</code></td>\n<td><code>1000</code></td>" in dc and "<code>200</code>" in dc
    iwd = open(site / "iwd" / "index.html", encoding="utf-8").read()
    assert all(f"<code>{name}</code>" in iwd for name in SOLVERS)
    for folder in result_folders(os.path.join(ROOT, "results")):
        page = site / "results" / (folder if folder != "." else "bench") / "index.html"
        assert page.exists(), folder
    assert (site / "results" / "quick" / "figures" / "accuracy_vs_cost.png").exists()


def test_the_results_index_describes_each_folder_in_a_line_without_its_command(tmp_path):
    """A benchmark folder is described by what it measured (its section titles), any other page by its title;
    never by a command line, which would overflow the index table."""
    from benchmark.report.site import results_index
    (tmp_path / "speed").mkdir()
    (tmp_path / "speed" / "bench.md").write_text(
        "# Performance benchmark\n\n`python run.py bench --quick --sections evaluation --out results/speed`\n\n"
        "## Evaluation (seconds per epoch)\n\n| a | b |\n|---|---|\n")
    (tmp_path / "check").mkdir()
    (tmp_path / "check" / "notes.md").write_text("# plan vs measured\n\nMeasured: `python run.py run --suite quick`\n")
    rows = results_index(str(tmp_path)).splitlines()[2:]
    assert rows == ["| [results/check](check/index.md) | plan vs measured |",
                    "| [results/speed](speed/index.md) | Benchmark: Evaluation. |"]


def test_no_list_starts_right_after_a_paragraph_line():
    """Python-Markdown (MkDocs) needs a blank line before a list: without one, the items run into the paragraph
    above as a single block of text. Checked over the docs, the README and every results page the site includes."""
    import glob
    import re
    item = re.compile(r"\s*(- |\* |\d+\. )")
    files = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True),
             *glob.glob(os.path.join(ROOT, "results", "**", "*.md"), recursive=True)]
    bad = []
    for path in files:
        lines, fenced = open(path, encoding="utf-8").read().split("\n"), False
        for i, line in enumerate(lines[1:], start=1):
            fenced ^= line.startswith("```")
            prev = lines[i - 1]
            if (not fenced and item.match(line) and not line.startswith(" ") and prev.strip()
                    and not item.match(prev) and not prev.startswith(("  ", "#", "|", "<!--", "```"))):
                bad.append(f"{os.path.relpath(path, ROOT)}:{i + 1}")
    assert not bad, f"a list right after a paragraph line (add a blank line before it): {bad}"
