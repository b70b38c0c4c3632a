"""Distillation losses (pure functions with explicit masks and reductions)."""

from tbt.distill.losses import soft_cross_entropy

__all__ = ["soft_cross_entropy"]
