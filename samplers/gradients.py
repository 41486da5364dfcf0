"""Gradients through sampling: d(samples)/d(x_T, conditioning, network parameters) with torch.autograd.

:func:`sample_grad` has three modes: ``"backprop"`` (autograd records every step), ``"reversible"``
(:class:`solvers.Reversible`: the backward pass rebuilds each step with the exact inverse step, so
memory does not grow with the steps, at about 3x the calls) and ``"adjoint"`` (AdjointDEIS-1 for
any deterministic fixed-grid solver and EulerMaruyama / Heun / DPMSolverSDE: the gradient of the
exact flow up to O(h), not of the discrete map).  Modes, formulas and measured memory and errors:
docs/inversion.md, "Gradients through sampling".
"""

from __future__ import annotations

import torch

from sde import GaussianSDE
from sde.validation import check_choice, check_flag
from solvers import Solver
from solvers.reversible import Reversible

from .driver import check_solver_state, fixed_grid_context, plan_run
from .model import Model

__all__ = ["sample_grad", "GRAD_MODES", "SavedTensorMeter"]

GRAD_MODES = ("backprop", "reversible", "adjoint")


class SavedTensorMeter:
    """Counts the bytes autograd holds for backward while active: ``peak`` (bytes) and ``live``.

    A context manager over :func:`torch.autograd.graph.saved_tensors_hooks`: each tensor saved for
    backward is counted once per storage until the graph that saved it is freed.  This is the memory
    that grows with the number of steps under plain backprop (activations of every network call) and
    stays at one step's worth in the memory-constant mode; it leaves out the few state-sized tensors
    every mode holds.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple[int, int], int] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor):
        meter = self
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())

        class Holder:
            __slots__ = ("tensor",)

            def __init__(self, t):
                self.tensor = t
                refs = meter._refs.get(key, 0)
                if refs == 0:
                    meter.live += key[1]
                    meter.peak = max(meter.peak, meter.live)
                meter._refs[key] = refs + 1

            def __del__(self):
                refs = meter._refs.get(key, 0) - 1
                if refs <= 0:
                    meter._refs.pop(key, None)
                    meter.live -= key[1]
                else:
                    meter._refs[key] = refs

        return Holder(tensor)

    @staticmethod
    def _unpack(holder):
        return holder.tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def _leaves(model: Model, cond: dict, params):
    """The tensors besides x_T that gradients flow to: the net's parameters (or ``params``) and the
    conditioning tensors that require grad."""
    if params is None:
        params = list(model.net.parameters()) if isinstance(model.net, torch.nn.Module) else []
    params = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
    cond_tensors = [v for v in cond.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return params + cond_tensors


def _grads_to(outputs, grad_outputs, inputs):
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)]


class _ReversibleSolve(torch.autograd.Function):
    """(x_T, x_hat_T, *leaves) -> (x_0, x_hat_0) with the pair rebuilt by inverse steps in backward."""

    @staticmethod
    def forward(fctx, run, x, x_hat, *leaves):
        solver, ctx, n_steps, _ = run
        with torch.no_grad():
            for k in range(n_steps):
                x, x_hat = solver.forward_step(k, x, x_hat, ctx)
        fctx.run = run
        fctx.n_leaves = len(leaves)
        fctx.save_for_backward(x, x_hat)
        return x.clone(), x_hat.clone()

    @staticmethod
    def backward(fctx, grad_x, grad_x_hat):
        solver, ctx, n_steps, leaves = fctx.run
        x, x_hat = fctx.saved_tensors
        grad_leaves = [torch.zeros_like(leaf) for leaf in leaves]
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        grad_x_hat = torch.zeros_like(x_hat) if grad_x_hat is None else grad_x_hat
        for k in reversed(range(n_steps)):
            with torch.no_grad():
                x, x_hat = solver.inverse_step(k, x, x_hat, ctx)
            with torch.enable_grad():
                x_in, x_hat_in = x.detach().requires_grad_(True), x_hat.detach().requires_grad_(True)
                x_next, x_hat_next = solver.forward_step(k, x_in, x_hat_in, ctx)
                grads = _grads_to((x_next, x_hat_next), (grad_x, grad_x_hat), [x_in, x_hat_in, *leaves])
            grad_x, grad_x_hat = grads[0], grads[1]
            for acc, g in zip(grad_leaves, grads[2:], strict=True):
                acc.add_(g)
        return (None, grad_x, grad_x_hat, *grad_leaves)


class _AdjointSolve(torch.autograd.Function):
    """(x_T, *leaves) -> x_0 by any deterministic solver; backward is AdjointDEIS-1."""

    @staticmethod
    def forward(fctx, run, x, *leaves):
        solver, ctx, n_steps, _model, _table_times, _ = run
        trajectory = [x.detach().clone()]
        with torch.no_grad():
            x = x.detach().clone()
            for k in range(n_steps):
                x = solver.step(k, x, ctx)
                trajectory.append(x.clone())
        fctx.run, fctx.trajectory = run, trajectory
        return x.clone()

    @staticmethod
    def backward(fctx, grad_x):
        _solver, ctx, n_steps, model, table_times, score_weight = fctx.run
        sde = model.sde
        leaves = ctx.grad_leaves
        grad_leaves = [torch.zeros_like(leaf) for leaf in leaves]
        x_like = fctx.trajectory[0]
        shape = (-1,) + (1,) * (x_like.dim() - 1)

        def column(values):
            return values.to(device=x_like.device, dtype=x_like.dtype).reshape(shape)

        alpha, lam = sde.alpha(table_times), sde.log_snr(table_times)
        p_eps, q_eps = model.coefficients("eps", table_times)
        a_x = grad_x.detach()
        for k in reversed(range(n_steps)):
            t, s = k + 1, k  # from t (less noise) to s (noisier)
            with torch.enable_grad():
                x_t = fctx.trajectory[t].detach().requires_grad_(True)
                eps = column(p_eps[t]) * x_t + column(q_eps[t]) * ctx.output(x_t, t).to(x_t.dtype)
                grads = _grads_to(eps, a_x, [x_t, *leaves])
            # a_x(s) = (alpha_t/alpha_s) a_x(t) + (alpha_t^2/alpha_s) (e^{-lambda_t} - e^{-lambda_s}) v_x,
            # a_theta(s) = a_theta(t) + alpha_t (e^{-lambda_t} - e^{-lambda_s}) v_theta
            # the SDE's drift carries the score term score_weight times (2 for the reverse SDE)
            integral = score_weight * (torch.exp(-lam[t]) - torch.exp(-lam[s]))
            a_x = (column(alpha[t] / alpha[s]) * a_x
                   + column(alpha[t] ** 2 / alpha[s] * integral) * grads[0])
            # one weight for the batch: sample_grad refuses per-sample grids when there are leaves
            weight = float(alpha[t, 0] * integral[0])
            for acc, g in zip(grad_leaves, grads[1:], strict=True):
                acc.add_(g, alpha=weight)
        return (None, a_x, *grad_leaves)


def sample_grad(model: Model, solver: Solver, x_T: torch.Tensor, *, steps: int | None = None, grid=None,
                grid_kind: str | None = None, mode: str | None = None, seed=0, sample_index=None,
                cond: dict | None = None, final_denoise: bool = True, x_hat_T: torch.Tensor | None = None,
                params=None, return_state: bool = False, noise: str = "step"):
    """Samples from ``x_T`` that torch.autograd can differentiate with respect to ``x_T``, tensors in
    ``cond`` that require grad, and the network's parameters.

    ``mode``: ``"backprop"``, ``"reversible"`` (memory independent of the number of steps; the default
    for :class:`solvers.Reversible`) or ``"adjoint"`` (AdjointDEIS-1: any deterministic solver and
    EulerMaruyama/Heun/DPMSolverSDE; the default for other solvers); see the module.  ``params``: the
    tensors the network depends on (default: ``model.net.parameters()`` when it is an ``nn.Module``);
    the memory-constant and adjoint
    modes route gradients only to these, to ``x_T`` and to ``cond``.  ``x_hat_T``: Reversible's
    second state at x_T (default x_T).  ``return_state``: also return Reversible's final ``x_hat``
    (before final denoising).  ``noise``: ``"step"`` or ``"path"``, as :func:`samplers.sample`.  x_T is
    float32 or float64; a float32 run carries Reversible's pair in float64, as :func:`samplers.sample` does
    (the memory-constant mode rebuilds the pair by inverse steps, which float32 arithmetic cannot do for
    Rex's SDE).
    """
    if mode is None:
        mode = "reversible" if isinstance(solver, Reversible) else "adjoint"
    check_choice("mode", mode, GRAD_MODES)
    if isinstance(x_T, torch.Tensor) and x_T.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x_T must be float32 or float64 to differentiate through sampling, got {x_T.dtype}")
    plan = plan_run(model, solver, x=x_T, state_name="x_T", steps=steps, grid=grid, grid_kind=grid_kind, seed=seed,
                    sample_index=sample_index, cond=cond, fixed_grid_for="sample_grad", own_state=False,
                    noise_mode=noise)
    table_times, times, keyed, cond, dtype = plan.table_times, plan.times, plan.noise, plan.cond, plan.dtype
    final_denoise = check_flag("final_denoise", final_denoise)
    return_state = check_flag("return_state", return_state)
    reversible = isinstance(solver, Reversible)
    if mode in ("backprop", "reversible") and not reversible:
        raise ValueError(f"mode={mode!r} differentiates through solvers.Reversible steps; {solver!r} updates its "
                         "state in place: use mode='adjoint' (the continuous adjoint) or a Reversible solver")
    score_weight = solver.score_weight
    if mode == "adjoint" and score_weight is None:
        raise ValueError(f"mode='adjoint' needs the drift the solver follows (its score_weight: the ODE solvers, "
                         f"EulerMaruyama/Heun and DPMSolverSDE declare one); {solver!r} declares none")
    if mode == "adjoint":
        if not isinstance(model.sde, GaussianSDE):
            raise ValueError(f"mode='adjoint' (AdjointDEIS-1, in alpha and the log-SNR) needs a Gaussian-marginal "
                             f"SDE; {model.sde!r} is not one")
        # the AdjointDEIS-1 rule divides by alpha and weights by e^-lambda = sigma/alpha: a grid time
        # where alpha = 0 (rectified flow at t = 1) would turn the gradient into NaN
        alpha = model.sde.alpha(table_times)
        singular = ~(alpha > 0) | ~torch.isfinite(model.sde.log_snr(table_times))
        if bool(singular.any()):
            k = int(torch.nonzero(singular.any(dim=1))[0])
            raise ValueError(f"mode='adjoint' needs alpha > 0 at every grid time; {model.sde!r} has alpha = 0 at "
                             f"t={float(table_times[k].max()):g} (grid index {k}): end the grid below that time or "
                             "use a Reversible solver (mode='reversible')")
    if (x_hat_T is not None or return_state) and not reversible:
        raise ValueError(f"x_hat_T/return_state concern solvers.Reversible's second state; {solver!r} has none")
    n_steps = table_times.shape[0] - 1
    ctx = fixed_grid_context(model, solver, x_T.detach(), table_times, cond, keyed, dtype)
    ctx.grad_leaves = _leaves(model, cond, params)
    if isinstance(solver, Reversible):
        if x_hat_T is None:
            x_hat = x_T
        else:
            check_solver_state(solver, {"x_hat": x_hat_T}, x_T)  # the checks; x_hat_T keeps its graph
            x_hat = x_hat_T.to(device=x_T.device, dtype=x_T.dtype)
        # the pair in float64 (casts are no-ops for float64 runs), with float64 tables and the run's noise
        steps_ctx = solver.float64_context(ctx, x_T)
        x, x_hat = x_T.to(torch.float64), x_hat.to(torch.float64)
        if mode == "backprop":
            for k in range(n_steps):
                x, x_hat = solver.forward_step(k, x, x_hat, steps_ctx)
        else:
            x, x_hat = _ReversibleSolve.apply((solver, steps_ctx, n_steps, ctx.grad_leaves), x, x_hat,
                                              *ctx.grad_leaves)
        x, x_hat = x.to(x_T.dtype), x_hat.to(x_T.dtype)
    else:
        if times.dim() == 2 and times.shape[1] > 1 and ctx.grad_leaves:
            raise ValueError("mode='adjoint' with parameters or cond needs one grid shared by the batch")
        x = _AdjointSolve.apply((solver, ctx, n_steps, model, table_times, score_weight), x_T, *ctx.grad_leaves)
    if final_denoise:
        x = model.predict("x0", x, table_times[-1].expand(x.shape[0]), **cond)
    if not return_state:
        return x
    return x, {"x_hat": x_hat}
