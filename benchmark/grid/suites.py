"""Declarative suites (YAML files in benchmark/suites/) expanded into a grid of cells.

A suite names datasets, methods, IPCs, seeds, the preset, the evaluation protocol, number of evaluation networks,
evaluation networks (cross-architecture) and optional variants (named override sets, e.g. a tau sweep). Every
field can be narrowed from the CLI. A cell = method x dataset x IPC x seed x variant.
"""
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List

import yaml

from benchmark.platform.errors import BenchmarkError, unknown_name
from benchmark.core.registry import get_method

SUITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suites")


@dataclass
class Suite:
    name: str
    datasets: List[str]
    methods: List[str]
    ipc: List[int]
    seeds: List[int] = field(default_factory=lambda: [0])
    preset: str = "reference"
    protocol: str = "auto"
    num_eval: int = 5
    eval_networks: List[str] = field(default_factory=lambda: ["ConvNet"])
    overrides: Dict[str, List[str]] = field(default_factory=dict)    # method -> ["key=value", ...]
    variants: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)  # variant -> method -> overrides
    description: str = ""
    reduced: bool = False
    data_root: str = ""
    plugins: List[str] = field(default_factory=list)  # modules registering methods (imported in every worker too)

    def cells(self):
        out = []
        variants = list(self.variants) or [""]
        for ds in self.datasets:
            for m in self.methods:
                for ipc in (self.ipc if get_method(m).uses_ipc else self.ipc[:1]):
                    for seed in self.seeds:
                        for v in variants:
                            if v and m not in self.variants[v] and "*" not in self.variants[v]:
                                continue
                            out.append(Cell(m, ds, ipc, seed, v))
        return out

    def method_overrides(self, method, variant=""):
        over = list(self.overrides.get(method, []))
        if variant:
            v = self.variants.get(variant, {})
            over += list(v.get("*", [])) + list(v.get(method, []))
        return over


@dataclass(frozen=True)
class Cell:
    method: str
    dataset: str
    ipc: int
    seed: int
    variant: str = ""

    @property
    def key(self):
        v = f"@{self.variant}" if self.variant else ""
        return f"{self.dataset}__{self.method}{v}__ipc{self.ipc}__seed{self.seed}".replace("+", "-plus-")


def list_suites():
    return sorted(f[:-5] for f in os.listdir(SUITE_DIR) if f.endswith(".yaml"))


def load_suite(name_or_path) -> Suite:
    """A built-in suite by name, or a suite file (YAML) by path. A folder of the same name (a run root's
    `<suite>/`, in the working directory) is not a suite file: the name then means the built-in suite."""
    given = str(name_or_path)
    path = given if os.path.isfile(given) else os.path.join(SUITE_DIR, f"{given}.yaml")
    if not os.path.isfile(path):
        raise unknown_name("suite", name_or_path, list_suites())
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    known = set(Suite.__dataclass_fields__)
    bad = set(raw) - known
    if bad:
        raise BenchmarkError(f"suite {path} has unknown keys {sorted(bad)}; known: {sorted(known)}")
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return Suite(**raw)


def narrow(suite: Suite, methods=None, datasets=None, ipc=None, seeds=None, num_eval=None, protocol=None,
           preset=None, variants=None) -> Suite:
    """Narrow or override a suite from the CLI (comma lists)."""
    def pick(current, given, kind, conv=str):
        if not given:
            return current
        vals = [conv(v) for v in str(given).split(",") if v != ""]
        return vals

    s = replace(suite, methods=pick(suite.methods, methods, "method"), datasets=pick(suite.datasets, datasets, "dataset"),
                ipc=pick(suite.ipc, ipc, "ipc", int), seeds=pick(suite.seeds, seeds, "seed", int))
    if variants:
        keep = [v for v in str(variants).split(",") if v]
        for v in keep:
            if v not in suite.variants:
                raise unknown_name("variant", v, list(suite.variants))
        s = replace(s, variants={k: suite.variants[k] for k in keep})
    if num_eval:
        s = replace(s, num_eval=int(num_eval))
    if protocol:
        s = replace(s, protocol=protocol)
    if preset:
        s = replace(s, preset=preset)
    return s
