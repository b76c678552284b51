"""Every seed formula of the benchmark, in one place. Each random stream is a function of the cell's seed and a
counter, so a resumed run, a worker on another machine and a rerun all draw the same numbers."""
import torch


def network_seed(task_seed, iteration):
    """The fresh network of distillation iteration `iteration` (a large odd multiplier keeps seeds apart)."""
    return task_seed * 1_000_003 + iteration


def scoring_network(n):
    """The n-th network whole-training-set scoring uses: indices no distillation iteration reaches."""
    return 1_000_000 + n


def scoring_generator(task_seed, n):
    """The real-batch and augmentation stream of the n-th scoring network."""
    return torch.Generator().manual_seed(task_seed * 7919 + n)


def batchnorm_generator(task_seed, net_index):
    """The real images that set a scoring network's BatchNorm statistics before they are frozen."""
    return torch.Generator().manual_seed(task_seed * 7907 + net_index)


def evaluation_seed(seed, i):
    """The i-th evaluation network of a cell (resuming an evaluation gives exactly the uninterrupted result)."""
    return seed * 1000 + 17 + i


def expert_seed(k):
    """Expert trajectory k of an MTT buffer: its initialisation and data order, shared by every cell and seed (a
    buffer is trained once and reused, as in the reference)."""
    return 2_000_000 + k
