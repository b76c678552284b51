"""Evaluation: train fresh networks on a synthetic set under a named protocol, test, and summarise."""
from .harness import PROTOCOLS, Protocol, evaluate, evaluate_full, list_protocols, resolve_protocol  # noqa: F401
