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

from .ihvp import InfluenceError, SolveInfo

KRONECKER = (nn.Conv2d, nn.Linear)


def _blocks(net, params):
    """[(module, kind)] covering every parameter in params, kind 'kron' (Conv2d/Linear: its weight, and its bias when
    that is among params; 'kron-nobias' otherwise) or 'diag' (GroupNorm: weight and bias)."""
    wanted = {id(p) for p in params}
    blocks, covered = [], set()
    for m in net.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        if isinstance(m, KRONECKER) and id(m.weight) in wanted and getattr(m, "groups", 1) == 1 \
                and getattr(m, "padding_mode", "zeros") == "zeros":
            blocks.append((m, "kron" if m.bias is not None and id(m.bias) in wanted else "kron-nobias"))
        elif isinstance(m, nn.GroupNorm) and len(own) == 2:
            blocks.append((m, "diag"))
        else:
            continue
        covered |= {id(p) for p in own}
    missing = [tuple(p.shape) for p in params if id(p) not in covered]
    if missing:
        raise InfluenceError(f"curvature kfac/ekfac and solver woodbury cover Conv2d (groups 1, zero padding), Linear "
                             f"and GroupNorm parameters; this network also trains parameters of shapes {missing}. "
                             f"Use curvature=gauss-newton with solver=cg.")
    return blocks


def _patches(m, kind, a):
    """Layer inputs as rows (n, T, in'): one per output location, with a ones column for a trained bias."""
    if isinstance(m, nn.Conv2d):
        a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    else:
        a = a.reshape(len(a), 1, -1)
    if kind == "kron":
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def _pseudo_gradients(net, x, params):
    """(blocks, layer inputs, iterator over k of per-block output gradients g_k): one forward, C backwards."""
    blocks = _blocks(net, params)
    inputs, outputs = {}, {}

    def keep(m, inp, out):
        inputs[m], outputs[m] = inp[0].detach(), out
    hooks = [m.register_forward_hook(keep) for m, _ in blocks]
    try:
        z = net(x)
    finally:
        for hk in hooks:
            hk.remove()
    n, classes = z.shape
    p = torch.softmax(z.detach().double(), 1).to(z.dtype)
    outs = [outputs[m] for m, _ in blocks]
    xin = {m: (F.group_norm(inputs[m], m.num_groups, eps=m.eps) if kind == "diag" else _patches(m, kind, inputs[m]))
           for m, kind in blocks}

    def per_class():
        for k in range(classes):
            r = p[:, k:k + 1].sqrt() * (F.one_hot(torch.full((n,), k, device=z.device), classes).to(z.dtype) - p)
            grads = torch.autograd.grad(z, outs, grad_outputs=r, retain_graph=k < classes - 1)
            yield [(g.flatten(2).transpose(1, 2) if g.dim() == 4 else g.reshape(n, 1, -1)) if kind != "diag" else g
                   for (m, kind), g in zip(blocks, grads)]
    return blocks, xin, per_class()


def _per_instance(kind, a, g):
    """Per-instance gradient of a block, flat (n, d): [W b] row-major for kron, [weight, bias] for GroupNorm."""
    if kind != "diag":
        return torch.einsum("nto,nti->noi", g, a).flatten(1)
    return torch.cat([(g * a).flatten(2).sum(2), g.flatten(2).sum(2)], 1)


def _flat(m, kind, v, index):
    """The block's slice of a parameter-shaped list, in _per_instance's layout."""
    vw = v[index[id(m.weight)]]
    if kind != "diag":
        vw = vw.reshape(vw.shape[0], -1)
        return (torch.cat([vw, v[index[id(m.bias)]].reshape(-1, 1)], 1) if kind == "kron" else vw).reshape(-1)
    return torch.cat([vw.reshape(-1), v[index[id(m.bias)]].reshape(-1)])


def _unflat(m, kind, flat, h, index):
    w, b = m.weight, m.bias
    if kind != "diag":
        mat = flat.reshape(w.shape[0], -1)
        h[index[id(w)]] = mat[:, :w[0].numel()].reshape(w.shape)
        if kind == "kron":
            h[index[id(b)]] = mat[:, -1].reshape(b.shape)
    else:
        h[index[id(w)]], h[index[id(b)]] = flat[:w.numel()].view_as(w), flat[w.numel():].view_as(b)


def kfac_inverse(net, x, params, v, damping, eigen_correct=False):
    """h ~ (GN + damping I)^{-1} v (K-FAC, or EK-FAC with eigen_correct) for the mean cross-entropy of net over x.
    Returns (h as a list shaped like params, SolveInfo)."""
    params = list(params)
    blocks, xin, grads = _pseudo_gradients(net, x, params)
    n = len(x)
    second = {m: 0.0 for m, _ in blocks}  # G factors (kron) or squared per-instance gradients (diag)
    g_rows = {m: [] for m, _ in blocks}   # per-class output gradients (EK-FAC needs them in the eigenbasis)
    for gk in grads:
        for (m, kind), g in zip(blocks, gk):
            if kind != "diag":
                second[m] = second[m] + torch.einsum("nto,ntp->op", g, g) / n
                if eigen_correct:
                    g_rows[m].append(g)
            else:
                second[m] = second[m] + (_per_instance(kind, xin[m], g) ** 2).sum(0) / n
    index = {id(q): i for i, q in enumerate(params)}
    h = [None] * len(params)
    for m, kind in blocks:
        vm = _flat(m, kind, v, index)
        if kind == "diag":
            _unflat(m, kind, vm / (second[m] + damping), h, index)
            continue
        a = xin[m]
        alpha, qa = torch.linalg.eigh(torch.einsum("nti,ntj->ij", a, a).double() / (a.shape[0] * a.shape[1]))
        gamma, qg = torch.linalg.eigh(second[m].double())
        if eigen_correct:  # exact second moments of the per-instance pseudo-gradients in the Kronecker eigenbasis
            a_e = a.double() @ qa
            scale = sum(torch.einsum("nto,nti->noi", g.double() @ qg, a_e).pow(2).sum(0) for g in g_rows[m]) / n
        else:
            scale = gamma.clamp_min(0)[:, None] * alpha.clamp_min(0)[None, :]
        vm = vm.reshape(m.weight.shape[0], -1).double()
        sol = qg @ ((qg.T @ vm @ qa) / (scale + damping)) @ qa.T
        _unflat(m, kind, sol.to(x.dtype).reshape(-1), h, index)
    return h, SolveInfo("ekfac" if eigen_correct else "kfac", damping=damping)


def woodbury_inverse(net, x, params, v, damping):
    """h = (GN + damping I)^{-1} v exactly, for the mean cross-entropy GN of net over x. Returns (h, SolveInfo)."""
    if damping <= 0:
        raise InfluenceError("the Woodbury solve needs damping > 0")
    params = list(params)
    blocks, xin, grads = _pseudo_gradients(net, x, params)
    n = len(x)
    # U^T as rows (k, i), one column block per layer: per-instance pseudo-gradients
    u = [torch.cat(rows) for rows in zip(*[[_per_instance(kind, xin[m], g) for (m, kind), g in zip(blocks, gk)]
                                           for gk in grads])]
    index = {id(q): i for i, q in enumerate(params)}
    vb = [_flat(m, kind, v, index) for m, kind in blocks]
    gram = sum(b @ b.T for b in u).double()
    gram.diagonal().add_(n * damping)
    z = torch.cholesky_solve(sum(b @ t for b, t in zip(u, vb)).double()[:, None], torch.linalg.cholesky(gram))
    z = z[:, 0].to(x.dtype)
    h = [None] * len(params)
    for (m, kind), b, t in zip(blocks, u, vb):
        _unflat(m, kind, (t - b.T @ z) / damping, h, index)
    return h, SolveInfo("woodbury", damping=damping)
