"""Sharded sampling over torch.distributed (gloo on the CPU) and the resumable command-line sampler."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samplers import Model, problems, sample
from samplers.cli.sample import main as cli_main
from samplers.distributed import (
    check_out_dir,
    load_shards,
    network_fingerprint,
    sample_distributed,
    shard_range,
    shard_ranges,
    verify_shards,
)
from samplers.limits import MAX_SAMPLES, MAX_SHARDS, MAX_STEPS
from sde import VPSDE
from solvers import AdaptiveEM, DPMSolver, EulerMaruyama

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
N = 21  # not a multiple of the 2 ranks, the chunk size or the shard size
CASES = {  # name -> (solver factory, sample kwargs)
    "em": (lambda: EulerMaruyama(), {"steps": 6}),
    "dpm++2m": (lambda: DPMSolver(2), {"steps": 6}),
    "adaptive-em": (lambda: AdaptiveEM(rtol=0.2), {}),
}

NETS_MODULE = """
import os, torch
from samplers import Model, problems
from sde import VPSDE
net = problems.mixture_2d().net(VPSDE(), "x0")
model = Model(net, VPSDE(), "x0")
not_callable = 3

def never_called(x, t):
    raise RuntimeError("the network was called")

class Linear(torch.nn.Module):  # an eps-network whose weights the environment sets, as a retrained one
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((2, 2), float(os.environ.get("NET_WEIGHT", "0.1"))))
        self.register_buffer("bias", torch.zeros(2))

    def forward(self, x, t):
        return x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)

linear = Linear()
"""


def _model():
    sde = VPSDE()
    return Model(problems.mixture_2d().net(sde, "x0"), sde, "x0")


def _env(extra_path=None, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), extra_path, env.get("PYTHONPATH")) if p)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(extra)
    return env


def test_shard_range_covers_contiguously_and_balanced():
    for n in (0, 1, 5, 21, 64):
        for world in (1, 2, 3, 7):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="shard_size"):
        shard_ranges(4, 0)


@pytest.mark.parametrize("name", list(CASES))
def test_single_process_chunks_and_shards_equal_one_run(name, tmp_path):
    factory, kw = CASES[name]
    model = _model()
    ref = sample(model, factory(), shape=(N, 2), seed=7, dtype=F64, **kw)
    got, info = sample_distributed(model, factory(), N, (2,), seed=7, batch_size=4, dtype=F64, return_info=True, **kw)
    assert torch.equal(got, ref) and info.world_size == 1 and (info.start, info.end) == (0, N)
    assert sample_distributed(model, factory(), N, (2,), seed=7, batch_size=4, dtype=F64, out_dir=tmp_path,
                              shard_size=5, **kw) is None
    assert torch.equal(load_shards(tmp_path), ref)


def test_sample_distributed_argument_errors(tmp_path):
    model, solver = _model(), EulerMaruyama()
    with pytest.raises(ValueError, match="seed"):
        sample_distributed(model, solver, 4, (2,), seed=None, steps=3)
    with pytest.raises(ValueError, match="x_T"):
        sample_distributed(model, solver, 4, (2,), x_T=torch.zeros(4, 2), steps=3)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        sample_distributed(model, solver, 0, (2,), steps=3)
    for shape in ((2.5,), (0,), (), 2.0, None):
        with pytest.raises(ValueError, match=r"shape must be the shape of one sample \(positive int sizes"):
            sample_distributed(model, solver, 4, shape, steps=3)
    with pytest.raises(ValueError, match="batch_size"):
        sample_distributed(model, solver, 4, (2,), batch_size=0, steps=3)
    with pytest.raises(ValueError, match="shard_size"):
        sample_distributed(model, solver, 4, (2,), shard_size=2, steps=3)
    with pytest.raises(ValueError, match="shard_format"):
        sample_distributed(model, solver, 4, (2,), out_dir=tmp_path, shard_format="csv", steps=3)
    sample_distributed(model, solver, 4, (2,), out_dir=tmp_path, shard_size=2, steps=3)
    with pytest.raises(ValueError, match="other settings.*seed"):
        sample_distributed(model, solver, 4, (2,), out_dir=tmp_path, shard_size=2, steps=3, seed=1)


WORKER = """
import sys, datetime, torch, torch.distributed as dist
torch.set_num_threads(1)
rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
from tests.test_distributed import CASES, N, F64, _model
from samplers.distributed import sample_distributed
model, results = _model(), {}
for name, (factory, kw) in CASES.items():
    full, info = sample_distributed(model, factory(), N, (2,), seed=7, batch_size=4, dtype=F64,
                                    return_info=True, **kw)
    to0 = sample_distributed(model, factory(), N, (2,), seed=7, dtype=F64, gather=0, **kw)
    assert (to0 is None) == (rank != 0)
    results[name] = {"all": full, "to0": to0, "start": info.start, "end": info.end,
                     "ranks": [(r["start"], r["end"]) for r in info.ranks]}
sample_distributed(model, CASES["dpm++2m"][0](), N, (2,), seed=7, dtype=F64, out_dir=out, shard_size=4,
                   batch_size=3, **CASES["dpm++2m"][1])
torch.save(results, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_gloo_processes_bit_identical_to_one_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "store"), str(out)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    model = _model()
    for r in range(2):
        results = torch.load(out / f"rank{r}.pt", weights_only=False)
        for name, (factory, kw) in CASES.items():
            ref = sample(model, factory(), shape=(N, 2), seed=7, dtype=F64, **kw)
            res = results[name]
            assert torch.equal(res["all"], ref), (name, r)
            assert torch.equal(res["to0"], ref) if r == 0 else res["to0"] is None
            assert (res["start"], res["end"]) == shard_range(N, r, 2) and res["ranks"] == [(0, 11), (11, 21)]
    ref = sample(model, DPMSolver(2), shape=(N, 2), seed=7, dtype=F64, steps=6)
    assert torch.equal(load_shards(out), ref)
    assert not list(out.glob("progress-*.json"))


def _cli_args(out, *extra):
    return ["--model", "nets:net", "--sde", "vp", "--predicts", "x0", "--solver", "dpm++2m", "--steps", "6",
            "-n", "40", "--shape", "2", "--shard-size", "8", "--batch-size", "3", "--dtype", "float64",
            "--out", str(out), *extra]


def _run_cli(tmp_path, out, env_extra=None, extra=()):
    return subprocess.run([sys.executable, "-m", "samplers", "sample", *_cli_args(out, *extra)], cwd=ROOT,
                          env=_env(str(tmp_path), **(env_extra or {})), capture_output=True, text=True, timeout=120)


def _shard_records(out):
    recs = []
    for path in [out / "index.json", *out.glob("progress-*.json")]:
        if path.exists():
            recs += json.loads(path.read_text())["shards"]
    return recs


def test_cli_killed_mid_run_resumes_without_loss_duplication_or_corruption(tmp_path):
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    out = tmp_path / "out"
    ref = sample(_model(), DPMSolver(2), shape=(40, 2), seed=0, dtype=F64, steps=6)

    # dies right after writing its 3rd shard file, before recording it in the index
    killed = _run_cli(tmp_path, out, {"SAMPLERS_TEST_EXIT_AFTER_SHARDS": "3"})
    assert killed.returncode == 1, killed.stderr
    assert not (out / "index.json").exists()
    assert len(list(out.glob("shard-*.pt"))) == 3
    assert sorted(r["start"] for r in _shard_records(out)) == [0, 8]  # the 3rd file is unrecorded
    report = verify_shards(out)
    assert report["done"] == [(0, 8), (8, 16)] and report["corrupt"] == [(16, 24)]
    assert report["missing"] == [(24, 32), (32, 40)]

    # corrupt a recorded shard: the checksum must catch it
    first = out / "shard-000000000-000000008.pt"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    assert (0, 8) in verify_shards(out)["corrupt"]
    with pytest.raises(FileNotFoundError, match="not complete"):
        load_shards(out)

    done = _run_cli(tmp_path, out)
    assert done.returncode == 0, done.stderr
    assert "4 shards written, 1 already complete" in done.stdout  # 0-8 recomputed, 8-16 kept
    index = json.loads((out / "index.json").read_text())
    starts = sorted((r["start"], r["end"]) for r in index["shards"])
    assert starts == shard_ranges(40, 8) and index["complete"]
    assert not list(out.glob("progress-*.json")) and not list(out.glob(".*tmp"))
    assert torch.equal(load_shards(out), ref)  # every index once, bit-identical to one run

    again = _run_cli(tmp_path, out)
    assert again.returncode == 0 and "0 shards written, 5 already complete" in again.stdout

    other = _run_cli(tmp_path, out, extra=("--seed", "1"))
    assert other.returncode == 2 and "other settings" in other.stderr and "seed" in other.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "nets"], "module:attr"),
    (["--model", "no_such_module_xyz:net"], "cannot import module"),
    (["--model", "nets:nope"], "no attribute"),
    (["--model", "nets:not_callable"], "samplers.Model or a callable"),
    (["--model", "nets:model", "--sde", "vp"], "already a samplers.Model"),
    (["--model", "nets:net"], "pass --sde"),
    (["--model", "nets:net", "--sde", "nope"], "--sde must be one of"),
    (["--model", "nets:net", "--sde", "vp", "--predicts", "noise"], "--predicts: predicts='noise' is spelt predicts='eps'"),
    (["--model", "nets:model", "--solver", "adaptive-em", "--steps", "5"], "--steps"),
    (["--model", "nets:model", "--steps", None], "pass one of --steps or --nfe"),
    (["--model", "nets:model", "--nfe", "5"], "pass one of --steps or --nfe"),
    (["--model", "nets:model", "--solver", "adaptive-em", "--steps", None, "--nfe", "5"], "--steps/--nfe"),
    (["--model", "nets:model", "--rtol", "0.1"], "--rtol/--atol apply only"),
    (["--model", "nets:model", "--solver", "rk4"], "--solver"),
    (["--model", "nets:model", "--shape", "3,a"], "--shape"),
    (["--model", "nets:model", "-n", "0"], "-n"),
    (["--model", "nets:model", "--format", "npz", "--dtype", "bfloat16"], "bfloat16"),
    # sizes beyond samplers.limits or the memory, refused before the network is loaded or called
    (["--model", "nets:never_called", "--sde", "vp", "--steps", str(MAX_STEPS + 1)], f"[1, {MAX_STEPS}]"),
    (["--model", "nets:never_called", "--sde", "vp", "-n", str(10 * MAX_SAMPLES), "--shard-size", str(MAX_SAMPLES)],
     "-n: expected an integer in [1, 1000000000]"),
    (["--model", "nets:never_called", "--sde", "vp", "--batch-size", str(10 * MAX_SAMPLES)], "--batch-size: expected"),
    (["--model", "nets:never_called", "--sde", "vp", "-n", str(2 * MAX_SHARDS), "--shard-size", "1"],
     "use a larger --shard-size"),
    (["--model", "nets:never_called", "--sde", "vp", "--shape", "100000,100000,100"],
     "x --shape (100000, 100000, 100)"),
])
def test_cli_argument_errors(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"--solver": "dpm++2m", "--steps": "4", "-n": "4", "--shape": "2", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [x for flag, value in base.items() if value is not None for x in (flag, value)]
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _limited_memory():  # a guard: on a build without the size checks the CLI fails here instead of eating the host
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_cli_absurd_steps_refused_before_any_work(tmp_path):
    """--steps 1000000000 grew to 24 GB and was killed; now: exit 2, the limit named, nothing created."""
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    out = tmp_path / "out"
    args = ["--model", "nets:never_called", "--sde", "vp", "--solver", "dpm++2m", "--steps", "1000000000", "-n", "4",
            "--shape", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "samplers", "sample", *args], cwd=ROOT, env=_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=120, preexec_fn=_limited_memory)
    assert proc.returncode == 2, proc.stderr
    assert "--steps: expected an integer in [1, 100000] (samplers.limits.MAX_STEPS), got '1000000000'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def _sample_cli_6x2(tmp_path, *solver_args):
    """The sample command on the 2-D exact model, 6 float64 samples: (its process, the samples it wrote)."""
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    out = tmp_path / "out"
    args = ["--model", "nets:model", *solver_args, "-n", "6", "--shape", "2", "--dtype", "float64", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "samplers", "sample", *args], cwd=ROOT, env=_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc, load_shards(out)


def test_cli_restart_solver_runs(tmp_path):
    """'--solver restart' (a listed choice) crashed with Restart()'s TypeError; it samples like Restart()."""
    from solvers import Restart

    proc, x = _sample_cli_6x2(tmp_path, "--solver", "restart", "--steps", "17")
    assert "1 shards written" in proc.stdout
    assert torch.equal(x, sample(_model(), Restart(), shape=(6, 2), seed=0, dtype=F64, steps=17))


def test_cli_nfe_runs_sample_with_nfe(tmp_path):
    from solvers import DPMSolver

    _, x = _sample_cli_6x2(tmp_path, "--solver", "dpm++2m", "--nfe", "5")
    assert torch.equal(x, sample(_model(), DPMSolver(2), shape=(6, 2), seed=0, dtype=F64, nfe=5))


def _read_only_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits; /proc and a file-as-parent cover root")
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o500)
    return path


@pytest.mark.parametrize("where, reason", [
    (lambda tmp: tmp / "a-file" / "out", "a-file is not a directory"),
    (lambda tmp: tmp / "a-file", "exists and is not a directory"),
    (lambda tmp: Path("/proc"), "cannot write in /proc"),  # exists, a directory, nobody may create files in it
    (lambda tmp: Path("/proc/samplers-no-such-dir/out"), "cannot write in /proc"),
    (lambda tmp: _read_only_dir(tmp), "cannot write in"),
    (lambda tmp: _read_only_dir(tmp) / "out", "cannot write in"),
], ids=["parent-is-file", "is-a-file", "proc", "under-proc", "read-only-dir", "under-read-only-dir"])
def test_cli_unwritable_out_refused_before_any_network_call(where, reason, tmp_path):
    """An --out that cannot be written stopped the CLI with a traceback (exit 1), for /proc after computing a
    shard; now exit 2 naming --out and the reason, before the network is called (it raises if it is)."""
    if not Path("/proc").is_dir() and "proc" in reason:
        pytest.skip("no /proc here")
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    (tmp_path / "a-file").write_text("not a directory")
    out = where(tmp_path)
    args = ["--model", "nets:never_called", "--sde", "vp", "--solver", "dpm++2m", "--steps", "3", "-n", "4",
            "--shape", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "samplers", "sample", *args], cwd=ROOT, env=_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"--out {out}" in proc.stderr and reason in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "network was called" not in proc.stderr
    assert (tmp_path / "a-file").read_text() == "not a directory"
    assert not [p for p in tmp_path.rglob(".write-probe-*")]


def test_check_out_dir_creates_nothing(tmp_path):
    target = tmp_path / "new" / "deeper"
    assert check_out_dir(target) == target and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"out_dir .*a-file: exists and is not a directory"):
        (tmp_path / "a-file").write_text("")
        check_out_dir(tmp_path / "a-file")


def test_network_fingerprint():
    """SHA-256 over names, dtypes, shapes and bytes of parameters and buffers: equal weights give equal
    fingerprints, any change of a weight, a buffer or a dtype another; a plain function says it has none."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm1d(4))
    fp = network_fingerprint(net)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm1d(4))
    twin.load_state_dict(net.state_dict())
    assert network_fingerprint(twin) == fp == network_fingerprint(Model(net, VPSDE()))
    assert network_fingerprint(net.forward) == fp
    with torch.no_grad():
        twin[0].weight[1, 2] += 1e-6
    assert network_fingerprint(twin) != fp
    twin.load_state_dict(net.state_dict())
    twin[2].running_mean.add_(1.0)  # a buffer, not a parameter
    assert network_fingerprint(twin) != fp
    assert network_fingerprint(net.to(torch.float64)) != fp
    assert network_fingerprint(_model()).startswith("none: not a torch.nn.Module")


class _EpsNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x, t):
        return self.linear(x)


def test_index_records_the_network_fingerprint(tmp_path):
    net = _EpsNet().requires_grad_(False)
    sample_distributed(Model(net.forward, VPSDE(), "eps"), DPMSolver(2), 4, (2,), steps=3, out_dir=tmp_path / "a")
    assert json.loads((tmp_path / "a" / "index.json").read_text())["config"]["network"] == network_fingerprint(net)
    model = Model(lambda x, t: net(x, t), VPSDE(), "eps")  # a function hides the module it calls
    sample_distributed(model, DPMSolver(2), 4, (2,), steps=3, out_dir=tmp_path / "b")
    config = json.loads((tmp_path / "b" / "index.json").read_text())["config"]
    assert config["network"] == "none: not a torch.nn.Module, no parameters to fingerprint"


def test_cli_resume_with_changed_weights_refused(tmp_path):
    """A killed run resumed after the network's weights changed kept the old shards and computed the rest with
    the new weights (exit 0, a run mixing two models); now exit 2 naming both fingerprints, the shards untouched."""
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    out = tmp_path / "out"
    args = ["--model", "nets:linear", "--sde", "vp", "--solver", "dpm++2m", "--steps", "3", "-n", "12", "--shape", "2",
            "--shard-size", "4", "--out", str(out)]

    def run(weight, **env):
        return subprocess.run([sys.executable, "-m", "samplers", "sample", *args], cwd=ROOT,
                              env=_env(str(tmp_path), NET_WEIGHT=weight, **env), capture_output=True, text=True,
                              timeout=120)

    killed = run("0.1", SAMPLERS_TEST_EXIT_AFTER_SHARDS="2")  # one shard recorded, a second written, then dies
    assert killed.returncode == 1 and len(list(out.glob("shard-*.pt"))) == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    changed = run("0.2")
    assert changed.returncode == 2, changed.stderr
    assert "network's weights differ" in changed.stderr and changed.stderr.count("sha256:") >= 2, changed.stderr
    assert "Traceback" not in changed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finished = run("0.1")  # the same weights resume
    assert finished.returncode == 0 and "1 already complete" in finished.stdout, finished.stderr


def test_sample_distributed_gather_and_sizes_refused_before_any_work(tmp_path):
    """gather=5 without a process group was accepted (and ignored); sizes beyond the limits or the memory ran
    into the allocator.  Both are refused before the network is called."""
    model = Model(lambda x, t: (_ for _ in ()).throw(RuntimeError("the network was called")), VPSDE(), "x0")
    solver = DPMSolver(2)
    for gather in (5, 1, -1):
        with pytest.raises(ValueError, match=r"gather must be True, False or a rank in \[0, 1\) \(no process group"):
            sample_distributed(model, solver, 4, (2,), steps=3, gather=gather)
    for gather in ("yes", 0.0, 2.5):
        with pytest.raises(ValueError, match=r"gather must be True, False or a rank \(an int\)"):
            sample_distributed(model, solver, 4, (2,), steps=3, gather=gather)
    with pytest.raises(ValueError, match=rf"steps={MAX_STEPS + 1} is more than MAX_STEPS={MAX_STEPS}"):
        sample_distributed(model, solver, 4, (2,), steps=MAX_STEPS + 1)
    with pytest.raises(ValueError, match=r"4 x shape \(100000, 100000, 100\).* needs at least 29.1 TiB at once"):
        sample_distributed(model, solver, 4, (100_000, 100_000, 100), steps=3, batch_size=1)
    with pytest.raises(ValueError, match=rf"n must be at most {MAX_SAMPLES}"):
        sample_distributed(model, solver, MAX_SAMPLES + 1, (2,), steps=3, out_dir=tmp_path, shard_size=MAX_SAMPLES,
                           batch_size=4)
    with pytest.raises(ValueError, match="use a larger shard_size"):
        sample_distributed(model, solver, 2 * MAX_SHARDS, (2,), steps=3, out_dir=tmp_path, shard_size=1, batch_size=4)
    assert list(tmp_path.iterdir()) == []
    ok = Model(problems.mixture_2d().net(VPSDE(), "x0"), VPSDE(), "x0")
    assert torch.equal(sample_distributed(ok, solver, 4, (2,), steps=3, gather=0),
                       sample_distributed(ok, solver, 4, (2,), steps=3, gather=True))


def test_cli_model_object_and_npz_format(tmp_path, monkeypatch, capsys):
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "o"
    assert cli_main(["--model", "nets:model", "--solver", "adaptive-em", "--rtol", "0.2", "-n", "6", "--shape", "2",
                     "--shard-size", "4", "--format", "npz", "--dtype", "float64", "--out", str(out)]) == 0
    assert "2 shards written" in capsys.readouterr().out
    ref = sample(_model(), AdaptiveEM(rtol=0.2), shape=(6, 2), seed=0, dtype=F64)
    assert torch.equal(load_shards(out), ref)


def test_main_lists_sample_command():
    from samplers.__main__ import COMMANDS

    assert COMMANDS["sample"][0] == "samplers.cli.sample"


def _torchrun(tmp_path, out, nproc, env_extra=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "samplers", "sample", *_cli_args(out)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(str(tmp_path), **(env_extra or {})), capture_output=True,
                          text=True, timeout=150)


def test_torchrun_two_processes_killed_then_resumed_with_one(tmp_path):
    """The docs' torchrun command: a 2-process run whose rank dies mid-run, finished by a 1-process rerun."""
    (tmp_path / "nets.py").write_text(NETS_MODULE)
    out = tmp_path / "out"
    ref = sample(_model(), DPMSolver(2), shape=(40, 2), seed=0, dtype=F64, steps=6)

    # each rank dies right after writing its 2nd shard file (torchrun then stops the job)
    killed = _torchrun(tmp_path, out, 2, {"SAMPLERS_TEST_EXIT_AFTER_SHARDS": "2"})
    assert killed.returncode != 0
    assert not (out / "index.json").exists()
    assert 1 <= len(list(out.glob("shard-*.pt"))) <= 4

    done = _run_cli(tmp_path, out)
    assert done.returncode == 0, done.stderr
    assert "(1 process)" in done.stdout
    assert torch.equal(load_shards(out), ref)
    assert not list(out.glob("progress-*.json")) and not list(out.glob(".*tmp"))

    fresh = tmp_path / "fresh"
    two = _torchrun(tmp_path, fresh, 2)
    assert two.returncode == 0, two.stderr
    assert "(2 processes): 5 shards written" in two.stdout
    assert torch.equal(load_shards(fresh), ref)


@pytest.mark.parametrize("solver", [EulerMaruyama(), AdaptiveEM(rtol=0.2)], ids=["em", "adaptive-em"])
def test_shared_mean_state_shaped_like_one_sample_is_not_split(solver):
    """On the mean-reverting SDE a mu shaped like one sample whose first dimension equals n is shared, not
    per-sample rows: chunks of 1 give what one sample() call gives (it once differed by 3.5)."""
    from sde import MeanRevertingSDE

    sde = MeanRevertingSDE("cosine", lam=0.5)
    model = Model(lambda x, t, mu: 0.3 * (x - mu), sde, predicts="eps")
    n, shape = 3, (3, 5)
    mu = torch.linspace(-1.0, 1.0, 15, dtype=F64).reshape(shape)  # first dimension == n
    kw = {} if getattr(solver, "adaptive", False) else {"steps": 5}
    ref = sample(model, solver, shape=(n,) + shape, seed=4, dtype=F64, cond={"mu": mu}, **kw)
    got = sample_distributed(model, solver, n, shape, seed=4, dtype=F64, batch_size=1, cond={"mu": mu}, **kw)
    assert torch.equal(got, ref)
    per_sample = mu.expand((n,) + shape) + torch.arange(n, dtype=F64)[:, None, None]  # rows do follow samples
    ref = sample(model, solver, shape=(n,) + shape, seed=4, dtype=F64, cond={"mu": per_sample}, **kw)
    got = sample_distributed(model, solver, n, shape, seed=4, dtype=F64, batch_size=2, cond={"mu": per_sample}, **kw)
    assert torch.equal(got, ref)


def test_throughput_reports_each_process_count():
    from samplers.cli.bench_distributed import throughput

    rows = throughput(n=64, world_sizes=(1, 2), dim=4, hidden=8, steps=2, batch_size=16, repeats=1)
    assert [r["processes"] for r in rows] == [1, 2] and all(r["n"] == 64 for r in rows)
    for r in rows:
        assert r["seconds"] > 0 and r["samples_per_s"] == pytest.approx(64 / r["seconds"])
        assert r["speedup"] == pytest.approx(r["samples_per_s"] / rows[0]["samples_per_s"])
    assert rows[0]["speedup"] == 1.0
