"""Rex: algebraically reversible exponential (stochastic) Runge-Kutta solvers (Blasingame & Liu).

An explicit Runge-Kutta step in a variable y = x / w without linear part is coupled with the
McCallum-Foster scheme, so the pair (x, x_hat) has an exact algebraic inverse step that reuses the
same network calls and the same keyed noise: inversion and memory-constant gradients need nothing
stored.  The data forms (default) are the ones that stay stable while sampling; ``data_std`` moves
the weight to a Gaussian of that scale so that the inverse is also well conditioned; float32 runs
carry the pair in float64.  Forms, stability and the measured round trips: docs/inversion.md,
"Reversible solvers (Rex)" and "Measured round trips".
"""

from __future__ import annotations

import torch

from sde.validation import check_choice, check_in_range, check_nonnegative, check_predicts

from .base import Plan, Solver, grid_draw
from .tableau import TABLEAUX as ALL_TABLEAUX

__all__ = ["Reversible", "TABLEAUX"]

#: the fixed-step tableaux (:mod:`solvers.tableau`) a Reversible solver is built on
TABLEAUX = {name: tableau for name, tableau in ALL_TABLEAUX.items() if not tableau.embedded}

_FLOAT64_PLAN = "reversible_float64_tables"

#: per (predicts, stochastic): exponent e of the time variable s = e^{e lambda}, the quantity integrated
_FORMS = {("x0", False): (1.0, "x0"), ("eps", False): (-1.0, "eps"), ("x0", True): (2.0, "x0")}


class _Float64Steps:
    """A step context whose coefficients and noise are float64, for a run whose states are float32 (or
    half): the pair is carried and updated in float64 (its inverse is too ill-conditioned for float32
    rounding, see the module) while the network keeps its dtype.  The noise is the run's own keyed draw,
    cast, so the forward run and the inverse see the same increments."""

    def __init__(self, ctx, tables64: dict, cache: dict, ndim: int, device):
        self._ctx, self._raw, self._ndim, self._device = ctx, tables64, ndim, device
        self._tables = cache

    def coef(self, name, step):
        table = self._tables.get(name)
        if table is None:
            raw = self._raw[name]
            table = self._tables[name] = raw.reshape(raw.shape + (1,) * (self._ndim - 1)).to(self._device)
        return table[step]

    def noise(self, step, draw=0):
        return self._ctx.noise(step, draw).to(torch.float64)

    def output(self, x, *where):
        return self._ctx.output(x, *where)


class Reversible(Solver):
    """Rex: the algebraically reversible exponential Runge-Kutta solver built on ``tableau``.

    ``tableau`` is a name in :data:`TABLEAUX` (euler, midpoint, heun, ralston, ssprk3, rk4,
    rk38); ``coupling`` the McCallum-Foster zeta in (0, 1] (1: the plain MF scheme; below 1 it damps
    the drift between x and x_hat); ``predicts`` ``"x0"`` (data form, the default: stable on every
    schedule) or ``"eps"`` (noise form, ODE only: the most precise inverse, for VP/VE-like schedules
    where sigma/alpha stays moderate; see the module); ``eta`` 0 (the probability-flow ODE, default) or 1
    (the reverse SDE, with keyed Brownian increments; the reverse family between them has no exact
    exponential form here).  ``data_std`` (data forms, default 0: Rex's weights) is the scale c of the
    Gaussian N(0, c^2) the weight integrates exactly: set at or a little above the data's standard
    deviation, with a second-order tableau (``"heun"``), it makes the inverse precise to about the flow's
    own conditioning (see the module).  ``convergence_order`` is the tableau's (pathwise; weak order 1
    for the SDE); ``nfe_per_step`` is 2 x stages.

    The solver's state besides x is ``x_hat`` (``state_names``): :func:`samplers.sample` starts it
    at x_T unless ``solver_state={"x_hat": ...}`` is given; :meth:`forward_step` and
    :meth:`inverse_step` map the pair one step forward and back (out of place, differentiable), which
    :func:`samplers.invert` and :func:`samplers.sample_grad` use.
    """

    gaussian_only = True
    state_names = ("x_hat",)

    def __init__(self, tableau: str = "euler", coupling: float = 0.999, *, predicts: str = "x0",
                 eta: float = 0.0, data_std: float = 0.0):
        owner = "Reversible"
        self.tableau = check_choice("tableau", tableau, TABLEAUX, owner)
        self.coupling = check_in_range("coupling", coupling, 0.0, 1.0, owner, closed="right",
                                       why=" (the McCallum-Foster zeta)")
        self.predicts = check_predicts(predicts, owner=owner)
        self.eta = check_choice("eta", eta, (0.0, 1.0), owner, why=" (0: the probability-flow ODE, 1: the reverse "
                                "SDE; Rex has no exact form for the family between them)")
        self.stochastic = self.eta == 1.0
        if self.stochastic and predicts == "eps":
            raise ValueError(
                "Reversible: predicts='eps' with eta=1 is unstable: the reverse SDE's drift 2 eps d(sigma/alpha) "
                "makes the coupled pair's parasitic mode grow by about (sigma_max/s_data)^2 over a run, and x_hat "
                "diverges (measured: variance off by 1e12 at 50 steps); use predicts='x0'"
            )
        self.data_std = check_nonnegative("data_std", data_std, owner, why=" (the data scale the weight is exact for)")
        if self.data_std > 0.0 and predicts == "eps":
            raise ValueError("data_std applies to the data form (predicts='x0'); the noise form has no such weight")
        self.eta = float(self.eta)
        rk = TABLEAUX[tableau]
        self.a, self.b, self.c, order = rk.a, rk.b, rk.c, rk.order
        self.stages = len(self.b)
        if self.stochastic:  # weak order 1 for the SDE (the order-1.5 ShARK needs the Levy area)
            self.convergence_order, self.convergence_mode = 1, "weak"
        else:
            self.convergence_order = order
        self.nfe_per_step = 2 * self.stages
        self._exponent, self._quantity = _FORMS[(self.predicts, self.stochastic)]
        # the fractions of a step (in s) where a stage is taken: c_i going forward, 1 - c_i back
        fractions = sorted({float(c) for c in self.c} | {1.0 - float(c) for c in self.c})
        self._stage_names = {f: f"rex{j}" for j, f in enumerate(fractions) if f not in (0.0, 1.0)}

    # -- tables ---------------------------------------------------------------------------------

    def _weight(self, sde, t):
        if self.predicts == "eps":
            return sde.alpha(t)
        c2 = self.data_std ** 2
        if self.stochastic:  # (sigma^2 + c^2 alpha^2)/alpha, finite where sigma is small
            return sde.sigma(t) * torch.exp(-sde.log_snr(t)) + c2 * sde.alpha(t)
        return sde.sigma(t) * torch.sqrt(1.0 + c2 * torch.exp(2.0 * sde.log_snr(t)))

    def _time_variable(self, sde, t):
        snr = torch.exp(self._exponent * sde.log_snr(t))  # sigma/alpha, alpha/sigma or alpha^2/sigma^2
        c = self.data_std
        if self.predicts == "eps" or c == 0.0:
            return snr
        if self.stochastic:
            return torch.log1p(c * c * snr) / (c * c)
        return torch.asinh(c * snr) / c

    def _log_snr_at(self, s):
        """The log-SNR where the time variable equals ``s`` (the inverse of :meth:`_time_variable`)."""
        c = self.data_std
        if self.predicts == "x0" and c > 0.0:
            s = torch.expm1(c * c * s) / (c * c) if self.stochastic else torch.sinh(c * s) / c
        return torch.log(s) / self._exponent

    def _brownian_variance(self, s):
        """v(s) with the SDE's Brownian increment over a step of variance v(s_{n+1}) - v(s_n): the
        noise of dy is g/w dW, so v = alpha^2/(sigma^2 + c^2 alpha^2) = (1 - e^{-c^2 s})/c^2 (s itself at c = 0)."""
        c2 = self.data_std ** 2
        return s if c2 == 0.0 else -torch.expm1(-c2 * s) / c2

    def _linear_part(self, sde, t):
        """K with x0_hat = K x for Gaussian data N(0, c^2): what the weight already integrates exactly,
        so the slope is x0_hat - K x (zero for that Gaussian)."""
        c2 = self.data_std ** 2
        alpha = sde.alpha(t)
        return c2 * alpha / (c2 * alpha * alpha + sde.sigma(t) ** 2)

    def _fraction_times(self, sde, times, fraction):
        """SDE times at s_n + fraction h, (N, C)."""
        if fraction == 0.0:
            return times[:-1]
        if fraction == 1.0:
            return times[1:]
        s0, s1 = self._time_variable(sde, times[:-1]), self._time_variable(sde, times[1:])
        return sde.t_from_log_snr(self._log_snr_at(s0 + fraction * (s1 - s0)))

    def brownian_draws(self, model, times):
        """The step's W(s_{n+1}) - W(s_n) is an increment in the clock v(s(t)) (:meth:`_brownian_variance`)."""
        if not self.stochastic:
            return []
        sde = model.sde
        return [grid_draw(lambda t: self._brownian_variance(self._time_variable(sde, t)), times)]

    def stage_times(self, model, times):
        return {name: self._fraction_times(model.sde, times, f) for f, name in self._stage_names.items()}

    def prepare(self, model, times):
        sde = model.sde
        s0, s1 = self._time_variable(sde, times[:-1]), self._time_variable(sde, times[1:])
        h = s1 - s0
        w0, w1 = self._weight(sde, times[:-1]), self._weight(sde, times[1:])
        r = w1 / w0
        zeta = self.coupling
        tables = {"x_x": r * zeta, "x_hat": r * (1.0 - zeta), "r": r, "inv_r": 1.0 / r, "inv_x_x": 1.0 / (r * zeta)}
        if self.stochastic:  # W(s_{n+1}) - W(s_n) = root_h z
            root_h = torch.sqrt(self._brownian_variance(s1) - self._brownian_variance(s0))
        # forward Psi_h from (s_n, x_hat_n) and backward Psi_{-h} from (s_{n+1}, x_{n+1}), in x units
        for d, start_w, step, start in (("f", w0, h, 0.0), ("b", w1, -h, 1.0)):
            sign = 1.0 if d == "f" else -1.0
            for i, c in enumerate(self.c):
                frac = start + sign * c
                t_i = self._fraction_times(sde, times, frac)
                w_i = self._weight(sde, t_i)
                p, tables[f"{d}{i}_q"] = model.coefficients(self._quantity, t_i)
                tables[f"{d}{i}_p"] = p - self._linear_part(sde, t_i) if self.data_std > 0.0 else p
                if i == 0:
                    continue
                tables[f"{d}{i}_x"] = w_i / start_w
                for j, a_ij in enumerate(self.a[i - 1]):
                    if a_ij != 0.0:
                        tables[f"{d}{i}_k{j}"] = w_i * step * a_ij
                if self.stochastic:
                    # W(stage) - W(start), linear in s: c W going forward, -c W going back
                    tables[f"{d}{i}_z"] = sign * w_i * c * root_h
            # what the increment adds to its row: +w_{n+1} Psi_h to x, -w_{n+1} Psi_{-h} to x_hat (Psi_{-h}
            # carries -W, so both rows gain +w_{n+1} W)
            for i, b_i in enumerate(self.b):
                if b_i != 0.0:
                    tables[f"{d}_b{i}"] = sign * w1 * step * b_i
            if self.stochastic:
                tables[f"{d}_z"] = w1 * root_h
        # the driver casts tables to the states' dtype; a list is handed through untouched (a "plan"),
        # so float32 runs find the float64 originals here (see float64_context)
        tables[_FLOAT64_PLAN] = Plan([dict(tables)])
        return tables

    def table_names(self):
        """The tables of :meth:`step` and of :meth:`inverse_step` (``samplers.invert``, the adjoint)."""
        names = {"x_x", "x_hat", "r", "inv_r", "inv_x_x"}
        for d in ("f", "b"):
            for i in range(len(self.c)):
                names |= {f"{d}{i}_p", f"{d}{i}_q"}
                if i == 0:
                    continue
                names.add(f"{d}{i}_x")
                names |= {f"{d}{i}_k{j}" for j, a_ij in enumerate(self.a[i - 1]) if a_ij != 0.0}
                if self.stochastic:
                    names.add(f"{d}{i}_z")
            names |= {f"{d}_b{i}" for i, b_i in enumerate(self.b) if b_i != 0.0}
            if self.stochastic:
                names.add(f"{d}_z")
        return frozenset(names)

    def plan_names(self):
        return frozenset({_FLOAT64_PLAN})

    # -- steps ----------------------------------------------------------------------------------

    def _where(self, k: int, frac: float):
        if frac == 0.0:
            return (k,)
        if frac == 1.0:
            return (k + 1,)
        return (k, self._stage_names[frac])

    def _slopes(self, k, x, ctx, d: str):
        """The Runge-Kutta slopes of the forward (d='f', from x_hat_n at s_n) or backward (d='b', from
        x_{n+1} at s_{n+1}) increment, and the step's standard normal draw (None for the ODE)."""
        start, sign = (0.0, 1.0) if d == "f" else (1.0, -1.0)
        z = ctx.noise(k) if self.stochastic else None
        slopes: list[torch.Tensor] = []
        for i, c in enumerate(self.c):
            if i == 0:
                x_i = x
            else:
                x_i = x * ctx.coef(f"{d}{i}_x", k)
                for j, a_ij in enumerate(self.a[i - 1]):
                    if a_ij != 0.0:
                        x_i = torch.addcmul(x_i, ctx.coef(f"{d}{i}_k{j}", k), slopes[j])
                if z is not None:
                    x_i = torch.addcmul(x_i, ctx.coef(f"{d}{i}_z", k), z)
            out = ctx.output(x_i, *self._where(k, start + sign * c))
            if out.dtype != x_i.dtype:
                out = out.to(x_i.dtype)
            slopes.append(torch.addcmul(x_i * ctx.coef(f"{d}{i}_p", k), ctx.coef(f"{d}{i}_q", k), out))
        return slopes, z

    def _add_increment(self, row, k, slopes, z, ctx, d: str, value: float = 1.0, inplace: bool = False):
        """row + value * (the increment d adds to its row: w_{n+1} Psi_h to x, -w_{n+1} Psi_{-h} to
        x_hat); in place on ``row`` for the sampling driver, out of place (recorded by autograd) otherwise."""
        for i, b_i in enumerate(self.b):
            if b_i != 0.0:
                coef = ctx.coef(f"{d}_b{i}", k)
                row = row.addcmul_(coef, slopes[i], value=value) if inplace else \
                    torch.addcmul(row, coef, slopes[i], value=value)
        if z is not None:
            coef = ctx.coef(f"{d}_z", k)
            row = row.addcmul_(coef, z, value=value) if inplace else torch.addcmul(row, coef, z, value=value)
        return row

    def forward_step(self, k: int, x: torch.Tensor, x_hat: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{k+1}, x_hat_{k+1}) from the pair at grid time k; new tensors (autograd records them)."""
        slopes, z = self._slopes(k, x_hat, ctx, "f")
        x_next = self._add_increment(torch.addcmul(x * ctx.coef("x_x", k), ctx.coef("x_hat", k), x_hat),
                                     k, slopes, z, ctx, "f")
        slopes, z = self._slopes(k, x_next, ctx, "b")
        x_hat_next = self._add_increment(x_hat * ctx.coef("r", k), k, slopes, z, ctx, "b")
        return x_next, x_hat_next

    def inverse_step(self, k: int, x_next: torch.Tensor, x_hat_next: torch.Tensor,
                     ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_k, x_hat_k) from the pair at grid time k+1: the exact algebraic inverse of :meth:`forward_step`."""
        slopes, z = self._slopes(k, x_next, ctx, "b")
        x_hat = self._add_increment(x_hat_next, k, slopes, z, ctx, "b", value=-1.0) * ctx.coef("inv_r", k)
        slopes, z = self._slopes(k, x_hat, ctx, "f")
        x = self._add_increment(torch.addcmul(x_next, ctx.coef("x_hat", k), x_hat, value=-1.0),
                                k, slopes, z, ctx, "f", value=-1.0) * ctx.coef("inv_x_x", k)
        return x, x_hat

    def float64_context(self, ctx, like: torch.Tensor):
        """``ctx`` itself for float64 states; for others, a context with float64 coefficients and the
        run's noise cast to float64, in which :meth:`forward_step`/:meth:`inverse_step` update a float64
        pair (the network still sees the run's dtype).  :func:`samplers.sample` (through :meth:`step`),
        :func:`samplers.invert` and :func:`samplers.sample_grad` use it, so a float32 run, its inverse
        and its gradient do the same arithmetic."""
        if like.dtype == torch.float64:
            return ctx
        raw = ctx.plan(_FLOAT64_PLAN)[0]
        cache = self._float64_run(ctx).setdefault(id(raw), {})
        return _Float64Steps(ctx, raw, cache, like.dim(), like.device)

    @staticmethod
    def _float64_run(ctx) -> dict:
        """The float64 pair and device tables of a float32 (or half) run, kept on the run's scratch buffer
        "reversible_x_hat" (a context may be a per-step wrapper, e.g. Restart's, so it cannot hold them)."""
        anchor = ctx.scratch("reversible_x_hat")
        run = getattr(anchor, "_reversible_float64", None)
        if run is None:
            run = anchor._reversible_float64 = {}
        return run

    def step(self, k, x, ctx):
        """The sampling driver's step: :meth:`forward_step` updating x and the x_hat buffer in place
        (float64 states), or a float64 pair kept beside the run's state (other dtypes)."""
        if x.dtype != torch.float64:
            return self._step_float64(k, x, ctx)
        x_hat = ctx.scratch("reversible_x_hat")
        if k == 0:
            state = ctx.solver_state
            x_hat.copy_(state["x_hat"] if state else x)
        slopes, z = self._slopes(k, x_hat, ctx, "f")
        x = self._add_increment(x.mul_(ctx.coef("x_x", k)).addcmul_(ctx.coef("x_hat", k), x_hat),
                                k, slopes, z, ctx, "f", inplace=True)
        slopes, z = self._slopes(k, x, ctx, "b")
        self._add_increment(x_hat.mul_(ctx.coef("r", k)), k, slopes, z, ctx, "b", inplace=True)
        return x

    def _step_float64(self, k, x, ctx):
        run = self._float64_run(ctx)
        if k == 0:
            state = ctx.solver_state
            run["pair"] = (x.to(torch.float64), (state["x_hat"] if state else x).to(torch.float64))
        run["pair"] = self.forward_step(k, *run["pair"], self.float64_context(ctx, x))
        ctx.scratch("reversible_x_hat").copy_(run["pair"][1])  # the run's dtype, for read_state
        return x.copy_(run["pair"][0])

    def read_state(self, ctx, dtype=None) -> dict:
        """The driver's copy of the state besides x after the last step (``SampleInfo.solver_state``)."""
        x_hat = ctx.scratch("reversible_x_hat")
        return {"x_hat": x_hat.clone() if dtype is None else x_hat.to(dtype, copy=True)}

    def __repr__(self):
        extra = "" if self.predicts == "x0" else f", predicts={self.predicts!r}"
        extra += ", eta=1" if self.stochastic else ""
        extra += f", data_std={self.data_std:g}" if self.data_std > 0.0 else ""
        return f"Reversible(tableau={self.tableau!r}, coupling={self.coupling:g}{extra})"
