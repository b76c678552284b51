"""Method base classes, configs with presets and key=value overrides, and resumable iteration.

A method is a class with a `name`, a `Config` dataclass whose defaults follow the reference implementation,
optional `presets` (named override sets, e.g. reduced CPU settings) and `distill(task) -> SyntheticSet`.
Iterative methods subclass `IterativeMethod` and get checkpoints, exact resume, NaN checks, TensorBoard scalars
and a progress bar for free: they implement `init_state`, `iteration` and `result`.
"""
import dataclasses
import math
import os
import time
import typing
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import BenchmarkError
from .synthetic import SyntheticSet, code_commit, provenance, safe_load


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

    def __post_init__(self):
        # the rule: a task's data lives on its device once (cached per device); indices stay CPU-drawn
        if hasattr(self.dataset, "on"):
            self.dataset = self.dataset.on(self.device)


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
    """overrides: dict or list of 'key=value' strings. Unknown keys and wrong types raise BenchmarkError."""
    if not overrides:
        return config
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

    def distill(self, task: Task) -> SyntheticSet:
        raise NotImplementedError

    def metadata(self, task, **extra):
        return {"method": self.name, "config": dataclasses.asdict(self.config), "dataset": task.dataset.full_name,
                "ipc": task.ipc, "seed": task.seed, **provenance(task.device), **extra}


def _config_changes(saved, current):
    """What differs between a checkpoint's config and the current one, as 'key: saved -> current' strings. A
    longer or shorter run (`iterations`) may resume; a checkpoint from before configs were saved is trusted."""
    if saved is None:
        return []
    keys = sorted((set(saved) | set(current)) - {"iterations"})
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


class NonFiniteError(BenchmarkError):
    pass


class IterativeMethod(Method):
    """Checkpointed iteration. State is a dict of tensors / plain values (saved with torch.save, loaded with
    weights_only=True). All randomness must come from `state['rng']` (a torch.Generator state) or from seeds derived
    from (task.seed, iteration), so a resumed run ends with exactly the set an uninterrupted run gives."""

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
            raise NonFiniteError(f"{self.name}: non-finite {', '.join(bad)} at iteration {it}; last good checkpoint: "
                                 f"{self._last_ckpt or 'none (set --checkpoint-every)'}. Lower the learning rate or "
                                 f"check the data.")

    def distill(self, task):
        torch.manual_seed(task.seed)  # only for code paths that forget a generator; ours pass one explicitly
        state, start, elapsed_before, t_start = None, 0, 0.0, time.perf_counter()
        segments = []  # (commit, first iteration) of each resumed segment: a long run may span commits
        self._last_ckpt = None
        if task.checkpoint_path and os.path.exists(task.checkpoint_path):
            ck = safe_load(task.checkpoint_path)
            if ck.get("method") != self.name or ck.get("ipc") != task.ipc or ck.get("seed") != task.seed:
                raise BenchmarkError(f"checkpoint {task.checkpoint_path} belongs to another run "
                                     f"({ck.get('method')}, ipc {ck.get('ipc')}, seed {ck.get('seed')}); delete it "
                                     f"or choose another --checkpoint path.")
            changed = _config_changes(ck.get("config"), dataclasses.asdict(self.config))
            if changed:
                raise BenchmarkError(f"checkpoint {task.checkpoint_path} was made with other settings ("
                                     f"{'; '.join(changed)}); rerun with its settings to resume, or delete it to "
                                     f"start afresh with these.")
            state, start = ck["state"], ck["next_iteration"]
            elapsed_before = float(ck.get("elapsed_s", 0.0))
            segments = list(ck.get("segments", [{"commit": "unknown", "from_iteration": 0}]))
            self._last_ckpt = task.checkpoint_path
        if state is None:
            gen = torch.Generator().manual_seed(task.seed)
            state = self.init_state(task, gen)
            state["rng"] = gen.get_state()
        segments.append({"commit": code_commit(), "from_iteration": start})
        n = self.num_iterations(task)
        bar = None
        if task.progress:
            from tqdm import tqdm
            bar = tqdm(total=n, initial=start, desc=f"{self.name} {task.dataset.name} ipc{task.ipc}", leave=False)
        gen = torch.Generator()
        last_save = t_start
        for it in range(start, n):
            gen.set_state(state["rng"])
            t0 = time.perf_counter()
            scalars = self.iteration(task, state, it, gen) or {}
            scalars["time/iteration_s"] = time.perf_counter() - t0
            state["rng"] = gen.get_state()
            self.check_finite(state, it, scalars)
            if task.writer is not None:
                for k, v in scalars.items():
                    task.writer.add_scalar(f"distill/{k}", v, it)
                if task.log_images_every and (it % task.log_images_every == 0 or it == n - 1):
                    self.log_images(task, state, it)
            if task.checkpoint_path and it + 1 < n and (
                    (task.checkpoint_every and (it + 1) % task.checkpoint_every == 0)
                    or (task.checkpoint_minutes and time.perf_counter() - last_save >= 60 * task.checkpoint_minutes)):
                last_save = time.perf_counter()
                self.save_checkpoint(task, state, it + 1, elapsed_before + last_save - t_start, segments)
            if bar is not None:
                bar.update(1)
                if "loss" in scalars:
                    bar.set_postfix(loss=f"{scalars['loss']:.4g}")
        if bar is not None:
            bar.close()
        out = self.result(task, state)
        # wall time of the whole distillation, across resumed segments (what a record and a table footer report)
        out.metadata["distill_seconds"] = elapsed_before + time.perf_counter() - t_start
        out.metadata["distill_segments"] = segments
        if task.checkpoint_path and os.path.exists(task.checkpoint_path):
            os.remove(task.checkpoint_path)
        return out

    def save_checkpoint(self, task, state, next_it, elapsed_s=0.0, segments=()):
        tmp = f"{task.checkpoint_path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(task.checkpoint_path)), exist_ok=True)
        torch.save({"method": self.name, "ipc": task.ipc, "seed": task.seed, "next_iteration": next_it,
                    "state": state, "elapsed_s": elapsed_s,
                    "segments": list(segments), "config": dataclasses.asdict(self.config)}, tmp)
        os.replace(tmp, task.checkpoint_path)
        self._last_ckpt = task.checkpoint_path

    def log_images(self, task, state, it):
        syn = self.result(task, state)
        x, _ = syn.training_data(task.dataset)
        from .logging import image_grid
        task.writer.add_image("distill/synthetic", image_grid(task.dataset.denormalize(x), nrow=syn.ipc or 10), it)
