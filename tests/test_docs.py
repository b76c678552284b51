"""The documentation site: it builds strictly (a broken link, a missing anchor or a page left out of the navigation
fails), every run.py command is in its CLI reference, and its generated parts come from the code and results/."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.xdist_group("docs")  # one pytest-xdist worker builds the site once for the whole module


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


def _python_blocks(path):
    import re
    return re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), flags=re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/extending.md"])
def test_the_add_your_own_method_example_runs_as_written(page, tmp_path):
    """The method example, saved as mymethods.py, registers mean-shift and iwd+mean-shift, and both distil and
    evaluate on the CPU through `run.py --plugin mymethods check` (one tiny iteration, one evaluation epoch)."""
    (tmp_path / "mymethods.py").write_text(_python_blocks(os.path.join(ROOT, page))[0])
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--threads", "1", "--plugin", "mymethods",
                          "check", "--device", "cpu", "--methods", "mean-shift,iwd+mean-shift"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] in (["mean-shift"], ["iwd+mean-shift"])]
    assert sorted(r[0] for r in rows) == ["iwd+mean-shift", "mean-shift"] and all(r[1] == "ok" for r in rows), out.stdout


def test_the_dataset_and_network_examples_register_what_they_say(tmp_path):
    """Extending's dataset and network examples, run as a plugin module in a fresh process: the network builds and
    maps a batch to logits, and the dataset loads from my_digits.npz under the data root (and, without the file,
    the error says how to get it)."""
    blocks = _python_blocks(os.path.join(ROOT, "docs", "extending.md"))
    dataset_block = next(b for b in blocks if "register_dataset(" in b)
    network_block = next(b for b in blocks if "register_network(" in b)
    (tmp_path / "myparts.py").write_text(dataset_block + "\n\n" + network_block)
    script = """
import numpy as np, torch, myparts
from benchmark.data.datasets import get_dataset
from benchmark.nn.networks import get_network
net = get_network("TinyMLP", 1, 10, (8, 8))
assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
try:
    get_dataset("my-digits", data_root="%(root)s/empty")
    raise SystemExit("no error without the file")
except Exception as e:
    assert "my_digits.npz" in str(e), e
rng = np.random.default_rng(0)
np.savez("%(root)s/my_digits.npz", x_train=rng.random((20, 1, 8, 8), dtype=np.float32), y_train=np.arange(20) %% 10,
         x_test=rng.random((10, 1, 8, 8), dtype=np.float32), y_test=np.arange(10))
ds = get_dataset("my-digits", data_root="%(root)s")
print("ok", len(ds.y_train), len(ds.y_test))
""" % {"root": tmp_path}
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["ok", "20", "10"], out.stdout + out.stderr
