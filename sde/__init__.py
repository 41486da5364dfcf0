"""Forward SDEs of score-based diffusion models: what the process is."""

from .base import SDE, GaussianSDE, broadcast_to_state, check_eta
from .gaussian import (
    EDMSDE,
    VESDE,
    VPSDE,
    CosineVPSDE,
    DiscreteVPSDE,
    RectifiedFlowSDE,
    SubVPSDE,
)
from .parametrization import PREDICTIONS, conversion

__all__ = [
    "SDE",
    "GaussianSDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "EDMSDE",
    "CosineVPSDE",
    "DiscreteVPSDE",
    "RectifiedFlowSDE",
    "PREDICTIONS",
    "conversion",
    "broadcast_to_state",
    "check_eta",
]
from .dirichlet import DirichletSDE

__all__ += ["DirichletSDE"]
from .mean_reverting import THETA_SCHEDULES, MeanRevertingSDE

__all__ += ["MeanRevertingSDE", "THETA_SCHEDULES"]
