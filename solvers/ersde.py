"""ER-SDE-Solver (Cui et al. 2023, arXiv 2309.06169): exact-in-the-linear-part solvers of the
extended reverse SDE family, in data prediction, orders 1, 2 and 3 (multistep, one call per step).

The family.  With the noise-to-signal ratio lambda = sigma/alpha (not the log-SNR; for VE and
EDM alpha = 1 and lambda = sigma) and a *noise scale function* phi, the reverse process whose
diffusion is set by phi has, between lambda_s > lambda_t, the exact solution

    x_t = (alpha_t/alpha_s) r x_s + alpha_t phi(lambda_t) int_{lambda_t}^{lambda_s} phi'(l)/phi(l)^2 D(l) dl
          + alpha_t sqrt(lambda_t^2 - lambda_s^2 r^2) z,              r = phi(lambda_t)/phi(lambda_s),

with D the data prediction (x0 estimate).  phi(x) = x is the probability-flow ODE (DDIM), phi(x) = x^2
the original reverse SDE (the DDPM posterior); the default ``"sde_5"`` is the paper's choice.  The noise
variance is real iff lambda phi'/phi >= 1 (the paper's constraint, App. A.8); the solver checks it.

The steps.  Expanding D around lambda_s (integrating by parts, exactly):

    order 1:  x_t = c_x x_s + alpha_t (1 - r) D_s + noise
    order 2:  ... + alpha_t (lambda_t - lambda_s + S phi(lambda_t)) D'(lambda_s)
    order 3:  ... + alpha_t ((lambda_t - lambda_s)^2/2 + S' phi(lambda_t)) D''(lambda_s)

with S = int_{lambda_t}^{lambda_s} dl/phi(l), S' = int_{lambda_t}^{lambda_s} (l - lambda_s)/phi(l) dl.
Written with rho(l) = l/phi(l) (non-increasing by the constraint): c_x = (sigma_t/sigma_s) q and
noise = sigma_t sqrt(1 - q^2) z with q = rho(lambda_s)/rho(lambda_t) <= 1, r = q lambda_t/lambda_s.
Only alpha and sigma of the Gaussian SDE are used: one form for VP, sub-VP, VE, EDM, cosine, discrete
and rectified flow (the paper's "VP version"; its VE version is the case alpha = 1).

Choices where the paper (and its code) leaves room:

* History derivatives.  D' and D'' come from :func:`solvers.multistep.derivative_weights` over the
  newest 2 or 3 outputs at their lambdas (the interpolating polynomial, Newton form; D'' = 2 f[0,1,2]
  as in the paper).  The paper's code takes D' = (D_i - D_{i-1})/(lambda_i - lambda_{i-1}), a plain
  backward difference, also in the third-order scheme; its O(h) error times the O(h^2) weight leaves
  an O(h^3) local error.  Measured with phi(x) = x on the 3-component 2-D Gaussian mixture (DOP853
  reference, grids uniform in log-SNR, 32-256 steps): the paper's rule converges with slope 2.12 (VP)
  / 2.11 (VE), the interpolating polynomial with 2.98 / 2.98 (orders 1 and 2: 1.00 and 2.02 on both;
  Gaussian data, exact flow, 16-128 steps: 0.97 / 2.06 / 3.06).  We use the latter.
* The integrals S, S'.  The paper's code uses 100-point left Riemann sums in lambda.  Their error,
  ~h^2/200 times the integrand's slope, is as large as the weights it feeds (which are O(h^2) and
  O(h^3) after the cancellation of their leading terms: for phi = x the D' weight is
  lambda_t - lambda_s + lambda_t log(lambda_s/lambda_t) = O(h^2)); measured with phi = x on the mixture
  (VP, 64-256 steps) it caps order 3 at slope 1.36 and order 2 at 1.78, with a 20x larger error at
  256 steps.  We use composite Gauss-Legendre quadrature in u = log lambda (S = int rho du,
  S' = int (l - lambda_s) rho du, nodes placed relative to lambda_t): in u the integrands of every
  phi in the table (powers, exponentials of powers, logarithms) are smooth over decades, and
  ``QUADRATURE_NODES`` nodes per panel no wider than ``PANEL_WIDTH`` integrate them to float64
  round-off (checked against the closed forms for phi = x^p in 50-digit arithmetic, for steps from
  1e-6 relative length to 4.6 decades: within 2 ulp; sde_5 against scipy's quad).
* The noise variance.  The paper's code zeroes lambda_t^2 - lambda_s^2 r^2 when below 1e-6 (in
  lambda^2 units: at EDM's sigma_min = 0.002 that removes the noise of the last steps).  We keep the
  variance sigma_t^2 (1 - q^2) as computed, zeroing only |1 - q^2| within 16 ulp (the round-off of
  q = 1, a phi linear over the step; otherwise sqrt would turn it into 1e-8 sigma_t of noise); below
  -1e-12 the constraint is broken and it is an error, not a clip.
* The constraint lambda phi'/phi >= 1 is checked in ``prepare`` by a central difference of log phi in
  log lambda (accurate to ~1e-9; tolerance 1e-6) at every grid point and 4 points inside every step,
  and beyond the grid's largest lambda when the grid starts at alpha = 0.
* Steps from alpha_s = 0 (rectified flow at t = 1, lambda_s = inf).  With rho(inf) = lim l/phi(l)
  the coefficients have finite limits: r = 0, c_x = (sigma_t/sigma_s) rho(inf)/rho(lambda_t),
  noise sigma_t sqrt(1 - q^2).  For phi growing faster than x (rho(inf) = 0) the step is the jump
  x_t = alpha_t D_s + sigma_t z, exact in law; for phi = x it is DDIM's limit
  x_t = (sigma_t/sigma_s) x_s + alpha_t D_s.  rho(inf) is exact for the named functions ("sde_1" is
  ~11 x, rho(inf) = 1/11; "sde_4" grows like x^0.9 log x and breaks the constraint for lambda > ~1.1e3,
  so it is refused on such grids); for a callable it is the smallest rho(10^k) with phi(10^k)
  finite, k up to 300 (exact for c x, and ~0 for phi growing like x^{1.05} or faster).  Such a step
  is the first, so first order (warm-up), and the node lambda = inf gets weight 0 in later derivatives.
* Step orders: the paper's warm-up, step k uses order min(order, k + 1), and no lowering at the end
  (the grid never reaches sigma = 0: that is the driver's final denoising).  DPM-Solver's rule of
  order 1 after a >3x (now 2x) jump in log-SNR step length (:data:`solvers.multistep.MAX_STEP_RATIO`) was
  measured and not adopted: on VP's uniform-t grid it raises the 20-NFE variance error of orders 2/3
  on Gaussian data (0.019/0.034 -> 0.033/0.025) and lowers it at 50 NFE (0.009/0.004 -> 0.003/0.003).

Convergence.  With phi(x) = x ("ode") the solver is deterministic and ``convergence_order`` is its
pathwise order, ``order`` (1, 2, 3).  With a stochastic phi the D-expansion runs along a Brownian path,
and the scheme is claimed as weak order 1 in general (``convergence_order = 1``), as
:class:`solvers.dpm_sde.DPMSolverSDE`: the noise of the linear part is sampled exactly, and on
Gaussian data with the default phi the moment errors fall with slopes 0.94 / 2.06 / 3.12 (VP,
log-SNR grid, 16-128 steps) for orders 1 / 2 / 3; at 20 NFE (19 steps + final denoising) the
variance errors are 0.057 / 0.015 / 0.0062 (VP, log-SNR) and 0.066 / 0.015 / 0.0032 (EDM, Karras).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from sde.validation import check_choice

from .base import Solver, X0Hooks, first_true
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
                f"noise_scale {self._noise_scale_label()} breaks the ER-SDE constraint lambda phi'(lambda)/phi(lambda) >= 1 "
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
