"""Affine warps of image batches whose gradient in the images is deterministic on CUDA.

kornia's warps (DSA's scale, rotate and crop) sample with `F.grid_sample`, whose CUDA backward in the input
accumulates with atomics: two runs of the same seed give slightly different synthetic sets (measured on an H200,
results/gpu-h200/). Here the same sampling is written as gathers from the flattened batch; the backward of a
gather from a 1-D tensor is one of the kernels PyTorch makes deterministic under
`torch.use_deterministic_algorithms(True)`, which every CUDA run sets. Values match kornia's up to rounding
(tests/test_augment.py checks values and image gradients against kornia in float64).

Matrices are kornia's: pixel coordinates (x right, y down, pixel centres at integers, i.e. align_corners=True),
mapping a source pixel to its destination; zero padding outside the image.
"""
import torch


def rotation_matrix(angle_deg, scale, center):
    """(N, 2, 3) pixel matrices of kornia's get_rotation_matrix2d: rotate by angle_deg (N,) about center (x, y)
    and scale by scale (N, 2) as (sx, sy)."""
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a), torch.sin(a)
    sx, sy = scale[:, 0], scale[:, 1]
    cx, cy = center
    # kornia: translate(center) @ rotate(angle) @ scale @ translate(-center), rotate = [[cos, sin], [-sin, cos]]
    r00, r01, r10, r11 = cos * sx, sin * sy, -sin * sx, cos * sy
    tx = cx - r00 * cx - r01 * cy
    ty = cy - r10 * cx - r11 * cy
    return torch.stack([torch.stack([r00, r01, tx], -1), torch.stack([r10, r11, ty], -1)], -2)


def translation_matrix(shift):
    """(N, 2, 3) pixel matrices of a translation by shift (N, 2) as (dx, dy)."""
    n = shift.shape[0]
    m = torch.zeros(n, 2, 3, dtype=shift.dtype, device=shift.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    m[:, :, 2] = shift
    return m


def warp_affine(x, matrix, mode="bilinear"):
    """x (N, C, H, W) warped by the pixel matrices (N, 2, 3) (source -> destination), zero padding; mode
    'bilinear' or 'nearest'. Each output pixel samples the source at matrix^-1 applied to its own coordinates."""
    n, c, h, w = x.shape
    m = matrix.to(dtype=x.dtype)
    a, b, d, e = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    det = a * e - b * d
    ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w)
    dx = xs - m[:, 0, 2].view(n, 1, 1)
    dy = ys - m[:, 1, 2].view(n, 1, 1)
    # inverse of [[a, b], [d, e]] applied to (dx, dy): the source location of every destination pixel
    sx = (e.view(n, 1, 1) * dx - b.view(n, 1, 1) * dy) / det.view(n, 1, 1)
    sy = (a.view(n, 1, 1) * dy - d.view(n, 1, 1) * dx) / det.view(n, 1, 1)
    flat = x.reshape(-1)
    base = (torch.arange(n * c, device=x.device) * (h * w)).view(n, c, 1, 1)

    def tap(yi, xi, weight):
        """weight * x[:, :, yi, xi], zero where (yi, xi) falls outside the image."""
        inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        idx = base + (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().unsqueeze(1)
        vals = flat.gather(0, idx.reshape(-1)).view(n, c, h, w)
        return vals * (weight * inside.to(x.dtype)).unsqueeze(1)

    if mode == "nearest":  # grid_sample's nearest rounds half to even, as torch.round does
        return tap(torch.round(sy), torch.round(sx), torch.ones_like(sx))
    if mode != "bilinear":
        raise ValueError(f"unknown warp mode {mode!r} (bilinear, nearest)")
    x0, y0 = torch.floor(sx), torch.floor(sy)
    fx, fy = sx - x0, sy - y0
    return (tap(y0, x0, (1 - fx) * (1 - fy)) + tap(y0, x0 + 1, fx * (1 - fy))
            + tap(y0 + 1, x0, (1 - fx) * fy) + tap(y0 + 1, x0 + 1, fx * fy))
