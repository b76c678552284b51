"""The documentation site's generated parts (docs/hooks.py calls these at every `mkdocs build`): one page per
results folder (its READMEs, leaderboards and bench reports, with its figures and files), and tables read from the
code (a method's config defaults and presets, the solver registry), so a rerun or a changed default updates the
site without anyone editing a page."""
import dataclasses
import inspect
import os
import re

from benchmark.core.registry import get_method
from influence.ihvp import SolverConfig
from influence.iwd import IWD_SOLVER_DEFAULTS, SOLVER_KEYS, IWDOptions
from influence.solvers import SOLVERS

RESULT_FILES = (".png", ".csv", ".tex", ".json", ".yaml")  # shipped beside a results page and linked from it


def result_folders(results_root):
    """Every folder under results_root holding Markdown reports, run roots (*-runs) excluded: relative paths."""
    out = []
    for d, dirs, files in os.walk(results_root):
        dirs[:] = sorted(x for x in dirs if not x.endswith("-runs") and x != "runs")
        if any(f.endswith(".md") for f in files):
            out.append(os.path.relpath(d, results_root))
    return sorted(out)


def _demote(markdown, anchor):
    """The report's headings one level down (the page has its own title); the first gets the anchor."""
    lines, first = [], True
    for line in markdown.splitlines():
        if line.startswith("#"):
            line = "#" + line + (f" {{#{anchor}}}" if first else "")
            first = False
        lines.append(line)
    if first:  # no heading: give the section one
        lines.insert(0, f"## {anchor} {{#{anchor}}}")
    return "\n".join(lines)


def results_page(results_root, folder):
    """(markdown, [(uri relative to the page, absolute path)]) of one results folder's page."""
    path = os.path.join(results_root, folder)
    names = sorted(os.listdir(path))
    reports = sorted((f for f in names if f.endswith(".md")),
                     key=lambda f: (f != "README.md", f != "leaderboard.md", f))
    anchors = {f: os.path.splitext(f)[0].lower() for f in reports}
    title = "results/" + ("" if folder == "." else folder)
    body = [f"# {title}", "", f"Generated from `{title}` by `benchmark/report/site.py`: rerun its command (in each "
                              f"report's footer) and rebuild the site to update this page.", ""]
    for f in reports:
        text = open(os.path.join(path, f), encoding="utf-8").read()
        for other, anchor in anchors.items():  # links between the merged reports become links within the page
            text = text.replace(f"]({other})", f"](#{anchor})")
        body += [_demote(text, anchors[f]), ""]
    assets, shown = [], "\n".join(body)
    for sub in ("", "figures"):
        d = os.path.join(path, sub)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if f.endswith(RESULT_FILES):
                assets.append((os.path.join(sub, f) if sub else f, os.path.join(d, f)))
    pictures = [uri for uri, _ in assets if uri.endswith(".png")]
    if pictures:
        body += ["## Figures", ""] + [f"![{os.path.basename(u)}]({u})\n" for u in pictures]
    others = [uri for uri, _ in assets if not uri.endswith(".png") and f"]({uri})" not in shown]
    if others:
        body += ["## Files", ""] + [f"- [{u}]({u})" for u in others]
    return "\n".join(body) + "\n", assets


def results_index(results_root):
    """The Results section's table of contents: one line per results page with its suite's description."""
    lines = ["| page | what it holds |", "|---|---|"]
    for folder in result_folders(results_root):
        path = os.path.join(results_root, folder)
        first = ""
        for f in ("README.md", "leaderboard.md", "bench.md", *sorted(os.listdir(path))):
            full = os.path.join(path, f)
            if f.endswith(".md") and os.path.isfile(full):
                text = [ln for ln in open(full, encoding="utf-8").read().splitlines() if ln.strip()]
                prose = [ln for ln in text if not ln.startswith(("#", "|", "-", "```"))]  # its first sentence
                first = (prose or text or [""])[0]
                if f not in ("leaderboard.md", "bench.md") and text and text[0].startswith("#"):  # its title says it best
                    first = re.sub(r"^#+\s*", "", text[0])
                if f == "bench.md":  # a benchmark's command would overflow the table: name what it measured
                    first = "Benchmark: " + "; ".join(
                        re.sub(r"\s*\(.*", "", ln[3:]) for ln in text if ln.startswith("## ")) + "."
                first = first[:first.find(". ") + 1] if ". " in first[:200] else (
                    first if len(first) <= 200 else first[:first.rfind(" ", 0, 200)] + " ...")
                break
        link = f"{folder}/index.md" if folder != "." else "bench/index.md"
        lines.append(f"| [results/{'' if folder == '.' else folder}]({link}) | {first.replace('|', '/')} |")
    return "\n".join(lines)


def _field_notes(config_cls):
    """key -> the comment beside the field's declaration (with its continuation lines), from the config class and
    its bases."""
    notes = {}
    for klass in reversed(config_cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # generated classes (IWD's config) have no source of their own
            continue
        key = None
        for line in lines:
            field = re.match(r"^\s+(\w+): [^#]*(?:#\s*(.+))?$", line)
            more = re.match(r"^\s+#\s*(.+)$", line)
            if field and field.group(2):
                key, notes[field.group(1)] = field.group(1), field.group(2).strip()
            elif field:  # redeclared without a comment (a subclass's own default): the base's note is not its own
                key = None
                notes.pop(field.group(1), None)
            elif more and key:
                notes[key] += " " + more.group(1).strip()
            else:
                key = None
    return notes


def _cell(text):
    """Plain text safe inside a Markdown table cell."""
    return text.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;")


def config_table(method_name):
    """A method's config as the code defines it: key, reference default, each preset's override, and the comment
    beside the declaration."""
    cls = get_method(method_name)
    presets, notes = sorted(cls.presets), _field_notes(cls.Config)
    lines = ["| key | reference default | " + " | ".join(f"preset `{p}`" for p in presets) + " | note |",
             "|---|---|" + "---|" * len(presets) + "---|"]
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        cells = [f"`{cls.presets[p][f.name]}`" if f.name in cls.presets[p] else "" for p in presets]
        note = _cell(notes.get(f.name, ""))
        lines.append(f"| `{f.name}` | `{default}` | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def iwd_options_table():
    """The options every iwd+* method adds to its base's config: IWD's own, then the solver's (SolverConfig's fields
    under IWD's keys, with IWD's defaults)."""
    lines = ["| key | default | note |", "|---|---|---|"]
    notes, solver_notes = _field_notes(IWDOptions), _field_notes(SolverConfig)
    for f in dataclasses.fields(IWDOptions):
        lines.append(f"| `{f.name}` | `{f.default}` | {_cell(notes.get(f.name, ''))} |")
    solver_fields = {f.name: f for f in dataclasses.fields(SolverConfig)}
    for key, name in SOLVER_KEYS.items():
        default = IWD_SOLVER_DEFAULTS.get(key, solver_fields[name].default)
        lines.append(f"| `{key}` | `{default}` | {_cell(solver_notes.get(name, ''))} |")
    return "\n".join(lines)


def solvers_table():
    """The solver registry (influence.solvers.SOLVERS), as validation and scoring read it."""
    lines = ["| solver | curvatures | exact | needs | cost |", "|---|---|---|---|---|"]
    for name, s in SOLVERS.items():
        lines.append(f"| `{name}` | {', '.join(s.curvatures)} | {'yes' if s.exact else 'no'} | {s.needs} | "
                     f"{s.cost} |")
    return "\n".join(lines)


def leaderboard_table(results_root, folder):
    """The first table of results/<folder>/leaderboard.md (a headline table that a rerun updates)."""
    lines = open(os.path.join(results_root, folder, "leaderboard.md"), encoding="utf-8").read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


GENERATED = {"solvers": solvers_table, "config": config_table, "iwd-options": iwd_options_table}


def expand(markdown, results_root):
    """Replace `<!-- generated: NAME [ARG] -->` markers with the tables they name (GENERATED, results-index)."""
    def one(match):
        name, arg = match.group(1), match.group(2)
        if name == "results-index":
            return results_index(results_root)
        if name == "leaderboard":
            return leaderboard_table(results_root, arg)
        return GENERATED[name](arg) if arg else GENERATED[name]()
    return re.sub(r"<!-- generated: ([\w-]+)(?: ([\w+.-]+))? -->", one, markdown)
