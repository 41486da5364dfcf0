"""Explicit Runge-Kutta tableaux as data: one format for every solver built on one (scipy's ``_ivp/rk.py`` idea).

A :class:`Tableau` holds the Butcher coefficients (c, a, b), the order of b and, for an embedded
pair, the weights of the lower-order solution the step-size control compares against.  The
fixed-step ones are the bases of :class:`solvers.Reversible`, the embedded pairs those of
:class:`solvers.AdaptiveODE`; tests/test_tableau.py checks every one against the order conditions
of its declared orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tableau", "TABLEAUX"]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stages c, a (the strictly lower-triangular rows of stages
    2..s, row j holding j entries), the propagated weights b (order ``order``) and, for an embedded
    pair, the embedded weights b_low (order ``order_low``), else None.  ``fsal``: the last stage is
    f at the step's result (first same as last)."""

    name: str
    c: tuple
    a: tuple
    b: tuple
    order: int
    b_low: tuple | None = None
    order_low: int | None = None

    def __post_init__(self):
        s = len(self.c)
        if len(self.b) != s or len(self.a) != s - 1 or any(len(row) != j for j, row in enumerate(self.a, start=1)):
            raise ValueError(f"tableau {self.name!r}: expected c and b of one length s and a with rows of "
                             f"1..s-1 entries, got {s} stages, {len(self.b)} weights, rows of "
                             f"{[len(row) for row in self.a]}")
        if (self.b_low is None) != (self.order_low is None) or (self.b_low is not None and len(self.b_low) != s):
            raise ValueError(f"tableau {self.name!r}: b_low ({s} weights) and order_low come together")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def embedded(self) -> bool:
        return self.b_low is not None

    @property
    def fsal(self) -> bool:
        return self.stages > 1 and self.c[-1] == 1 and tuple(self.a[-1]) + (0,) == tuple(self.b)

    @property
    def calls_per_step(self) -> int:
        """Network calls per accepted step (FSAL: the last stage is the next step's first)."""
        return self.stages - 1 if self.fsal else self.stages

    def step(self, f, y: torch.Tensor, h: torch.Tensor, k1: torch.Tensor | None = None):
        """One step of an embedded pair from y with per-row step sizes h ((B,) float64); f(y_stage, j) -> dy
        at stage j (the caller knows the stage's time tau + c_j h).  Returns (y_high, y_low, stages k)."""
        if not self.embedded:
            raise ValueError(f"tableau {self.name!r} has no embedded weights (b_low): it cannot estimate an error")
        b_low = self.b_low
        assert b_low is not None  # embedded says so
        hc = h.to(device=y.device, dtype=y.dtype).reshape((-1,) + (1,) * (y.dim() - 1))
        k = [f(y, 0) if k1 is None else k1]
        for j in range(1, self.stages):
            u = y.clone()
            for i, a in enumerate(self.a[j - 1]):
                if a != 0:
                    u.add_(hc * k[i], alpha=a)
            k.append(f(u, j))
        y_high, y_low = y.clone(), y.clone()
        for i in range(self.stages):
            if self.b[i] != 0:
                y_high.add_(hc * k[i], alpha=self.b[i])
            if b_low[i] != 0:
                y_low.add_(hc * k[i], alpha=b_low[i])
        return y_high, y_low, k


_ALL = (
    # -- fixed-step methods ----------------------------------------------------------------------
    Tableau("euler", c=(0.0,), a=(), b=(1.0,), order=1),
    Tableau("midpoint", c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0), order=2),
    Tableau("heun", c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5), order=2),
    Tableau("ralston", c=(0.0, 2.0 / 3.0), a=((2.0 / 3.0,),), b=(0.25, 0.75), order=2),
    # Shu & Osher's strong-stability-preserving third-order method
    Tableau("ssprk3", c=(0.0, 1.0, 0.5), a=((1.0,), (0.25, 0.25)), b=(1.0 / 6.0, 1.0 / 6.0, 2.0 / 3.0), order=3),
    Tableau("rk4", c=(0.0, 0.5, 0.5, 1.0), a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            b=(1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0), order=4),
    # Kutta's 3/8 rule
    Tableau("rk38", c=(0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0), a=((1.0 / 3.0,), (-1.0 / 3.0, 1.0), (1.0, -1.0, 1.0)),
            b=(0.125, 0.375, 0.375, 0.125), order=4),
    # -- embedded pairs --------------------------------------------------------------------------
    # Dormand & Prince (1980), RK5(4)7M: the pair of DOPRI5, ode45, RK45, torchdiffeq's dopri5
    Tableau(
        "dopri5",
        c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=((1 / 5,),
           (3 / 40, 9 / 40),
           (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
        b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
        order=5, order_low=4),
    # Bogacki & Shampine (1989) 3(2): ode23, RK23, torchdiffeq's bosh3
    Tableau(
        "bosh3",
        c=(0.0, 1 / 2, 3 / 4, 1.0),
        a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        b=(2 / 9, 1 / 3, 4 / 9, 0.0),
        b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
        order=3, order_low=2),
    # Fehlberg (1969) RKF 2(1) with local extrapolation (torchdiffeq's fehlberg2): 3 stages
    Tableau(
        "fehlberg2",
        c=(0.0, 1 / 2, 1.0),
        a=((1 / 2,), (1 / 256, 255 / 256)),
        b=(1 / 512, 255 / 256, 1 / 512),
        b_low=(1 / 256, 255 / 256, 0.0),
        order=2, order_low=1),
)

#: every tableau by name; ``solvers.reversible.TABLEAUX`` and ``solvers.adaptive_ode.TABLEAUX`` are the
#: fixed-step and the embedded ones
TABLEAUX = {tableau.name: tableau for tableau in _ALL}
