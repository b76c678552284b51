"""DM (Zhao & Bilen 2023, distribution matching).

Each iteration draws a fresh randomly initialised ConvNet, frozen; loss = sum over classes of
||mean embed(real_c) - mean embed(syn_c)||^2 on the penultimate features, with siamese DSA per class; one SGD step on
the synthetic images (lr 1.0, momentum 0.5). Real init. The weighted real statistic is sum_i w_i embed(x_i).
Batched across classes: one forward for all classes' real images and one for all synthetic images (exact for
per-sample normalisation; BatchNorm networks fall back to the reference's per-class passes).
"""
from dataclasses import dataclass

import torch

from benchmark.core.protocol import MatchingStep
from benchmark.nn.augment import DSAOptions
from benchmark.nn.networks import NetworkOptions
from benchmark.core.registry import register_method

from .dc import QUICK_NET
from .matching import MatchingMethod, has_batchnorm


@dataclass
class DMConfig(DSAOptions, NetworkOptions):
    iterations: int = 20000
    batch_real: int = 256
    lr_img: float = 1.0
    momentum_img: float = 0.5
    init: str = "real"


def _sq_distance(syn, real):
    return ((syn[0] - real[0]) ** 2).sum()


@register_method("dm")
class DM(MatchingMethod):
    """Distribution matching: per-class mean embeddings of random networks, augmented (Zhao & Bilen 2023)."""
    Config = DMConfig
    presets = {"cpu": {"iterations": 2000, "net_width": 32, "batch_real": 64},
               "quick": {"iterations": 200, **QUICK_NET, "batch_real": 64}}
    evaluation = "dsa"  # the reference evaluates DM's sets with DSA augmentation

    def resolve(self, task):
        return super().resolve(task).resolve_dsa(task.dataset)

    def fresh_net(self, task, index):
        net = super().fresh_net(task, index)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def build_step(self, task, net, syn, gen, it, real_indices=None):
        dsa = self.dsa_for(task)
        classes = sorted(syn)
        batches, real_aug, syn_aug = [], [], []
        for c in classes:
            b = self.real_batch(task, c, gen, real_indices)
            batches.append(b)
            xr, xs = dsa.siamese(b.x, syn[c][0], gen) if dsa is not None else (b.x, syn[c][0])
            real_aug.append(xr)
            syn_aug.append(xs)
        if has_batchnorm(net):
            with torch.no_grad():
                real_emb = [net.embed(x) for x in real_aug]
            syn_emb = [net.embed(x) for x in syn_aug]
        else:
            with torch.no_grad():
                real_emb = net.embed(torch.cat(real_aug)).split([len(x) for x in real_aug])
            syn_emb = net.embed(torch.cat(syn_aug)).split([len(x) for x in syn_aug])

        def real_statistic(g, weights, create_graph=False, rows=None):
            emb = real_emb[g] if rows is None else real_emb[g][rows]
            return ((weights[:, None] * emb).sum(0),)

        return MatchingStep(iteration=it, params=list(net.parameters()), batches=batches,
                            real_statistic=real_statistic, distance=_sq_distance,
                            syn_stats=[(e.mean(0),) for e in syn_emb], inner_data="synthetic", writer=task.writer)
