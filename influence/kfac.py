"""Direct inverses of the Gauss-Newton curvature for the implicit term (no iterative solver): K-FAC (Martens &
Grosse 2015; KFC for convolutions, Grosse & Martens 2016), EK-FAC (George et al. 2018), the layer approximations
kronfluence uses for Linear and Conv2d layers, and the exact GN through the Woodbury identity.

For softmax cross-entropy the Gauss-Newton matrix of the mean loss over n instances is exactly
    GN = (1/n) sum_i sum_k u_ik u_ik^T,   u_ik = J_i^T r_ik,   r_ik = sqrt(p_ik) (e_k - p_i)
(diag(p) - p p^T = sum_k r_k r_k^T): the expectation over the model's own labels, over all C classes (no sampling
noise). One forward pass with hooks and C backward passes of <z, r_k> give every layer's inputs a and output
gradients g_k, hence the per-instance pseudo-gradients, layer by layer: for s = W a (bias as a column of W acting
on a constant 1; a convolution at every output location t on its unfolded input patch a_t), DW_ik = sum_t g_ikt a_it^T;
GroupNorm's affine parameters (the ConvNets' instance norm) from its normalised input. Other layer types are refused.
- kfac: per layer A = mean_{i,t} a a^T, G = (1/n) sum_{i,k,t} g g^T, block ~ A (x) G (exact for a Linear layer on one
  instance), inverted in the factors' eigenbases: V -> Q_G [(Q_G^T V Q_A) / (gamma alpha^T + damping)] Q_A^T;
  GroupNorm gets its exact GN diagonal.
- ekfac: the same eigenbases, eigenvalues replaced by the exact second moments (1/n) sum_{i,k} (Q_G^T DW_ik Q_A)^2.
- woodbury: the whole GN, exactly (all layers, cross terms included): with U = [u_ik] (n C columns),
  (GN + damping I)^{-1} v = (v - U (n damping I + U^T U)^{-1} U^T v) / damping, one (nC x nC) Cholesky solve: what CG
  converges to, without iterating. Memory: U (n C parameter-sized rows); cost: n^2 C^2 P for U^T U.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .per_instance import (UnsupportedLayers, block_rows, capture, flatten, layer_blocks, output_grads,
                                    unflatten)

from .ihvp import InfluenceError, SolveInfo

def _blocks(net, params):
    try:
        return layer_blocks(net, params)
    except UnsupportedLayers as e:
        raise InfluenceError(f"solvers woodbury, kfac and ekfac: {e}. Use solver=cg (with curvature=gauss-newton)"
                             ) from None


def _patches(m, kind, a):
    """K-FAC's layout of a layer's inputs: rows (n, T, in'), one per output location, with a ones column for a
    trained bias."""
    if isinstance(m, nn.Conv2d):
        a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    else:
        a = a.reshape(len(a), 1, -1)
    if kind == "kron":
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def _pseudo_gradients(net, x, params):
    """(blocks, raw layer inputs, iterator over k of raw per-block output gradients g_k): one forward, C
    backwards."""
    blocks = _blocks(net, params)
    z, inputs, outs = capture(net, x, blocks)
    n, classes = z.shape
    p = torch.softmax(z.detach().double(), 1).to(z.dtype)

    def per_class():
        for k in range(classes):
            r = p[:, k:k + 1].sqrt() * (F.one_hot(torch.full((n,), k, device=z.device), classes).to(z.dtype) - p)
            yield output_grads(z, outs, r, retain_graph=k < classes - 1)
    return blocks, inputs, per_class()


def _rows(g):
    """An output gradient in K-FAC's layout (n, T, out)."""
    return g.flatten(2).transpose(1, 2) if g.dim() == 4 else g.reshape(len(g), 1, -1)


def kfac_inverse(net, x, params, v, damping, eigen_correct=False):
    """h ~ (GN + damping I)^{-1} v (K-FAC, or EK-FAC with eigen_correct) for the mean cross-entropy of net over x.
    Returns (h as a list shaped like params, SolveInfo)."""
    params = list(params)
    blocks, inputs, grads = _pseudo_gradients(net, x, params)
    n = len(x)
    second = [0.0] * len(blocks)         # G factors (kron) or squared per-instance gradients (diag)
    g_rows = [[] for _ in blocks]        # per-class output gradients (EK-FAC needs them in the eigenbasis)
    for gk in grads:
        for i, ((m, kind), g) in enumerate(zip(blocks, gk)):
            if kind != "diag":
                g = _rows(g)
                second[i] = second[i] + torch.einsum("nto,ntp->op", g, g) / n
                if eigen_correct:
                    g_rows[i].append(g)
            else:
                second[i] = second[i] + (block_rows(m, kind, inputs[i], g) ** 2).sum(0) / n
    sols = []
    for i, ((m, kind), vm) in enumerate(zip(blocks, flatten(blocks, params, v))):
        if kind == "diag":
            sols.append(vm / (second[i] + damping))
            continue
        a = _patches(m, kind, inputs[i])
        alpha, qa = torch.linalg.eigh(torch.einsum("nti,ntj->ij", a, a).double() / (a.shape[0] * a.shape[1]))
        gamma, qg = torch.linalg.eigh(second[i].double())
        if eigen_correct:  # exact second moments of the per-instance pseudo-gradients in the Kronecker eigenbasis
            a_e = a.double() @ qa
            scale = sum(torch.einsum("nto,nti->noi", g.double() @ qg, a_e).pow(2).sum(0) for g in g_rows[i]) / n
        else:
            scale = gamma.clamp_min(0)[:, None] * alpha.clamp_min(0)[None, :]
        vm = vm.reshape(m.weight.shape[0], -1).double()
        sols.append((qg @ ((qg.T @ vm @ qa) / (scale + damping)) @ qa.T).to(x.dtype).reshape(-1))
    return unflatten(blocks, params, sols), SolveInfo("ekfac" if eigen_correct else "kfac", damping=damping)


def woodbury_inverse(net, x, params, v, damping):
    """h = (GN + damping I)^{-1} v exactly, for the mean cross-entropy GN of net over x. Returns (h, SolveInfo)."""
    if damping <= 0:
        raise InfluenceError("the Woodbury solve needs damping > 0")
    params = list(params)
    blocks, inputs, grads = _pseudo_gradients(net, x, params)
    n = len(x)
    # U^T as rows (k, i), one column block per layer: per-instance pseudo-gradients
    u = [torch.cat(rows) for rows in zip(*[[block_rows(m, kind, a, g) for (m, kind), a, g in zip(blocks, inputs, gk)]
                                           for gk in grads])]
    vb = flatten(blocks, params, v)
    gram = sum(b @ b.T for b in u).double()
    gram.diagonal().add_(n * damping)
    z = torch.cholesky_solve(sum(b @ t for b, t in zip(u, vb)).double()[:, None], torch.linalg.cholesky(gram))
    z = z[:, 0].to(x.dtype)
    return unflatten(blocks, params, [(t - b.T @ z) / damping for b, t in zip(u, vb)]), \
        SolveInfo("woodbury", damping=damping)
