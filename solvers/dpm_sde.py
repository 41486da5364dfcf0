"""SDE-DPM-Solver++: multistep exponential integrators of the reverse SDE in data prediction (1, 2M, 3M).

Lu et al. (2022, diffusers' ``sde-dpmsolver++``); k-diffusion's ``sample_dpmpp_2m_sde`` /
``sample_dpmpp_3m_sde`` through :meth:`DPMSolverSDE.k_diffusion`.  The linear part and the noise of
the reverse process with diffusion eta g are integrated exactly in the half log-SNR and the data
prediction is expanded from the history with the one derivative rule of :mod:`solvers.multistep`
(so 3M is third order in its deterministic part, unlike k-diffusion's and diffusers' 3M).  Weak
order 1 for eta > 0; eta = 0 is DPM-Solver++.  Derivation: docs/solvers.md, "SDE-DPM-Solver++: the
derivation"; measured orders: docs/measurements.md, "SDE-DPM-Solver++".
"""

from __future__ import annotations

import math

import torch

from sde import check_eta
from sde.validation import check_choice, check_nonnegative

from .base import Solver, X0Hooks, grid_draw
from .exponential import z_phi_functions
from .multistep import (
    LowerOrderFinal,
    exponential_multistep_weights,
    history_names,
    history_step,
    history_tables,
    multistep_orders,
)

__all__ = ["DPMSolverSDE"]

#: the forms of the second-order steps
VARIANTS = ("midpoint", "heun")


class DPMSolverSDE(LowerOrderFinal, Solver):
    """SDE-DPM-Solver++ of multistep order 1, 2 (2M) or 3 (3M): one network call per step.

    ``eta`` in [0, 1] scales the diffusion of the reverse-time process to eta g, as in
    :class:`EulerMaruyama` (1: the reverse SDE, diffusers' ``sde-dpmsolver++``; 0: DPM-Solver++ on the
    probability-flow ODE).  k-diffusion's ``eta`` is this eta squared: :meth:`k_diffusion` takes it.
    ``variant`` is the form of the second-order steps, ``"midpoint"`` (1/2 phi1, diffusers' default)
    or ``"heun"`` (phi2).  ``lower_order_final`` lowers the order of the last steps of runs shorter
    than 10 steps (None: by where the run ends, :class:`solvers.multistep.LowerOrderFinal`).
    ``thresholding`` (True or a :class:`DynamicThresholding`) and
    ``correct_x0(x0, t) -> x0`` act on every x0 estimate before it is used.

    ``order`` is the multistep order; ``convergence_order`` is 1 (weak) while the solver draws noise
    (eta > 0) and ``order`` (pathwise) for eta = 0.
    """

    nfe_per_step = 1
    stochastic = True
    gaussian_only = True
    convergence_mode = "weak"

    def __init__(self, order: int = 2, variant: str = "midpoint", eta: float = 1.0,
                 lower_order_final: bool | None = None, thresholding=False, correct_x0=None):
        self.order = int(check_choice("order", order, (1, 2, 3)))
        self.variant = check_choice("variant", variant, VARIANTS, why=" (the form of the second-order steps)")
        self._set_lower_order_final(lower_order_final)
        self.hooks = X0Hooks(thresholding, correct_x0)
        self.eta = check_eta(eta, "DPMSolverSDE", hint="; k-diffusion's eta, our eta^2, any value >= 0, is "
                                                         "DPMSolverSDE.k_diffusion(eta=...)")
        self._set_noise(self.eta * self.eta, k_diffusion=False)

    @classmethod
    def k_diffusion(cls, order: int = 2, variant: str = "midpoint", eta: float = 1.0, **options) -> DPMSolverSDE:
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
        return multistep_orders(self.order, n_steps, self.lowers_final_order, h)

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

    def brownian_draws(self, model, times):
        """The noise sigma_t sqrt(1 - e^{-2 eta_k h}) z (eta_k = k-diffusion's eta) is the exact Wiener integral
        of the step, sigma_t e^{-eta_k lambda_t} (W(tau_t) - W(tau_s)) in the clock tau = e^{2 eta_k lambda}:
        sigma_t^2 e^{-2 eta_k lambda_t} (e^{2 eta_k lambda_t} - e^{2 eta_k lambda_s}) is its variance."""
        if not self.stochastic:
            return []
        sde, rate = model.sde, 2.0 * self.k_diffusion_eta
        return [grid_draw(lambda t: torch.exp(rate * sde.log_snr(t)), times)]

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
        extra = self._lower_order_final_repr()
        name, eta = ((f"{type(self).__name__}.k_diffusion", self.k_diffusion_eta) if self._k_diffusion_spelling
                     else (type(self).__name__, self.eta))
        return f"{name}(order={self.order}, variant={self.variant!r}, eta={eta:g}{extra}{self.hooks.repr_args()})"
