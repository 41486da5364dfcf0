"""Predictor-corrector sampling (Song et al. 2021, "Score SDE"): SCORE's predictors and correctors.

The predictors (:class:`ReverseDiffusion`, :class:`AncestralSampling`) are ordinary solvers built on
the forward one-step transition of a Gaussian-marginal SDE, so SCORE's VP and VE formulas become one
formula for every such SDE, with every score conversion folded into per-step float64 tables.  The
correctors (:class:`Langevin`, :class:`AnnealedLangevin`) are not solvers: they move x at a fixed
grid time and are run by :class:`PredictorCorrector`, which wraps any fixed-grid solver as its
predictor.  Formulas: docs/solvers.md, "Predictor-corrector sampling".
"""

from __future__ import annotations

import torch

from sde import GaussianSDE
from sde.validation import check_choice, check_count, check_positive

from .base import Solver, SolverBase, grid_draw

__all__ = [
    "CORRECTOR_FIRST_DRAW",
    "AncestralSampling",
    "AnnealedLangevin",
    "Corrector",
    "Langevin",
    "PredictorCorrector",
    "ReverseDiffusion",
]

#: the first ``ctx.noise`` draw index a PredictorCorrector's corrector uses (draw j of the corrector
#: iterations at step k is CORRECTOR_FIRST_DRAW + j); far above the draws predictors use (the library's
#: use draw 0 only), and below the driver's limit of 2^16 draws
CORRECTOR_FIRST_DRAW = 1 << 15
_MAX_DRAW = 1 << 16
_VARIANCES = ("posterior", "forward")


def forward_transition(sde, times: torch.Tensor):
    """(a, G^2) of the forward transition from t_{k+1} to t_k for a grid ``times`` (N+1, C), float64:
    a = alpha(t_k)/alpha(t_{k+1}), G^2 = sigma(t_k)^2 - a^2 sigma(t_{k+1})^2 (clamped at 0 against rounding)."""
    t0, t1 = times[:-1], times[1:]
    a = sde.alpha(t0) / sde.alpha(t1)
    g2 = (sde.sigma(t0) ** 2 - (a * sde.sigma(t1)) ** 2).clamp_min(0.0)
    return a, g2


def _score_coefficients(model, t: torch.Tensor):
    """(p, q) with score = p x + q out.  A score network needs no conversion, so this works on any
    SDE; other parametrisations need a Gaussian-marginal one (``model.coefficients`` says so)."""
    if model.predicts == "score":
        return torch.zeros_like(t), torch.ones_like(t)
    return model.coefficients("score", t)


class ReverseDiffusion(Solver):
    """SCORE's reverse-diffusion predictor on any Gaussian-marginal SDE.

    It reverses the forward one-step transition x_{t_k} = a x_{t_{k+1}} + G z of the grid:
    x <- (2 - a) x + G^2 score(x, t_k) + G z, a = alpha(t_k)/alpha(t_{k+1}),
    G^2 = sigma(t_k)^2 - a^2 sigma(t_{k+1})^2.  VP: (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z;
    VE: x + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_i^2 - sigma_{i-1}^2) z.  One network call per
    step, weak order 1.  SCORE returns the noise-free mean of its last step; here the driver's
    ``final_denoise`` (the x0 estimate at t_min) plays that part.
    """

    convergence_order = 1
    convergence_mode = "weak"
    nfe_per_step = 1
    stochastic = True
    gaussian_only = True

    def prepare(self, model, times):
        a, g2 = forward_transition(model.sde, times)
        p, q = _score_coefficients(model, times[:-1])
        return {"x": 2.0 - a + g2 * p, "out": g2 * q, "noise": torch.sqrt(g2)}

    def table_names(self):
        return frozenset({"x", "out", "noise"})

    def brownian_draws(self, model, times):
        """G = alpha(t_k) sqrt(s_k^2 - s_{k+1}^2) (s = sigma/alpha): an increment in the clock s^2, the
        forward SDE's own (the variance of x/alpha)."""
        return [grid_draw(_noise_level_clock(model.sde), times)]

    def step(self, k, x, ctx):
        out = ctx.output(x, k)
        x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("out", k), out)
        return x.addcmul_(ctx.coef("noise", k), ctx.noise(k))


def _noise_level_clock(sde):
    """tau = (sigma/alpha)^2 = e^{-2 lambda}: the clock of the forward SDE's noise."""
    return lambda t: torch.exp(-2.0 * sde.log_snr(t))


class AncestralSampling(Solver):
    """SCORE's ancestral-sampling predictor (DDPM's sampler) on any Gaussian-marginal SDE.

    Mean (x + G^2 score(x, t_k))/a, the exact mean of q(x_{t_{k+1}} | x_{t_k}, x0) at Tweedie's x0
    estimate, computed in the equivalent form alpha(t_{k+1}) G^2/sigma(t_k)^2 x0_hat +
    a sigma(t_{k+1})^2/sigma(t_k)^2 x, which stays finite where alpha(t_k) = 0 (rectified flow at t = 1).

    ``variance``:
      - ``"posterior"`` (default): std G sigma(t_{k+1})/sigma(t_k), the variance of the DDPM posterior
        q(x_{t_{k+1}} | x_{t_k}, x0) (beta-tilde); SCORE's VE form.  The default because it is the
        variance of the exact posterior given x0 on every SDE (and what SCORE's VE ancestral sampler uses).
      - ``"forward"``: std G, SCORE's (and DDPM's) VP form sigma^2 = beta_i.

    ``variance`` is not an ``eta``: both variances sample the data distribution (the posterior one is
    DDIM's eta = 1, the forward one is more than that), they differ in their first-order error.

    Both are first order and err in opposite directions (Ho et al. 2020: beta-tilde is optimal for a
    point-mass x0, beta for x0 ~ N(0, I)); on N(0.7, 0.5^2) data with 1000 steps the final variance is
    2.7% low with "posterior", 0.9% low with "forward".

    a = alpha(t_k)/alpha(t_{k+1}), G^2 = sigma(t_k)^2 - a^2 sigma(t_{k+1})^2.  One call per step, weak order 1.
    """

    convergence_order = 1
    convergence_mode = "weak"
    nfe_per_step = 1
    stochastic = True
    gaussian_only = True

    def __init__(self, variance: str = "posterior"):
        self.variance = check_choice("variance", variance, _VARIANCES, "AncestralSampling")

    def prepare(self, model, times):
        sde = model.sde
        t0, t1 = times[:-1], times[1:]
        a, g2 = forward_transition(sde, times)
        s0sq, s1sq = sde.sigma(t0) ** 2, sde.sigma(t1) ** 2
        c_x0 = sde.alpha(t1) * g2 / s0sq
        c_x = a * s1sq / s0sq
        p, q = model.coefficients("x0", t0)
        var = g2 * s1sq / s0sq if self.variance == "posterior" else g2
        return {"x": c_x + c_x0 * p, "out": c_x0 * q, "noise": torch.sqrt(var)}

    def table_names(self):
        return frozenset({"x", "out", "noise"})

    def step(self, k, x, ctx):
        out = ctx.output(x, k)
        x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("out", k), out)
        return x.addcmul_(ctx.coef("noise", k), ctx.noise(k))

    def brownian_draws(self, model, times):
        """The posterior std sigma_{k+1} sqrt(1 - e^{2 (lambda_k - lambda_{k+1})}) is an increment in the clock
        e^{2 lambda} (as SDE-DPM-Solver++(1) with eta = 1, which it is); the forward std G one in the clock
        of :class:`ReverseDiffusion`."""
        if self.variance == "forward":
            return [grid_draw(_noise_level_clock(model.sde), times)]
        sde = model.sde
        return [grid_draw(lambda t: torch.exp(2.0 * sde.log_snr(t)), times)]

    def __repr__(self):
        return f"AncestralSampling(variance={self.variance!r})"


class Corrector:
    """Base class of the correctors :class:`PredictorCorrector` runs: ``n_steps`` iterations of
    ``update`` at grid time k, each one network call and one noise draw.  A corrector is not a
    :class:`Solver`: it does not advance time, so ``samplers.sample`` refuses it on its own."""

    convergence_order = 1
    convergence_mode = "weak"
    stochastic = True
    #: whether the corrector needs a Gaussian-marginal SDE (sigma(t))
    gaussian_only = False

    def __init__(self, snr: float = 0.16, n_steps: int = 1):
        name = type(self).__name__
        self.snr = check_positive("snr", snr, name)
        self.n_steps = check_count("n_steps", n_steps, name)

    @property
    def nfe_per_step(self) -> int:
        return self.n_steps

    def check_sde(self, sde) -> None:
        if self.gaussian_only and not isinstance(sde, GaussianSDE):
            raise ValueError(f"{type(self).__name__} needs a Gaussian-marginal SDE (sigma(t)); {sde!r} is not one")
        if sde.constrained_state:
            raise ValueError(f"{type(self).__name__} does not keep states inside the domain of {sde!r} (its "
                             "Langevin steps would leave it); use that SDE's own solver without a corrector")

    def prepare(self, model, times: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tables (N, C) for the corrector at the grid times ``times[:-1]``."""
        raise NotImplementedError

    def table_names(self) -> frozenset[str]:
        """The tables ``update`` reads (before the prefix), as :meth:`solvers.Solver.table_names`;
        default: none declared."""
        return frozenset()

    def update(self, k: int, x: torch.Tensor, ctx, draw: int, prefix: str = "") -> torch.Tensor:
        """One corrector iteration at grid time k, in place, with noise ``ctx.noise(k, draw)``; the
        tables are read as ``prefix + name``."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(snr={self.snr:g}, n_steps={self.n_steps})"


def _alpha_i(model, times: torch.Tensor) -> torch.Tensor:
    """SCORE's alpha_i for the corrector at grid time t_k: a^2 = (alpha(t_k)/alpha(t_{k+1}))^2
    = exp(2 int_{t_{k+1}}^{t_k} f), the squared forward-transition coefficient of the step (1 - beta_i
    on VP, 1 on VE/EDM); 1 on an SDE without alpha(t)."""
    if not isinstance(model.sde, GaussianSDE):
        return torch.ones_like(times[:-1])
    a, _ = forward_transition(model.sde, times)
    return a * a


class Langevin(Corrector):
    """SCORE's Langevin corrector with a step size per sample.

    Per iteration at grid time t_k: g = score(x, t_k), z ~ N(0, I),
    eps = 2 alpha_i (snr ||z|| / ||g||)^2, x <- x + eps g + sqrt(2 eps) z,
    with alpha_i = a^2 = (alpha(t_k)/alpha(t_{k+1}))^2 = exp(2 int_{t_{k+1}}^{t_k} f): SCORE's 1 - beta_i on VP
    (its discrete alphas), 1 on VE/EDM, and 1 on an SDE without alpha(t).  Needs only a score, so
    it works on any SDE given a score network (``predicts="score"``).

    The norms are per sample.  SCORE averages them over the batch, which makes every sample's step
    size depend on the whole batch (a sample changes with the batch it is drawn in); per-sample
    norms keep sample i's arithmetic the same in any batch.  The price: the step size then depends on the sample's
    own state and noise, and in the small-step limit the chain samples not p_t but, for a Gaussian
    p_t in d dimensions, a law whose variance is about (1 + 2/d)^2 times too large (per-sample
    ||g|| changes the invariant law to p ||g||^2 and per-sample ||z|| heats it by (d + 2)/d).
    That is 0.13% for d = 3072 (32x32x3) but 27% for d = 16 (measured: +30%), and far worse for d <= 4: for
    low-dimensional problems use :class:`AnnealedLangevin`, whose step size does not depend on x.
    Where ||g|| = 0 exactly the step size is 0 (SCORE divides by zero).
    """

    #: the noise term is sqrt(_noise_factor * eps) z (2 for Langevin dynamics)
    _noise_factor = 2.0

    def prepare(self, model, times):
        p, q = _score_coefficients(model, times[:-1])
        return {"score_x": p, "score_out": q, "alpha": _alpha_i(model, times)}

    def table_names(self):
        return frozenset({"score_x", "score_out", "alpha"})

    def update(self, k, x, ctx, draw, prefix=""):
        out = ctx.output(x, k)
        g = torch.mul(x, ctx.coef(prefix + "score_x", k), out=ctx.scratch(prefix + "langevin_g"))
        g.addcmul_(ctx.coef(prefix + "score_out", k), out)
        z = ctx.noise(k, draw)
        batch = x.shape[0]
        g_norm = torch.linalg.vector_norm(g.reshape(batch, -1), dim=1)
        z_norm = torch.linalg.vector_norm(z.reshape(batch, -1), dim=1)
        ratio = torch.where(g_norm > 0, self.snr * z_norm / g_norm, torch.zeros_like(g_norm))
        eps = (2.0 * ratio * ratio).reshape((batch,) + (1,) * (x.dim() - 1)) * ctx.coef(prefix + "alpha", k)
        x.addcmul_(eps, g)
        return x.addcmul_(torch.sqrt(eps * self._noise_factor), z)


class AnnealedLangevin(Corrector):
    """SCORE's annealed Langevin dynamics (ALD) corrector: the step size follows the noise level.

    eps = 2 alpha_i (snr sigma(t_k))^2 (alpha_i as in :class:`Langevin`), x <- x + eps score(x, t_k)
    + sqrt(2 eps) z.  The step size does not depend on x, so the chain has no bias beyond that of a
    finite step, in any dimension, and each sample is independent of its batch.  Needs sigma(t):
    Gaussian-marginal SDEs only.
    """

    gaussian_only = True

    def prepare(self, model, times):
        t = times[:-1]
        eps = 2.0 * _alpha_i(model, times) * (self.snr * model.sde.sigma(t)) ** 2
        p, q = _score_coefficients(model, t)
        return {"x": 1.0 + eps * p, "out": eps * q, "noise": torch.sqrt(2.0 * eps)}

    def table_names(self):
        return frozenset({"x", "out", "noise"})

    def update(self, k, x, ctx, draw, prefix=""):
        out = ctx.output(x, k)
        x.mul_(ctx.coef(prefix + "x", k)).addcmul_(ctx.coef(prefix + "out", k), out)
        return x.addcmul_(ctx.coef(prefix + "noise", k), ctx.noise(k, draw))


class PredictorCorrector(Solver):
    """Predictor-corrector sampling: at every grid time, ``n_corrector_steps`` corrector iterations
    (SCORE's order: corrector first), then one step of the predictor.

    Parameters
    ----------
    predictor:
        any fixed-grid solver of :mod:`solvers` (default :class:`ReverseDiffusion`); adaptive
        solvers choose their own times and are refused.
    corrector:
        a :class:`Corrector` (default ``AnnealedLangevin(snr, n_corrector_steps)``: SCORE's default
        is :class:`Langevin`, but with per-sample norms Langevin's variance bias (1 + 2/d)^2 is
        large in few dimensions; on the 2-D mixture (VP, 50 steps) Langevin's sliced Wasserstein
        error is 0.40 against ALD's 0.040, at the sampling floor).
    n_corrector_steps:
        corrector iterations per step (default 1, or the given corrector's ``n_steps``); 0 without a
        corrector runs the predictor alone.
    snr:
        the default corrector's signal-to-noise ratio (default 0.16, SCORE's CIFAR-10 value).

    Notes
    -----
    With a corrector given, ``snr``/``n_corrector_steps`` must be left out or agree with it.  NFE per
    step: the predictor's plus n_corrector_steps.  Corrector iteration j of step k draws
    ``ctx.noise(k, CORRECTOR_FIRST_DRAW + j)``: independent of the predictor's draws and of each other.
    """

    convergence_order = 1
    convergence_mode = "weak"

    def __init__(self, predictor: Solver | None = None, corrector: Corrector | None = None,
                 n_corrector_steps: int | None = None, snr: float | None = None):
        if predictor is None:
            predictor = ReverseDiffusion()
        elif isinstance(predictor, SolverBase) and not isinstance(predictor, Solver):
            raise ValueError(f"PredictorCorrector: predictor must be a fixed-grid solver; {predictor!r} is adaptive "
                             "(it chooses its own times, so there are no grid times to correct at)")
        elif not isinstance(predictor, Solver):
            raise TypeError(f"PredictorCorrector: predictor must be a solvers.Solver instance (a fixed-grid "
                            f"solver such as ReverseDiffusion() or EulerMaruyama()), got {type(predictor).__name__}")
        if snr is not None:
            snr = check_positive("snr", snr, "PredictorCorrector")
        if n_corrector_steps is not None:
            n_corrector_steps = check_count("n_corrector_steps", n_corrector_steps, "PredictorCorrector", minimum=0)
        if corrector is None:
            if n_corrector_steps != 0:
                corrector = AnnealedLangevin(0.16 if snr is None else snr,
                                             1 if n_corrector_steps is None else n_corrector_steps)
        elif not isinstance(corrector, Corrector):
            raise TypeError(f"PredictorCorrector: corrector must be a solvers.pc.Corrector instance (Langevin(...) or "
                            f"AnnealedLangevin(...)), got {type(corrector).__name__}")
        else:
            if snr is not None and snr != corrector.snr:
                raise ValueError(f"PredictorCorrector: snr={snr:g} conflicts with the corrector's "
                                 f"snr={corrector.snr:g}: set snr on the corrector only")
            if n_corrector_steps is not None and n_corrector_steps != corrector.n_steps:
                raise ValueError(f"PredictorCorrector: n_corrector_steps={n_corrector_steps} conflicts with the "
                                 f"corrector's n_steps={corrector.n_steps}: set n_steps on the corrector only")
        self.predictor = predictor
        self.corrector = corrector
        self.n_corrector_steps = 0 if corrector is None else corrector.n_steps
        self.snr = None if corrector is None else corrector.snr
        self.nfe_per_step = predictor.nfe_per_step + self.n_corrector_steps
        self.stochastic = corrector is not None or bool(predictor.stochastic)
        if corrector is None:
            self.convergence_order, self.convergence_mode = predictor.convergence_order, predictor.convergence_mode
        self.gaussian_only = bool(predictor.gaussian_only) or bool(corrector is not None and corrector.gaussian_only)
        # nested predictor-correctors stack their corrector draws
        self.first_draw = max(CORRECTOR_FIRST_DRAW, predictor.draw_end)
        self.draw_end = self.first_draw + self.n_corrector_steps
        if self.draw_end > _MAX_DRAW:
            raise ValueError(f"PredictorCorrector: n_corrector_steps={self.n_corrector_steps} needs noise draws up to "
                             f"{self.draw_end}, beyond the driver's {_MAX_DRAW}")
        self._prefix = "pc_corrector."

    @property
    def hooks(self):
        """The predictor's x0 hooks (thresholding, correct_x0), which the driver also applies to the
        final denoised sample."""
        return self.predictor.hooks

    def check_sde(self, sde) -> None:
        if self.gaussian_only and not isinstance(sde, GaussianSDE):
            who = self.predictor if self.predictor.gaussian_only else self.corrector
            raise ValueError(f"PredictorCorrector needs a Gaussian-marginal SDE for its {who!r}; {sde!r} is not one")
        self.predictor.check_sde(sde)
        if self.corrector is not None:
            self.corrector.check_sde(sde)

    def stage_times(self, model, times):
        return self.predictor.stage_times(model, times)

    def brownian_draws(self, model, times):
        """The predictor's (the corrector's Langevin draws stay keyed by step and iteration: they are not
        increments of the path the grid refines, but a fresh chain at each grid time)."""
        return self.predictor.brownian_draws(model, times)

    def prepare(self, model, times):
        tables = dict(self.predictor.prepare(model, times))
        if self.corrector is None:
            return tables
        prefix = "pc_corrector."
        while any(name.startswith(prefix) for name in tables):
            prefix = "_" + prefix  # a name that cannot clash with the predictor's
        self._prefix = prefix
        for name, table in self.corrector.prepare(model, times).items():
            tables[prefix + name] = table
        return tables

    def table_names(self):
        tables = self.predictor.table_names()
        if self.corrector is None:
            return tables
        return tables | {self._prefix + name for name in self.corrector.table_names()}

    def plan_names(self):
        return self.predictor.plan_names()

    def step(self, k, x, ctx):
        if self.corrector is not None:
            for j in range(self.n_corrector_steps):
                x = self.corrector.update(k, x, ctx, self.first_draw + j, self._prefix)
        return self.predictor.step(k, x, ctx)

    def __repr__(self):
        return f"PredictorCorrector(predictor={self.predictor!r}, corrector={self.corrector!r})"
