"""Method base classes, configs with presets and key=value overrides, and resumable iteration.

A method is a class with a `name`, a `Config` dataclass whose defaults follow the reference implementation,
optional `presets` (named override sets, e.g. reduced CPU settings), declared traits (`evaluation`, `ranked`,
`uses_ipc`) and `distill(task) -> SyntheticSet`. Config keys whose default depends on the dataset or IPC are None
until `resolve(task)` fills them; a method distils with, and records, the resolved config.
Iterative methods subclass `IterativeMethod` and get checkpoints, exact resume, NaN checks, TensorBoard scalars
and progress for free: they implement `init_state`, `iteration` and `result`.
"""
import copy
import dataclasses
import math
import os
import time
import typing
from dataclasses import dataclass
from typing import Any, Optional

import torch

from benchmark.platform.errors import BenchmarkError
from benchmark.platform.files import save_torch_atomic
from benchmark.platform.observe import PLAIN, Observer
from .synthetic import SyntheticSet, code_commit, provenance, safe_load
from benchmark.platform.logging import image_grid, progress_bar


@dataclass
class Task:
    """What to distil: the dataset, images per class, seed, device, and where to log and checkpoint."""
    dataset: Any
    ipc: int
    seed: int = 0
    device: str = "cpu"
    writer: Any = None               # a torch.utils.tensorboard SummaryWriter, or None
    checkpoint_path: Optional[str] = None
    checkpoint_every: int = 0        # iterations between checkpoints (0: none)
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time has passed since the last one (0: off)
    progress: bool = False
    log_images_every: int = 0
    cache_dir: Optional[str] = None  # reusable artefacts shared by runs (benchmark.core.artefacts); None: $IWD_CACHE
    observer: Observer = PLAIN       # who watches the run: a planner counting, a timer (benchmark.platform.observe)

    def __post_init__(self):
        # the rule: a task's data lives on its device once (cached per device); indices stay CPU-drawn
        if hasattr(self.dataset, "on"):
            self.dataset = self.dataset.on(self.device)


EVALUATION_FAMILIES = ("dc", "dsa", "idc", "full", "mtt")  # what a method's `evaluation` trait may declare


@dataclass
class BaseConfig:
    pass


def _coerce(name, typ, value):
    """Parse a CLI string into the field's type, with a clear error."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value in ("none", "None", "null"):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            v = float(value)
            if v != int(v):
                raise ValueError
            return int(v)
        if typ in (float, str):
            return typ(value)
        if typing.get_origin(typ) in (tuple, list) or typ in (tuple, list):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
            inner = (typing.get_args(typ) or (str,))[0]
            return tuple(inner(v) for v in items)
    except (TypeError, ValueError):
        raise BenchmarkError(f"config key {name!r} expects {getattr(typ, '__name__', typ)}, got {value!r}") from None
    return value


def apply_overrides(config, overrides):
    """overrides: dict or list of 'key=value' strings. Unknown keys and wrong types raise BenchmarkError. The config
    is validated every time, overrides or not (a preset or a subclass default is checked like a --set value)."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise BenchmarkError(f"override {item!r} is not key=value (example: --set iterations=100)")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    for k, v in overrides.items():
        if k not in fields:
            import difflib
            close = difflib.get_close_matches(k, fields, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise BenchmarkError(f"{type(config).__qualname__} has no key {k!r}.{hint} Keys: {', '.join(sorted(fields))}")
        setattr(config, k, _coerce(k, hints[k], v) if isinstance(v, str) else v)
    if hasattr(config, "validate"):
        config.validate()
    return config


class Method:
    name: str = None
    Config = BaseConfig
    presets: dict = {}
    inner_data = "synthetic"  # which data the network trains on between matching steps (IWD's S_inner)
    # Declared traits, read by the evaluation harness, the leaderboard and the runner (nothing looks a method up by
    # name): the evaluation protocol family of its sets (dc | dsa | idc | full; None: undeclared, so 'auto'
    # evaluation asks for an explicit protocol), whether it is ranked among distillation rows, whether IPC applies.
    evaluation: Optional[str] = None
    ranked = True
    uses_ipc = True
    TRAITS = ("evaluation", "ranked", "uses_ipc")  # checked at registration, copied into each record

    @classmethod
    def traits(cls):
        return {k: getattr(cls, k) for k in cls.TRAITS}

    def __init__(self, config=None):
        self.config = config if config is not None else self.make_config()

    @classmethod
    def make_config(cls, preset=None, overrides=None):
        cfg = cls.Config()
        if preset and preset != "reference":
            if preset not in cls.presets and not dataclasses.fields(cfg):
                pass  # a method with nothing to configure runs the same under every preset
            elif preset not in cls.presets:
                raise BenchmarkError(f"method {cls.name!r} has no preset {preset!r}; presets: "
                                     f"{', '.join(['reference'] + sorted(cls.presets))}")
            else:
                apply_overrides(cfg, dict(cls.presets[preset]))
        return apply_overrides(cfg, overrides)

    def resolve(self, task):
        """The config with every by-dataset / by-IPC default (None) filled in for this task. Idempotent."""
        return copy.copy(self.config)

    def for_task(self, task):
        """This method with its config resolved for `task`: what distils, and what records and checkpoints hold."""
        m = copy.copy(self)
        m.config = self.resolve(task)
        return m

    def distill(self, task: Task) -> SyntheticSet:
        raise NotImplementedError

    def metadata(self, task, **extra):
        return {"method": self.name, "config": dataclasses.asdict(self.config), "dataset": task.dataset.full_name,
                "ipc": task.ipc, "seed": task.seed, "evaluation": self.evaluation, **provenance(task.device),
                **extra}


class NonFiniteError(BenchmarkError):
    """A NaN/inf in a run. The distillation loop adds which checkpoint is the last good one."""

    def __init__(self, what, hint="Lower the learning rate or check the data."):
        self.what, self.hint = what, hint
        super().__init__(f"{what}. {hint}")

    def with_checkpoint(self, path):
        return NonFiniteError(f"{self.what}; last good checkpoint: {path or 'none (set --checkpoint-every)'}",
                              self.hint)


class Checkpoint:
    """A run's checkpoint file: checked to belong to this run (method, IPC, seed, resolved config; a longer or
    shorter run, `iterations`, may resume), written atomically, and remembered as the last good one."""

    def __init__(self, path, method, task):
        self.path, self.method, self.task = path, method, task
        self.last_good = None

    def load(self):
        """The saved run as a dict (state moved to the task's device), or None."""
        if not self.path or not os.path.exists(self.path):
            return None
        ck, m, task = safe_load(self.path, "delete it to start the run afresh"), self.method, self.task
        if ck.get("method") != m.name or ck.get("ipc") != task.ipc or ck.get("seed") != task.seed:
            raise BenchmarkError(f"checkpoint {self.path} belongs to another run ({ck.get('method')}, ipc "
                                 f"{ck.get('ipc')}, seed {ck.get('seed')}); delete it or choose another --checkpoint "
                                 f"path.")
        saved, current = ck.get("config"), dataclasses.asdict(m.config)
        keys = sorted((set(saved or {}) | set(current)) - {"iterations"}) if saved is not None else []
        # an option added since the checkpoint was made counts as unchanged at its default (what the older code did)
        defaults = {f.name: f.default for f in dataclasses.fields(m.config) if f.default is not dataclasses.MISSING}
        changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
                   and not (k not in saved and k in defaults and current.get(k) == defaults[k])]
        if changed:
            raise BenchmarkError(f"checkpoint {self.path} was made with other settings ({'; '.join(changed)}); rerun "
                                 f"with its settings to resume, or delete it to start afresh with these.")
        # the state lives on the task's device (the generator state stays a CPU byte tensor)
        ck["state"] = {k: v.to(task.device) if torch.is_tensor(v) and k != "rng" else v
                       for k, v in ck["state"].items()}
        self.last_good = self.path
        return ck

    def save(self, state, next_it, elapsed_s, segments):
        m, task = self.method, self.task
        save_torch_atomic(self.path, {"method": m.name, "ipc": task.ipc, "seed": task.seed, "next_iteration": next_it,
                                      "state": state, "elapsed_s": elapsed_s, "segments": list(segments),
                                      "config": dataclasses.asdict(m.config)})
        self.last_good = self.path

    def remove(self):
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


class IterativeMethod(Method):
    """Checkpointed iteration. State is a dict of tensors / plain values (saved with torch.save, loaded with
    weights_only=True). All randomness must come from `state['rng']` (a torch.Generator state) or from seeds derived
    from (task.seed, iteration) (benchmark.core.seeds), so a resumed run ends with exactly the set an uninterrupted run
    gives."""

    def num_iterations(self, task):
        return self.config.iterations

    def cost_iterations(self, task):
        """[(iteration, how many iterations cost like it)]: what `run.py plan` counts FLOPs on. Default: every
        iteration costs like the first."""
        return [(0, self.num_iterations(task))]

    def init_state(self, task, gen) -> dict:
        raise NotImplementedError

    def iteration(self, task, state, it, gen) -> dict:
        """One outer iteration; returns scalars to log (e.g. {'loss': ...})."""
        raise NotImplementedError

    def result(self, task, state) -> SyntheticSet:
        raise NotImplementedError

    def check_finite(self, state, it, scalars):
        bad = [k for k, v in scalars.items() if isinstance(v, float) and not math.isfinite(v)]
        bad += [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(f"{self.name}: non-finite {', '.join(bad)} at iteration {it}")

    def distill(self, task):
        unresolved = self.config
        self.config = self.resolve(task)  # in place for the run (so patched or bound methods see it), then restored
        try:
            return self.run_loop(task)
        finally:
            self.config = unresolved

    def run_loop(self, task):
        """The resumable loop (on a resolved method): resume from the checkpoint, iterate with the callbacks
        (TensorBoard, progress, checkpoint policy), return the result with its wall time across segments."""
        torch.manual_seed(task.seed)  # only for code paths that forget a generator; ours pass one explicitly
        began, before = time.perf_counter(), 0.0
        clock = lambda: before + time.perf_counter() - began  # noqa: E731  wall time across resumed segments
        ckpt = Checkpoint(task.checkpoint_path, self, task)
        saved = ckpt.load()
        if saved is None:
            gen = torch.Generator().manual_seed(task.seed)
            state, start, segments = self.init_state(task, gen), 0, []
            state["rng"] = gen.get_state()
        else:
            state, start, segments = saved["state"], saved["next_iteration"], list(
                saved.get("segments", [{"commit": "unknown", "from_iteration": 0}]))
            before = float(saved.get("elapsed_s", 0.0))
        segments.append({"commit": code_commit(), "from_iteration": start})
        if task.observer.counting:  # `run.py plan`: each distinct-cost iteration counted once and scaled
            gen = torch.Generator().set_state(state["rng"])
            for it, weight in self.cost_iterations(task):
                task.observer.repeat(weight, lambda: self.iteration(task, state, it, gen))
            return self.result(task, state)
        n = self.num_iterations(task)
        callbacks = [cb for cb in (_tensorboard(self, task, n), _progress(self, task, n, start),
                                   _checkpoint_policy(task, ckpt, n, clock, segments)) if cb is not None]
        gen = torch.Generator()
        for it in range(start, n):
            gen.set_state(state["rng"])
            t0 = time.perf_counter()
            try:
                scalars = self.iteration(task, state, it, gen) or {}
                scalars["time/iteration_s"] = time.perf_counter() - t0
                state["rng"] = gen.get_state()
                self.check_finite(state, it, scalars)
            except NonFiniteError as e:
                raise e.with_checkpoint(ckpt.last_good) from None
            for cb in callbacks:
                cb(it, state, scalars)
        for cb in callbacks:
            getattr(cb, "close", lambda: None)()
        out = self.result(task, state)
        # wall time of the whole distillation, across resumed segments (what a record and a table footer report)
        out.metadata["distill_seconds"] = clock()
        out.metadata["distill_segments"] = segments
        ckpt.remove()
        return out

    def log_images(self, task, state, it):
        syn = self.result(task, state)
        x, _ = syn.training_data(task.dataset)
        task.writer.add_image("distill/synthetic", image_grid(task.dataset.denormalize(x), nrow=syn.ipc or 10), it)


def _tensorboard(method, task, n):
    if task.writer is None:
        return None

    def log(it, state, scalars):
        for k, v in scalars.items():
            task.writer.add_scalar(f"distill/{k}", v, it)
        if task.log_images_every and (it % task.log_images_every == 0 or it == n - 1):
            method.log_images(task, state, it)
    return log


def _progress(method, task, n, start):
    if not task.progress:
        return None
    bar = progress_bar(n, f"{method.name} {task.dataset.name} ipc{task.ipc}", initial=start)

    def update(it, state, scalars):
        if "loss" in scalars:
            bar.set_postfix(loss=f"{scalars['loss']:.4g}")
        bar.update(1)
    update.close = bar.close
    return update


def _checkpoint_policy(task, ckpt, n, clock, segments):
    """Save every `checkpoint_every` iterations and whenever `checkpoint_minutes` of wall time passed since the
    last save (never after the last iteration: the result replaces the checkpoint)."""
    if not task.checkpoint_path:
        return None
    last = [time.perf_counter()]

    def save(it, state, scalars):
        due = (task.checkpoint_every and (it + 1) % task.checkpoint_every == 0) or (
            task.checkpoint_minutes and time.perf_counter() - last[0] >= 60 * task.checkpoint_minutes)
        if it + 1 < n and due:
            last[0] = time.perf_counter()
            ckpt.save(state, it + 1, clock(), segments)
    return save
