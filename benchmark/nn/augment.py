"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) on kornia, and CutMix.

Parameters are sampled explicitly (`DSA.sample`) and replayed (`DSA.apply`), kornia-style, so one draw can be applied
to a real batch and a synthetic batch inside one matching step (siamese mode: one parameter set shared by every
image of both batches, as the reference's `Siamese=True` does), or drawn per image for training networks.
Each call picks ONE family of the strategy at random (the reference's aug_mode 'S'); 'color' applies brightness,
saturation and contrast together. Ops work in normalised space without clamping, as the reference does.
Geometric ops (scale, rotate, flip, translate) use kornia.geometry; all ops are differentiable in the images.
On CUDA, images that need a gradient (the synthetic batch) are warped by `warp.warp_affine` instead: the same
sampling with a deterministic backward (kornia's goes through grid_sample's atomics), so a seed gives the same set.
"""
from dataclasses import dataclass
from typing import Optional

import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F

from benchmark.platform.device import deterministic_image_grad, to_device

from .warp import rotation_matrix, translation_matrix, warp_affine

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
NO_FLIP_STRATEGY = "color_crop_cutout_scale_rotate"  # digit datasets: a flipped digit is another digit


def strategy_for(dataset):
    """The DSA strategy for a dataset: no flips where a flip changes the label (its declared `flip` trait)."""
    return DEFAULT_STRATEGY if dataset.spec.flip else NO_FLIP_STRATEGY


@dataclass
class DSA:
    strategy: str = DEFAULT_STRATEGY
    scale: float = 1.2        # ratio_scale
    rotate: float = 15.0      # ratio_rotate, degrees
    crop: float = 0.125       # ratio_crop_pad (translation as a fraction of the size)
    cutout: float = 0.5       # ratio_cutout (side of the square as a fraction of the size)
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    flip: float = 0.5
    # scale/rotate/crop through warp.warp_affine (deterministic image gradient) instead of kornia; None: on CUDA
    # (and meta, its stand-in) for images that require a gradient, with torch's deterministic mode on (every CUDA
    # run sets it)
    gather_warp: Optional[bool] = None

    @property
    def families(self):
        return self.strategy.split("_") if self.strategy else []

    def sample(self, n, size, generator=None, siamese=False, family=None):
        """Draw parameters for a batch of n images of side `size`. siamese=True: one draw shared by all n."""
        fams = self.families
        if not fams:
            return {"family": "none"}
        if family is None:
            family = fams[int(torch.randint(len(fams), (1,), generator=generator))]
        m = 1 if siamese else n
        u = lambda *shape: torch.rand(m, *shape, generator=generator)  # noqa: E731
        p = {"family": family}
        if family == "color":
            p.update(brightness=u(), saturation=u(), contrast=u())
        elif family == "crop":
            shift = int(size * self.crop + 0.5)
            p["shift"] = torch.randint(-shift, shift + 1, (m, 2), generator=generator)
        elif family == "cutout":
            side = int(size * self.cutout + 0.5)
            p["side"] = side
            p["offset"] = torch.randint(0, size + (1 - side % 2), (m, 2), generator=generator)
        elif family == "flip":
            p["flip"] = u() < self.flip
        elif family == "scale":
            p["scale"] = (u(2) * (self.scale - 1.0 / self.scale) + 1.0 / self.scale)
        elif family == "rotate":
            p["angle"] = (u() - 0.5) * 2 * self.rotate
        else:
            raise ValueError(f"unknown DSA family {family!r} in strategy {self.strategy!r}")
        return self.expand(p, n) if siamese else p

    @staticmethod
    def expand(params, n):
        """One (siamese) draw, shared by a batch of n images: every per-image tensor expanded to n rows."""
        return {k: (v.expand(n, *v.shape[1:]) if torch.is_tensor(v) else v) for k, v in params.items()}

    def apply(self, x, p):
        """Apply sampled parameters to x (N, C, H, W). Parameters must have been drawn for N images."""
        fam = p["family"]
        if fam == "none":
            return x
        dev, dt = x.device, x.dtype
        t = lambda k: to_device(p[k], dev, dt)  # noqa: E731  (drawn on the CPU by seeded generators)
        n = x.shape[0]
        if fam == "color":
            x = x + (t("brightness").view(n, 1, 1, 1) - 0.5) * self.brightness
            mean_c = x.mean(dim=1, keepdim=True)
            x = (x - mean_c) * (t("saturation").view(n, 1, 1, 1) * self.saturation) + mean_c
            mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean_all) * (t("contrast").view(n, 1, 1, 1) + self.contrast) + mean_all
        if fam in ("crop", "scale", "rotate") and self._gather_warp(x):
            h, w = x.shape[-2:]
            if fam == "crop":
                return warp_affine(x, translation_matrix(t("shift")), "nearest")
            center = ((w - 1) / 2, (h - 1) / 2)  # kornia's centre of rotation and scaling
            if fam == "scale":
                return warp_affine(x, rotation_matrix(torch.zeros(n, dtype=dt, device=dev), 1.0 / t("scale"), center))
            return warp_affine(x, rotation_matrix(t("angle").view(n), torch.ones(n, 2, dtype=dt, device=dev), center))
        if fam == "crop":  # integer translation with zero fill (the reference pads and re-indexes)
            return KT.translate(x, t("shift"), mode="nearest", padding_mode="zeros", align_corners=True)
        if fam == "cutout":
            h, w = x.shape[-2:]
            side = p["side"]
            off = to_device(p["offset"], dev)
            ys = torch.arange(h, device=dev).view(1, h, 1)
            xs = torch.arange(w, device=dev).view(1, 1, w)
            y0 = (off[:, 0] - side // 2).view(n, 1, 1)
            x0 = (off[:, 1] - side // 2).view(n, 1, 1)
            inside = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)
            return x * (~inside).unsqueeze(1).to(dt)
        if fam == "flip":
            return torch.where(to_device(p["flip"], dev).view(n, 1, 1, 1), KT.hflip(x), x)
        if fam == "scale":
            # the reference's affine_grid with diag(sx, sy) samples input at (sx*u, sy*v): a zoom by 1/s
            return KT.scale(x, 1.0 / t("scale"), align_corners=True)
        if fam == "rotate":
            return KT.rotate(x, t("angle").view(n), align_corners=True)
        raise ValueError(f"unknown DSA family {fam!r}")

    def _gather_warp(self, x):
        if self.gather_warp is not None:
            return self.gather_warp
        return deterministic_image_grad(x)

    def __call__(self, x, generator=None, siamese=False):
        return self.apply(x, self.sample(x.shape[0], x.shape[-1], generator, siamese))

    def siamese(self, real, syn, generator=None):
        """Augment a real and a synthetic batch with one shared parameter draw (siamese DSA)."""
        p = self.sample(1, real.shape[-1], generator, siamese=True)
        return self.apply(real, self.expand(p, len(real))), self.apply(syn, self.expand(p, len(syn)))


def cutmix(x, y, generator=None):
    """CutMix (Yun et al. 2019) with lambda ~ Beta(1, 1) = U(0, 1), as IDC's evaluation uses it: returns mixed x,
    the two label sets and lambda (corrected to the pasted box's true area)."""
    n, _, h, w = x.shape
    lam = float(torch.rand(1, generator=generator))
    perm = torch.randperm(n, generator=generator)
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,), generator=generator))
    cx = int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = to_device(perm, x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam


def cutmix_loss(logits, y_a, y_b, lam):
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


@dataclass
class DSAOptions:
    """The DSA option group of every method config that augments (declared once, here)."""
    dsa: bool = True
    dsa_strategy: Optional[str] = None   # None: by dataset (no flip where a flip changes the label)

    def resolve_dsa(self, dataset):
        """dsa_strategy None -> the dataset's (recorded only when DSA is on: otherwise none ran)."""
        if self.dsa and self.dsa_strategy is None:
            self.dsa_strategy = strategy_for(dataset)
        return self

    def make_dsa(self):
        return DSA(strategy=self.dsa_strategy) if self.dsa else None
