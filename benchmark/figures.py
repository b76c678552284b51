"""Figures like the paper's (matplotlib, PNG)."""
import os

import torch


def influence_figure(scores, dataset, cls, out_path, n_tail=8, title=None):
    """The paper's Figure 1: the distribution of per-instance influence scores of one class, with the real images
    of both tails (lowest scores left, highest right). scores: one per training instance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ix = dataset.class_indices[cls]
    s = torch.as_tensor(scores)[ix].double()
    order = s.argsort()
    low, high = ix[order[:n_tail]], ix[order.flip(0)[:n_tail]]
    fig = plt.figure(figsize=(10, 5.2))
    ax = fig.add_axes([0.08, 0.42, 0.88, 0.5])
    ax.hist(s.numpy(), bins=40, color="#4c72b0")
    ax.set_xlabel("explicit influence score (positive: upweighting raises the distillation objective)")
    ax.set_ylabel("instances")
    name = dataset.class_names[cls] if dataset.class_names else str(cls)
    ax.set_title(title or f"{dataset.name}, class {name}: {len(ix)} instances")
    for row, (idx, label) in enumerate(((low, "lowest influence"), (high, "highest influence"))):
        for k, i in enumerate(idx.tolist()):
            a = fig.add_axes([0.02 + row * 0.5 + k * 0.058, 0.05, 0.055, 0.2])
            img = dataset.denormalize(dataset.x_train[i:i + 1])[0].clamp(0, 1)
            a.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
            a.set_xticks([])
            a.set_yticks([])
            a.set_xlabel(f"{float(torch.as_tensor(scores)[i]):.2g}", fontsize=7)
        fig.text(0.02 + row * 0.5, 0.28, label, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
