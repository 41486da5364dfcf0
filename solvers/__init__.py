"""Solvers: how one step is taken."""

from .base import DynamicThresholding, Solver, StepContext, X0Hooks
from .dpm import DPMSolver
from .euler import Euler, EulerMaruyama, Heun

__all__ = ["Solver", "StepContext", "DynamicThresholding", "X0Hooks", "EulerMaruyama", "Euler", "Heun",
           "DPMSolver"]
from .adaptive import AdaptiveContext, AdaptiveDPMSolver, AdaptiveSolver, StepSizeError

__all__ += ["AdaptiveSolver", "AdaptiveContext", "AdaptiveDPMSolver", "StepSizeError"]
from .unipc import UniPC

__all__ += ["UniPC"]
from .dpm_sde import DPMSolverSDE

__all__ += ["DPMSolverSDE"]
from .ersde import ERSDE

__all__ += ["ERSDE"]
