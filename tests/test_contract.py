"""The tables and plans a fixed-grid solver declares (``Solver.table_names``/``plan_names``): every built-in
solver declares exactly what its steps read, and the driver refuses a prepare that misses a declared name
right after ``prepare``, before any network call."""

from __future__ import annotations

import pytest
import torch
from golden_runs import solver_runs

from samplers import Model, invert, problems, sample, sample_grad
from samplers.driver import FixedGridContext, plan_run
from sde import EDMSDE, VPSDE, DirichletSDE
from solvers import (
    ERSDE,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    EulerMaruyama,
    EVODiff,
    Heun,
    JacobiEulerMaruyama,
    Plan,
    PredictorCorrector,
    Restart,
    Reversible,
    Solver,
    UniPC,
)
from solvers.pc import Langevin

F64 = torch.float64


def _identity(x0, t):
    return x0


def fixed_grid_runs() -> dict[str, callable]:
    """Every fixed-grid configuration of the golden runs, plus the x0 hooks, composites of composites and
    Restart around a multistep solver."""
    runs = {name: make for name, make in solver_runs().items() if not name.startswith("Adaptive")}
    for order in (1, 2, 3):
        runs[f"DPMSolver-{order}-hooked"] = lambda o=order: DPMSolver(order=o, correct_x0=_identity)
        runs[f"DPMSolver-{order}-singlestep-hooked"] = (
            lambda o=order: DPMSolver(order=o, variant="singlestep", correct_x0=_identity))
        runs[f"UniPC-{order}-hooked"] = lambda o=order: UniPC(order=o, correct_x0=_identity)
        runs[f"DPMSolverSDE-{order}-hooked"] = lambda o=order: DPMSolverSDE(order=o, eta=0.5, correct_x0=_identity)
        runs[f"ERSDE-{order}-hooked"] = lambda o=order: ERSDE(order=o, correct_x0=_identity)
    runs["DPMSolver-thresholded"] = lambda: DPMSolver(thresholding=True)
    runs["EVODiff"] = lambda: EVODiff()
    runs["EVODiff-reference-last-step-hooked"] = lambda: EVODiff(last_step="evodiff", correct_x0=_identity)
    runs["PC-heun-langevin"] = lambda: PredictorCorrector(Heun(), Langevin())
    runs["PC-nested"] = lambda: PredictorCorrector(PredictorCorrector(EulerMaruyama()))
    runs["PC-no-corrector"] = lambda: PredictorCorrector(n_corrector_steps=0)
    runs["Restart-dpm2"] = lambda: Restart(ode_solver=DPMSolver(order=2))
    runs["Restart-intervals"] = lambda: Restart(intervals=[(0.1, 2.0, 2, 2)])
    runs["Restart-dpm2-intervals"] = lambda: Restart(ode_solver=DPMSolver(order=2), intervals=[(0.1, 2.0, 3, 1)])
    runs["Restart-singlestep-intervals"] = lambda: Restart(ode_solver=DPMSolver(order=3, variant="singlestep"),
                                                           intervals=[(0.1, 2.0, 2, 1)])
    runs["Reversible-rk4-sde"] = lambda: Reversible(tableau="rk4", eta=1)
    return runs


def _record_reads(monkeypatch) -> tuple[set, set]:
    """(tables, plans) read through the driver's context from now on."""
    tables, plans = set(), set()
    coef, plan = FixedGridContext.coef, FixedGridContext.plan

    def recording_coef(self, name, step):
        tables.add(name)
        return coef(self, name, step)

    def recording_plan(self, name):
        plans.add(name)
        return plan(self, name)

    monkeypatch.setattr(FixedGridContext, "coef", recording_coef)
    monkeypatch.setattr(FixedGridContext, "plan", recording_plan)
    return tables, plans


def _prepared(solver, model, steps):
    """What prepare returns on the run's grid (the grid `sample` builds for a float64 run)."""
    run = plan_run(model, solver, shape=(2, 2), steps=steps, seed=0, dtype=F64)
    return solver.prepare(model, run.table_times)


#: tables a step reads where the "history" plan written with them says so (solvers.multistep.history_names)
HISTORY_CONVERSIONS = {"conv_x", "conv_out", "conv_ratio"}


def _undeclared_ok(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in HISTORY_CONVERSIONS


@pytest.mark.parametrize("sde_name", ["VP", "EDM"])
@pytest.mark.parametrize("run_id", list(fixed_grid_runs()))
def test_declared_tables_and_plans_are_prepared_and_read(run_id, sde_name, monkeypatch):
    sde = {"VP": VPSDE, "EDM": EDMSDE}[sde_name]()
    model = Model(problems.mixture_2d().net(sde, "x0"), sde, predicts="x0")
    steps = 10
    tables, plans = _record_reads(monkeypatch)
    solver = fixed_grid_runs()[run_id]()
    # float64 reads the tables through the context, float32 the Reversible's float64 plan
    for dtype in (F64, torch.float32):
        sample(model, solver, shape=(3, 2), steps=steps, seed=1, dtype=dtype)
    if isinstance(solver, Reversible):  # the inverse steps read the inverse tables
        invert(model, solver, torch.zeros(3, 2, dtype=F64), steps=steps, seed=1)
    declared_tables, declared_plans = solver.table_names(), solver.plan_names()
    assert declared_tables and isinstance(declared_tables, frozenset) and isinstance(declared_plans, frozenset)

    prepared = _prepared(solver, model, steps)
    assert declared_tables <= {n for n, v in prepared.items() if not isinstance(v, Plan)}
    assert declared_plans <= {n for n, v in prepared.items() if isinstance(v, Plan)}
    assert {n for n in tables - declared_tables if not _undeclared_ok(n)} == set(), "read but not declared"
    assert plans - declared_plans == set(), "plans read but not declared"
    assert declared_tables - tables == set(), "declared but never read"
    assert declared_plans - plans == set(), "plans declared but never read"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_simplex_solver_declares_what_it_reads(eta, monkeypatch):
    sde = DirichletSDE(3)
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    tables, plans = _record_reads(monkeypatch)
    solver = JacobiEulerMaruyama(eta=eta)
    sample(model, solver, shape=(4, 2), steps=4, seed=0, dtype=F64, final_denoise=False)
    assert tables == solver.table_names() and plans == solver.plan_names()


class CountingNet:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


def _counting_model():
    sde = VPSDE()
    net = CountingNet(problems.mixture_2d().net(sde, "x0"))
    return Model(net, sde, predicts="x0"), net


class MisspeltEuler(Euler):
    def prepare(self, model, times):
        tables = super().prepare(model, times)
        tables["ot"] = tables.pop("out")
        return tables


class PlanAsTable(DPMSolver):
    def prepare(self, model, times):
        tables = super().prepare(model, times)
        tables["history"] = torch.zeros(times.shape[0] - 1, times.shape[1], dtype=F64)
        return tables


def test_a_misspelt_table_fails_after_prepare_before_any_network_call():
    model, net = _counting_model()
    with pytest.raises(ValueError) as err:
        sample(model, MisspeltEuler(), shape=(3, 2), steps=4, seed=0, dtype=F64)
    assert net.calls == 0
    message = str(err.value)
    assert "MisspeltEuler" in message and "'out'" in message and "did you mean 'ot'?" in message
    assert "missing from what prepare returned: the tables ['ot', 'x'] and the plans []" in message


def test_a_plan_returned_as_a_table_names_the_kind():
    model, net = _counting_model()
    with pytest.raises(ValueError, match="plans 'history' \\(prepare returned it as a coefficient table"):
        sample(model, PlanAsTable(order=2), shape=(3, 2), steps=4, seed=0, dtype=F64)
    assert net.calls == 0


@pytest.mark.parametrize("entry", ["invert", "sample_grad", "restart"])
def test_every_entry_point_checks_before_the_network(entry):
    model, net = _counting_model()
    with pytest.raises(ValueError, match="out' \\(did you mean"):
        if entry == "invert":
            invert(model, MisspeltEuler(), torch.zeros(3, 2, dtype=F64), steps=4, seed=0)
        elif entry == "sample_grad":
            sample_grad(model, MisspeltEuler(), torch.zeros(3, 2, dtype=F64, requires_grad=True), steps=4, seed=0)
        else:  # a composite declares its part's names under the part's prefix
            sample(model, Restart(ode_solver=MisspeltEuler()), shape=(3, 2), steps=6, seed=0, dtype=F64)
    assert net.calls == 0


def test_a_corrector_misspelling_is_named_under_its_prefix():
    class MisspeltLangevin(Langevin):
        def prepare(self, model, times):
            tables = super().prepare(model, times)
            tables["alfa"] = tables.pop("alpha")
            return tables

    model, net = _counting_model()
    with pytest.raises(ValueError, match="'pc_corrector.alpha' \\(did you mean 'pc_corrector.alfa'\\?\\)"):
        sample(model, PredictorCorrector(Euler(), MisspeltLangevin()), shape=(3, 2), steps=4, seed=0, dtype=F64)
    assert net.calls == 0


def test_a_custom_solver_that_declares_nothing_keeps_working():
    class Custom(Solver):
        def prepare(self, model, times):
            dt = times[1:] - times[:-1]
            return {"dt": dt}

        def step(self, k, x, ctx):
            ctx.output(x, k)
            return x.add_(ctx.coef("dt", k) * 0.0)

    model, net = _counting_model()
    assert Custom().table_names() == frozenset() and Custom().plan_names() == frozenset()
    sample(model, Custom(), shape=(3, 2), steps=3, seed=0, dtype=F64, final_denoise=False)
    assert net.calls == 3
