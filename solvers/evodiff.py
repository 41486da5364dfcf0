"""EVODiff (Li et al. 2025, "EVODiff: Entropy-aware Variance Optimized Diffusion Inference"): a data-prediction
multistep solver whose differences of the history are balanced per sample by inner products of the state.

The method is defined on EDM's probability-flow ODE (alpha = 1, sigma = kappa): on any Gaussian-marginal SDE the
state y = x / alpha follows that ODE in kappa = sigma / alpha, so every rule below is written in kappa and its
additive terms are multiplied by alpha at the step's end.  A run of N steps, one network call each:

* step 0: a first-order (DDIM) step;
* steps 1 .. N-2: a *probe*: DDIM plus half a step of a variance-balanced difference D1 = m_k - r1 m_{k-1} of
  the last two data predictions, where r1 mixes sqrt(kappa-ratio ratio) with the projection coefficient of
  m_k on m_{k-1}, divided by a temperature-softened ratio of the step lengths;
* at the next step the new call (at the probe) corrects the probe with a second balanced difference
  D2 = m_{k+1} - r2 m_k, weighted by projections, and becomes the next step's history, so a step still
  costs one call;
* step N-1: a DDIM step (``last_step="ddim"``), or the reference's special last step (``"evodiff"``), which
  shrinks the state by 1 - sqrt(kappa_N kappa_{N-1}): an O(sigma_min) bias that no step count removes (on VP
  the error stops falling at about 8e-3 from 64 steps on), and at NFE 5-10 it was worse than DDIM on the
  exact mixtures (docs/measurements.md, "EVODiff"), so it is not the default.

Every per-sample coefficient is a ratio of inner products over one sample's elements (``inner_product``),
so each sample's result does not depend on the rest of the batch.  The constants of the reference are the
class attributes below, each with the measurement that decided it (``python -m samplers bench evodiff``;
docs/solvers.md, "EVODiff").  The coefficients depend on the state, so there is no fused kernel.
"""

from __future__ import annotations

import torch

from sde.validation import check_choice

from .base import Plan, Solver, X0Hooks, check_coefficients_finite

__all__ = ["EVODiff", "INNER_PRODUCTS", "LAST_STEPS"]

#: "sample": one inner product over all of a sample's elements; "channel": one per sample and channel (dim 1,
#: over the dims after it), the reference code's reduction for (B, C, H, W) images.  States of fewer than three
#: dims have no spatial dims, and there the two coincide.
INNER_PRODUCTS = ("sample", "channel")
#: "evodiff": the reference's last step (a shrunk DDIM step plus a balanced difference); "ddim": a first-order step
LAST_STEPS = ("evodiff", "ddim")


class EVODiff(Solver):
    """EVODiff on the probability-flow ODE, one network call per step, data prediction.

    ``inner_product`` (see :data:`INNER_PRODUCTS`) picks the elements each projection is taken over;
    ``last_step`` (see :data:`LAST_STEPS`) the rule of the last step.  ``thresholding`` and
    ``correct_x0(x0, t) -> x0`` act on every x0 estimate before it enters the history.  A grid run towards
    noise (``invert``) is refused: the balance weights are defined from noise to data.

    Measured pathwise order 1 (:attr:`convergence_order`): the balance factors move D1 and D2 off the plain
    differences by O(h) and the probe's step-ratio divisor is off by a fixed factor, so the second-order
    terms do not cancel.
    """

    stochastic = False
    gaussian_only = True
    nfe_per_step = 1
    convergence_order = 1

    # The reference's constants, each with what `python -m samplers bench evodiff --ablation` measured (NFE 5-20,
    # 2-D and 64-D mixtures, VP and EDM; and 16-256 steps on the order mixture): docs/measurements.md, "EVODiff".
    #: |projection coefficient| cap: ratios of inner products of nearly orthogonal predictions are unbounded.
    #: Kept: neutral at NFE <= 20 (no cap: geometric-mean error ratio 0.97), 25-45% lower error at 32-128 steps
    projection_clamp: float = 2.0
    #: the probe divides D1 by sigmoid(temperature |r1|) times the step ratio.  Kept at the reference's 0.25: no
    #: other value won everywhere (0: 1.18x the error; 1: 0.85x at NFE 6-10 but worse at NFE 5 and 20 and from 16
    #: steps on)
    temperature: float = 0.25
    #: the correction's weight is sigmoid(|zeta*| - zeta_shift).  The reference's 0.5 is not kept: 0 was as good or
    #: better (better in 10 of 20 low-NFE cases, worse in 2; 5-12% lower error at 32-256 steps)
    zeta_shift: float = 0.0
    #: runs of more steps than this gate the correction weight by the consistency of m_k with its difference
    #: quotient (the reference's ``steps > 20`` branch).  Kept: gating always raised the error at NFE <= 20
    #: (worse in 12-15 of 20 cases), gating above 20 steps lowered it by 1-8%
    gate_steps: int = 20

    def __init__(self, inner_product: str = "sample", last_step: str = "ddim", thresholding=False,
                 correct_x0=None):
        self.inner_product = check_choice("inner_product", inner_product, INNER_PRODUCTS, "EVODiff")
        self.last_step = check_choice("last_step", last_step, LAST_STEPS, "EVODiff")
        self.hooks: X0Hooks = X0Hooks(thresholding, correct_x0)

    # -- the grid's tables -------------------------------------------------------------------------------

    def prepare(self, model, times):
        sde = model.sde
        n = times.shape[0] - 1
        if n > 0 and bool((times[1:] >= times[:-1]).any()):
            raise ValueError(f"{self!r} integrates from noise to data: its balance weights and last step are "
                             f"defined on a decreasing grid (t = {float(times[0, 0]):g} -> {float(times[-1, 0]):g}); "
                             f"invert with another solver, e.g. DPMSolver(2)")
        lam = sde.log_snr(times)
        alpha, sigma = sde.alpha(times), sde.sigma(times)
        kappa = torch.exp(-lam)  # sigma / alpha: EDM's sigma, the reference's time
        dlam = lam[1:] - lam[:-1]
        # the DDIM step in kappa, 1 - kappa_{k+1}/kappa_k (1 from alpha = 0 or to sigma = 0)
        c = -torch.expm1(-dlam)
        ratio = torch.where(torch.isfinite(dlam), torch.exp(-dlam), torch.zeros_like(dlam))  # kappa_{k+1}/kappa_k
        tables: dict[str, torch.Tensor | Plan] = {
            "x": sigma[1:] / sigma[:-1],
            "m": alpha[1:] * c,
            "half_step": 0.5 * alpha[1:] * c,
            "c": c,
        }
        # the probe's and the correction's per-step scalars, at the probe step k (rows 1 .. N-2)
        zeros = torch.zeros_like(dlam)
        rlogh, base = zeros.clone(), zeros.clone()
        if n > 1:
            rlogh[1:] = dlam[:-1] / dlam[1:]  # (lam_k - lam_{k-1}) / (lam_{k+1} - lam_k)
            base[1:] = torch.sqrt(ratio[1:] / ratio[:-1])
        h_edm = torch.exp(lam[1:]) - torch.exp(lam[:-1])  # 1/kappa_{k+1} - 1/kappa_k
        k_start, k_end = kappa[:1], kappa[-1:]
        t_normalised = (kappa[1:] + k_end) / (k_start + k_end)
        weight = 0.5 * (1.0 - t_normalised**2)
        advance = ["ddim"] + ["probe"] * max(n - 2, 0) + ([self.last_step] if n > 1 else [])
        correct = [k >= 2 and advance[k - 1] == "probe" for k in range(n)]
        probe_rows = torch.tensor([a == "probe" for a in advance], dtype=torch.bool)[:, None].expand_as(dlam)
        tables.update({
            "rlogh": torch.where(probe_rows, rlogh, zeros),
            "base": torch.where(probe_rows, base, zeros),
            "weight": weight,
            "h": torch.where(probe_rows, h_edm, zeros),
            "ratio_sq": ratio**2,
        })
        # the reference's last step: x = (1 - sqrt(kappa_N kappa_{N-1})) x_ddim + alpha c/2 (m - r m_prev)
        shrink = 1.0 - torch.sqrt(kappa[1:] * kappa[:-1])
        prev_weight = torch.where(ratio < 0.5, 1.0 - 0.5 * torch.sqrt(ratio),
                                  1.0 - 0.5 * torch.sqrt((ratio - 0.5).clamp(min=0.0)))
        tables["last_shrink"] = shrink
        tables["last_prev"] = prev_weight
        tables["conv_x"], tables["conv_out"] = model.coefficients("x0", times[:-1])
        tables.update(self.hooks.time_table(times))
        for name in ("x", "m", "conv_x", "conv_out"):
            check_coefficients_finite(self, name, tables[name], lambda row, col: self._where(times, row, col))
        for name in ("rlogh", "base", "h"):
            check_coefficients_finite(
                self, name, tables[name],
                lambda row, col: self._where(times, row, col) + " (a probe whose history starts at alpha = 0)")
        tables["advance"] = Plan(advance)
        tables["correct"] = Plan(["gated" if (c and n > self.gate_steps) else ("plain" if c else None)
                                  for c in correct])
        return tables

    @staticmethod
    def _where(times, row, col):
        return f"step {row} (t = {float(times[row, col]):g} -> {float(times[row + 1, col]):g}, sample column {col})"

    def table_names(self):
        # "h" and "ratio_sq" are read only by the gated correction, where the "correct" plan says so
        last = {"last_shrink", "last_prev"} if self.last_step == "evodiff" else set()
        return frozenset({"x", "m", "half_step", "c", "rlogh", "base", "weight", "conv_x", "conv_out", *last}
                         ) | self.hooks.table_names()

    def plan_names(self):
        return frozenset({"advance", "correct"})

    # -- per-sample inner products -------------------------------------------------------------------------

    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<a, b> per sample (per sample and channel with ``inner_product="channel"``), shaped to broadcast."""
        start = 2 if self.inner_product == "channel" and a.dim() >= 3 else 1
        dims = tuple(range(start, a.dim()))
        if not dims:  # a (B,) state: each sample is one number
            return a * b
        return (a * b).sum(dim=dims, keepdim=True)

    def _projection(self, a: torch.Tensor, b: torch.Tensor, scale=1.0) -> torch.Tensor:
        """clamp(scale <a, b> / <b, b>): how much of a lies along b, capped (see :attr:`projection_clamp`)."""
        return (scale * self._dot(a, b) / self._dot(b, b)).clamp(-self.projection_clamp, self.projection_clamp)

    def _balanced(self, new, old, k, ctx):
        """(new - r old, r) with r = (1 - w) base + w clamp(<new, old>/<old, old>): the balanced difference
        of the probe step k (its weight w and base from the tables)."""
        w = ctx.coef("weight", k)
        r = (1.0 - w) * ctx.coef("base", k) + w * self._projection(new, old)
        return new - r * old, r

    def _step_ratio(self, r1, k, ctx):
        """The probe's divisor: sigmoid(temperature |r1|) times the log-SNR step ratio."""
        return torch.sigmoid(self.temperature * r1.abs()) * ctx.coef("rlogh", k)

    # -- the step -------------------------------------------------------------------------------------------

    def step(self, k, x, ctx):
        ring = [ctx.scratch(f"evodiff_m{j}") for j in range(3)]
        m = ring[k % 3]
        torch.mul(x, ctx.coef("conv_x", k), out=m).addcmul_(ctx.coef("conv_out", k), ctx.output(x, k))
        if self.hooks.active:
            self.hooks.apply(m, k, ctx)
        m_prev, m_prev2 = ring[(k - 1) % 3], ring[(k - 2) % 3]
        correct = ctx.plan("correct")[k]
        if correct is not None:
            x = self._correct(k - 1, x, m, m_prev, m_prev2, ctx, gated=correct == "gated")
        advance = ctx.plan("advance")[k]
        x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("m", k), m)  # the DDIM step every rule starts from
        if advance == "probe":
            d1, r1 = self._balanced(m, m_prev, k, ctx)
            x.add_(d1 * (ctx.coef("half_step", k) / self._step_ratio(r1, k, ctx)))
        elif advance == "evodiff":  # the reference's last step
            x.mul_(ctx.coef("last_shrink", k))
            x.add_(ctx.coef("half_step", k) * (m - ctx.coef("last_prev", k) * m_prev))
        return x

    def _correct(self, j, x, m_new, m, m_prev, ctx, gated):
        """Correct the probe of step j (x, at grid time j + 1) with the new call's x0 estimate ``m_new``;
        ``m`` and ``m_prev`` are the history the probe used."""
        d1, r1 = self._balanced(m, m_prev, j, ctx)
        d2, _ = self._balanced(m_new, m, j, ctx)
        rlogh = ctx.coef("rlogh", j)
        before, after = d1 / rlogh, rlogh * d2
        eta = 0.5 * torch.sigmoid((0.5 * self._projection(after + before, after - before)).abs())
        b_theta = (-eta / rlogh) * d1 + (rlogh * (1.0 - eta)) * d2
        # zeta* = clamp(<P1, D1>/<D1, D1>) / c with P1 = c/(2 r_i) (D1 - B_theta), the probe's excess over B_theta
        c, r_i = ctx.coef("c", j), self._step_ratio(r1, j, ctx)
        zeta_star = self._projection(d1 - b_theta, d1, scale=0.5 * c / r_i) / c
        shifted = zeta_star.abs() - self.zeta_shift
        if gated:
            # the projection of m on its difference quotient, sharpened near the data end (kappa ratio -> 1)
            consistency = torch.sigmoid(self._projection(m, (m - m_prev) / ctx.coef("h", j))
                                        * (2.0 - ctx.coef("ratio_sq", j)))
            zeta = torch.sigmoid(-shifted * consistency)
        else:
            zeta = torch.sigmoid(shifted)
        # x_{j+1} = DDIM + alpha c/2 B_theta/zeta, and the probe x was DDIM + alpha c/2 D1/r_i
        return x.add_(ctx.coef("half_step", j) * (b_theta / zeta - d1 / r_i))

    def fused_step(self):
        """No fused kernel: each step's coefficients are ratios of per-sample inner products of the state,
        reductions that the elementwise kernels of :mod:`solvers.kernels` do not take."""
        from .kernels import KernelUnsupported

        raise KernelUnsupported("EVODiff's coefficients are per-sample inner products of the state (a reduction "
                                "each step): no fused kernel")

    def __repr__(self):
        args = [f"inner_product={self.inner_product!r}"] if self.inner_product != "sample" else []
        if self.last_step != "ddim":
            args.append(f"last_step={self.last_step!r}")
        return f"{type(self).__name__}({', '.join(args)}{self.hooks.repr_args()})".replace("(, ", "(")
