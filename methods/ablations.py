"""The paper's section 5.2 ablations, as registered methods, and whole-training-set scoring.

- influence-select: the IPC most influential real instances per class, used directly as the synthetic set.
- influence-prune-then-distill: drop the lowest-influence fraction (default 10%) of each class, then distil the
  rest with the base method.
- random-select is the `random` method.

Whole-set scores (also `run.py influence`) are the influence scores of every training instance against a
reference synthetic set, averaged over `num_nets` fresh networks: explicit, plus implicit for bases whose network
trains on real data (IDC, PDD; what their IWD variants' weights are dominated by). Within a class every chunk uses
the same d Dist / d Phi_real (taken at the class's full uniform-weight statistic), so scores do not depend on
chunking.
Ablation reference set: IPC random real images per class (the starting point of real-initialised methods).
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from benchmark.core import seeds
from benchmark.core.method import Method, apply_overrides
from benchmark.core.registry import create_method, register_method
from benchmark.core.synthetic import SyntheticSet
from benchmark.platform.logging import progress_bar
from influence.ihvp import SolverConfig
from influence.scores import gradient_products, hessian_rows
from influence.solvers import solve


def score_training_set(method, task, synset, num_nets=2, chunk=512, progress=False, solver=None):
    """Influence of every training instance of task.dataset against synset under `method`'s matching statistic (a
    method with a `scoring_step`), as its IWD variant scores a step: the explicit term, plus, when the method's
    network trains on real data (IDC, PDD), the implicit term -<(GN + damping I)^{-1} g_M, grad l_j> with g_M the
    gradient of the whole objective (every class) and the curvature on 128 evenly spaced training instances (one
    solve per network; `solver`: a SolverConfig, default CG as IWD's). Returns a float64 tensor of length N_train."""
    ds, method = task.dataset, method.for_task(task)
    implicit = method.inner_data == "real"
    solver = solver or SolverConfig(curvature="gauss-newton", hessian_batch=128)
    scores = torch.zeros(len(ds.y_train), dtype=torch.float64)
    if progress:
        bar = progress_bar(num_nets, "influence")
    for n in range(num_nets):
        gen = seeds.scoring_generator(task.seed, n)
        g_m = None
        for c in range(ds.num_classes):
            ix = ds.class_indices[c]
            step = method.scoring_step(task, synset, seeds.scoring_network(n), {c: ix}, gen)
            rows = torch.arange(len(ix)).split(chunk)
            dev = step.batches[0].x.device
            uniform = lambda r, grad=False: torch.full((len(r),), 1.0 / len(ix), device=dev,  # noqa: E731
                                                       requires_grad=grad)
            # d Dist / d Phi_real at the class's full uniform statistic (the sum of the chunks' statistics)
            full = None
            for r in rows:
                stat = [t.detach() for t in step.real_statistic(0, uniform(r), False, rows=r)]
                full = stat if full is None else [a + b for a, b in zip(full, stat)]
            full = [t.requires_grad_(True) for t in full]
            syn = [t.detach() for t in step.syn_stats[0]]
            v = torch.autograd.grad(step.distance(syn, full), full, allow_unused=True)
            v = [torch.zeros_like(t) if g is None else g for g, t in zip(v, full)]
            for r in rows:  # I_j = <v, d Phi_real / d w_j>, for a whole chunk in one double backward
                w = uniform(r, True)
                stat = step.real_statistic(0, w, True, rows=r)
                (s,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(stat, v)), w)
                scores[ix[r]] += s.detach().cpu().double() / num_nets
            if implicit:  # this class's share of g_M: through the synthetic statistic, then the real one by chunks
                params = step.train_params
                parts = [_grads(step.distance(step.syn_stats[0], [t.detach() for t in full]), params)]
                parts += [_grads(sum((a * b).sum() for a, b in zip(step.real_statistic(0, uniform(r), True, rows=r),
                                                                    v)), params) for r in rows]
                g_m = [sum(ts) for ts in zip(*parts)] if g_m is None else [a + sum(ts) for a, *ts in zip(g_m, *parts)]
        if implicit:  # the networks of every class are the same seeded one: solve and score with the last
            everyone = torch.cat(list(ds.class_indices))
            hrows = everyone[hessian_rows(len(everyone), solver.hessian_batch)]
            xh, yh = ds.x_train[hrows.to(dev)], ds.y_train[hrows.to(dev)]
            h, _ = solve(solver, params, g_m, lambda: step.instance_loss(xh, yh).mean(),
                         (lambda: step.instance_outputs(xh), lambda z: step.output_loss(z, yh).mean()),
                         (step.instance_outputs, xh))
            products = gradient_products(ds.x_train[everyone.to(dev)], ds.y_train[everyone.to(dev)], h, params,
                                         step.instance_loss, per_instance_grads=False, chunk=chunk)
            scores[everyone] += products.cpu().double() / num_nets
        if progress:
            bar.update(1)
    if progress:
        bar.close()
    return scores


def _grads(scalar, params):
    return [torch.zeros_like(p) if g is None else g.detach()
            for g, p in zip(torch.autograd.grad(scalar, params, allow_unused=True), params)]


def reference_set(task):
    return create_method("random").distill(task)


@dataclass
class SelectConfig:
    base: str = "dc"              # whose matching statistic defines influence
    base_preset: Optional[str] = None  # None: the base's reference settings (a suite's preset is passed on)
    num_nets: int = 2
    chunk: int = 512
    base_set: tuple = ()          # key=value overrides of the base method (e.g. --set base_set=iterations=50)


class UsesBase(Method):
    """A method that runs a base method (config keys base, base_preset, base_set): a preset goes to the base (and
    to this method's own presets, if it has that one)."""

    @classmethod
    def make_config(cls, preset=None, overrides=None):
        cfg = cls.Config()
        if preset and preset != "reference":
            cfg.base_preset = preset
            if preset in cls.presets:
                apply_overrides(cfg, dict(cls.presets[preset]))
        return apply_overrides(cfg, overrides)

    def base_method(self):
        return create_method(self.config.base, self.config.base_preset, list(self.config.base_set))

    def prune_then_distill(self, task, scores, keep_fraction):
        """Keep the highest-scored keep_fraction of each class (at least IPC), then distil that with the base. The set
        records the kept training indices (extras['kept_index']; a selection base's 'selected_index' counts within
        them) and, on corrupted data, the corrupted share of the kept pool."""
        ds = task.dataset
        keep = []
        for c in range(ds.num_classes):
            ix = ds.class_indices[c]
            n_keep = max(task.ipc, int(round(len(ix) * keep_fraction)))
            keep.append(ix[scores[ix].argsort(descending=True)[:n_keep]])
        keep = torch.cat(keep).sort().values
        out = self.base_method().distill(dataclasses.replace(task, dataset=ds.restrict(keep), checkpoint_path=None))
        out.metadata.update(self.metadata(task, evaluation=out.metadata.get("evaluation")),
                            base=self.config.base, kept=int(len(keep)))
        out.extras["kept_index"] = keep
        if ds.corruption:
            out.metadata["kept_corrupted_share"] = float(ds.corrupted[keep].double().mean())
        return out

    def whole_set_scores(self, task):
        return score_training_set(self.base_method(), task, reference_set(task), self.config.num_nets,
                                  self.config.chunk, task.progress)


@register_method("influence-select")
class InfluenceSelect(UsesBase):
    """Influence-Select: the IPC highest-influence real instances of each class, as the synthetic set."""
    Config = SelectConfig
    evaluation, ranked = "dc", False

    def distill(self, task):
        ds = task.dataset
        ds.check_ipc(task.ipc)
        scores = self.whole_set_scores(task)
        idx = torch.cat([ds.class_indices[c][scores[ds.class_indices[c]].argsort(descending=True)[:task.ipc]]
                         for c in range(ds.num_classes)])
        return SyntheticSet.from_indices(ds, idx, self.metadata(task), influence={"scores": scores})


@dataclass
class PruneConfig(SelectConfig):
    prune_fraction: float = 0.1


@register_method("influence-prune-then-distill")
class InfluencePruneThenDistill(UsesBase):
    """Drop the lowest-influence prune_fraction of each class, then distil the remaining data with the base."""
    Config = PruneConfig
    evaluation = "dc"  # the default base's; each set carries its base method's protocol in its metadata

    def distill(self, task):
        return self.prune_then_distill(task, self.whole_set_scores(task), 1 - self.config.prune_fraction)
