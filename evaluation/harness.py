"""The one evaluation harness: train N fresh networks on a synthetic set under a named protocol, test each on the
whole test split, report the FINAL-epoch accuracy (never the best over checkpoints), mean and std over N, and the
full protocol with the numbers.

Protocols (docs/reference-settings.md):
  dc     SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256, lr x0.1 from epoch E//2+1, 300 epochs, no augmentation
  dsa    the same with DSA and 1000 epochs (DSA, DM, and DC on MNIST in the references)
  idc    1000 epochs, batch 64, lr 0.01, x0.2 at 2/3 and 5/6 of training, DSA + CutMix (p 0.5)
  paper  the IWD paper's evaluation: each method's own augmentation, lr 0.1 for DC-family sets, 0.01 for IDC/PDD
  full   the Full-Dataset upper bound: 50 epochs on the whole training set, batch 128, lr 0.01 x0.1 at 25, DSA off
  auto   the protocol the method that made the set declares (its `evaluation` trait, in the set's metadata)
  *-quick  reduced CPU variants (fewer epochs), labelled as such in every result.
Sets made by PDD (extras['stages']) are evaluated the staged way: one network trains on stage 1, then on stages
1..2, and so on, each phase with the protocol's schedule.
"""
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Tuple

import torch

from benchmark.core import seeds
from benchmark.core.method import EVALUATION_FAMILIES as FAMILIES  # what an `evaluation` trait may declare
from benchmark.nn.augment import DSA, strategy_for
from benchmark.platform.errors import BenchmarkError, unknown_name
from benchmark.platform.logging import progress_bar
from benchmark.nn.networks import get_network
from benchmark.nn.training import accuracy, train_steps


@dataclass
class Protocol:
    name: str
    epochs: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch: int = 256
    milestones: Tuple[float, ...] = (0.5,)   # fractions of training at which the lr decays
    gamma: float = 0.1
    dsa: bool = False
    cutmix_p: float = 0.0
    reduced: bool = False

    def lr_at(self, epoch):
        """The reference DC schedule decays from epoch E//2+1; milestones are fractions (0.5 -> E//2 + 1)."""
        lr = self.lr
        for m in self.milestones:
            start = self.epochs // 2 + 1 if m == 0.5 else int(round(self.epochs * m))
            if epoch >= start:
                lr *= self.gamma
        return lr


PROTOCOLS = {
    "dc": Protocol("dc", 300),
    "dsa": Protocol("dsa", 1000, dsa=True),
    "idc": Protocol("idc", 1000, batch=64, milestones=(2 / 3, 5 / 6), gamma=0.2, dsa=True, cutmix_p=0.5),
    "paper-dc": Protocol("paper-dc", 300, lr=0.1),
    "paper-dsa": Protocol("paper-dsa", 1000, lr=0.1, dsa=True),
    "paper-idc": Protocol("paper-idc", 1000, batch=64, milestones=(2 / 3, 5 / 6), gamma=0.2, dsa=True, cutmix_p=0.5),
    "full": Protocol("full", 50, batch=128),
    # MTT's: the set's learned learning rate (extras['lr']; 0.01 when it has none), 1000 epochs, DSA
    "mtt": Protocol("mtt", 1000, dsa=True),
}
# reduced CPU variants: 1/3 of the dc epochs, 1/5 of the 1000-epoch protocols, 30 full-data epochs
_QUICK_EPOCHS = {"dc": 100, "dsa": 200, "idc": 200, "paper-dc": 100, "paper-dsa": 200, "paper-idc": 200, "full": 30,
                 "mtt": 200}
for _k, _e in _QUICK_EPOCHS.items():
    PROTOCOLS[_k + "-quick"] = dataclasses.replace(PROTOCOLS[_k], name=_k + "-quick", epochs=_e, reduced=True)

_OLDER_SETS = {"dm": "dsa", "pdd": "idc", "select": "dc"}  # sets saved before traits carried 'evaluation_hint'


def list_protocols():
    return sorted(list(PROTOCOLS) + ["auto", "auto-quick", "paper", "paper-quick"])


def resolve_protocol(name, synset=None) -> Protocol:
    """A protocol by name; 'auto' and 'paper' look at the set's evaluation_hint (the method family)."""
    if isinstance(name, Protocol):
        return name
    quick = name.endswith("-quick")
    base = name[:-6] if quick else name
    if base in ("auto", "paper"):
        family = declared_family(synset, name)
        base = family if (base == "auto" or family in ("full", "mtt")) else "paper-" + family
    key = base + ("-quick" if quick else "")
    if key not in PROTOCOLS:
        raise unknown_name("protocol", name, list_protocols())
    proto = PROTOCOLS[key]
    if base == "mtt" and synset is not None and "lr" in synset.extras:  # MTT evaluates with its learned lr
        proto = dataclasses.replace(proto, lr=float(synset.extras["lr"]))
    return proto


def declared_family(synset, protocol_name="auto"):
    """The evaluation family the set's method declared; a clear error when it declared none."""
    meta = synset.metadata if synset is not None else {}
    hint = meta.get("evaluation") or meta.get("evaluation_hint")
    family = _OLDER_SETS.get(hint, hint)
    if family not in FAMILIES:
        who = f"method {meta['method']!r}" if meta.get("method") else "the set (made elsewhere)"
        raise BenchmarkError(
            f"protocol {protocol_name!r} needs the evaluation protocol of the method that made the set, but {who} "
            f"declares {'none' if family is None else repr(family)}. Pass one with --protocol "
            f"({', '.join(list_protocols())}), or, for your own method, declare it on the class: "
            f"evaluation = 'dc' (one of {', '.join(FAMILIES)}).")
    return family


def train_and_test(dataset, stages, protocol: Protocol, network="ConvNet", seed=0, device="cpu", net_kwargs=None,
                   temperature=1.0):
    """Train one fresh network through the stages ([(x, y)], cumulative; y may be soft labels, trained at
    `temperature`) and return its final test accuracy. The stages and the dataset's test split are used on
    `device` (moved once by `evaluate`, not per network)."""
    dataset = dataset.on(device)
    gen = torch.Generator().manual_seed(seed)
    net = get_network(network, dataset.channels, dataset.num_classes, dataset.image_size, seed=seed,
                      **(net_kwargs or {})).to(device)
    aug = DSA(strategy=strategy_for(dataset)) if protocol.dsa else None
    for x, y in stages:
        opt = torch.optim.SGD(net.parameters(), lr=protocol.lr, momentum=protocol.momentum,
                              weight_decay=protocol.weight_decay)
        loss = train_steps(net, x.to(device), y.to(device), opt, epochs=protocol.epochs, batch=protocol.batch,
                           aug=aug, gen=gen, cutmix_p=protocol.cutmix_p, lr_schedule=protocol.lr_at,
                           temperature=temperature)
        loss = float(loss)  # one host read per stage
        if not math.isfinite(loss):
            raise BenchmarkError(f"evaluation training diverged (loss {loss}) under protocol {protocol.name}; "
                                 f"the synthetic set may hold extreme values.")
    return accuracy(net, dataset.x_test, dataset.y_test)


def evaluate(synset, dataset, protocol="auto", network="ConvNet", num_eval=5, seed=0, device="cpu",
             progress=False, net_kwargs=None, resume=None, on_model=None):
    """Train `num_eval` fresh networks on the set and test them. Returns a result dict with every detail.
    resume: {"accuracies": [...], "seconds": s} of models already evaluated (network i always has the seed
    seeds.evaluation_seed(seed, i), so resuming gives exactly the uninterrupted result); on_model(same dict) is
    called after each network, for a caller that persists progress."""
    synset.check_fits(dataset)
    proto = resolve_protocol(protocol, synset)
    dataset = dataset.on(device)
    # soft labels (extras['soft_labels']): soft cross-entropy at the set's temperature (extras['soft_temperature'])
    soft = synset.extras.get("soft_labels") is not None
    temperature = float(synset.extras.get("soft_temperature", 1.0)) if soft else 1.0
    stages = [(x.to(device), y.to(device)) for x, y in synset.stage_data(dataset)]
    t0 = time.perf_counter()
    accs = list((resume or {}).get("accuracies", []))[:num_eval]
    before = float((resume or {}).get("seconds", 0.0))
    it = range(len(accs), num_eval)
    bar = progress_bar(num_eval, f"evaluate {proto.name} {network}", initial=len(accs)) if progress else None
    for i in it:
        accs.append(train_and_test(dataset, stages, proto, network, seed=seeds.evaluation_seed(seed, i),
                                   device=device, net_kwargs=net_kwargs, temperature=temperature))
        if on_model is not None:
            on_model({"accuracies": list(accs), "seconds": before + time.perf_counter() - t0})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    t = torch.tensor(accs, dtype=torch.float64)
    return {"accuracies": accs, "mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(accs) > 1 else 0.0,
            "num_eval": num_eval, "network": network, "protocol": dataclasses.asdict(proto),
            "staged": len(stages) > 1, "train_images": int(len(stages[-1][1])),
            "soft_labels": {"temperature": temperature, "loss": "soft cross-entropy of logits / T, x T^2"}
            if soft else None,
            "seconds": before + time.perf_counter() - t0}

