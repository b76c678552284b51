"""DM (Zhao & Bilen 2023, distribution matching).

Each iteration draws a fresh randomly initialised ConvNet, frozen; loss = sum over classes of
||mean embed(real_c) - mean embed(syn_c)||^2 on the penultimate features, with siamese DSA per class; one SGD step on
the synthetic images (lr 1.0, momentum 0.5). Real init. The weighted real statistic is sum_i w_i embed(x_i).
Batched across classes: one forward for all classes' real images and one for all synthetic images (exact for
per-sample normalisation; BatchNorm networks fall back to the reference's per-class passes).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from benchmark.augment import DSA, strategy_for
from benchmark.device import to_device
from benchmark.method import IterativeMethod
from benchmark.networks import get_network
from benchmark.protocol import MatchingStep, RealBatch, WeightedMatching
from benchmark.registry import register_method
from benchmark.synthetic import SyntheticSet

from .dc import QUICK_NET, _init_images


@dataclass
class DMConfig:
    iterations: int = 20000
    network: str = "ConvNet"
    net_width: int = 0
    batch_real: int = 256
    lr_img: float = 1.0
    momentum_img: float = 0.5
    init: str = "real"
    dsa: bool = True
    dsa_strategy: str = ""


def _sq_distance(syn, real):
    return ((syn[0] - real[0]) ** 2).sum()


@register_method("dm")
class DM(WeightedMatching, IterativeMethod):
    """Distribution matching: per-class mean embeddings of random networks, augmented (Zhao & Bilen 2023)."""
    Config = DMConfig
    presets = {"cpu": {"iterations": 2000, "net_width": 32, "batch_real": 64},
               "quick": {"iterations": 200, **QUICK_NET, "batch_real": 64}}
    evaluation_hint = "dm"

    def init_state(self, task, gen):
        task.dataset.check_ipc(task.ipc)
        ds = task.dataset
        images = _init_images(task, gen, task.ipc, self.config.init)
        return {"images": images, "labels": torch.arange(ds.num_classes).repeat_interleave(task.ipc),
                "opt_img": None}

    def fresh_net(self, task, it):
        cfg, ds = self.config, task.dataset
        kw = {"width": cfg.net_width} if cfg.net_width else {}
        net = get_network(cfg.network, ds.channels, ds.num_classes, ds.image_size,
                          seed=task.seed * 1_000_003 + it, **kw).to(task.device)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def scoring_step(self, task, synset, net_index, real_indices, gen):
        net = self.fresh_net(task, net_index)
        x, y = synset.training_data(task.dataset)
        order = torch.cat([torch.nonzero(y == c).flatten() for c in sorted(real_indices)])
        return self.build_step(task, net, x[order].to(task.device), gen, net_index, real_indices=real_indices)

    def iteration(self, task, state, it, gen):
        cfg, ds = self.config, task.dataset
        net = self.fresh_net(task, it)
        leaf = state["images"].clone().to(task.device).requires_grad_(True)
        opt = torch.optim.SGD([leaf], lr=cfg.lr_img, momentum=cfg.momentum_img)
        if state.get("opt_img") is not None:
            opt.load_state_dict(state["opt_img"])
        step = self.build_step(task, net, leaf, gen, it)
        loss = self.matching_loss(step, self.instance_weights(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["images"] = leaf.detach()  # the state lives on the task's device
        state["opt_img"] = opt.state_dict()
        return {"loss": float(loss.detach()) / ds.num_classes}

    def build_step(self, task, net, leaf, gen, it, real_indices=None):
        cfg, ds = self.config, task.dataset
        dsa = DSA(strategy=cfg.dsa_strategy or strategy_for(ds.name)) if cfg.dsa else None
        classes = sorted(real_indices) if real_indices is not None else range(ds.num_classes)
        ipc = len(leaf) // len(classes)
        batches, real_aug, syn_aug = [], [], []
        for g, c in enumerate(classes):
            idx = real_indices[c] if real_indices is not None else ds.sample_class(c, cfg.batch_real, gen)
            on_dev = to_device(idx, ds.x_train.device)  # data on the task's device; indices CPU-drawn
            xr = ds.x_train[on_dev]
            batches.append(RealBatch(xr, ds.y_train[on_dev], idx, c))
            xs = leaf[g * ipc:(g + 1) * ipc]
            if dsa is not None:
                xr, xs = dsa.siamese(xr, xs, gen)
            real_aug.append(xr)
            syn_aug.append(xs)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        if has_bn:
            with torch.no_grad():
                real_emb = [net.embed(x) for x in real_aug]
            syn_emb = [net.embed(x) for x in syn_aug]
        else:
            with torch.no_grad():
                real_emb = net.embed(torch.cat(real_aug)).split([len(x) for x in real_aug])
            syn_emb = net.embed(torch.cat(syn_aug)).split([len(x) for x in syn_aug])
        syn_stats = [(e.mean(0),) for e in syn_emb]

        def real_statistic(g, weights, create_graph=False, rows=None):
            emb = real_emb[g] if rows is None else real_emb[g][rows]
            return ((weights[:, None] * emb).sum(0),)

        return MatchingStep(iteration=it, params=[p for p in net.parameters()], batches=batches,
                            real_statistic=real_statistic, distance=_sq_distance, syn_stats=syn_stats,
                            inner_data="synthetic", writer=task.writer)

    def result(self, task, state):
        return SyntheticSet(state["images"].clone(), state["labels"].clone(), "normalized", {},
                            self.metadata(task, evaluation_hint=self.evaluation_hint))
