"""Selection baselines and the upper bound: Random, Herding, Full Dataset."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from benchmark.platform.device import to_device
from benchmark.platform.files import save_torch_atomic
from benchmark.core.artefacts import artefact_dir, artefact_lock
from benchmark.core.method import Method
from benchmark.nn.networks import get_network
from benchmark.core.registry import register_method
from benchmark.core.synthetic import SyntheticSet
from benchmark.nn.training import train_steps
from .ablations import UsesBase
from benchmark.platform.errors import BenchmarkError


@dataclass
class RandomConfig:
    pass


@register_method("random")
class RandomSelect(Method):
    """IPC random real images per class (seeded). Also the paper's Random-Select ablation."""
    Config = RandomConfig
    evaluation, ranked = "dc", False  # selected real images, evaluated like DC's sets; not ranked with distillation

    def distill(self, task):
        ds = task.dataset
        ds.check_ipc(task.ipc)
        gen = torch.Generator().manual_seed(task.seed)
        idx = torch.cat([ds.sample_class(c, task.ipc, gen) for c in range(ds.num_classes)])
        return SyntheticSet.from_indices(ds, idx, self.metadata(task))


@dataclass
class HerdingConfig:
    network: str = "ConvNet"
    feature_epochs: int = 30      # training of the feature network on the real training set
    lr: float = 0.01
    batch: int = 256


_FEATURE_NETS = {}  # in-process: (cache file, device) -> network


def feature_network(task, cfg):
    """A network trained by the project on the real training set (SGD momentum 0.9, weight decay 5e-4, lr x0.1 after
    half the epochs), cached in the task's artefact cache (benchmark.core.artefacts) under a key holding every
    setting that changes it: dataset (corruptions included), network, epochs, lr, batch, seed. A lock file keeps two
    processes (a suite's parallel cells) from training the same one: the second waits and loads it. Never cached:
    networks trained on meta (shapes only). On meta it is trained when the task's observer says the run would make
    it (for `run.py plan`: not when the network is in the cache already, nor twice for cells sharing one)."""
    ds = task.dataset
    settings = {"dataset": ds.full_name, "network": cfg.network, "epochs": cfg.feature_epochs, "lr": cfg.lr,
                "batch": cfg.batch, "seed": task.seed, "momentum": 0.9, "weight_decay": 5e-4}
    path = os.path.join(artefact_dir(task, "feature-networks", settings, f"{ds.full_name}__{cfg.network}"),
                        "network.pt")
    meta = str(task.device) == "meta"
    key = (path, str(task.device))
    if not meta and key in _FEATURE_NETS:
        return _FEATURE_NETS[key]
    net = get_network(cfg.network, ds.channels, ds.num_classes, ds.image_size, seed=task.seed).to(task.device)
    if meta:
        if task.observer.units_to_make(path, 1, int(os.path.exists(path)), task.device):
            _train_feature_network(net, task, cfg)
        net.eval()
        return net  # (weights do not matter to a count)
    if not _load_feature_network(net, path, task.device):
        with artefact_lock(path, f"the feature network {path}"):
            if not _load_feature_network(net, path, task.device):  # another process may have trained it meanwhile
                _train_feature_network(net, task, cfg)
                try:
                    save_torch_atomic(path, {k: v.cpu() for k, v in net.state_dict().items()})
                except OSError:
                    pass  # an unwritable cache only costs time
    net.eval()
    _FEATURE_NETS[key] = net
    return net


def _load_feature_network(net, path, device):
    try:
        net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return True
    except Exception:  # noqa: BLE001 - missing or stale cache: train it
        return False


def _train_feature_network(net, task, cfg):
    gen = torch.Generator().manual_seed(task.seed)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    train_steps(net, task.dataset.x_train, task.dataset.y_train, opt, epochs=cfg.feature_epochs, batch=cfg.batch,
                gen=gen, lr_schedule=lambda ep: cfg.lr * (0.1 if ep >= cfg.feature_epochs // 2 + 1 else 1.0),
                observer=task.observer)


def herding_select(features, k):
    """Greedy herding (Welling 2009): step j picks the unselected sample nearest (L2) to (j+1)*mean - sum(selected)."""
    mu = features.mean(0)
    chosen, total = [], torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for j in range(k):
        target = (j + 1) * mu - total
        d = ((features - target) ** 2).sum(1)
        d[~available] = float("inf")
        i = int(d.argmin())
        chosen.append(i)
        available[i] = False
        total = total + features[i]
    return torch.tensor(chosen, dtype=torch.long)


@register_method("herding")
class Herding(Method):
    """Per class, herding on the features (output of the last conv block, flattened) of a trained ConvNet."""
    Config = HerdingConfig
    evaluation, ranked = "dc", False
    presets = {"quick": {"feature_epochs": 10, "network": "ConvNetD2"},
               "cpu": {"feature_epochs": 10, "network": "ConvNetW32"}}  # width 32 like the cpu distillation presets

    def distill(self, task):
        ds = task.dataset
        ds.check_ipc(task.ipc)
        net = feature_network(task, self.config)
        picked = []
        with torch.no_grad():
            for c in range(ds.num_classes):
                ix = ds.class_indices[c]
                ix_dev = to_device(ix, ds.x_train.device)
                feats = torch.cat([net.embed(ds.x_train[ix_dev[s:s + 1024]]) for s in range(0, len(ix), 1024)])
                # the greedy selection reads an argmin per pick: on the host, one copy per class
                picked.append(ix[herding_select(feats.double().cpu(), task.ipc)])
        return SyntheticSet.from_indices(ds, torch.cat(picked), self.metadata(task))


@dataclass
class FullConfig:
    pass


@register_method("full")
class FullDataset(Method):
    """The Full-Dataset upper bound: the whole training set, evaluated under the 'full' protocol. IPC is ignored."""
    Config = FullConfig
    evaluation, ranked, uses_ipc = "full", False, False

    def distill(self, task):
        ds = task.dataset
        return SyntheticSet(ds.x_train, ds.y_train, "normalized", {}, self.metadata(task))


@dataclass
class LossPruneConfig:
    base: str = "dc"                   # the method that distils the kept data
    base_preset: Optional[str] = None  # None: the base's reference settings (a suite's preset is passed on)
    base_set: tuple = ()               # key=value overrides of the base method
    keep_fraction: float = 0.2         # of each class, the lowest-loss instances kept (the paper's headline setting
                                       # removes 80%)
    network: str = "ConvNet"           # the briefly trained scoring network (herding's, trained and cached alike)
    feature_epochs: int = 10
    lr: float = 0.01
    batch: int = 256

    def validate(self):
        if not 0 < self.keep_fraction <= 1:
            raise BenchmarkError(f"keep_fraction must be in (0, 1] (got {self.keep_fraction})")


@register_method("loss-prune-then-distill")
class LossPruneThenDistill(UsesBase):
    """Keep each class's lowest-loss fraction under a briefly trained network, then distil it with the base method
    (easy instances first: Moser et al. 2024, "Distill the Best, Ignore the Rest", arXiv 2411.12115)."""
    Config = LossPruneConfig
    evaluation = "dc"  # the default base's; each set carries its base method's protocol in its metadata
    presets = {"quick": {"network": "ConvNetD2"}, "cpu": {"network": "ConvNetW32"}}  # as herding's

    def distill(self, task):
        ds = task.dataset
        net = feature_network(task, self.config)
        with torch.no_grad():
            losses = torch.cat([F.cross_entropy(net(ds.x_train[s:s + 1024]), ds.y_train[s:s + 1024], reduction="none")
                                for s in range(0, len(ds.y_train), 1024)]).cpu()
        return self.prune_then_distill(task, -losses, self.config.keep_fraction)  # highest -loss = lowest loss
