"""The method registry, small and boring (timm-style).

    @register_method("mymethod")
    class MyMethod(Method): ...

    get_method("dc")            -> the class
    create_method("dc", preset="cpu", overrides=["iterations=50"]) -> an instance
    list_methods("iwd+*")       -> names

Users register their own methods from their own module and load it with `run.py --plugin mypkg.mymethod`
(or the entry-point group "iwd_bench.methods"), without editing this package. The built-in methods arrive the same
way: setup.cfg declares `methods` (which lists them all) as an entry point of that group, so the core imports no
method.
"""
import dataclasses
import fnmatch
import importlib

from benchmark.platform.errors import BenchmarkError, unknown_name
from .method import EVALUATION_FAMILIES

_METHODS = {}
_BUILTINS_LOADED = False


def register_method(name):
    def deco(cls):
        cls.name = name
        check_declaration(cls)
        _METHODS[name] = cls
        return cls
    return deco


def check_declaration(cls):
    """A method's declared traits, config and presets, checked once when it registers (not when a suite runs)."""
    problems = []
    if cls.evaluation is not None and cls.evaluation not in EVALUATION_FAMILIES:
        problems.append(f"evaluation = {cls.evaluation!r} is none of {', '.join(EVALUATION_FAMILIES)} (or None)")
    problems += [f"{t} = {getattr(cls, t)!r} is not True or False" for t in ("ranked", "uses_ipc")
                 if not isinstance(getattr(cls, t), bool)]
    if not dataclasses.is_dataclass(cls.Config):
        problems.append(f"Config {cls.Config.__name__} is not a dataclass")
    else:
        keys = {f.name for f in dataclasses.fields(cls.Config)}
        problems += [f"preset {p!r} sets unknown key(s) {', '.join(sorted(set(o) - keys))}"
                     for p, o in cls.presets.items() if set(o) - keys]
    if problems:
        raise BenchmarkError(f"method {cls.name!r} ({cls.__module__}.{cls.__qualname__}) cannot register: "
                             f"{'; '.join(problems)}")


def family(cls):
    """The module a method comes from, for grouping (methods.dc -> 'dc'; IWD variants list with their base)."""
    return cls.__module__.rsplit(".", 1)[-1]


def _load_builtins():
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from importlib.metadata import entry_points
        eps = list(entry_points(group="iwd_bench.methods"))
        for ep in eps:
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001
                raise BenchmarkError(f"the method entry point {ep.name} = {ep.value} failed to load "
                                     f"({type(e).__name__}: {e})") from e
        if not any(ep.value == "methods" for ep in eps):
            raise BenchmarkError("the built-in methods are not registered: the package is not installed (its "
                                 "entry point iwd_bench.methods = methods is missing). Run: pip install -e .")


def list_methods(pattern="*"):
    _load_builtins()
    return sorted(n for n in _METHODS if fnmatch.fnmatch(n, pattern))


def get_method(name):
    _load_builtins()
    if name not in _METHODS:
        base = _METHODS.get(name[len("iwd+"):]) if name.startswith("iwd+") else None
        if base is not None:  # a method IWD does not apply to: say why, not just "unknown"
            why = getattr(base, "no_iwd", None) or (
                f"{base.name} does not follow the weighted-statistic protocol (benchmark.core.protocol.WeightedMatching)")
            raise BenchmarkError(f"there is no {name}: {why}. IWD variants: {', '.join(list_methods('iwd+*'))}")
        raise unknown_name("method", name, _METHODS)
    return _METHODS[name]


def create_method(name, preset=None, overrides=None):
    cls = get_method(name)
    return cls(cls.make_config(preset, overrides))


LOADED_PLUGINS = []  # modules loaded with --plugin: the runner re-imports them in its worker processes


def load_plugin(module_name):
    """Import a user's module so its @register_method decorators run."""
    try:
        importlib.import_module(module_name)
        if module_name not in LOADED_PLUGINS:
            LOADED_PLUGINS.append(module_name)
    except Exception as e:  # noqa: BLE001 - any failure inside the user's module
        raise BenchmarkError(f"plugin module {module_name!r} failed to import ({type(e).__name__}: {e}); check that "
                             f"it is on PYTHONPATH and imports cleanly with: python -c 'import {module_name}'") from e
