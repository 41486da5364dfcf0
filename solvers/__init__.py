"""Solvers: how one step is taken."""

from .base import Solver, StepContext
from .euler import Euler, EulerMaruyama, Heun

__all__ = ["Solver", "StepContext", "EulerMaruyama", "Euler", "Heun"]
