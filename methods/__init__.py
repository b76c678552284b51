"""Distillation and selection methods; importing this package registers them."""
from . import baselines, dc  # noqa: F401
