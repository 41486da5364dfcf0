"""ER-SDE-Solver (Cui et al. 2023, arXiv 2309.06169): exact-in-the-linear-part solvers of the
extended reverse SDE family, in data prediction, orders 1, 2 and 3 (multistep, one call per step).

The variable is lambda = sigma/alpha and a noise scale function phi picks the reverse process; only
alpha and sigma are used, so one form serves every Gaussian SDE.  Two choices differ from the
paper's code because measurement decided: history derivatives from the interpolating polynomial
(:mod:`solvers.multistep`) and the step integrals by Gauss-Legendre quadrature in log lambda.
Derivation and choices: docs/solvers.md, "ER-SDE: the derivation and the choices"; the numbers
behind them: docs/measurements.md, "ER-SDE".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from sde.validation import check_choice

from .base import Solver, X0Hooks, first_true, grid_draw
from .multistep import exponential_multistep_weights, history_names, history_step, history_tables, multistep_orders

__all__ = ["ERSDE", "NOISE_SCALES", "noise_scale_integrals"]


def _ode(x):
    return x.clone()


def _original_sde(x):
    return x * x


def _sde_1(x):  # the paper's SDE_1 with eta = 0: x (e^{x^{eta-1}/(eta-1)} + 10)
    return x * (torch.exp(-1.0 / x) + 10.0)


def _sde_2(x):
    return x**1.5


def _sde_3(x):
    return x**2.5


def _sde_4(x):
    return x**0.9 * torch.log10(1.0 + 100.0 * x**1.5)


def _sde_5(x):
    return x * (torch.exp(x**0.3) + 10.0)


#: the paper's noise scale functions (its table, ``customized_func`` types 1-7), by name
NOISE_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ode": _ode,
    "original_sde": _original_sde,
    "sde_1": _sde_1,
    "sde_2": _sde_2,
    "sde_3": _sde_3,
    "sde_4": _sde_4,
    "sde_5": _sde_5,
}

#: lim_{l -> inf} l/phi(l) of the named functions (inf: phi grows slower than x there, which
#: breaks the constraint; "sde_4" does so for l above ~1.1e3)
_RHO_AT_INFINITY = {"ode": 1.0, "original_sde": 0.0, "sde_1": 1.0 / 11.0, "sde_2": 0.0, "sde_3": 0.0,
                    "sde_4": math.inf, "sde_5": 0.0}

#: Gauss-Legendre nodes per panel, and the widest panel in log lambda (a factor e^0.5 in lambda)
QUADRATURE_NODES = 10
PANEL_WIDTH = 0.5
_GL_X, _GL_W = (torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(QUADRATURE_NODES))

#: the constraint lambda phi'/phi >= 1 is checked to this tolerance (the central difference below
#: is accurate to ~1e-9), and 1 - q^2 >= -VARIANCE_ROUNDOFF (round-off of a variance that is 0)
CONSTRAINT_TOL = 1e-6
VARIANCE_ROUNDOFF = 1e-12
#: |1 - q^2| below this is the round-off of q = rho_s/rho_t = 1 (16 ulp): the variance is 0
ROUNDOFF_BAND = 16 * torch.finfo(torch.float64).eps
_LOG_STEP = 1e-4


def noise_scale_integrals(phi: Callable, lam_t: torch.Tensor, lam_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S') = (int_{lam_t}^{lam_s} dl/phi(l), int_{lam_t}^{lam_s} (l - lam_s)/phi(l) dl) for finite
    0 < lam_t < lam_s (float64 tensors of one shape), by composite Gauss-Legendre quadrature in
    u = log l (``QUADRATURE_NODES`` nodes on each of P equal panels, P such that no panel is wider than
    ``PANEL_WIDTH``).  The nodes are placed relative to lam_t (l = lam_t e^v, v in [0, log(lam_s/lam_t)]
    from log1p of the step's relative length), so short steps keep their relative accuracy."""
    d = lam_s - lam_t
    span = torch.log1p(d / lam_t)
    if span.numel() == 0:
        return torch.zeros_like(lam_t), torch.zeros_like(lam_t)
    panels = max(1, math.ceil(float(span.max()) / PANEL_WIDTH))
    half = (span / (2 * panels))[..., None, None]
    centres = span[..., None] * ((torch.arange(panels, dtype=span.dtype) + 0.5) / panels)
    v = centres[..., None] + half * _GL_X  # (..., panels, nodes)
    offset = lam_t[..., None, None] * torch.expm1(v)  # l - lam_t
    lam = lam_t[..., None, None] + offset
    rho_w = lam / phi(lam) * (half * _GL_W)
    s = rho_w.sum(dim=(-1, -2))
    s_prime = ((offset - d[..., None, None]) * rho_w).sum(dim=(-1, -2))
    return s, s_prime


class ERSDE(Solver):
    """ER-SDE-Solver of order 1, 2 or 3 (multistep, one network call per step), data prediction.

    ``noise_scale``: one of the paper's functions by name (``"ode"`` x, ``"original_sde"`` x^2,
    ``"sde_1"`` x (e^{-1/x} + 10), ``"sde_2"`` x^1.5, ``"sde_3"`` x^2.5, ``"sde_4"``
    x^0.9 log10(1 + 100 x^1.5), ``"sde_5"`` x (e^{x^0.3} + 10), the default) or a callable
    phi(lambda) -> tensor, elementwise on float64 tensors, positive, with lambda phi'/phi >= 1 on the
    grid's range of lambda = sigma/alpha (checked when sampling starts).

    ``thresholding`` (True or a :class:`DynamicThresholding`) and ``correct_x0(x0, t) -> x0`` act on every
    x0 estimate before it is used.

    ``noise_scale`` is not an ``eta``: phi chooses a whole reverse process of the ER-SDE family (the
    paper's noise scale function), of which ``"ode"`` and ``"original_sde"`` are the probability-flow
    ODE and the reverse SDE (eta 0 and 1).

    ``order`` is the multistep order; ``convergence_order`` is ``order`` (pathwise) for ``"ode"`` and
    1 (weak) for a stochastic phi.
    """

    nfe_per_step = 1
    stochastic = True
    convergence_mode = "weak"
    gaussian_only = True

    #: the name of a built-in noise scale (:data:`NOISE_SCALES`); None for a callable one
    noise_scale_name: str | None

    def __init__(self, order: int = 3, noise_scale="sde_5", thresholding=False, correct_x0=None):
        self.order = int(check_choice("order", order, (1, 2, 3)))
        if isinstance(noise_scale, str) and noise_scale in NOISE_SCALES:
            self.noise_scale_name = noise_scale
            self._phi = NOISE_SCALES[noise_scale]
        elif callable(noise_scale) and not isinstance(noise_scale, (str, type)):
            self.noise_scale_name = None
            self._phi = noise_scale
        else:
            raise ValueError(
                f"noise_scale must be one of {sorted(NOISE_SCALES)} or a callable phi(lambda) -> tensor, "
                f"got {noise_scale!r}"
            )
        self.noise_scale = noise_scale
        self.stochastic = noise_scale != "ode"
        self.convergence_order = 1 if self.stochastic else self.order
        self.convergence_mode = "weak" if self.stochastic else "pathwise"
        self.hooks = X0Hooks(thresholding, correct_x0)

    # -- the noise scale function -------------------------------------------------------------------

    def phi(self, lam: torch.Tensor) -> torch.Tensor:
        """phi at float64 lambdas, checked: a tensor of lam's shape, positive and finite where lam is finite."""
        out = self._phi(lam)
        if not isinstance(out, torch.Tensor) or out.shape != lam.shape:
            raise ValueError(
                f"noise_scale must return a tensor shaped like its argument {tuple(lam.shape)}, got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        out = out.to(torch.float64)
        bad = ~((out > 0) & torch.isfinite(out)) & torch.isfinite(lam)
        if bool(bad.any()):
            i = int(torch.nonzero(bad.reshape(-1))[0])
            raise ValueError(
                f"noise_scale phi must be positive and finite for lambda > 0; phi({lam.reshape(-1)[i].item():g}) = "
                f"{out.reshape(-1)[i].item():g}"
            )
        return out

    def _log_slope(self, lam: torch.Tensor) -> torch.Tensor:
        """lambda phi'(lambda)/phi(lambda) by a central difference in log lambda (accurate to ~1e-9)."""
        step = math.exp(_LOG_STEP)
        up = torch.as_tensor(self._phi(lam * step), dtype=torch.float64)
        down = torch.as_tensor(self._phi(lam / step), dtype=torch.float64)
        return (torch.log(up) - torch.log(down)) / (2 * _LOG_STEP)

    def _check_constraint(self, lam: torch.Tensor, where: str = "") -> None:
        """Refuse a phi with lambda phi'/phi < 1 at any of the finite lambdas given."""
        lam = lam[torch.isfinite(lam)].reshape(-1)
        if lam.numel() == 0:
            return
        self.phi(lam)  # positive and finite there
        slope = self._log_slope(lam)
        bad = ~(slope >= 1.0 - CONSTRAINT_TOL)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"noise_scale {self._noise_scale_label()} breaks the ER-SDE constraint "
                f"lambda phi'(lambda)/phi(lambda) >= 1 "
                f"(needed for a real noise variance): it is {slope[i].item():.6g} at lambda = sigma/alpha = "
                f"{lam[i].item():.6g}{where}; use another noise scale, or a grid that avoids that range"
            )

    def _rho_at_infinity(self, lam_max: float) -> float:
        """lim_{l -> inf} l/phi(l), for a step from alpha = 0 (lambda = inf); the constraint must hold
        on (lam_max, inf) too."""
        beyond = " (the grid starts at alpha = 0, lambda = inf, so the constraint must hold for every lambda above " \
                 f"{lam_max:.6g})"
        if self.noise_scale_name is not None:
            rho = _RHO_AT_INFINITY[self.noise_scale_name]
            if math.isinf(rho):  # phi grows slower than x at large lambda: find where for the message
                probes = torch.logspace(math.log10(lam_max), 300, 600, dtype=torch.float64)
                slope = self._log_slope(probes)
                self._check_constraint(probes[torch.isfinite(slope)], beyond)
                raise ValueError(f"noise_scale {self._noise_scale_label()} grows slower than lambda as lambda -> inf: "
                                 f"it breaks the ER-SDE constraint lambda phi'/phi >= 1 there{beyond}")
            return rho
        probes = torch.logspace(0, 300, 301, dtype=torch.float64)
        probes = torch.cat([torch.tensor([lam_max], dtype=torch.float64), probes[probes > lam_max]])
        values = torch.as_tensor(self._phi(probes), dtype=torch.float64)
        finite = torch.isfinite(values) & (values > 0)
        slope = self._log_slope(probes)
        self._check_constraint(probes[finite & torch.isfinite(slope)], beyond)
        return float((probes[finite] / values[finite]).min())

    def _noise_scale_label(self) -> str:
        return repr(self.noise_scale_name) if self.noise_scale_name else getattr(self._phi, "__name__", "phi")

    # -- coefficients ---------------------------------------------------------------------------------

    def step_orders(self, n_steps: int) -> list[int]:
        """The order of each step: min(order, k + 1) (the paper's warm-up)."""
        return multistep_orders(self.order, n_steps, lower_order_final=False)

    def prepare(self, model, times):
        sde = model.sde
        n = times.shape[0] - 1
        alpha, sigma = sde.alpha(times), sde.sigma(times)
        lam = sigma / alpha  # inf where alpha = 0 (only the first row: rectified flow at t = 1)
        lam_s, lam_t = lam[:-1], lam[1:]
        at_inf = torch.isinf(lam_s)
        lam_s_fin = torch.where(at_inf, 2.0 * lam_t, lam_s)  # a stand-in where lam_s = inf, never used

        self._check_constraint(lam)
        phi_t = self.phi(lam_t)
        rho_t = lam_t / phi_t
        rho_s = lam_s_fin / self.phi(lam_s_fin)
        if bool(at_inf.any()):
            rho_inf = self._rho_at_infinity(float(lam[torch.isfinite(lam)].max()))
            rho_s = torch.where(at_inf, torch.full_like(rho_s, rho_inf), rho_s)
        q = rho_s / rho_t  # <= 1 by the constraint
        r = torch.where(at_inf, torch.zeros_like(q), q * lam_t / lam_s_fin)  # phi(lam_t)/phi(lam_s)
        alpha_t, sigma_t = alpha[1:], sigma[1:]
        cx = sigma_t / sigma[:-1] * q  # (alpha_t/alpha_s) r
        c0 = alpha_t * (1.0 - r)

        # D' and D'' weights: the step integrals at every step that has a finite start
        s, s_prime = noise_scale_integrals(self.phi, lam_t, lam_s_fin)
        self._check_constraint(_points_inside(lam_t, lam_s_fin)[~at_inf.reshape(-1)], " (inside a step)")
        delta = lam_t - lam_s_fin
        zero = torch.zeros_like(delta)
        c1 = torch.where(at_inf, zero, alpha_t * (delta + s * phi_t))
        c2 = torch.where(at_inf, zero, alpha_t * (0.5 * delta * delta + s_prime * phi_t))
        # derivative_weights over the nodes lam[k], lam[k-1], (lam[k-2]); h = 1: c1, c2 multiply D', D''
        ones = torch.ones_like(delta)
        w = exponential_multistep_weights(lam, ones, self.step_orders(n), c0, c1, c1, c2)

        p, q_out = model.coefficients("x0", times[:-1])
        tables = history_tables(self.order, cx, w, p, q_out, self.hooks, times)
        if self.stochastic:
            var = 1.0 - q * q
            if bool((var < -VARIANCE_ROUNDOFF).any()):
                k, j = first_true(var < -VARIANCE_ROUNDOFF)  # tables are (N, C): step k, grid column j
                sample = f" of sample {j}" if var.shape[1] > 1 else ""
                raise ValueError(
                    f"noise_scale {self._noise_scale_label()}: the noise variance of step {k}{sample} "
                    f"(lambda {lam_s[k, j].item():.6g} -> {lam_t[k, j].item():.6g}) is negative "
                    f"({(sigma_t[k, j] ** 2 * var[k, j]).item():.3g}): the constraint lambda phi'/phi >= 1 is "
                    f"broken there"
                )
            # |1 - q^2| within a few ulp is round-off of a zero variance (phi linear over the step): 0,
            # not sqrt(1e-16) = 1e-8 of noise
            var = torch.where(var.abs() <= ROUNDOFF_BAND, torch.zeros_like(var), var).clamp(min=0.0)
            tables["noise"] = sigma_t * torch.sqrt(var)
        return tables

    def brownian_draws(self, model, times):
        """The noise sigma_t sqrt(1 - (rho_s/rho_t)^2) z, rho = lambda/phi(lambda) (lambda = sigma/alpha), is
        (sigma_t/rho_t) (W(tau_t) - W(tau_s)) in the clock tau = rho^2 (the ER-SDE constraint makes it
        monotone); where alpha = 0 rho is its limit, as in :meth:`prepare`."""
        if not self.stochastic:
            return []
        sde = model.sde
        lam_grid = sde.sigma(times) / sde.alpha(times)
        finite = lam_grid[torch.isfinite(lam_grid)]
        rho_inf = self._rho_at_infinity(float(finite.max())) if bool(torch.isinf(lam_grid).any()) else math.inf

        def clock(t):
            lam = sde.sigma(t) / sde.alpha(t)
            at_inf = torch.isinf(lam)
            rho = torch.where(at_inf, torch.full_like(lam, rho_inf),
                              lam / self.phi(torch.where(at_inf, torch.ones_like(lam), lam)))
            return rho * rho

        return [grid_draw(clock, times)]

    # -- steps ----------------------------------------------------------------------------------

    def table_names(self):
        tables = history_names(self.order, self.hooks)[0]
        return tables | {"noise"} if self.stochastic else tables

    def plan_names(self):
        return history_names(self.order, self.hooks)[1]

    def step(self, k, x, ctx):
        x = history_step(k, x, ctx.output(x, k), ctx, self.order, self.hooks, "ersde_m")
        if self.stochastic:
            x.addcmul_(ctx.coef("noise", k), ctx.noise(k))
        return x

    def fused_step(self):
        """The fused CUDA kernel of this step (:mod:`solvers.kernels`), noise drawn in the kernel."""
        from .kernels import multistep_kernel

        return multistep_kernel(self.hooks, self.order, "ersde_m", noise=self.stochastic)

    def __repr__(self):
        scale = repr(self.noise_scale_name) if self.noise_scale_name else getattr(self._phi, "__name__",
                                                                                   type(self._phi).__name__)
        return f"{type(self).__name__}(order={self.order}, noise_scale={scale}{self.hooks.repr_args()})"


def _points_inside(lam_t: torch.Tensor, lam_s: torch.Tensor) -> torch.Tensor:
    """Four points inside every step, equally spaced in log lambda, shape (steps * C, 4): where the
    constraint is checked between the grid points."""
    frac = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    u_t, u_s = torch.log(lam_t), torch.log(lam_s)
    return torch.exp(u_t[..., None] + (u_s - u_t)[..., None] * frac).reshape(-1, 4)
