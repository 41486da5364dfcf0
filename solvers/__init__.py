"""Solvers: how one step is taken."""

from .base import Solver, StepContext
from .dpm import DPMSolver
from .euler import Euler, EulerMaruyama, Heun

__all__ = ["Solver", "StepContext", "EulerMaruyama", "Euler", "Heun", "DPMSolver"]
