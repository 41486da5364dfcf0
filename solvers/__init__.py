"""Solvers: how one step is taken."""

from .base import BrownianDraw, DynamicThresholding, Plan, Solver, SolverBase, StepContext, X0Hooks
from .dpm import DPMSolver
from .euler import Euler, EulerMaruyama, Heun

__all__ = ["SolverBase", "Solver", "Plan", "BrownianDraw", "StepContext", "DynamicThresholding", "X0Hooks",
           "EulerMaruyama", "Euler", "Heun", "DPMSolver"]
from .adaptive import AdaptiveContext, AdaptiveDPMSolver, AdaptiveSolver, StepSizeError

__all__ += ["AdaptiveSolver", "AdaptiveContext", "AdaptiveDPMSolver", "StepSizeError"]
from .unipc import UniPC

__all__ += ["UniPC"]
from .dpm_sde import DPMSolverSDE

__all__ += ["DPMSolverSDE"]
from .ersde import ERSDE

__all__ += ["ERSDE"]
from .adaptive_em import AdaptiveEM
from .adaptive_ode import AdaptiveODE

__all__ += ["AdaptiveEM", "AdaptiveODE"]
from .pc import AncestralSampling, AnnealedLangevin, Corrector, Langevin, PredictorCorrector, ReverseDiffusion

__all__ += ["PredictorCorrector", "ReverseDiffusion", "AncestralSampling", "Corrector", "Langevin", "AnnealedLangevin"]
from .restart import RESTART_PRESETS, Restart, RestartInterval

__all__ += ["Restart", "RestartInterval", "RESTART_PRESETS"]
from .simplex import JacobiEulerMaruyama

__all__ += ["JacobiEulerMaruyama"]
from .reversible import Reversible

__all__ += ["Reversible"]
from .optimal_reverse import OptimalReverse

__all__ += ["OptimalReverse"]
from .evodiff import EVODiff

__all__ += ["EVODiff"]
