"""The solver contract: a small object that declares what it is and takes one step.

A solver turns a time grid into per-step coefficient tables once (``prepare``, float64 on
the host), then ``step`` updates the state in place with a few fused torch operations.  All
the per-grid arithmetic, including the conversion from what the network predicts, is in the
tables, so a step costs the network calls plus a handful of passes over the batch.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["Solver", "StepContext"]


class StepContext(Protocol):
    """What the sampling driver hands to :meth:`Solver.step`."""

    def output(self, x: torch.Tensor, time_index: int) -> torch.Tensor:
        """The network output at state x and grid time ``time_index`` (counts one NFE)."""

    def noise(self, step: int) -> torch.Tensor:
        """Keyed standard normals shaped like the state for ``step`` (the same for every call)."""

    def coef(self, name: str, step: int) -> torch.Tensor:
        """Row ``step`` of a prepared table, shaped to broadcast against the state."""

    def scratch(self, name: str) -> torch.Tensor:
        """A reusable buffer shaped like the state."""


class Solver:
    """Base class: subclasses set the class attributes and implement prepare/step."""

    #: convergence order: deterministic (pathwise) for ODE solvers, weak order for SDE solvers
    order: int = 1
    #: network calls per step
    nfe_per_step: int = 1
    #: whether the step draws noise (``stochastic`` may depend on parameters such as eta)
    stochastic: bool = False
    #: whether the solver needs a Gaussian-marginal SDE (alpha, sigma, log-SNR)
    gaussian_only: bool = True

    def check_sde(self, sde) -> None:
        """Refuse an SDE this solver cannot integrate, with the reason."""
        if self.gaussian_only and not getattr(sde, "gaussian", False):
            raise ValueError(
                f"{type(self).__name__} needs a Gaussian-marginal SDE (alpha(t), sigma(t), log-SNR); "
                f"{sde!r} is not one"
            )

    def prepare(self, model, times: torch.Tensor) -> dict[str, torch.Tensor]:
        """Coefficient tables for a grid ``times`` of shape (N+1, C), float64; each table (N, C)."""
        raise NotImplementedError

    def step(self, k: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Advance x from grid time k to k+1 (in place where possible) and return it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
