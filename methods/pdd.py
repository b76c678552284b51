"""PDD (Chen et al. 2023, progressive dataset distillation) over a gradient-matching base (IDC as in the
reference, or DC).

The IPC budget is split into P stages (default 5; IPC < P gives IPC stages of one image per class). Stage k distils
its own images per class for `iterations` iterations while earlier stages stay frozen (they are not optimised).
Conditioning: every fresh network is first trained `condition_epochs` epochs on the decoded images of the earlier
stages before matching starts. The set records its stages, and the evaluation harness trains one network on stage 1,
then on stages 1..2, and so on (the reference's staged evaluation).
Deviation: the conditioning length is ours (the reference conditions through its base method's expert/teacher
schedule); it is a config key.
"""
from dataclasses import dataclass

import torch

from benchmark.core.registry import register_method
from benchmark.core.synthetic import SyntheticSet
from benchmark.nn.training import train_steps

from .dc import CPU_PRESET as DC_CPU, DC, DCConfig, QUICK_NET, QUICK_PRESET as DC_QUICK
from .idc import IDC, IDCConfig


def stage_sizes(ipc, stages):
    """Images per class in each stage: IPC split as evenly as possible, earlier stages take the remainder."""
    p = max(1, min(stages, ipc))
    return [ipc // p + (1 if k < ipc % p else 0) for k in range(p)]


def stage_major(state, task, sizes):
    """Re-lay a class-major state (C x IPC rows) stage-major, class-major inside each stage; adds 'stage_of'."""
    order, stage_of, start, n_cls = [], [], 0, task.dataset.num_classes
    for k, m in enumerate(sizes):
        for c in range(n_cls):
            order += list(range(c * task.ipc + start, c * task.ipc + start + m))
        stage_of += [k] * (m * n_cls)
        start += m
    order = torch.tensor(order)  # CPU indices index tensors on any device
    state["images"], state["labels"] = state["images"][order], state["labels"][order]
    state["stage_of"] = torch.tensor(stage_of)
    return state


class Progressive:
    """Mixin turning a matching method into its progressive (PDD) version (its evaluation protocol stays the
    base's; the harness evaluates staged sets stage by stage)."""

    def _sizes(self, task):
        return stage_sizes(task.ipc, self.config.stages)

    def num_iterations(self, task):
        return len(self._sizes(task)) * self.config.iterations

    def cost_iterations(self, task):
        # stage k conditions every fresh network on the k earlier stages: one count per stage
        return [(k * self.config.iterations, self.config.iterations) for k in range(len(self._sizes(task)))]

    def _stage(self, task, it):
        return it // self.config.iterations

    def init_state(self, task, gen):
        return stage_major(super().init_state(task, gen), task, self._sizes(task))

    def trainable_rows(self, task, state, it):
        k = self._stage(task, it)
        rows = torch.nonzero(state["stage_of"] == k).flatten()
        return int(rows[0]), int(rows[-1]) + 1, self._sizes(task)[k]

    def prepare_net(self, task, net, state, it, gen):
        start = self.trainable_rows(task, state, it)[0]
        if start == 0 or self.config.condition_epochs == 0:
            return
        earlier = SyntheticSet(state["images"][:start], state["labels"][:start], self.space,
                               self.set_extras(task))
        x, y = earlier.training_data(task.dataset)
        opt = torch.optim.SGD(net.parameters(), lr=self.config.condition_lr, momentum=0.9, weight_decay=5e-4)
        train_steps(net, x.to(task.device), y.to(task.device), opt, epochs=self.config.condition_epochs,
                    batch=256, gen=gen, observer=task.observer)

    def iteration(self, task, state, it, gen):
        if it % self.config.iterations == 0:
            state["opt_img"] = None  # a new stage starts with fresh image momentum
        out = super().iteration(task, state, it, gen)
        out["stage"] = float(self._stage(task, it))
        return out

    def result(self, task, state):
        base = super().result(task, state)
        base.extras.update(stages=self._sizes(task), stage_of=state["stage_of"].clone())
        return base


@dataclass
class ProgressiveOptions:
    stages: int = 5
    condition_epochs: int = 50
    condition_lr: float = 0.01


@dataclass
class PDDConfig(IDCConfig, ProgressiveOptions):
    pass


@register_method("pdd")
class PDD(Progressive, IDC):
    """PDD over IDC (the reference's base). `iterations` is per stage."""
    Config = PDDConfig
    presets = {"cpu": {"iterations": 40, "inner_loop": 20, "net_width": 32, "condition_epochs": 20},
               "quick": {"iterations": 4, "inner_loop": 10, "n_data": 256, **QUICK_NET, "condition_epochs": 20}}


@dataclass
class PDDDCConfig(DCConfig, ProgressiveOptions):
    pass


@register_method("pdd-dc")
class PDDDC(Progressive, DC):
    """PDD over DC. `iterations` is per stage."""
    Config = PDDDCConfig
    presets = {"cpu": {**DC_CPU, "iterations": 40, "condition_epochs": 20},
               "quick": {**DC_QUICK, "iterations": 10, "condition_epochs": 20}}
