"""samplers.optimize_grid: never worse than its start, improves a bad start, valid grids, grid files, errors, CLI."""

import json

import pytest
import torch

from samplers import Model, grid, grid_metadata, load_grid, optimize_grid, problems, sample, save_grid, validate_grid
from samplers.optimize_grid import grid_distance
from sde import EDMSDE, VPSDE
from solvers import AdaptiveDPMSolver, DPMSolver, DPMSolverSDE, UniPC

F64 = torch.float64
SMALL = dict(shape=(32, 2), dtype=F64, reference_steps=100, candidates=40, progress=False)


class CountingNet:
    """The exact 2-D mixture network, counting its calls."""

    def __init__(self, sde):
        self.net = problems.mixture_2d().net(sde, "x0")
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


def model_2d(sde=None):
    sde = VPSDE() if sde is None else sde
    return Model(CountingNet(sde), sde, predicts="x0")


def distances(model, solver, *grids, reference_steps=100):
    """The objective recomputed independently: runs on ``grids`` against DPM-Solver(3) on a log-SNR grid."""
    times = grids[0]
    ref_grid = grid(model.sde, reference_steps, "log_snr", t_max=float(times[0]), t_min=float(times[-1]))
    reference = sample(model, DPMSolver(3), shape=(32, 2), grid=ref_grid, dtype=F64)
    return [grid_distance(sample(model, solver, shape=(32, 2), grid=g, dtype=F64), reference) for g in grids]


def test_improves_a_bad_start_and_returns_a_valid_grid():
    model = model_2d()
    bad = torch.tensor([1.0, 0.98, 0.96, 0.94, 0.001], dtype=F64)  # every step but the last near t_max
    found = {}
    for method in ("dp", "descent", "dp+descent"):
        result = optimize_grid(model, DPMSolver(2), 5, start=bad, method=method, max_evals=25, **SMALL)
        times = result.times
        assert times.shape == (5,) and times.dtype == F64
        assert times[0] == bad[0] and times[-1] == bad[-1]  # the ends are kept exactly
        assert bool((times[1:] < times[:-1]).all())
        validate_grid(model.sde, times)
        assert result.objective < 0.5 * result.objective_start, (method, result.objective, result.objective_start)
        assert result.evaluations <= 25
        found[method] = result
    # the reported numbers are the distances a user measures
    start_distance, *method_distances = distances(model, DPMSolver(2), bad, *(r.times for r in found.values()))
    for result, distance in zip(found.values(), method_distances):
        assert result.objective == pytest.approx(distance, rel=1e-12)
        assert result.objective_start == pytest.approx(start_distance, rel=1e-12)


def test_never_worse_than_its_start():
    model = model_2d()
    good = optimize_grid(model, UniPC(), 5, max_evals=40, **SMALL)
    assert good.objective <= good.objective_start
    # from a start better than what the dynamic programme finds, the DP grid must be rejected
    again = optimize_grid(model, UniPC(), 5, start=good.times, method="dp", **SMALL)
    assert again.evaluations == 2  # the start and the DP grid were both run ...
    assert len(again.history) == 1  # ... and the DP grid was not better
    assert torch.equal(again.times, good.times) and again.objective == again.objective_start
    # descent from a local optimum: no move helps, the start comes back unchanged
    polished = optimize_grid(model, UniPC(), 5, start=good.times, method="descent", max_evals=30, **SMALL)
    assert polished.objective <= polished.objective_start == pytest.approx(good.objective, rel=1e-12)


def test_on_edm_with_x_T_and_without_final_denoise():
    sde = EDMSDE()
    model = model_2d(sde)
    x_T = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    result = optimize_grid(model, DPMSolver(2), 4, x_T=x_T, final_denoise=False, max_evals=30, reference_steps=100,
                           candidates=40, progress=False)
    assert result.steps == 4 and not result.final_denoise and result.seed is None
    assert result.objective < result.objective_start
    assert result.times[0] == sde.t_max and result.times[-1] == sde.t_min


def test_grid_file_round_trip(tmp_path):
    model = model_2d()
    result = optimize_grid(model, DPMSolver(2), 4, max_evals=10, **SMALL)
    path = result.save(tmp_path / "grid.json")
    times = load_grid(path, sde=model.sde)
    assert torch.equal(times, result.times)  # float64 round trip is exact
    meta = grid_metadata(path)
    assert meta["sde"] == repr(model.sde) and meta["solver"] == repr(DPMSolver(2))
    assert meta["nfe"] == 4 and meta["seed"] == 0 and meta["final_denoise"] is True
    assert meta["objective"] == result.objective and meta["objective_start"] == result.objective_start
    x = sample(model, DPMSolver(2), shape=(8, 2), grid=load_grid(path), dtype=F64)
    assert torch.equal(x, sample(model, DPMSolver(2), shape=(8, 2), grid=result.times, dtype=F64))
    with pytest.raises(ValueError, match="was made for VPSDE"):
        load_grid(path, sde=EDMSDE())
    save_grid(tmp_path / "plain.json", [80.0, 1.0, 0.002], note="by hand")
    assert load_grid(tmp_path / "plain.json").tolist() == [80.0, 1.0, 0.002]
    assert grid_metadata(tmp_path / "plain.json") == {"note": "by hand"}


@pytest.mark.parametrize("content, match", [
    ("not json", "is not JSON"),
    (json.dumps({"times": [1.0, 0.5]}), "is not a grid file"),
    (json.dumps({"format": "samplers.grid", "version": 9, "times": [1.0, 0.5]}), "version 9"),
    (json.dumps({"format": "samplers.grid", "version": 1, "times": [1.0, 1.0]}), "strictly decreasing"),
    (json.dumps({"format": "samplers.grid", "version": 1, "times": ["a"]}), "list of numbers"),
])
def test_bad_grid_files(tmp_path, content, match):
    path = tmp_path / "g.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_grid(path)


def test_save_grid_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="strictly decreasing"):
        save_grid(tmp_path / "g.json", [0.5, 1.0])
    with pytest.raises(ValueError, match="metadata 'model' must be a JSON value"):
        save_grid(tmp_path / "g.json", [1.0, 0.5], model=object())


@pytest.mark.parametrize("solver, nfe, kwargs, error, match", [
    (DPMSolver(2), 0, {}, ValueError, "nfe must be an int >= 1"),
    (DPMSolver(2), True, {}, ValueError, "nfe must be an int"),
    (DPMSolver(2), 1, {}, ValueError, "nfe=1 leaves no step"),
    (AdaptiveDPMSolver(), 5, {}, ValueError, "needs a fixed-grid solver"),
    (DPMSolverSDE(2), 5, {}, ValueError, "needs a deterministic solver"),
    ("dpm", 5, {}, TypeError, "solver must be a solvers.Solver"),
    (DPMSolver(2), 5, {"start": torch.tensor([1.0, 0.5, 0.001], dtype=F64)}, ValueError, "start has 2 steps"),
    (DPMSolver(2), 3, {"start": torch.tensor([[1.0], [0.5], [0.001]], dtype=F64)}, ValueError, "one grid shared"),
    (DPMSolver(2), 3, {"start": torch.tensor([1.0, 0.001, 0.5], dtype=F64)}, ValueError, "strictly decreasing"),
    (DPMSolver(2), 5, {"method": "newton"}, ValueError, "method must be"),
    (DPMSolver(2), 5, {"max_evals": 0}, ValueError, "max_evals must be"),
    (DPMSolver(2), 5, {"reference_steps": 1}, ValueError, "reference_steps must be"),
    (DPMSolver(2), 5, {"reference_solver": DPMSolverSDE(2)}, ValueError, "needs a deterministic solver"),
])
def test_bad_input_is_refused_before_any_network_call(solver, nfe, kwargs, error, match):
    model = model_2d()
    with pytest.raises(error, match=match):
        optimize_grid(model, solver, nfe, shape=(4, 2), **kwargs)
    assert model.net.calls == 0
    with pytest.raises(TypeError, match="model must be a samplers.Model"):
        optimize_grid(model.net, DPMSolver(2), 5, shape=(4, 2))


def test_cli_writes_a_loadable_grid(tmp_path, capsys):
    from samplers.__main__ import main

    out = tmp_path / "grid.json"
    assert main(["grid", "--problem", "2d", "--sde", "vp", "--solver", "dpm++2m", "--nfe", "4", "--out", str(out),
                 "--batch-size", "16", "--max-evals", "6", "--reference-steps", "50", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    times = load_grid(out, sde=VPSDE())
    assert times.shape == (4,) and grid_metadata(out)["nfe"] == 4
    assert main(["grid", "--problem", "2d", "--sde", "vp", "--solver", "em", "--nfe", "4", "--out",
                 str(tmp_path / "no.json"), "--no-progress"]) == 2
    assert "deterministic solver" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grid", "--model", "tests.nope:net", "--solver", "unipc", "--nfe", "4", "--out", str(out)])


def test_bench_grid_runs():
    from samplers.cli.bench_grid import bench_grid

    rows = bench_grid(problems=("8d",), sdes=("vp",), budgets=(3,), calibration=8, held_out=8, max_evals=4)
    assert len(rows) == 2 and all(r["optimised"] > 0 and r["evaluations"] <= 4 for r in rows)


def test_a_grid_ending_at_sigma_zero_keeps_that_end_and_spends_nfe_calls():
    sde = EDMSDE()
    model = model_2d(sde)
    start = grid(sde, 4, to_zero=True)
    result = optimize_grid(model, UniPC(), 4, start=start, max_evals=20, **SMALL)
    assert result.steps == 4 and not result.final_denoise and "to sigma = 0" in result.reference
    assert result.times[0] == start[0] and result.times[-1] == 0.0
    assert float(result.times[-2]) >= sde.t_min  # the last network call stays inside the SDE's range
    assert result.objective < result.objective_start
    _, info = sample(model, UniPC(), shape=(4, 2), grid=result.times, dtype=F64, return_info=True)
    assert info.nfe == 4
    with pytest.raises(ValueError, match="already ends at sigma = 0|ends at sigma = 0"):
        optimize_grid(model, UniPC(), 4, start=start, final_denoise=True, **SMALL)
    with pytest.raises(ValueError, match="start has 4 steps"):
        optimize_grid(model, UniPC(), 5, start=start, **SMALL)


def test_fitted_grid_keeps_its_times_apart_and_runs_in_float32():
    # fitted in float64, a grid may not exploit a near-coincident pair of times (a finite-difference
    # derivative for the multistep solver that float32 rounding destroys); the case that blew up to |x| = 2e4
    from samplers import grid_for_nfe

    sde = EDMSDE()
    model = Model(problems.mixture_2d().net(sde, "x0"), sde, predicts="x0")
    solver = UniPC(lower_order_final=False)
    result = optimize_grid(model, solver, 8, shape=(256, 2), seed=12345, start=grid_for_nfe(sde, solver, 8),
                           dtype=F64, progress=False)
    times = result.times
    position = (times[1:-1] - times[2:]) / (times[:-2] - times[2:])
    assert bool(((position > 0.0179) & (position < 0.9821)).all()), times.tolist()
    x_T = 80.0 * torch.randn(2000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x32 = sample(model, solver, x_T=x_T.float(), grid=times)
    x64 = sample(model, solver, x_T=x_T, grid=times)
    assert (x32.double() - x64).abs().max().item() < 1e-3
