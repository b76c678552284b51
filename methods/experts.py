"""Expert trajectories for trajectory matching (MTT): networks trained on real data, their parameters stored after
every epoch, trained once and shared by every run that needs them (the reference's buffer.py).

An expert is defined by `ExpertSpec` (dataset with its corruptions, network, augmentation, optimiser) and its index
k; its initialisation and its data order come from seeds.expert_seed(k) alone, never from a cell's seed, so every
cell (any seed, any suite, any process) that asks for expert k of a spec gets the same trajectory. Without a
learning-rate schedule the first E epochs of a longer run are exactly an E-epoch run, so one file per expert serves
every need: a shorter request reads a prefix, a longer one continues training from the stored end (the generator
state is stored with it). The file is written atomically when training ends and at most once a minute during it, so
a killed build resumes from its last save; a lock file keeps two processes from training the same expert (the
second waits for the first and then reads its file).

Reference (GeorgeCazenavette/mtt-distillation, buffer.py): 100 experts x 50 epochs; SGD lr 0.01, momentum 0, weight
decay 0, batch 256, DSA augmentation (per-image draws); parameters saved at initialisation and after each epoch.
Deviation: no ZCA whitening (the reference offers it for CIFAR); the data order comes from our seeded generator.
"""
import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from benchmark.core import seeds
from benchmark.core.artefacts import artefact_dir, artefact_lock
from benchmark.nn.augment import DSA
from benchmark.platform.errors import BenchmarkError
from benchmark.platform.files import save_torch_atomic
from benchmark.nn.networks import NetworkOptions
from benchmark.core.synthetic import safe_load
from benchmark.nn.training import train_steps

SAVE_EVERY_S = 60.0  # a running expert is saved at most this often (and when it ends)


@dataclass(frozen=True)
class ExpertSpec:
    dataset: str                 # the dataset's full name, corruptions included (a noisy set has its own experts)
    network: str
    net_width: Optional[int]
    dsa_strategy: Optional[str]  # None: no augmentation
    lr: float = 0.01
    batch: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0

    def folder(self, task):
        """This spec's buffer in the task's artefact cache (one folder per distinct setting)."""
        width = f"w{self.net_width}" if self.net_width else "wdefault"
        return artefact_dir(task, "experts", dataclasses.asdict(self), f"{self.dataset}__{self.network}-{width}")


def new_network(task, spec, seed):
    return NetworkOptions(spec.network, spec.net_width).build_network(task.dataset, seed, task.device)


def flat_params(net):
    return torch.nn.utils.parameters_to_vector(net.parameters()).detach()


def load_flat(net, flat):
    """Copy a flat vector into the network's parameters (a copy: vector_to_parameters would make the parameters
    views of `flat`, and training would then overwrite the stored epoch)."""
    with torch.no_grad():
        for p, chunk in zip(net.parameters(), flat.split([p.numel() for p in net.parameters()])):
            p.copy_(chunk.view_as(p))


def expert_trajectory(task, spec, k, epochs):
    """Expert k's flat parameters at initialisation and after each of `epochs` epochs (a list of epochs + 1 tensors
    on the host: a caller moves the ones it uses), trained now if the buffer holds fewer epochs."""
    if str(task.device) == "meta":  # shapes only (the device guard, plan's counting): nothing trains or is stored
        return [flat_params(new_network(task, spec, seeds.expert_seed(k)))] * (epochs + 1)
    path = expert_path(task, spec, k)
    folder = os.path.dirname(path)
    stored = _read(path, spec)
    if stored is not None and len(stored["params"]) > epochs:
        return stored["params"][:epochs + 1]
    with artefact_lock(path, f"expert {k} of {folder}", must_store=True):
        stored = _read(path, spec)  # another process may have trained it while this one waited
        if stored is None or len(stored["params"]) <= epochs:
            stored = _train(task, spec, k, epochs, path, stored)
    return stored["params"][:epochs + 1]


@functools.lru_cache(maxsize=8)
def _load(path, mtime_ns, size):
    """One expert file, parsed once per version (each distillation iteration reads one expert)."""
    return safe_load(path, "delete it and the run trains that expert again")


def _load_current(path):
    st = os.stat(path)
    return _load(path, st.st_mtime_ns, st.st_size)


def expert_path(task, spec, k):
    return os.path.join(spec.folder(task), f"expert_{k:04d}.pt")


def build_expert(task, spec, k, epochs):
    """Make sure expert k holds `epochs` epochs (trained now if not). On meta nothing is stored or loaded: the
    epochs the task's observer says the run would make are trained on shapes (the default observer: all of them;
    `run.py plan`'s: those neither in the buffer already nor made by an earlier planned cell)."""
    if str(task.device) != "meta":
        expert_trajectory(task, spec, k, epochs)
        return
    path = expert_path(task, spec, k)
    epochs = task.observer.units_to_make(path, epochs, _stored_epochs(path), task.device)
    if epochs > 0:
        _train(task, spec, k, epochs, None, None)


def _stored_epochs(path):
    """Epochs stored at `path` (0 when missing or unreadable: the run would train them)."""
    try:
        return len(_load_current(path)["params"]) - 1
    except Exception:  # noqa: BLE001
        return 0


def _read(path, spec):
    if not os.path.exists(path):
        return None
    try:
        stored = _load_current(path)
    except BenchmarkError:
        os.rename(path, path + ".corrupt")  # kept for inspection; the expert is retrained
        return None
    if stored.get("spec") != dataclasses.asdict(spec):
        raise BenchmarkError(f"expert file {path} was trained with other settings ({stored.get('spec')}); delete it "
                             f"or its folder to retrain")
    return stored


def _train(task, spec, k, epochs, path, stored):
    ds = task.dataset
    net = new_network(task, spec, seeds.expert_seed(k))
    gen = torch.Generator().manual_seed(seeds.expert_seed(k))
    host = "cpu" if path is not None else task.device  # stored on the host; a meta run keeps its shapes
    params = [flat_params(net).to(host)]
    if stored is not None:  # continue where the stored trajectory ends
        params = list(stored["params"])
        load_flat(net, params[-1])
        gen.set_state(stored["rng"])
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if stored is not None and stored.get("optimizer"):
        opt.load_state_dict(stored["optimizer"])  # momentum buffers, when a spec has momentum
    aug = DSA(strategy=spec.dsa_strategy) if spec.dsa_strategy else None
    last_save = time.monotonic()

    def save():
        if path is None:
            return
        save_torch_atomic(path, {"spec": dataclasses.asdict(spec), "expert": k, "params": params,
                                 "rng": gen.get_state(), "optimizer": opt.state_dict()})

    while len(params) <= epochs:
        train_steps(net, ds.x_train, ds.y_train, opt, epochs=1, batch=spec.batch, aug=aug, gen=gen,
                    observer=task.observer)
        params.append(flat_params(net).to(host))
        if time.monotonic() - last_save >= SAVE_EVERY_S and len(params) <= epochs:
            save()
            last_save = time.monotonic()
    save()
    return {"params": params}
