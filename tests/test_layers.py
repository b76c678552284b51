"""The one import rule, checked on the whole graph of project imports (module level and inside functions).

Folders are layers; a module imports only from its own folder or from a lower layer (LAYERS, lowest first; folders
of one tier are peers and import nothing from each other). No cycle between modules. A project import inside a
function is allowed only to defer a heavy dependency, with `# deferred: <reason>` on its line or on a comment line
directly above its block of imports (or, for a file that defers in every function, `# deferred (whole file): <reason>`
at its top level: run.py, whose commands load torch only when they run).
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("benchmark", "influence", "evaluation", "methods")

LAYERS = [  # lowest first; the README's Layout section says the same
    ("benchmark", "benchmark/platform"),                    # (an empty namespace); errors, files, locks, device, ...
    ("benchmark/data", "benchmark/nn", "benchmark/core"),   # datasets; networks, training; method, registry, protocol
    ("influence", "evaluation"),                            # the influence analyzer; the evaluation harness
    ("methods",),                                           # every built-in method (a plugin, like a user's)
    ("benchmark/report",),                                  # leaderboards, figures
    ("benchmark/grid",),                                    # suites, the runner
    ("benchmark/tools",),                                   # plan, bench, the device check
    (".",),                                                 # run.py, the CLI
]
RANK = {folder: i for i, tier in enumerate(LAYERS) for folder in tier}


def project_modules():
    """{dotted module name: file path} of every project module (run.py included)."""
    out = {"run": os.path.join(ROOT, "run.py")}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def folder_of(module, path):
    return os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, "/")


def _resolve(importer, is_package, node, modules):
    """The project modules an import statement loads (a `from pkg import name` names a submodule or a name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    base = node.module or ""
    if node.level:
        parts = importer.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    if base.split(".")[0] not in PACKAGES:
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in modules else base)
    return out


def import_graph():
    """[(importer, imported, lineno, inside_function, deferred_reason_given)] over every project module."""
    modules = project_modules()
    edges = []
    for mod, path in modules.items():
        lines = open(path).read().splitlines()
        tree = ast.parse("\n".join(lines))
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(mod, path.endswith("__init__.py"), node, modules):
                    if target not in modules:
                        raise AssertionError(f"{path}:{node.lineno} imports {target}, which is not a project module")
                    edges.append((mod, target, node.lineno, id(node) in in_function, _deferred(lines, node)))
    return modules, edges


def _deferred(lines, node):
    """Whether the import carries '# deferred:' on its lines or on a comment line directly above its import block, or
    its file says '# deferred (whole file):' at top level."""
    if any(ln.startswith("# deferred (whole file):") for ln in lines) or any("# deferred:" in ln for ln in lines[node.lineno - 1:node.end_lineno]):
        return True
    i = node.lineno - 2
    while i >= 0:
        s = lines[i].strip()
        if s.startswith("#"):
            if "deferred:" in s:
                return True
        elif not (s.startswith(("import ", "from ")) or s == "" or s.endswith((",", "(")) or s.endswith(")")):
            return False
        i -= 1
    return False


def _cycles(nodes, edges):
    """Strongly connected components with more than one node (Tarjan)."""
    graph = {n: set() for n in nodes}
    for a, b in edges:
        if a != b:
            graph[a].add(b)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for n in graph:
        if n not in index:
            visit(n)
    return out


def test_every_folder_has_a_layer():
    modules = project_modules()
    missing = sorted({folder_of(m, p) for m, p in modules.items()} - set(RANK))
    assert not missing, f"folders without a layer in LAYERS: {missing}"


def test_no_import_against_the_layer_order():
    modules, edges = import_graph()
    bad = []
    for a, b, line, _, _ in edges:
        fa, fb = folder_of(a, modules[a]), folder_of(b, modules[b])
        if fa != fb and RANK[fb] >= RANK[fa]:
            bad.append(f"{modules[a]}:{line}: {a} ({fa}) imports {b} ({fb})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_cycle_between_modules_or_folders():
    modules, edges = import_graph()
    module_cycles = _cycles(modules, [(a, b) for a, b, *_ in edges])
    folders = {folder_of(m, p) for m, p in modules.items()}
    folder_cycles = _cycles(folders, [(folder_of(a, modules[a]), folder_of(b, modules[b])) for a, b, *_ in edges])
    assert not module_cycles and not folder_cycles, (module_cycles, folder_cycles)


def test_project_imports_inside_functions_say_why():
    modules, edges = import_graph()
    bad = [f"{modules[a]}:{line}: {b}" for a, b, line, inside, reason in edges if inside and not reason]
    assert not bad, "project imports inside functions without '# deferred: <reason>':\n" + "\n".join(bad)


def test_the_checks_catch_what_they_guard():
    """The graph tools on constructed cases: a cycle is found, a chain is not, a deferral comment is read."""
    assert _cycles("abc", [("a", "b"), ("b", "c"), ("c", "a")]) == [["a", "b", "c"]]
    assert _cycles("abc", [("a", "b"), ("b", "c")]) == []
    src = "def f():\n    # deferred: torch\n    from x import y\n    from z import w\n\ndef g():\n    import q\n"
    imports = [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [_deferred(src.splitlines(), n) for n in sorted(imports, key=lambda n: n.lineno)] == [True, True, False]
