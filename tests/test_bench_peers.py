"""``bench quality`` with peers side by side, and ``bench convergence`` (small runs)."""

from __future__ import annotations

import json
import math

import pytest

from samplers.cli import bench
from samplers.cli.convergence import fitted_order, measure_orders
from samplers.cli.peers import PeerProblem, available_peers, missing_peers, peer_list, run_peers
from solvers import Euler, EulerMaruyama, Heun


def test_fitted_order_is_the_slope_and_refuses_bad_errors():
    steps = [10, 20, 40, 80]
    assert fitted_order(steps, [3.0 / n**2 for n in steps]) == pytest.approx(2.0)
    assert fitted_order(steps, [1.0 / n for n in steps]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        fitted_order(steps, [1.0, 0.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="same length"):
        fitted_order([1, 2], [1.0])


def test_measured_orders_match_theory_for_euler_heun_and_em():
    rows = measure_orders(("edm",), solver_list=[("Euler", Euler), ("Heun", Heun)], ode_steps=(32, 64, 128))
    for row in rows:
        assert row["kind"] == "pathwise"
        assert abs(row["measured"] - row["theory"]) <= 0.15, row
    (em,) = measure_orders(("vp",), solver_list=[("EM", EulerMaruyama)], sde_steps=(16, 32, 64),
                           weak_samples=400_000)
    assert em["kind"] == "weak" and em["theory"] == 1.0 and not em["mc_limited"]
    assert abs(em["measured"] - 1.0) <= 0.25, em


def test_unknown_sde_and_bad_step_lists_are_refused():
    with pytest.raises(ValueError, match="sdes must be among"):
        measure_orders(("nope",), solver_list=[("Euler", Euler)])
    for bad in ((16,), (16, 16), (0, 16), (8.5, 16)):
        with pytest.raises(ValueError, match="ode_steps must hold at least 2 different positive"):
            measure_orders(("edm",), solver_list=[("Euler", Euler)], ode_steps=bad)
    with pytest.raises(ValueError, match="sde_steps must hold"):
        measure_orders(("edm",), solver_list=[("EM", EulerMaruyama)], sde_steps=(32,))
    with pytest.raises(ValueError, match="weak_samples must be >= 1000"):
        measure_orders(("vp",), solver_list=[("EM", EulerMaruyama)], weak_samples=999)


def test_peer_bookkeeping():
    assert set(available_peers()) | set(missing_peers()) == {"k-diffusion", "diffusers", "torchsde"}
    with pytest.raises(ValueError, match="libraries must be among"):
        peer_list(["scipy"])
    for peer in peer_list():
        assert peer.steps_for_nfe(100) >= 1 and peer.nfe(peer.steps_for_nfe(100)) <= 100


@pytest.mark.skipif(not available_peers(), reason="no peer library installed")
def test_peers_count_their_network_calls_and_converge():
    """The NFE a peer declares is the NFE it makes, and more steps mean a smaller error."""
    from samplers import Model, problems
    from samplers.cli.registry import SDES

    sde = SDES["edm"]()
    mixture = problems.mixture_2d()
    exact = mixture.sample(600)
    for peer in peer_list():
        if peer.sdes and "edm" not in peer.sdes:
            continue
        records, skipped = run_peers(sde="edm", problem="2d", exact=exact, budgets=(peer.nfe(2), peer.nfe(40)),
                                     samples=600, peers=[peer])
        assert not skipped, skipped
        assert [r["nfe"] for r in records] == [peer.nfe(2), peer.nfe(40)], peer.label
        # every peer here is consistent: at 40 steps it is far closer than at 2
        # (torchsde's Stratonovich methods on EDM are the exception: they diverge at both)
        if "midpoint" not in peer.name and "reversible" not in peer.name:
            assert records[1]["sw"] < records[0]["sw"], (peer.label, records)
    view = PeerProblem(Model(mixture.net(sde, "x0"), sde, predicts="x0"), sde)
    assert view.nfe == 0


def test_quality_cli_writes_json_and_plots(tmp_path, capsys):
    code = bench.main(["quality", "--problems", "2d", "--sdes", "vp", "--nfe", "5", "12", "--samples", "200",
                       "--solvers", "Euler(eta=0)", "DPMSolver(order=2, predicts='x0')", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "quality.json").read_text())
    libraries = {r["library"] for r in data["records"]}
    assert "ours" in libraries and set(available_peers()) <= libraries | {"torchsde"}
    assert all(math.isfinite(r["sw"]) for r in data["records"] if r["library"] == "ours")
    assert (tmp_path / "quality_2d_vp.png").stat().st_size > 10_000
    assert "best per NFE" in out or not available_peers()
    for lib in missing_peers():
        assert f"peer {lib} is not installed" in out
    assert {row["budget"] for row in data["best_by_budget"]} == {5, 12}
    assert (tmp_path / "best_2d_vp.png").exists() and data["floor_ranges"]["2d_vp"][0] <= data["floors"]["2d_vp"]
    replotted = bench.replot(str(tmp_path / "quality.json"), str(tmp_path / "again"))
    assert [p.split("/")[-1] for p in replotted] == ["best_2d_vp.png"]


def test_quality_cli_refuses_unknown_solver_labels():
    with pytest.raises(SystemExit, match="unknown labels"):
        bench.main(["quality", "--solvers", "NoSuchSolver()", "--no-peers"])
