"""A plugin with a device bug, for `run.py check`: 'test-device-leak' mixes a CPU tensor with the task's data."""
import torch

from benchmark.core.method import Method
from benchmark.core.registry import register_method
from benchmark.core.synthetic import SyntheticSet


@register_method("test-device-leak")
class Leaky(Method):
    evaluation = "dc"

    def distill(self, task):
        x = task.dataset.x_train[:10] + torch.zeros(10, *task.dataset.x_train.shape[1:])  # CPU zeros: the bug
        return SyntheticSet(x, torch.arange(10), "normalized", {}, self.metadata(task))
