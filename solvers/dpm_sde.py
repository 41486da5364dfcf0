"""SDE-DPM-Solver++: multistep exponential integrators of the reverse SDE in data prediction (1, 2M, 3M).

Lu et al. (2022, DPM-Solver++ and its SDE variant in diffusers' ``sde-dpmsolver++``); k-diffusion's
``sample_dpmpp_2m_sde``/``sample_dpmpp_3m_sde`` through :meth:`DPMSolverSDE.k_diffusion`.  In the half
log-SNR lambda = log(alpha/sigma) the reverse-time family with diffusion eta g (as everywhere in the
library; k-diffusion's noise scale is e = eta^2)

    dx = [f x - (1 + e)/2 g^2 score] dt + sqrt(e) g dW       (e = eta^2; 1: the reverse SDE, 0: the ODE)

is linear in x given the data prediction D (score = (alpha D - x)/sigma^2), and its exact solution
from s to t (h = lambda_t - lambda_s > 0, h_eta = (1 + e) h) is

    x_t = (sigma_t/sigma_s) e^{-e h} x_s + (1 + e) alpha_t int_{lambda_s}^{lambda_t} e^{-(1+e)(lambda_t - l)} D(l) dl
          + sigma_t sqrt(1 - e^{-2 e h}) z.

Expanding D around lambda_s (D1 ~ h D', D2 ~ h^2 D'' from the history) gives, with
phi1 = 1 - e^{-h_eta}, phi2 = 1 - phi1/h_eta, phi3 = phi2/h_eta - 1/2:

    order 1:           x_t = c_x x + alpha_t phi1 D0 + sigma_t sqrt(1 - e^{-2 e h}) z
    2M, "midpoint":    ... + 1/2 alpha_t phi1 D1          (diffusers' default)
    2M, "heun":        ... + alpha_t phi2 D1              (the exact weight of the linear term)
    3M:                ... + alpha_t phi2 D1 - alpha_t phi3 D2

with c_x = (sigma_t/sigma_s) e^{-e h}.  eta = 1 is diffusers' ``sde-dpmsolver++`` (h_eta = 2h);
eta = 0 is the probability-flow ODE's DPM-Solver++ (``DPMSolver(order, predicts="x0")``, whose
order-2 steps use the midpoint form).  ``variant`` chooses the form of every second-order step
(the 2M steps, and the warm-up / final order-2 steps of 3M, as in diffusers).

The derivatives come from :func:`solvers.multistep.derivative_weights` (the interpolating
polynomial through the newest 2 or 3 outputs), so D2 ~ h^2 D''.  Our 3M therefore differs from
k-diffusion's and diffusers' 3M SDE: they use D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 D''/2 (the
reference DPM-Solver's missing factor 2, see :mod:`solvers.dpm`), and diffusers' 3M SDE branch
(checked in 0.42.1) further weights D2 by alpha_t ((1 - e^{-2h} - 2h)/(2h)^2 - 1/2), whose
constant term has the wrong sign (the expansion gives -phi3 = 1/2 + (1 - e^{-2h} - 2h)/(2h)^2,
which is O(h), while theirs tends to -1): an O(h^2) error per step in the drift integral.

Only alpha, sigma and the log-SNR of the Gaussian SDE are used.  Where a step starts at alpha = 0
(rectified flow at t = 1, lambda = -inf) h is infinite and the coefficients take their limits:
c_x = 0 (eta > 0) or sigma_t/sigma_s (eta = 0), phi1 = 1, noise sigma_t (eta > 0): the step draws
x_t = alpha_t D0 + sigma_t z, and the history weights of that node vanish in the next steps.

Convergence: for eta > 0 the method is a weak order 1 scheme (``convergence_order = 1``; the multistep
order ``order`` improves the deterministic part, the noise of the linear part is sampled
exactly).  On Gaussian data (a linear problem) the exact moment recurrence shows more: the mean is
exact for every order and the variance error falls with slope 1 for order 1 (measured 0.95-0.98)
and 2 for 2M and 3M (1.99-2.07 on VP/VE log-SNR grids, 64-512 steps; 2M 2.03-2.06 on EDM Karras
grids, where 3M settles slowly, 1.5; see tests/test_dpm_sde.py).  Weak order 1 is what is
claimed in general.  For eta = 0 it is the ODE solver and ``convergence_order`` is its pathwise
order, ``order``.
"""

from __future__ import annotations

import math

import torch

from sde import check_eta
from sde.validation import check_choice, check_flag, check_nonnegative

from .base import Solver, X0Hooks
from .exponential import z_phi_functions
from .multistep import exponential_multistep_weights, history_names, history_step, history_tables, multistep_orders

__all__ = ["DPMSolverSDE"]

#: the forms of the second-order steps
VARIANTS = ("midpoint", "heun")


class DPMSolverSDE(Solver):
    """SDE-DPM-Solver++ of multistep order 1, 2 (2M) or 3 (3M): one network call per step.

    ``eta`` in [0, 1] scales the diffusion of the reverse-time process to eta g, as in
    :class:`EulerMaruyama` (1: the reverse SDE, diffusers' ``sde-dpmsolver++``; 0: DPM-Solver++ on the
    probability-flow ODE).  k-diffusion's ``eta`` is this eta squared: :meth:`k_diffusion` takes it.
    ``variant`` is the form of the second-order steps, ``"midpoint"`` (1/2 phi1, diffusers' default)
    or ``"heun"`` (phi2).  ``lower_order_final`` lowers the order of the last steps of runs shorter
    than 10 steps.  ``thresholding`` (True or a :class:`DynamicThresholding`) and
    ``correct_x0(x0, t) -> x0`` act on every x0 estimate before it is used.

    ``order`` is the multistep order; ``convergence_order`` is 1 (weak) while the solver draws noise
    (eta > 0) and ``order`` (pathwise) for eta = 0.
    """

    nfe_per_step = 1
    stochastic = True
    gaussian_only = True
    convergence_mode = "weak"

    def __init__(self, order: int = 2, variant: str = "midpoint", eta: float = 1.0,
                 lower_order_final: bool = True, thresholding=False, correct_x0=None):
        self.order = int(check_choice("order", order, (1, 2, 3)))
        self.variant = check_choice("variant", variant, VARIANTS, why=" (the form of the second-order steps)")
        self.lower_order_final = check_flag("lower_order_final", lower_order_final)
        self.hooks = X0Hooks(thresholding, correct_x0)
        if isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta > 1:
            raise ValueError(f"DPMSolverSDE: eta must be a number in [0, 1] (the reverse diffusion eta g), got {eta!r}; "
                             "k-diffusion's eta (our eta^2, any value >= 0) is DPMSolverSDE.k_diffusion(eta=...)")
        self.eta = check_eta(eta)
        self._set_noise(self.eta * self.eta, k_diffusion=False)

    @classmethod
    def k_diffusion(cls, order: int = 2, variant: str = "midpoint", eta: float = 1.0, **options) -> "DPMSolverSDE":
        """The solver with k-diffusion's noise scale ``eta`` (``sample_dpmpp_2m_sde``/``_3m_sde``): diffusion
        sqrt(eta) g, so ``DPMSolverSDE.k_diffusion(eta=e)`` is ``DPMSolverSDE(eta=sqrt(e))``, with e kept
        as given (no square root and back); any e >= 0, as k-diffusion allows.  ``options``: the other
        arguments of the constructor."""
        k_eta = check_nonnegative("eta", eta, "DPMSolverSDE.k_diffusion", why=" (k-diffusion's noise scale: 0 "
                                  "is the probability-flow ODE, 1 the reverse SDE)")
        solver = cls(order, variant, 0.0, **options)
        solver.eta = math.sqrt(k_eta)
        solver._set_noise(k_eta, k_diffusion=True)
        return solver

    def _set_noise(self, k_diffusion_eta: float, k_diffusion: bool) -> None:
        # k-diffusion's eta (= eta^2) is the number the coefficients are computed from
        self.k_diffusion_eta = k_diffusion_eta
        self._k_diffusion_spelling = k_diffusion
        self.stochastic = k_diffusion_eta > 0
        self.convergence_order = 1 if self.stochastic else self.order
        self.convergence_mode = "weak" if self.stochastic else "pathwise"

    @property
    def score_weight(self) -> float:
        return 1.0 + self.k_diffusion_eta

    def step_orders(self, n_steps: int, h: torch.Tensor | None = None) -> list[int]:
        """The order used at each of ``n_steps`` steps: :func:`solvers.multistep.multistep_orders`
        (as :class:`DPMSolver`; ``h`` the steps' lengths in log-SNR)."""
        return multistep_orders(self.order, n_steps, self.lower_order_final, h)

    # -- coefficients ---------------------------------------------------------------------------

    def prepare(self, model, times):
        sde = model.sde
        n = times.shape[0] - 1
        lam = sde.log_snr(times)
        t_s, t_t = times[:-1], times[1:]
        h = lam[1:] - lam[:-1]  # +inf where alpha_s = 0
        alpha_t, sigma_t = sde.alpha(t_t), sde.sigma(t_t)
        # eta h with 0 * inf = 0 (eta = 0 is the ODE also where h is infinite)
        eta_h = self.k_diffusion_eta * h if self.k_diffusion_eta > 0 else torch.zeros_like(h)
        h_eta = h + eta_h
        cx = sigma_t / sde.sigma(t_s) * torch.exp(-eta_h)
        # phi1 = 1 - e^{-h_eta}, phi2 = 1 - phi1/h_eta, -phi3 = 1/2 - phi2/h_eta (the module's names)
        phi1, phi2, minus_phi3 = (-w for w in z_phi_functions(-h_eta, 3))
        c_m0 = alpha_t * phi1
        c_d1_2 = 0.5 * c_m0 if self.variant == "midpoint" else alpha_t * phi2  # order-2 steps
        c_d1_3 = alpha_t * phi2
        c_d2 = alpha_t * minus_phi3

        # (a history node at lambda = -inf gets weight 0: the derivative uses the finite ones)
        m0, m1, m2 = exponential_multistep_weights(lam, h, self.step_orders(n, h), c_m0, c_d1_2, c_d1_3, c_d2)

        p, q = model.coefficients("x0", t_s)
        tables = history_tables(self.order, cx, (m0, m1, m2), p, q, self.hooks, times)
        if self.stochastic:
            tables["noise"] = sigma_t * torch.sqrt(-torch.expm1(-2.0 * eta_h))
        return tables

    # -- steps ----------------------------------------------------------------------------------

    def table_names(self):
        tables = history_names(self.order, self.hooks)[0]
        return tables | {"noise"} if self.stochastic else tables

    def plan_names(self):
        return history_names(self.order, self.hooks)[1]

    def step(self, k, x, ctx):
        x = history_step(k, x, ctx.output(x, k), ctx, self.order, self.hooks, "dpm_sde_m")
        if self.stochastic:
            x.addcmul_(ctx.coef("noise", k), ctx.noise(k))
        return x

    def fused_step(self):
        """The fused CUDA kernel of this step (:mod:`solvers.kernels`), noise drawn in the kernel."""
        from .kernels import multistep_kernel

        return multistep_kernel(self.hooks, self.order, "dpm_sde_m", noise=self.stochastic)

    def __repr__(self):
        extra = "" if self.lower_order_final else ", lower_order_final=False"
        name, eta = ((f"{type(self).__name__}.k_diffusion", self.k_diffusion_eta) if self._k_diffusion_spelling
                     else (type(self).__name__, self.eta))
        return f"{name}(order={self.order}, variant={self.variant!r}, eta={eta:g}{extra}{self.hooks.repr_args()})"
