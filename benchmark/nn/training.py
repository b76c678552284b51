"""Training loops on in-memory tensors (no DataLoader: the data is resident), shared by the methods' inner training
and the evaluation harness. No host synchronisation inside a step: index batches move to the data's device without
one, and the loss is accumulated on the device (read once by the caller, if at all)."""
import torch
import torch.nn.functional as F

from .augment import cutmix, cutmix_loss
from benchmark.platform.device import to_device
from benchmark.platform.observe import PLAIN


def train_steps(net, x, y, opt, steps=None, epochs=None, batch=256, aug=None, gen=None, cutmix_p=0.0,
                lr_schedule=None, temperature=1.0, observer=PLAIN):
    """SGD on (x, y). Either `epochs` (shuffled passes, the last batch may be short) or `steps` (batches drawn from
    a shuffled stream). `aug`: a DSA (independent per-image draws). `cutmix_p`: probability of CutMix per batch.
    y: class indices, or soft labels (N, C) probabilities, trained with the soft cross-entropy of logits / T,
    times T^2 (the gradient of T^2 KL(q || softmax(z / T)), as knowledge distillation scales it).
    `lr_schedule(epoch) -> lr` is applied at the start of each epoch. Returns the mean loss of the last epoch (with
    `epochs`) or over the steps, as a 0-d tensor on the data's device (float() it where the value is needed).
    `observer` (benchmark.platform.observe): the loop runs in its 'train' section; a counting observer counts one
    step and scales it to the loop's length (thousands of shape-only steps would take minutes)."""
    with observer.section("train"):
        if observer.counting:
            total = steps if epochs is None else epochs * -(-len(y) // batch)
            idx = torch.randperm(len(y), generator=gen)[:batch]
            net.train()
            observer.repeat(total, lambda: _step(net, x, y, idx, opt, aug, gen, cutmix_p, temperature), "train")
            return torch.zeros((), device=x.device)
        return _train_steps(net, x, y, opt, steps, epochs, batch, aug, gen, cutmix_p, lr_schedule, temperature)


def _train_steps(net, x, y, opt, steps, epochs, batch, aug, gen, cutmix_p, lr_schedule, temperature):
    net.train()
    n = len(y)
    last = torch.zeros((), device=x.device)
    if epochs is not None:
        for ep in range(epochs):
            if lr_schedule is not None:
                for g in opt.param_groups:
                    g["lr"] = lr_schedule(ep)
            perm = torch.randperm(n, generator=gen)
            tot = 0.0
            for s in range(0, n, batch):
                tot = tot + _step(net, x, y, perm[s:s + batch], opt, aug, gen, cutmix_p, temperature) * \
                    len(perm[s:s + batch])
            last = tot / n
        return last
    perm, pos, tot = torch.randperm(n, generator=gen), 0, 0.0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        tot = tot + _step(net, x, y, idx, opt, aug, gen, cutmix_p, temperature)
    return torch.as_tensor(tot, device=x.device) / max(steps, 1)


def _step(net, x, y, idx, opt, aug, gen, cutmix_p, temperature=1.0):
    idx = to_device(idx, x.device)
    xb, yb = x[idx], y[idx]
    if aug is not None:
        xb = aug(xb, generator=gen)
    if cutmix_p > 0 and float(torch.rand(1, generator=gen)) < cutmix_p:
        xb, ya, yb2, lam = cutmix(xb, yb, generator=gen)
        loss = cutmix_loss(_logits(net, xb, temperature), ya, yb2, lam)
    else:
        loss = F.cross_entropy(_logits(net, xb, temperature), yb)
    if temperature != 1.0:
        loss = loss * temperature ** 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _logits(net, x, temperature):
    z = net(x)
    return z if temperature == 1.0 else z / temperature


@torch.no_grad()
def accuracy(net, x, y, batch=1024):
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for s in range(0, len(y), batch):
        correct += (net(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum()
    return int(correct) / max(len(y), 1)  # one host read per evaluation
