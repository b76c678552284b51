"""Training-set corruptions for the robustness suite (the paper's claim that IWD downweights redundant and harmful
instances, made measurable). A corrupted dataset is named `<dataset>@<kind>=<rate>`, e.g. `digits@label-noise=0.2`,
anywhere a dataset name is accepted; the test split is never touched. Kinds (rate = fraction of training instances
corrupted, chosen with a fixed seed so every method sees the same corruption):

- label-noise: symmetric label noise, each chosen instance gets a label drawn uniformly from the OTHER classes;
- duplicates: near-duplicate redundancy, each chosen instance is replaced by a copy of one of a few "source"
  instances of its class (5% of the class) plus small Gaussian noise (std 0.05 in normalised units);
- outliers: half of the chosen instances are heavily blurred (Gaussian, sigma = size / 8), half occluded (a square
  of half the image side set to the darkest value).

`dataset.corrupted` is the boolean mask of corrupted training instances (all False for a clean dataset).
"""
import math

import torch

from benchmark.platform.errors import BenchmarkError

KINDS = ("label-noise", "duplicates", "outliers")
SEED = 12345


def parse(name):
    """'digits@label-noise=0.2' -> ('digits', 'label-noise', 0.2); 'digits' -> ('digits', None, 0.0)."""
    if "@" not in name:
        return name, None, 0.0
    base, spec = name.split("@", 1)
    kind, _, rate = spec.partition("=")
    if kind not in KINDS:
        raise BenchmarkError(f"unknown corruption {kind!r} in {name!r}; use <dataset>@<kind>=<rate> with kind one of "
                             f"{', '.join(KINDS)}, e.g. digits@label-noise=0.2")
    try:
        r = float(rate)
    except ValueError:
        r = -1.0
    if not 0 < r < 1:
        raise BenchmarkError(f"corruption rate in {name!r} must be a number in (0, 1), e.g. {base}@{kind}=0.2")
    return base, kind, r


def _blur(x, sigma):
    k = max(3, 2 * math.ceil(2 * sigma) + 1)
    t = torch.arange(k, dtype=x.dtype) - k // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, k).repeat(c, 1, 1, 1), padding=(0, k // 2), groups=c)
    return torch.nn.functional.conv2d(x, g.view(1, 1, k, 1).repeat(c, 1, 1, 1), padding=(k // 2, 0), groups=c)


def corrupt(ds, kind, rate, full_name):
    """A corrupted copy of ds (training split only) with .corrupted set; ds itself is not modified."""
    gen = torch.Generator().manual_seed(SEED)
    n = len(ds.y_train)
    chosen = torch.randperm(n, generator=gen)[:int(round(rate * n))]
    x, y = ds.x_train.clone(), ds.y_train.clone()
    k = ds.num_classes
    if kind == "label-noise":
        y[chosen] = (y[chosen] + torch.randint(1, k, (len(chosen),), generator=gen)) % k
    elif kind == "duplicates":
        for c in range(k):
            members = chosen[ds.y_train[chosen] == c]
            pool = ds.class_indices[c]
            pool = pool[~torch.isin(pool, chosen)]
            sources = pool[torch.randperm(len(pool), generator=gen)[:max(1, len(pool) // 20)]]
            pick = sources[torch.randint(len(sources), (len(members),), generator=gen)]
            x[members] = ds.x_train[pick] + 0.05 * torch.randn(x[members].shape, generator=gen)
    else:  # outliers
        half = len(chosen) // 2
        blur, occlude = chosen[:half], chosen[half:]
        x[blur] = _blur(x[blur], sigma=ds.image_size[0] / 8)
        h, w = ds.image_size
        s = h // 2
        for i, idx in enumerate(occlude.tolist()):
            r0 = int(torch.randint(h - s + 1, (1,), generator=gen))
            c0 = int(torch.randint(w - s + 1, (1,), generator=gen))
            x[idx, :, r0:r0 + s, c0:c0 + s] = ds.x_train.min()
    out = type(ds)(ds.name, x, y, ds.x_test, ds.y_test, ds.mean, ds.std, ds.class_names)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    out.corrupted, out.full_name = mask, full_name
    out.corruption = {"kind": kind, "rate": rate, "seed": SEED, "count": int(mask.sum())}
    return out
