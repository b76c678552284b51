"""Evaluation: train fresh networks on a synthetic set under a named protocol, test, and summarise."""
from .harness import PROTOCOLS, Protocol, evaluate, list_protocols, resolve_protocol  # noqa: F401
