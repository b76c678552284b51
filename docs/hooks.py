"""MkDocs hooks: the site's generated parts come from the project's own code (benchmark/report/site.py).

- one page per results folder (results/<folder>/index.md), with its figures and files, added to the navigation
  under Results;
- `<!-- generated: ... -->` markers in the pages replaced by tables read from the code (config defaults, solvers).
"""
import os
import sys

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmark.report import site  # noqa: E402

RESULTS = os.path.join(ROOT, "results")


def _page_dir(folder):
    return "results/" + (folder if folder != "." else "bench")


def on_config(config):
    """The Results section lists the hand-written pages of mkdocs.yml, then one generated page per results folder."""
    pages = [{("bench (the latest)" if f == "." else f): _page_dir(f) + "/index.md"}
             for f in site.result_folders(RESULTS)]
    for entry in config["nav"]:
        if isinstance(entry, dict) and "Results" in entry:
            entry["Results"] = list(entry["Results"]) + [{"Every results folder": pages}]
    return config


def on_files(files, config):
    for folder in site.result_folders(RESULTS):
        markdown, assets = site.results_page(RESULTS, folder)
        files.append(File.generated(config, _page_dir(folder) + "/index.md", content=markdown))
        for uri, path in assets:
            files.append(File.generated(config, f"{_page_dir(folder)}/{uri}", abs_src_path=path))
    return files


def on_page_markdown(markdown, page, config, files):
    return site.expand(markdown, RESULTS)


def on_page_content(html, page, config, files):
    """mkdocs-click shows a required option's missing default as click's internal sentinel: say "required"."""
    return html.replace("<code>Sentinel.UNSET</code>", "<em>required</em>")
