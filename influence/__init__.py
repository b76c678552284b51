"""Influence-Weighted Distillation: distillation influence scores (explicit and implicit terms), inverse-HVP
solvers, the influence_weighted decorator and the paper's ablations. Imports no method: methods/ applies the
decorator to the built-ins (methods/iwd_variants.py)."""
from .ihvp import InfluenceError, SolverConfig, inverse_hvp  # noqa: F401
from .iwd import IWDOptions, effective_sample_size, influence_weighted, influence_weights  # noqa: F401
from .scores import explicit_scores, implicit_scores, step_scores  # noqa: F401
