"""Distillation and selection methods; importing this package registers them."""
from . import baselines, dc, dm, idc, pdd  # noqa: F401
