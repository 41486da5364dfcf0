"""What a user calls: sample(), model wrappers, time grids, keyed noise, test problems."""

from . import problems
from .brownian import BrownianPath, VirtualBrownianTree
from .grid import GRID_KINDS, LOW_NFE_POWER, grid, grid_for_nfe, validate_grid
from .model import Model
from .noise import NoiseSource
from .sample import STOP, NonFiniteError, SampleInfo, StepInfo, sample

__all__ = [
    "Model",
    "sample",
    "grid",
    "grid_for_nfe",
    "LOW_NFE_POWER",
    "validate_grid",
    "GRID_KINDS",
    "problems",
    "NoiseSource",
    "VirtualBrownianTree",
    "BrownianPath",
    "SampleInfo",
    "StepInfo",
    "STOP",
    "NonFiniteError",
]
from .likelihood import LikelihoodResult, bits_per_dim_offset, dequantize, likelihood

__all__ += ["likelihood", "LikelihoodResult", "dequantize", "bits_per_dim_offset"]
from .invert import Inversion, invert

__all__ += ["invert", "Inversion"]
from .gradients import GRAD_MODES, sample_grad

__all__ += ["sample_grad", "GRAD_MODES"]
from .optimize_grid import GRID_METHODS, OptimizedGrid, grid_metadata, load_grid, optimize_grid, save_grid

__all__ += ["optimize_grid", "OptimizedGrid", "GRID_METHODS", "save_grid", "load_grid", "grid_metadata"]
