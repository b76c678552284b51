"""The matching base: one loop for every method that matches a statistic of real data with one of synthetic data
(DC, DSA, DM, IDC, PDD), and gradient matching.

Each outer iteration draws a fresh network (benchmark.core.seeds), then `match_steps` times: build the step's
statistics per class (`build_step`: the method's statistic), take one SGD step on the synthetic images with the
(weighted) matching loss, then, except after the last step, `train_between` trains the network (on the synthetic
set for DC, on real data for IDC; DM's networks never train). Subclasses supply the statistic, `match_steps` and
`train_between`; the rest (networks, per-class real batches, init, result, scoring steps) lives here.

Gradient matching: Phi_real(w) = grad_theta sum_i w_i CE(f_theta(x_i), y_i) over one class's real batch (w uniform
= the reference's mean loss); Phi_syn = the same gradient on that class's synthetic images, kept differentiable.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from influence import per_instance
from benchmark.core import seeds
from benchmark.platform.device import to_device
from benchmark.core.method import IterativeMethod
from benchmark.core.protocol import IterationContext, MatchingStep, RealBatch, WeightedMatching
from benchmark.nn.real_pass import run as real_pass_run
from benchmark.core.synthetic import SyntheticSet

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


def has_batchnorm(net):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def freeze_batchnorm(net, dataset, idx):
    """The reference's BatchNorm handling: one train-mode pass over a few real images per class (`idx`) sets the
    running statistics, then BN layers switch to eval mode (frozen) for matching. Networks without BatchNorm gather
    nothing (the indices are still drawn by the caller, so the random stream does not depend on the network)."""
    if not has_batchnorm(net):
        return
    net.train()
    with torch.no_grad():
        net(dataset.x_train[to_device(idx, dataset.x_train.device)])
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def init_images(task, gen, per_class, init):
    """Initial synthetic images, class-major: `per_class` random real images of each class, or Gaussian noise."""
    ds = task.dataset
    if init == "real":
        idx = torch.cat([ds.sample_class(c, per_class, gen) for c in range(ds.num_classes)])
        return ds.x_train[to_device(idx, ds.x_train.device)].clone()
    return torch.randn((ds.num_classes * per_class, ds.channels, *ds.image_size), generator=gen)


class MatchingMethod(WeightedMatching, IterativeMethod):
    """The loop shared by every matching method (see the module docstring). Config keys it reads: network,
    net_width, batch_real, lr_img, momentum_img, init, dsa, dsa_strategy, iterations."""
    space = "normalized"  # how the stored rows live: normalised images, or 'pixel' ([0, 1], clamped after each step)

    # --- what a subclass supplies ------------------------------------------------------------------------------
    def build_step(self, task, net, syn, gen, it, real_indices=None) -> MatchingStep:
        """syn[c] = (x_syn_c differentiable in the stored images, y_syn_c). A MatchingStep with the synthetic
        statistics computed (with graph). real_indices[c]: given real batches instead of sampled ones."""
        raise NotImplementedError

    def match_steps(self, task):
        return 1

    def net_optimizer(self, net):
        return None

    def train_between(self, task, net, opt_net, leaf, labels, gen):
        """Train the network between matching steps (DC: on the synthetic set; IDC: on real data)."""

    # --- optional hooks ----------------------------------------------------------------------------------------
    def prepare_net(self, task, net, state, it, gen):
        """Before matching starts on a fresh network (PDD conditions it on earlier stages here)."""

    def before_step(self, task, net, gen):
        """Before each matching step (gradient matching freezes BatchNorm on a few real images here)."""

    def steps_alike(self):
        """Whether matching steps 0 .. k-2 of an iteration do the same work (run.py plan counts one, scaled)."""
        return True

    def trainable_rows(self, task, state, it):
        """(start, stop, per_class): the rows of state['images'] optimised at iteration it (class-major inside)."""
        return 0, len(state["images"]), len(state["images"]) // task.dataset.num_classes

    def decode(self, task, stored):
        """Stored synthetic rows -> images in normalised space for matching (IDC decodes multi-formation here)."""
        return stored

    def image_lr(self, task):
        return self.config.lr_img

    def set_extras(self, task):
        """What the SyntheticSet needs to decode its rows (IDC: the multi-formation factor)."""
        return {}

    # --- shared pieces -----------------------------------------------------------------------------------------
    def fresh_net(self, task, index):
        return self.config.build_network(task.dataset, seeds.network_seed(task.seed, index), task.device)

    def dsa_for(self, task):
        return self.config.make_dsa()

    def real_batch(self, task, c, gen, real_indices=None):
        """Class c's real batch: `batch_real` indices drawn (CPU generator) unless given; data on the device."""
        ds = task.dataset
        idx = real_indices[c] if real_indices is not None else ds.sample_class(c, self.config.batch_real, gen)
        on_dev = to_device(idx, ds.x_train.device)
        return RealBatch(ds.x_train[on_dev], ds.y_train[on_dev], idx, c)

    def init_state(self, task, gen):
        task.dataset.check_ipc(task.ipc)
        ds = task.dataset
        return {"images": init_images(task, gen, task.ipc, self.config.init), "opt_img": None,
                "labels": torch.arange(ds.num_classes).repeat_interleave(task.ipc)}

    def result(self, task, state):
        return SyntheticSet(state["images"].clone(), state["labels"].clone(), self.space, self.set_extras(task),
                            self.metadata(task))

    def synthetic_batches(self, task, rows, per_class):
        """{class: (decoded images, labels)} from class-major stored rows (`per_class` rows per class)."""
        out = {}
        for c in range(task.dataset.num_classes):
            xs = self.decode(task, rows[c * per_class:(c + 1) * per_class])
            out[c] = (xs, torch.full((len(xs),), c, dtype=torch.long, device=xs.device))
        return out

    def scoring_step(self, task, synset, net_index, real_indices, gen):
        net = self.fresh_net(task, net_index)
        if has_batchnorm(net):  # BatchNorm in eval mode, as in matching: scores must not depend on the chunking
            ds, bn_gen = task.dataset, seeds.batchnorm_generator(task.seed, net_index)
            freeze_batchnorm(net, ds, torch.cat([ds.sample_class(c, 16, bn_gen) for c in range(ds.num_classes)]))
        x, y = synset.training_data(task.dataset)
        syn = {c: (x[y == c].to(task.device), y[y == c].to(task.device)) for c in sorted(real_indices)}
        return self.build_step(task, net, syn, gen, net_index, real_indices=real_indices)

    def iteration(self, task, state, it, gen):
        cfg, ds = self.config, task.dataset
        net = self.fresh_net(task, it)
        self.prepare_net(task, net, state, it, gen)
        start, stop, per_class = self.trainable_rows(task, state, it)
        leaf = state["images"][start:stop].clone().to(task.device).requires_grad_(True)
        labels = state["labels"][start:stop].to(task.device)
        opt_img = torch.optim.SGD([leaf], lr=self.image_lr(task), momentum=cfg.momentum_img)
        if state.get("opt_img") is not None:
            opt_img.load_state_dict(state["opt_img"])
        opt_net = self.net_optimizer(net)
        context = IterationContext(state)
        k_steps, losses = self.match_steps(task), []

        def one_step(k):
            self.before_step(task, net, gen)
            step = self.build_step(task, net, self.synthetic_batches(task, leaf, per_class), gen, it)
            step.local_step, step.context = k, context
            loss = self.matching_loss(step, self.instance_weights(step))
            opt_img.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            if self.space == "pixel":
                with torch.no_grad():
                    leaf.clamp_(0.0, 1.0)
            losses.append(loss.detach())  # read on the host once per iteration, not per step
            if k < k_steps - 1:
                self.train_between(task, net, opt_net, leaf.detach(), labels, gen)
        if task.observer.counting and k_steps > 2 and self.steps_alike():
            # run.py plan on meta: steps 0 .. k_steps - 2 do the same work (shapes do not change); count one, scale it
            task.observer.repeat(k_steps - 1, lambda: one_step(0))
            one_step(k_steps - 1)
        else:
            for k in range(k_steps):
                one_step(k)
        images = state["images"].to(task.device).clone()  # the state lives on the task's device
        images[start:stop] = leaf.detach()
        state["images"] = images
        state["opt_img"] = opt_img.state_dict()
        out = {"loss": float((torch.stack(losses).double() / ds.num_classes).mean())}
        out.update(self.finish_iteration(context))
        return out


class GradientMatching(MatchingMethod):
    """Matching per-class gradients of the classification loss (DC, DSA, IDC, PDD). Config adds: metric, and the
    network's training between steps (the subclass's train_between)."""

    def matching_params(self, net):
        return [p for p in net.parameters() if p.requires_grad]

    def before_step(self, task, net, gen):
        ds = task.dataset
        freeze_batchnorm(net, ds, torch.cat([ds.sample_class(c, 16, gen) for c in range(ds.num_classes)]))

    def build_step(self, task, net, syn, gen, it, real_indices=None):
        dsa, params = self.dsa_for(task), self.matching_params(net)
        classes = sorted(syn)
        batches, aug_params = [], []
        for c in classes:
            batches.append(self.real_batch(task, c, gen, real_indices))
            aug_params.append(dsa.sample(1, task.dataset.image_size[0], gen, siamese=True) if dsa else None)

        def augment(g, x):  # the class's one siamese draw, replayed on any batch
            return x if aug_params[g] is None else dsa.apply(x, dsa.expand(aug_params[g], len(x)))

        syn_stats = []
        for g, c in enumerate(classes):
            xs, ys = syn[c]
            ones = torch.full((len(ys),), 1.0 / len(ys), device=xs.device, dtype=xs.dtype)
            syn_stats.append(weighted_grad(net, params, augment(g, xs), ys, ones, create_graph=True))

        real_pass = getattr(self.config, "real_pass", "eager")  # benchmark.nn.real_pass; a plugin's config may
        # not have the key

        def real_statistic(g, weights, create_graph=False, rows=None):
            b = batches[g]
            x, y = (b.x, b.y) if rows is None else (b.x[rows], b.y[rows])
            if create_graph or weights.requires_grad:  # influence: differentiable, always eager autograd
                return weighted_grad(net, params, augment(g, x), y, weights, create_graph=True)
            return real_pass_run(weighted_grad, real_pass, x.device.type, net, params, augment(g, x), y,
                                 weights)

        metric = self.config.metric
        step = MatchingStep(iteration=it, params=params, batches=batches, real_statistic=real_statistic,
                            distance=lambda s, r: match_distance(s, r, metric), syn_stats=syn_stats,
                            inner_data=self.inner_data, writer=task.writer,
                            train_params=[p for p in net.parameters() if p.requires_grad])
        if per_instance.supports(net, params):  # Phi_real(w) = sum_j w_j grad CE_j: per-instance gradients, one pass
            step.instance_gradients = lambda g: per_instance.output_loss_gradients(
                net, augment(g, batches[g].x), batches[g].y, params, per_instance.cross_entropy)
        if self.inner_data == "real":  # the network trains on real data: per-instance CE at theta_t (un-augmented)
            step.instance_outputs = net
            step.output_loss = per_instance.cross_entropy
            step.instance_loss = lambda x, y: step.output_loss(net(x), y)
        return step
