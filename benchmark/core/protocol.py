"""The weighted-statistic protocol: the one thing influence/ knows about a distillation method.

Distillation minimises M(S; D) = E_theta sum_t Dist(Phi_syn(S; theta_t), Phi_real(D_w; theta_t))  (paper eq. 6),
where the real statistic takes per-instance weights w. At each matching step a method following the protocol
builds a `MatchingStep` and asks `self.instance_weights(step)` for the weights of each group's real batch. The base
method answers with uniform weights (1/n per group: exactly the reference's mean loss / mean embedding); an IWD
variant (influence.influence_weighted) answers with softmax(influence / tau).

Weight convention: within a group (a class, for per-class matching) the weights sum to 1, so uniform weights give
the reference statistic bit for bit. Influence scores are derivatives of Dist at these weights.

Everything a step's weighting needs arrives explicitly: the step, and its `context` (what the steps of one outer
iteration share). Nothing is kept on the method object between calls.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class IterationContext:
    """What the matching steps of one outer iteration share, created by the loop and passed with every step: the
    method's state (IWD tracks per-instance scores in it), a sink for the iteration's statistics, what a solver
    carries from one step to the next (reset each iteration, so a resumed run stays exact), and device checks read
    on the host once, when the iteration ends (no sync per step)."""
    state: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    solution: Optional[list] = None  # the previous step's inverse-HVP solution (a warm start, or held: solve_every)
    damping: float = 0.0             # the damping the previous step's CG needed (within an iteration)
    checks: list = field(default_factory=list)      # (0-d bool tensor: all good, description of where)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class RealBatch:
    x: torch.Tensor          # real images of one group (normalised space, before augmentation)
    y: torch.Tensor
    index: torch.Tensor      # their indices in the training set (for tracking scores across iterations)
    group: int               # the class (or group) this batch is matched in


@dataclass
class MatchingStep:
    """One matching step, as influence/ sees it.

    real_statistic(g, weights, create_graph, rows=None) -> Phi_real of group g's batch with those weights (a tuple
        of tensors; with create_graph=True, or weights requiring grad, it is differentiable in weights and params).
        rows: a subset of the batch (weights then has one entry per row): Phi_real is linear in the weights, so
        chunks add up (what whole-training-set scoring uses to bound memory).
    syn_stats[g] -> Phi_syn of group g (a tuple of tensors, with its graph to the synthetic images and params).
    distance(syn_stat, real_stat) -> scalar Dist for one group; the step's objective is the sum over groups.
    params -> the parameters whose gradients are matched (Phi for gradient matching is d loss / d params).
    train_params -> theta_t, all parameters the inner training moves (defaults to params); the implicit term's
        Hessian and g_M are taken with respect to these.
    inner_data -> 'synthetic' (S_inner = S: explicit term only) or 'real' (S_inner = D: implicit term too).
    instance_loss(x, y) -> per-instance inner-training losses at theta_t (only for inner_data='real'); the Hessian H
        of their mean over the step's real batches is the one the implicit term inverts.
    instance_outputs(x), output_loss(z, y) -> the network's outputs (logits) and the per-instance loss of outputs, with
        instance_loss(x, y) = output_loss(instance_outputs(x), y): what the Gauss-Newton curvature needs (optional).
    instance_gradients(g) -> influence.per_instance.InstanceGradients of group g's real batch, when Phi_real is a
        weighted gradient, Phi_real(w) = sum_j w_j grad l_j (gradient matching), and the network's layers allow
        per-instance gradients from one pass (optional): scores and the statistic at any weights are then matrix
        products, with no further pass over the real batch.
    """
    iteration: int
    params: List[torch.Tensor]
    batches: List[RealBatch]
    real_statistic: Callable[[int, torch.Tensor, bool], Sequence[torch.Tensor]]
    distance: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]
    syn_stats: list = field(default_factory=list)
    inner_data: str = "synthetic"
    instance_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    train_params: Optional[List[torch.Tensor]] = None
    instance_outputs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    output_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    instance_gradients: Optional[Callable[[int], object]] = None
    writer: object = None
    local_step: int = 0      # index of this matching step within the iteration (0 = first)
    context: Optional[IterationContext] = None  # None: a step outside any iteration (a test, a one-off score)

    def __post_init__(self):
        if self.train_params is None:
            self.train_params = self.params


class InstanceWeights(list):
    """Per-group weights as instance_weights returns them, optionally with `statistics`: Phi_real_g at exactly these
    weights, computed on the way (from instance_gradients), which matching_loss then uses instead of another pass."""

    def __init__(self, weights, statistics=None):
        super().__init__(weights)
        self.statistics = statistics


def uniform_weights(step: MatchingStep):
    return [torch.full((len(b.y),), 1.0 / len(b.y), dtype=b.x.dtype, device=b.x.device) for b in step.batches]


class WeightedMatching:
    """The protocol a method follows so influence/ can weight it. It builds MatchingSteps, asks
    `instance_weights(step)` at each, calls `finish_iteration(context)` once the iteration's steps are done, and can
    build a `scoring_step` against a given synthetic set (whole-training-set scoring). IWD variants override the
    first two."""

    def instance_weights(self, step: MatchingStep):
        return uniform_weights(step)

    def finish_iteration(self, context: IterationContext) -> dict:
        """Scalars to log for the iteration (after its last step); may raise on the context's pending checks."""
        return {}

    def scoring_step(self, task, synset, net_index, real_indices, gen) -> MatchingStep:
        """A matching step of a fresh network (seeded by net_index) against `synset`, with the given real batches
        ({class: training indices}): what influence/ uses to score the whole training set."""
        raise NotImplementedError

    def matching_loss(self, step: MatchingStep, weights=None):
        """sum_g Dist(Phi_syn_g, Phi_real_g(w_g)); the real statistic carries no graph (as in the references)."""
        weights = weights if weights is not None else self.instance_weights(step)
        known = getattr(weights, "statistics", None)
        total = 0.0
        for g, (syn, w) in enumerate(zip(step.syn_stats, weights)):
            real = known[g] if known is not None else step.real_statistic(g, w.detach(), False)
            real = [r.detach() for r in real]
            total = total + step.distance(syn, real)
        return total
