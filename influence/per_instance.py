"""Per-instance parameter gradients of a network from ONE forward and ONE backward (no per-sample loop, no double
backward), layer by layer, as BackPACK and kronfluence compute them.

For a layer s = W a (a bias is a column of W acting on a constant 1; a convolution applies W at every output
location t to its unfolded input patch a_t), the gradient of instance i's loss is sum_t g_it a_it^T, with g_it the
gradient of that loss in the layer's output. One backward of sum_i <dl_i/dz_i, z_i> to the layers' OUTPUTS (not to
the parameters) gives every g_it, because instance i's loss reaches only instance i's activations: true for Conv2d,
Linear, GroupNorm (the ConvNets' instance norm) and BatchNorm in eval mode, not for BatchNorm in train mode
(its batch statistics mix instances). BatchNorm's parameters are not covered: networks with them (and any other
parameterised layer) are refused (`supports`), and callers fall back to autograd.
GroupNorm's affine parameters take sum_t g_it * xhat_it and sum_t g_it (xhat: its normalised input).

`InstanceGradients` never materialises the (n, parameters) matrix: products with it run as layer passes. Where
rows are needed (the Woodbury solve), `block_rows` gives per block an (n, d) matrix: [W b] row-major for
Conv2d/Linear, [weight, bias] for GroupNorm; `flatten`/`unflatten` move parameter-shaped lists to and from that
layout.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KRONECKER = (nn.Conv2d, nn.Linear)


class UnsupportedLayers(ValueError):
    pass


def layer_blocks(net, params):
    """[(module, kind)] covering every parameter in params, kind 'kron' (Conv2d/Linear: its weight, and its bias when
    that is among params; 'kron-nobias' otherwise) or 'diag' (GroupNorm: weight and bias). Raises
    UnsupportedLayers naming the parameters no block covers."""
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
        raise UnsupportedLayers(f"per-instance gradients cover Conv2d (groups 1, zero padding), Linear and GroupNorm "
                                f"parameters; this network also has parameters of shapes {missing}")
    return blocks


def supports(net, params):
    """Whether layer_blocks covers every parameter and no BatchNorm in training mode mixes instances (its batch
    statistics make each output depend on the whole batch, so a per-instance gradient is not the instance's own)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules()):
        return False
    try:
        layer_blocks(net, params)
    except UnsupportedLayers:
        return False
    return True


def capture(net, x, blocks):
    """One forward with hooks: (logits z, per-block layer inputs (detached), per-block outputs)."""
    inputs, outputs = {}, {}

    def keep(m, inp, out):
        inputs[m], outputs[m] = inp[0].detach(), out
    hooks = [m.register_forward_hook(keep) for m, _ in blocks]
    try:
        z = net(x)
    finally:
        for hk in hooks:
            hk.remove()
    return z, [inputs[m] for m, _ in blocks], [outputs[m] for m, _ in blocks]


def output_grads(z, outs, grad_z, retain_graph=False):
    """Gradients of <grad_z, z> in the layers' outputs (a backward that computes no parameter gradient)."""
    return list(torch.autograd.grad(z, outs, grad_outputs=grad_z, retain_graph=retain_graph))


def block_rows(m, kind, a, g):
    """Per-instance gradients of a block, flat (n, d), from its layer input a and output gradient g. A convolution:
    one batched matrix product of g (n, out, T) with the unfolded input (n, in k^2, T), transposed by BLAS."""
    n = len(g)
    if kind == "diag":
        xhat = F.group_norm(a, m.num_groups, eps=m.eps)
        return torch.cat([(g * xhat).flatten(2).sum(2), g.flatten(2).sum(2)], 1)
    if isinstance(m, nn.Conv2d):
        g = g.flatten(2)
        a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
        w = torch.bmm(g, a.transpose(1, 2))
        bias = g.sum(2, keepdim=True)
    else:
        g, a = g.reshape(n, -1, g.shape[-1]), a.reshape(n, -1, a.shape[-1])  # (n, T, out), (n, T, in)
        w = torch.bmm(g.transpose(1, 2), a)
        bias = g.sum(1)[:, :, None]
    return (torch.cat([w, bias], 2) if kind == "kron" else w).flatten(1)


def flatten(blocks, params, v):
    """A parameter-shaped list (ordered like params) -> per-block flat vectors in block_rows' layout."""
    index = {id(q): i for i, q in enumerate(params)}
    out = []
    for m, kind in blocks:
        vw = v[index[id(m.weight)]]
        if kind != "diag":
            vw = vw.reshape(vw.shape[0], -1)
            out.append((torch.cat([vw, v[index[id(m.bias)]].reshape(-1, 1)], 1) if kind == "kron" else vw).reshape(-1))
        else:
            out.append(torch.cat([vw.reshape(-1), v[index[id(m.bias)]].reshape(-1)]))
    return out


def unflatten(blocks, params, flats):
    """Per-block flat vectors -> a parameter-shaped list ordered like params."""
    index = {id(q): i for i, q in enumerate(params)}
    h = [None] * len(params)
    for (m, kind), flat in zip(blocks, flats):
        w, b = m.weight, m.bias
        if kind != "diag":
            mat = flat.reshape(w.shape[0], -1)
            h[index[id(w)]] = mat[:, :w[0].numel()].reshape(w.shape)
            if kind == "kron":
                h[index[id(b)]] = mat[:, -1].reshape(b.shape)
        else:
            h[index[id(w)]], h[index[id(b)]] = flat[:w.numel()].view_as(w), flat[w.numel():].view_as(b)
    return h


class InstanceGradients:
    """The per-instance gradients g_j of a batch's losses, kept as each block's layer input and output gradient
    (never materialised as an (n, parameters) matrix). Both uses are as cheap as a layer pass:
    <v, g_j> for all j is, per convolution, one convolution of the inputs with v's kernel multiplied by the output
    gradients (a forward's cost); sum_j w_j g_j is one weight-gradient convolution with the output gradients scaled
    per instance (what the backward computes for w uniform)."""

    def __init__(self, blocks, params, inputs, grads):
        self.blocks, self.params, self.inputs, self.grads = blocks, list(params), inputs, grads
        self.index = {id(q): i for i, q in enumerate(self.params)}
        self.small = {}

    def _small_rows(self, i):
        """Per-instance gradients of block i's per-channel parameters, (n, C) each, computed once: (GroupNorm
        weight, bias) for a norm block, (None, bias) for Conv2d/Linear."""
        if i not in self.small:
            (m, kind), a, g = self.blocks[i], self.inputs[i], self.grads[i]
            if kind == "diag":
                xhat = F.group_norm(a, m.num_groups, eps=m.eps)
                self.small[i] = ((g * xhat).flatten(2).sum(2), g.flatten(2).sum(2))
            else:
                self.small[i] = (None, g.flatten(2).sum(2) if isinstance(m, nn.Conv2d) else
                                 g.reshape(len(g), -1, g.shape[-1]).sum(1))
        return self.small[i]

    def dot(self, v):
        """(n,) <v, g_j> for a parameter-shaped list v (ordered like params)."""
        total = 0.0
        for i, ((m, kind), a, g) in enumerate(zip(self.blocks, self.inputs, self.grads)):
            vw = v[self.index[id(m.weight)]]
            vb = v[self.index[id(m.bias)]] if kind in ("kron", "diag") else None
            weight_rows, bias_rows = self._small_rows(i)
            if kind == "diag":
                total = total + weight_rows @ vw + bias_rows @ vb
                continue
            if isinstance(m, nn.Conv2d):
                total = total + (F.conv2d(a, vw, None, m.stride, m.padding, m.dilation) * g).flatten(1).sum(1)
            else:
                g2, a2 = g.reshape(len(g), -1, g.shape[-1]), a.reshape(len(a), -1, a.shape[-1])
                total = total + ((a2 @ vw.T) * g2).sum((1, 2))
            if vb is not None:
                total = total + bias_rows @ vb
        return total

    def weighted_sum(self, w):
        """sum_j w_j g_j, parameter-shaped (ordered like params)."""
        out = [None] * len(self.params)
        for i, ((m, kind), a, g) in enumerate(zip(self.blocks, self.inputs, self.grads)):
            weight_rows, bias_rows = self._small_rows(i)
            if kind == "kron" or kind == "diag":
                out[self.index[id(m.bias)]] = w.to(g.dtype) @ bias_rows
            if kind == "diag":
                out[self.index[id(m.weight)]] = w.to(g.dtype) @ weight_rows
                continue
            gw = g * w.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)
            if isinstance(m, nn.Conv2d):
                out[self.index[id(m.weight)]] = torch.nn.grad.conv2d_weight(a, m.weight.shape, gw, m.stride,
                                                                             m.padding, m.dilation)
            else:
                out[self.index[id(m.weight)]] = gw.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        return out

    def rows(self):
        """The per-instance gradients materialised: per block an (n, d) matrix in block_rows' layout."""
        return [block_rows(m, kind, a, g) for (m, kind), a, g in zip(self.blocks, self.inputs, self.grads)]


def output_loss_gradients(net, x, y, params, output_loss):
    """InstanceGradients of output_loss(net(x), y)_j wrt params, for a per-instance loss of the outputs (row j
    depends on z_j only; cross-entropy with reduction='none', say): one forward, one backward to the layers'
    outputs."""
    blocks = layer_blocks(net, params)
    z, inputs, outs = capture(net, x, blocks)
    zd = z.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad_z,) = torch.autograd.grad(output_loss(zd, y).sum(), zd)  # row j: d loss_j / d z_j
    gs = output_grads(z, outs, grad_z)
    return InstanceGradients(blocks, params, inputs, gs)


def cross_entropy(z, y):
    return F.cross_entropy(z, y, reduction="none")
