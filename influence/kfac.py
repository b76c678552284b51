"""Kronecker-factored Gauss-Newton curvature for the implicit term: K-FAC (Martens & Grosse 2015; KFC for
convolutions, Grosse & Martens 2016) and its eigenvalue-corrected form EK-FAC (George et al. 2018), the layer
approximations kronfluence uses for Linear and Conv2d layers. A direct inverse: no iterative solver.

For softmax cross-entropy the Gauss-Newton matrix of the mean loss over n instances is exactly
    GN = (1/n) sum_i sum_k u_ik u_ik^T,   u_ik = J_i^T r_ik,   r_ik = sqrt(p_ik) (e_k - p_i)
(diag(p) - p p^T = sum_k r_k r_k^T): the expectation over the model's own labels, taken over all C classes (no
sampling noise). Per layer s = W a (bias as a column of W acting on a constant 1; a convolution at every output
location t on the unfolded input patch a_t), K-FAC keeps the layer's diagonal block and factorises it:
    A = mean_{i,t} a_it a_it^T,   G = (1/n) sum_{i,k} sum_t g_ikt g_ikt^T  (g = d <z, r_k> / d s),   block ~ A (x) G,
exact for a Linear layer on one instance. (A (x) G + damping I)^{-1} is applied in the factors' eigenbases:
V -> Q_G [(Q_G^T V Q_A) / (gamma alpha^T + damping)] Q_A^T. EK-FAC replaces gamma alpha^T by the exact second moments
of the per-instance pseudo-gradients in that basis, (1/n) sum_{i,k} (Q_G^T DW_ik Q_A)^2 (the diagonal of the true
block in the K-FAC eigenbasis). GroupNorm's affine parameters (the ConvNets' instance norm) get their exact GN
diagonal. Other parameter types are refused with a clear error.
Cost: one forward and C backward passes over the Hessian batch, small eigendecompositions, and a few matrix
products per layer, against 2-3 passes per CG iteration for CG on the full GN.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ihvp import InfluenceError, SolveInfo

KRONECKER = (nn.Conv2d, nn.Linear)


def _blocks(net, params):
    """[(module, kind)] covering every parameter in params, kind 'kron' (Conv2d/Linear) or 'diag' (GroupNorm)."""
    wanted = {id(p) for p in params}
    blocks, covered = [], set()
    for m in net.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        if isinstance(m, KRONECKER) and getattr(m, "groups", 1) == 1 and getattr(m, "padding_mode", "zeros") == "zeros":
            blocks.append((m, "kron"))
        elif isinstance(m, nn.GroupNorm):
            blocks.append((m, "diag"))
        else:
            continue
        covered |= {id(p) for p in own}
    missing = [tuple(p.shape) for p in params if id(p) not in covered]
    if missing:
        raise InfluenceError(f"curvature kfac/ekfac covers Conv2d (groups 1, zero padding), Linear and GroupNorm "
                             f"parameters; this network also trains parameters of shapes {missing}. Use "
                             f"curvature=gauss-newton.")
    return blocks


def _patches(m, a):
    """Layer inputs as rows (one per instance and output location), with a ones column for the bias."""
    if isinstance(m, nn.Conv2d):
        a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # (n, T, in*kh*kw)
    else:
        a = a.reshape(len(a), 1, -1)
    if m.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a  # (n, T, in')


def _out_rows(g):
    """Output gradients as (n, T, out): conv maps (n, out, h, w) -> locations as rows."""
    return g.flatten(2).transpose(1, 2) if g.dim() == 4 else g.reshape(len(g), 1, -1)


def kfac_inverse(net, x, params, v, damping, eigen_correct=False):
    """h ~ (GN + damping I)^{-1} v for the mean cross-entropy of net over x (labels do not enter the GN of CE).
    Returns (h as a list shaped like params, SolveInfo)."""
    params = list(params)
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
    mods = [m for m, _ in blocks]
    a_rows = {m: _patches(m, inputs[m]) for m, kind in blocks if kind == "kron"}
    gg = {m: 0.0 for m in mods}          # G factors (kron) or squared per-instance gradients (diag)
    g_rows = {m: [] for m in mods}       # per-class output-gradient rows (EK-FAC needs them again)
    for k in range(classes):
        r = p[:, k:k + 1].sqrt() * (F.one_hot(torch.full((n,), k, device=z.device), classes).to(z.dtype) - p)
        grads = torch.autograd.grad(z, [outputs[m] for m in mods], grad_outputs=r, retain_graph=k < classes - 1)
        for (m, kind), g in zip(blocks, grads):
            if kind == "kron":
                rows = _out_rows(g)
                gg[m] = gg[m] + torch.einsum("nto,ntp->op", rows, rows) / n
                if eigen_correct:
                    g_rows[m].append(rows)
            else:  # GroupNorm: per-instance gradients of its affine weight and bias, exactly
                xhat = F.group_norm(inputs[m], m.num_groups, eps=m.eps)
                per = torch.cat([(g * xhat).flatten(2).sum(2), g.flatten(2).sum(2)], 1)  # (n, 2C)
                gg[m] = gg[m] + (per ** 2).sum(0) / n
    index = {id(q): i for i, q in enumerate(params)}
    h = [None] * len(params)
    for m, kind in blocks:
        w, b = m.weight, m.bias
        if kind == "diag":
            vw, vb = v[index[id(w)]], v[index[id(b)]]
            sol = torch.cat([vw.reshape(-1), vb.reshape(-1)]) / (gg[m] + damping)
            h[index[id(w)]], h[index[id(b)]] = sol[:w.numel()].view_as(w), sol[w.numel():].view_as(b)
            continue
        rows_a = a_rows[m]
        A = torch.einsum("nti,ntj->ij", rows_a, rows_a) / (rows_a.shape[0] * rows_a.shape[1])
        alpha, qa = torch.linalg.eigh(A.double())
        gamma, qg = torch.linalg.eigh(gg[m].double())
        alpha, gamma = alpha.clamp_min(0), gamma.clamp_min(0)
        if eigen_correct:  # exact second moments of per-instance pseudo-gradients in the Kronecker eigenbasis
            a_e = rows_a.double() @ qa
            scale = sum(torch.einsum("nto,nti->noi", g.double() @ qg, a_e).pow(2).sum(0) for g in g_rows[m]) / n
        else:
            scale = gamma[:, None] * alpha[None, :]
        vm = v[index[id(w)]].reshape(w.shape[0], -1)
        if b is not None:
            vm = torch.cat([vm, v[index[id(b)]].reshape(-1, 1)], 1)
        sol = qg @ ((qg.T @ vm.double() @ qa) / (scale + damping)) @ qa.T
        sol = sol.to(vm.dtype)
        h[index[id(w)]] = sol[:, :w[0].numel()].reshape(w.shape)
        if b is not None:
            h[index[id(b)]] = sol[:, -1].reshape(b.shape)
    return h, SolveInfo("ekfac" if eigen_correct else "kfac", damping=damping)
