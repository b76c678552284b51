"""TensorBoard helpers: one log root, one run directory per cell, image grids."""
import os

import torch


def image_grid(images, nrow=10):
    """(N, C, H, W) pixel-space images -> a (3, H', W') grid in [0, 1] for SummaryWriter.add_image."""
    from torchvision.utils import make_grid
    x = images.detach().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return make_grid(x, nrow=max(1, nrow), padding=1, pad_value=1.0)


def make_writer(log_root, run_name):
    """A SummaryWriter under log_root/run_name, or None when logging is off."""
    if not log_root:
        return None
    from torch.utils.tensorboard import SummaryWriter
    path = os.path.join(log_root, run_name)
    os.makedirs(path, exist_ok=True)
    return SummaryWriter(path)


def log_histogram(writer, tag, values, step):
    if writer is not None and values is not None and len(values):
        writer.add_histogram(tag, torch.as_tensor(values).detach().float().cpu(), step)
