"""Gradient matching, shared by DC, DSA, IDC and PDD.

Phi_real(w) = grad_theta sum_i w_i CE(f_theta(x_i), y_i) over one class's real batch (w uniform = the reference's
mean loss); Phi_syn = the same gradient on that class's synthetic images, kept differentiable (create_graph).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.augment import DSA, strategy_for
from benchmark.device import to_device
from benchmark.method import IterativeMethod
from benchmark.protocol import MatchingStep, RealBatch, WeightedMatching

# the reference DC loop table: IPC -> (outer_loop, inner_loop)
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc):
    """The reference's (outer_loop, inner_loop) for IPC in its table; other IPCs take the entry with the nearest
    IPC (ties to the smaller), a documented rule where the reference exits."""
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    nearest = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[nearest]


def layer_distance(gs, gr):
    """DC's 'ours' distance for one parameter tensor: rows = output units; sum over rows of 1 - cosine."""
    if gr.dim() == 1:
        return gr.new_zeros(())
    gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
    return torch.sum(1 - torch.sum(gs * gr, -1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6))


def match_distance(g_syn, g_real, metric="ours"):
    """Distance between two gradient lists. ours: layer-wise (DC); mse: sum of squares; l1: sum of |.| (IDC);
    cos: 1 - cosine of the flattened vectors."""
    if metric == "ours":
        return sum(layer_distance(s, r) for s, r in zip(g_syn, g_real))
    if metric == "mse":
        return sum(((s - r) ** 2).sum() for s, r in zip(g_syn, g_real))
    if metric == "l1":
        return sum((s - r).abs().sum() for s, r in zip(g_syn, g_real))
    if metric == "cos":
        s = torch.cat([t.flatten() for t in g_syn])
        r = torch.cat([t.flatten() for t in g_real])
        return 1 - (s * r).sum() / (s.norm() * r.norm() + 1e-6)
    raise ValueError(f"unknown matching metric {metric!r} (ours, mse, l1, cos)")


def weighted_grad(net, params, x, y, weights, create_graph=False):
    """grad_theta sum_i w_i CE_i. Differentiable in x, params and weights when create_graph=True."""
    losses = F.cross_entropy(net(x), y, reduction="none")
    return torch.autograd.grad((weights * losses).sum(), params, create_graph=create_graph)


def freeze_batchnorm(net, dataset, idx):
    """The reference's BatchNorm handling: one train-mode pass over a few real images per class (`idx`) sets the
    running statistics, then BN layers switch to eval mode (frozen) for matching. Networks without BatchNorm gather
    nothing (the indices are still drawn by the caller, so the random stream does not depend on the network)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    net.train()
    with torch.no_grad():
        net(dataset.x_train[to_device(idx, dataset.x_train.device)])
    for m in bns:
        m.eval()


class GradientMatching(WeightedMatching, IterativeMethod):
    """Shared matching step. Subclasses supply the synthetic images per class, the matched parameters, the metric,
    and whether DSA is used (siamese in matching)."""

    def dsa_for(self, task):
        cfg = self.config
        if not getattr(cfg, "dsa", False):
            return None
        return DSA(strategy=cfg.dsa_strategy or strategy_for(task.dataset.name))

    def matching_params(self, net):
        return [p for p in net.parameters() if p.requires_grad]

    def metric(self, task):
        return self.config.metric

    def build_step(self, task, net, params, syn_batches, gen, it, real_indices=None):
        """syn_batches[c] = (x_syn_c differentiable in the stored images, y_syn_c). Returns a MatchingStep with
        the synthetic statistics computed (with graph). real_indices[c]: given real batches instead of sampled."""
        ds, cfg = task.dataset, self.config
        dsa = self.dsa_for(task)
        classes = sorted(syn_batches)
        batches, aug_params, syn_stats = [], [], []
        for c in classes:
            idx = real_indices[c] if real_indices is not None else ds.sample_class(c, cfg.batch_real, gen)
            on_dev = to_device(idx, ds.x_train.device)  # data on the task's device; indices CPU-drawn
            batches.append(RealBatch(ds.x_train[on_dev], ds.y_train[on_dev], idx, c))
            aug_params.append(dsa.sample(1, ds.image_size[0], gen, siamese=True) if dsa is not None else None)
        metric = self.metric(task)

        def augment(g, x):
            p = aug_params[g]
            if p is None:
                return x
            return dsa.apply(x, {k: (v.expand(len(x), *v.shape[1:]) if torch.is_tensor(v) else v)
                                 for k, v in p.items()})

        for g, c in enumerate(classes):
            xs, ys = syn_batches[c]
            ones = torch.full((len(ys),), 1.0 / len(ys), device=xs.device, dtype=xs.dtype)
            syn_stats.append(weighted_grad(net, params, augment(g, xs), ys, ones, create_graph=True))

        def real_statistic(g, weights, create_graph=False, rows=None):
            b = batches[g]
            x, y = (b.x, b.y) if rows is None else (b.x[rows], b.y[rows])
            return weighted_grad(net, params, augment(g, x), y, weights,
                                 create_graph=create_graph or weights.requires_grad)

        step = MatchingStep(iteration=it, params=params, batches=batches, real_statistic=real_statistic,
                            distance=lambda s, r: match_distance(s, r, metric), syn_stats=syn_stats,
                            inner_data=self.inner_data, writer=task.writer,
                            train_params=[p for p in net.parameters() if p.requires_grad])
        if self.inner_data == "real":  # the network trains on real data: per-instance CE at theta_t (un-augmented)
            step.instance_outputs = net
            step.output_loss = lambda z, y: F.cross_entropy(z, y, reduction="none")
            step.instance_loss = lambda x, y: step.output_loss(net(x), y)
        return step

    # ------------------------------------------------------------------------------------------------------------
    # the shared outer iteration: fresh network; K x [match -> image step -> train the network between steps]

    def net_seed(self, task, it):
        return task.seed * 1_000_003 + it

    def fresh_net(self, task, it):
        from benchmark.networks import get_network
        cfg, ds = self.config, task.dataset
        kw = {"width": cfg.net_width} if getattr(cfg, "net_width", 0) else {}
        return get_network(cfg.network, ds.channels, ds.num_classes, ds.image_size, seed=self.net_seed(task, it),
                           **kw).to(task.device)

    def trainable_rows(self, task, state, it):
        """(start, stop, per_class): the rows of state['images'] optimised at iteration it (class-major inside)."""
        return 0, len(state["images"]), len(state["images"]) // task.dataset.num_classes

    def prepare_net(self, task, net, state, it, gen):
        """Hook before matching starts on a fresh network (PDD conditions it on earlier stages here)."""

    def synthetic_images(self, task, stored):
        """Stored synthetic rows -> images in normalised space for matching (IDC decodes here)."""
        return stored

    def match_steps(self, task):
        raise NotImplementedError

    def net_optimizer(self, net):
        raise NotImplementedError

    def train_between(self, task, net, opt_net, leaf, labels, gen):
        raise NotImplementedError

    def iteration(self, task, state, it, gen):
        cfg, ds = self.config, task.dataset
        net = self.fresh_net(task, it)
        self.prepare_net(task, net, state, it, gen)
        params = self.matching_params(net)
        start, stop, per_class = self.trainable_rows(task, state, it)
        leaf = state["images"][start:stop].clone().to(task.device).requires_grad_(True)
        labels = state["labels"][start:stop].to(task.device)
        opt_img = torch.optim.SGD([leaf], lr=self.image_lr(task), momentum=cfg.momentum_img)
        if state.get("opt_img") is not None:
            opt_img.load_state_dict(state["opt_img"])
        opt_net = self.net_optimizer(net)
        k_steps, losses = self.match_steps(task), []
        for k in range(k_steps):
            bn_idx = torch.cat([ds.sample_class(c, 16, gen) for c in range(ds.num_classes)])
            freeze_batchnorm(net, ds, bn_idx)
            syn = {}
            for c in range(ds.num_classes):
                rows = slice(c * per_class, (c + 1) * per_class)
                xs = self.synthetic_images(task, leaf[rows])
                syn[c] = (xs, torch.full((len(xs),), c, dtype=torch.long, device=task.device))
            step = self.build_step(task, net, params, syn, gen, it)
            step.local_step = k
            loss = self.matching_loss(step, self.instance_weights(step))
            opt_img.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            self.after_image_step(leaf)
            losses.append(loss.detach())  # read on the host once per iteration, not per step
            if k == k_steps - 1:
                break
            self.train_between(task, net, opt_net, leaf.detach(), labels, gen)
        images = state["images"].to(task.device).clone()  # the state lives on the task's device
        images[start:stop] = leaf.detach()
        state["images"] = images
        state["opt_img"] = opt_img.state_dict()
        return {"loss": float((torch.stack(losses).double() / ds.num_classes).mean())}

    def scoring_step(self, task, synset, net_index, real_indices, gen):
        """A matching step of a fresh network (seeded by net_index) against a given synthetic set, with the given
        real batches: what influence/ uses to score the whole training set."""
        net = self.fresh_net(task, net_index)
        params = self.matching_params(net)
        x, y = synset.training_data(task.dataset)
        syn = {c: (x[y == c].to(task.device), y[y == c].to(task.device)) for c in real_indices}
        return self.build_step(task, net, params, syn, gen, net_index, real_indices=real_indices)

    def image_lr(self, task):
        return self.config.lr_img

    def after_image_step(self, leaf):
        """Hook after each image step (IDC clamps pixel-space data to [0, 1])."""
