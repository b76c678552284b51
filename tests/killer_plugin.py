"""A plugin for the fault-injection test: 'test-killer' kills its own worker process with SIGKILL mid-distillation."""
import os
import signal

from benchmark.core.registry import register_method
from methods.baselines import RandomSelect


@register_method("test-killer")
class Killer(RandomSelect):
    def distill(self, task):
        os.kill(os.getpid(), signal.SIGKILL)
