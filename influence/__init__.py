"""Influence-Weighted Distillation."""
