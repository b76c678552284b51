"""Influence-Weighted Distillation: distillation influence scores (explicit and implicit terms), inverse-HVP
solvers, the influence_weighted decorator and the paper's ablations. Importing registers the IWD variants."""
from .ihvp import InfluenceError, SolverConfig, inverse_hvp  # noqa: F401
from .iwd import IWDOptions, effective_sample_size, influence_weighted, influence_weights  # noqa: F401
from .scores import explicit_scores, implicit_scores, step_scores  # noqa: F401
from . import variants  # noqa: F401,E402  (registers iwd+dc, iwd+dsa, iwd+dm, iwd+idc, iwd+pdd, ablations)
