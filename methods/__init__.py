"""The built-in methods, registered on import: the one place that lists them (as timm's models/__init__.py does).
The registry loads this module through the `iwd_bench.methods` entry point (setup.cfg), exactly as it loads a
user's plugin; nothing in benchmark/ or influence/ imports a method."""
from . import baselines, dc, dm, idc, mtt, pdd  # noqa: F401  random, herding, full; dc, dsa; dm; idc; mtt, pdd-mtt;
#                                                  pdd, pdd-dc
from . import iwd_variants  # noqa: F401  iwd+dc, iwd+dsa, iwd+dm, iwd+idc, iwd+pdd, iwd+pdd-dc
from . import ablations  # noqa: F401  influence-select, influence-prune-then-distill
