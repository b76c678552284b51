"""DC (Zhao, Mopuri & Bilen 2021, gradient matching) and DSA (Zhao & Bilen 2021, DC + siamese augmentation).

Faithful to the reference loop: each iteration draws a fresh ConvNet; outer_loop times: match per-class real vs
synthetic gradients (layer-wise 'ours' distance), one SGD step on all synthetic images (lr 0.1, momentum 0.5), then
(except after the last) train the network inner_loop epochs on the synthetic set (SGD lr 0.01, batch 256).
(outer_loop, inner_loop) come from the reference table by IPC (matching.dc_loops for other IPCs).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from benchmark.platform.errors import BenchmarkError
from benchmark.nn.real_pass import check_real_pass
from benchmark.nn.augment import DSAOptions
from benchmark.nn.networks import NetworkOptions
from benchmark.core.registry import register_method
from benchmark.nn.training import train_steps

from .matching import GradientMatching, dc_loops


@dataclass
class DCConfig(DSAOptions, NetworkOptions):
    iterations: int = 1000
    batch_real: int = 256
    lr_img: float = 0.1
    momentum_img: float = 0.5
    lr_net: float = 0.01
    momentum_net: float = 0.0            # the reference's network optimiser is plain SGD
    batch_train: int = 256
    outer_loop: Optional[int] = None     # None: the reference table by IPC (capped by max_outer_loop)
    inner_loop: Optional[int] = None     # None: the reference table by IPC
    max_outer_loop: Optional[int] = None  # None: no cap (reduced presets cap the table's outer loop)
    init: str = "noise"                  # noise | real
    metric: str = "ours"                 # ours | mse | cos | l1
    dsa: bool = False                    # DC's reference does not augment (DSA does)
    real_pass: str = "eager"             # eager (faithful) | compile | bf16: how the real gradient is computed
                                         # (benchmark.nn.real_pass)

    def validate(self):
        if self.init not in ("noise", "real"):
            raise BenchmarkError(f"init must be 'noise' or 'real', got {self.init!r}")
        check_real_pass(self.real_pass)


# Reduced settings, labelled as such wherever they are used. 'cpu': narrower network and smaller real batch for
# Fashion-MNIST-size data on a laptop; 'quick': the 8 px digits quick suite (minutes for the whole table).
# On 8 px images ConvNet-3's third block sees 2x2 maps whose instance norm leaves gradient matching almost no
# signal (DC from noise stays at chance on digits); ConvNet-2 (maps 8-4-2) is the 8 px analogue of ConvNet-3 on
# 32 px (32-16-8-4), so the quick presets distil (and the quick suite evaluates) with ConvNetD2.
CPU_PRESET = {"iterations": 200, "net_width": 32, "batch_real": 64}
QUICK_NET = {"network": "ConvNetD2", "net_width": 32}
# quick also starts from real images (DC's reference starts from noise, which 30 iterations cannot overcome at IPC 10)
QUICK_PRESET = {"iterations": 30, **QUICK_NET, "batch_real": 64, "inner_loop": 10, "max_outer_loop": 5,
                "init": "real"}


@register_method("dc")
class DC(GradientMatching):
    """Gradient matching per class on fresh networks, inner training on the synthetic set (Zhao et al. 2021)."""
    Config = DCConfig
    presets = {"cpu": CPU_PRESET, "quick": QUICK_PRESET}
    evaluation = "dc"

    def resolve(self, task):
        cfg = super().resolve(task)
        outer, inner = dc_loops(task.ipc)
        cfg.outer_loop = cfg.outer_loop or outer
        if cfg.max_outer_loop:
            cfg.outer_loop = min(cfg.outer_loop, cfg.max_outer_loop)
        cfg.inner_loop = cfg.inner_loop or inner
        return cfg.resolve_dsa(task.dataset)

    def match_steps(self, task):
        return self.config.outer_loop

    def net_optimizer(self, net):
        return torch.optim.SGD(net.parameters(), lr=self.config.lr_net, momentum=self.config.momentum_net)

    def train_between(self, task, net, opt_net, leaf, labels, gen):
        train_steps(net, leaf, labels, opt_net, epochs=self.config.inner_loop, batch=self.config.batch_train,
                    aug=self.dsa_for(task), gen=gen, observer=task.observer)


@dataclass
class DSAConfig(DCConfig):
    init: str = "real"
    dsa: bool = True


@register_method("dsa")
class DSAMethod(DC):
    """DC with the same random differentiable augmentation on real and synthetic batches (Zhao & Bilen 2021)."""
    Config = DSAConfig
    evaluation = "dsa"
