"""Sampling beyond one device: a batch of N sharded over the ranks of a ``torch.distributed`` group.

Each rank samples a contiguous range of global sample indices with :func:`samplers.sample`, and
because the noise is keyed by the global sample index the result is the same whatever the number of
ranks or chunks (bit-identical with a batch-invariant network).  The result is gathered, or written
as shard files with a checksummed index so that a run too large for one host survives being
killed and a rerun recomputes only the missing shards.  API and the directory layout:
docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sde.validation import check_choice, check_count, check_flag

from .driver import per_sample_cond
from .limits import MAX_SAMPLES, MAX_SHARDS, check_memory, check_steps
from .model import Model, network_module, network_placement
from .noise import as_integer, per_sample_integers
from .sample import sample

__all__ = ["shard_range", "shard_ranges", "sample_distributed", "DistributedInfo", "load_shards", "verify_shards",
           "network_fingerprint", "check_out_dir", "check_run_size", "INDEX_NAME"]

INDEX_NAME = "index.json"
_PROGRESS_PREFIX = "progress-"
_FORMATS = ("pt", "npz")
_INDEX_VERSION = 1
#: test hook: after writing this many shard files (before recording the last in the index), exit
_EXIT_HOOK = "SAMPLERS_TEST_EXIT_AFTER_SHARDS"


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous range [start, end) of ``n`` items that ``rank`` of ``world`` takes.

    The sizes differ by at most one (the first ``n % world`` ranks take one more); ranks beyond
    ``n`` get an empty range.  The ranges of ranks 0 ... world-1 cover 0 ... n-1 in order.
    """
    n = check_count("n", n, minimum=0)
    world = check_count("world", world)
    rank = check_count("rank", rank, minimum=0, maximum=world - 1, why=" (0 <= rank < world)")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """The global output shards of a run of ``n``: [0, s), [s, 2s), ... (the last may be shorter)."""
    shard_size = check_count("shard_size", shard_size)
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


@dataclass
class DistributedInfo:
    """What :func:`sample_distributed` did on this rank (``ranks``: the same for every rank)."""

    rank: int
    world_size: int
    start: int  #: this rank's first global sample index
    end: int  #: one past its last (for output runs: of the shards it owns)
    samples: int  #: samples this rank computed in this call (skipped shards not counted)
    nfe: int  #: network calls this rank made (sum over its chunks)
    wall_time: float  #: seconds this rank spent in the call
    shards_written: int = 0
    shards_skipped: int = 0  #: shards found done (checksum verified) and not recomputed
    index_path: str | None = None
    ranks: list = field(default_factory=list)  #: every rank's fields above, as dicts, by rank


# ---------------------------------------------------------------------------------------------
# checks before any work


def network_fingerprint(net) -> str:
    """A fingerprint of a network's weights, recorded with a sharded run so that a rerun with other
    weights is refused instead of mixing the samples of two networks.

    For a ``torch.nn.Module`` (also inside a :class:`samplers.Model`, or a bound method of a module):
    ``"sha256:<hex>"`` over each tensor's name, dtype, shape and bytes, in ``state_dict`` order (the
    parameters and persistent buffers), then the non-persistent buffers.  Any change of a weight, a
    dtype or a shape changes it; moving the network to another device does not.  For any other
    callable: ``"none: not a torch.nn.Module, no parameters to fingerprint"`` (a function's weights,
    if it closes over some, cannot be seen).
    """
    net = network_module(net)
    if net is None:
        return "none: not a torch.nn.Module, no parameters to fingerprint"
    state = net.state_dict(keep_vars=True)
    tensors = list(state.items()) + [(name, buf) for name, buf in net.named_buffers() if name not in state]
    h = hashlib.sha256()
    for name, tensor in tensors:
        if tensor is None:
            continue
        if tensor.is_meta:
            raise ValueError(f"network {name!r} is on the meta device: it has no weights to fingerprint or run")
        tensor = tensor.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def check_out_dir(out_dir, name: str = "out_dir") -> Path:
    """``out_dir`` as a Path, after making sure this process can create it and write in it; else a
    ValueError naming ``name`` and the reason: the path exists and is not a directory, a parent is a
    file, or creating an entry fails (read-only file system, permissions).  It is tried, not read off
    the permission bits (which do not stop root): a probe file in the directory, or a probe directory
    in its nearest existing ancestor, created and removed.  Nothing is left behind."""
    path = Path(out_dir)
    probe_dir = path  # where an entry is tried: the directory, or the nearest ancestor that exists
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{name} {path}: exists and is not a directory")
        while not probe_dir.exists() and probe_dir.parent != probe_dir:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise ValueError(f"{name} {path}: {probe_dir} is not a directory, so {path} cannot be created")
        if probe_dir == path:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=probe_dir))
    except OSError as exc:
        raise ValueError(f"{name} {path}: cannot write in {probe_dir} ({exc.strerror or exc})") from None
    return path


def check_run_size(n: int, shape, *, batch_size: int, shard_size: int | None = None, steps=None,
                   dtype: torch.dtype | None = None, device="cpu", world: int = 1, gathered: bool = False,
                   names: dict | None = None) -> None:
    """Refuse, before any work, a run of ``n`` samples of ``shape`` that is out of the bounds of
    :mod:`samplers.limits` or cannot fit in ``device``'s memory (ValueError naming the argument, as
    ``names`` spells it: the CLI passes its flags).

    Bounds: ``n``, ``batch_size`` and ``shard_size`` at most ``MAX_SAMPLES``, at most ``MAX_SHARDS``
    shards, ``steps`` at most ``MAX_STEPS``.  ``dtype=None``: not known yet (2 bytes an element are
    counted).  Memory: a process holds its samples twice while it
    assembles them (the chunks, then their concatenation): a shard with ``shard_size``, else its whole
    range (ceil(n / world) samples), plus twice all ``n`` on a rank the result is ``gathered`` to.  That
    is a lower bound (the network's own memory comes on top), so a refusal is certain to be right."""
    names = {"n": "n", "shape": "shape", "batch_size": "batch_size", "shard_size": "shard_size",
             "steps": "steps", **(names or {})}
    for key, value in (("n", n), ("batch_size", batch_size), ("shard_size", shard_size)):
        if value is not None and not value <= MAX_SAMPLES:
            raise ValueError(f"{names[key]} must be at most {MAX_SAMPLES} (samplers.limits.MAX_SAMPLES), got {value}")
    if steps is not None:
        check_steps(steps, names["steps"])
    if shard_size is not None and -(-n // shard_size) > MAX_SHARDS:
        raise ValueError(f"{names['n']}={n} in shards of {names['shard_size']}={shard_size} makes "
                         f"{-(-n // shard_size)} shards, more than {MAX_SHARDS} (samplers.limits.MAX_SHARDS): "
                         f"use a larger {names['shard_size']}")
    # dtype None: not known yet (the CLI checks before loading the network, whose parameters may make it
    # float16), so the smallest floating element, 2 bytes, keeps the bound a lower bound
    per_sample = math.prod(shape) * (2 if dtype is None else torch.empty((), dtype=dtype).element_size())
    held = -(-n // world) if shard_size is None else min(shard_size, -(-n // world))
    needed = per_sample * (2 * held + (2 * n if gathered else 0))
    what = (f"{'a shard' if shard_size is not None else 'the samples'} of {held} x {names['shape']} "
            f"{tuple(shape)} ({math.prod(shape)} elements each, "
            f"{'at least 2 bytes an element' if dtype is None else dtype})")
    advice = (f"lower {names['shard_size']} or {names['shape']}" if shard_size is not None else
              f"lower {names['n']} or {names['shape']}, or write shards (out_dir)")
    check_memory(needed, device, what, advice)


# ---------------------------------------------------------------------------------------------
# process group


def _group_rank_world(group):
    import torch.distributed as dist

    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    if not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised")
    return group, dist.get_rank(group), dist.get_world_size(group)


def _uses_nccl(group) -> bool:
    import torch.distributed as dist

    return str(dist.get_backend(group)).lower() == "nccl"


def _all_gather_object(obj, group, world):
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------------------------------
# sampling one range


def _slice_cond(sde, cond, n, shape, start, end):
    """Per-sample conditioning (tensors with N rows, see :func:`samplers.sample.per_sample_cond`)
    follows the samples; the rest is shared."""
    if not cond:
        return cond
    cond = per_sample_cond(sde, cond, (n,) + tuple(shape))
    return {k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in cond.items()}


def _sample_range(model, solver, n, shape, start, end, seed, batch_size, sample_kwargs, dtype, device):
    """Samples start ... end-1 (global indices) in chunks of batch_size; returns (x, nfe)."""
    pieces, nfe = [], 0
    cond = sample_kwargs.get("cond")
    rest = {k: v for k, v in sample_kwargs.items() if k != "cond"}
    for a in range(start, end, batch_size):
        b = min(a + batch_size, end)
        chunk_seed = seed[a:b] if isinstance(seed, list) else seed
        x, info = sample(model, solver, shape=(b - a,) + shape, seed=chunk_seed, sample_index=range(a, b),
                         cond=_slice_cond(model.sde, cond, n, shape, a, b), dtype=dtype, device=device,
                         return_info=True, **rest)
        pieces.append(x)
        nfe += info.nfe
    if not pieces:
        return torch.empty((0,) + shape, dtype=dtype or torch.get_default_dtype(), device=device), 0
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0], nfe


# ---------------------------------------------------------------------------------------------
# shard files and the index


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(start: int, end: int, fmt: str) -> str:
    return f"shard-{start:09d}-{end:09d}.{fmt}"


def _atomic_write(path: Path, write) -> None:
    """write(fileobj) into a temporary file next to path, fsync, then os.replace onto path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    _atomic_write(path, lambda fh: fh.write(data))


def _save_shard(path: Path, x: torch.Tensor, start: int, end: int, fmt: str) -> None:
    x = x.detach().cpu().contiguous()
    index = torch.arange(start, end, dtype=torch.int64)
    if fmt == "pt":
        _atomic_write(path, lambda fh: torch.save({"samples": x, "index": index}, fh))
    else:
        import numpy as np

        _atomic_write(path, lambda fh: np.savez(fh, samples=x.numpy(), index=index.numpy()))


def _load_shard(path: Path, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt == "pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["samples"], data["index"]
    import numpy as np

    with np.load(path) as data:
        return torch.from_numpy(data["samples"].copy()), torch.from_numpy(data["index"].copy())


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple, range)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    if isinstance(v, torch.Tensor) and v.numel() <= 64:
        return {"tensor": v.tolist()}
    return repr(v)


def _read_records(out_dir: Path):
    """(config or None, {shard file: [recorded sha256, ...]}, [progress files]) from all index files."""
    config, progress = None, []
    shas: dict[str, list[str]] = {}
    files = sorted(out_dir.glob(_PROGRESS_PREFIX + "*.json"))
    index = out_dir / INDEX_NAME
    for path in ([index] if index.exists() else []) + files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # an unreadable record records nothing; its shards are recomputed
        if path != index:
            progress.append(path)
        if config is None:
            config = data.get("config")
        elif data.get("config") != config:
            raise ValueError(f"{out_dir}: the index files disagree on the run's settings ({path.name}); "
                             "the directory mixes runs: use another output directory")
        for rec in data.get("shards", []):
            shas.setdefault(rec["file"], []).append(rec["sha256"])
    return config, shas, progress


def _check_config(out_dir: Path, old: dict | None, new: dict) -> None:
    if old is None or old == new:
        return
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and k != "network"]
    if old.get("network") != new.get("network"):
        diffs.insert(0, "the network's weights differ from those of the run there (network fingerprint "
                        f"{old.get('network')!r} there, {new.get('network')!r} now): its shards would mix two models")
    raise ValueError(f"{out_dir} holds a run with other settings ({'; '.join(diffs)}); "
                     "use another output directory, or the same settings to resume")


def verify_shards(out_dir) -> dict:
    """Check a (possibly unfinished) output directory without changing it.

    Returns ``{"config", "done": [(start, end), ...], "missing": [...], "corrupt": [...]}``: a
    shard is *done* when its file's SHA-256 matches a recorded one, *corrupt* when the file
    exists but matches no record, *missing* otherwise.
    """
    out_dir = Path(out_dir)
    config, shas, _ = _read_records(out_dir)
    if config is None:
        raise FileNotFoundError(f"{out_dir}: no index ({INDEX_NAME} or {_PROGRESS_PREFIX}*.json) found")
    report = {"config": config, "done": [], "missing": [], "corrupt": []}
    for start, end in shard_ranges(config["n"], config["shard_size"]):
        path = out_dir / _shard_name(start, end, config["format"])
        if not path.exists():
            report["missing"].append((start, end))
        elif _sha256(path) in shas.get(path.name, ()):
            report["done"].append((start, end))
        else:
            report["corrupt"].append((start, end))
    return report


def load_shards(out_dir, *, verify: bool = True) -> torch.Tensor:
    """The (N, *shape) samples of a completed output directory, in global index order.

    Reads ``index.json`` (the run must be complete), checks every shard's SHA-256 (unless
    ``verify=False``) and that the shards hold each index 0 ... N-1 exactly once.
    """
    out_dir = Path(out_dir)
    path = out_dir / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run is not complete (rerun it to finish)")
    index = json.loads(path.read_text())
    if not index.get("complete"):
        raise ValueError(f"{path}: the run is not complete")
    config = index["config"]
    n, fmt = config["n"], config["format"]
    pieces, seen = [], torch.zeros(n, dtype=torch.int64)
    for rec in sorted(index["shards"], key=lambda r: r["start"]):
        shard = out_dir / rec["file"]
        if verify and _sha256(shard) != rec["sha256"]:
            raise ValueError(f"{shard}: SHA-256 does not match the index (corrupted); rerun the job to recompute it")
        x, idx = _load_shard(shard, fmt)
        if idx.numel() != x.shape[0] or not torch.equal(idx, torch.arange(rec["start"], rec["end"])):
            raise ValueError(f"{shard}: holds indices other than [{rec['start']}, {rec['end']})")
        seen[idx] += 1
        pieces.append(x)
    if not bool((seen == 1).all()):
        bad = torch.nonzero(seen != 1).flatten()[:5].tolist()
        raise ValueError(f"{out_dir}: indices {bad} ... are not held exactly once by the shards")
    return torch.cat(pieces)


def _exit_hook_count() -> int | None:
    value = os.environ.get(_EXIT_HOOK)
    return int(value) if value else None


def _run_sharded(model, solver, n, shape, seed, batch_size, sample_kwargs, dtype, device, out_dir, shard_size, fmt,
                 config, group, rank, world):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old_config, shas, _ = _read_records(out_dir)
    _check_config(out_dir, old_config, config)
    shards = shard_ranges(n, shard_size)
    lo, hi = shard_range(len(shards), rank, world)
    mine = shards[lo:hi]
    progress_path = out_dir / f"{_PROGRESS_PREFIX}{world}x{rank}-{uuid.uuid4().hex[:12]}.json"
    records, written, skipped, computed, nfe = [], 0, 0, 0, 0
    exit_after = _exit_hook_count()

    def record():
        _write_json(progress_path, {"version": _INDEX_VERSION, "config": config, "shards": records})

    todo = []
    for start, end in mine:
        name = _shard_name(start, end, fmt)
        path = out_dir / name
        sha = _sha256(path) if path.exists() else None
        if sha is not None and sha in shas.get(name, ()):
            records.append({"file": name, "start": start, "end": end, "sha256": sha})
            skipped += 1
        else:
            todo.append((start, end))
    if records and todo:
        record()  # this process's own record of what it verified, before it starts computing
    for start, end in todo:
        name = _shard_name(start, end, fmt)
        x, k = _sample_range(model, solver, n, shape, start, end, seed, batch_size, sample_kwargs, dtype, device)
        nfe += k
        computed += end - start
        _save_shard(out_dir / name, x, start, end, fmt)
        del x
        written += 1
        if exit_after is not None and written >= exit_after:
            os._exit(1)  # test hook: die with the shard file written but not yet recorded
        records.append({"file": name, "start": start, "end": end, "sha256": _sha256(out_dir / name)})
        record()
    all_records = _all_gather_object(records, group, world)  # also the barrier: every rank is done
    index_path = out_dir / INDEX_NAME
    if rank == 0:
        merged = sorted((r for part in all_records for r in part), key=lambda r: r["start"])
        if [(r["start"], r["end"]) for r in merged] != shards:
            raise RuntimeError(f"{out_dir}: the ranks' shards do not cover 0 ... {n - 1} exactly once")
        _write_json(index_path, {"version": _INDEX_VERSION, "config": config, "complete": True, "n": n,
                                 "shape": list(shape), "shards": merged})
        for path in out_dir.glob(_PROGRESS_PREFIX + "*.json"):
            path.unlink(missing_ok=True)
    start = mine[0][0] if mine else n
    end = mine[-1][1] if mine else n
    return start, end, computed, nfe, written, skipped, str(index_path)


# ---------------------------------------------------------------------------------------------
# the public entry point


def _gather(x, n, shape, group, rank, world, dst):
    """The (n, *shape) tensor from every rank's contiguous piece (padded to equal sizes)."""
    import torch.distributed as dist

    sizes = [shard_range(n, r, world) for r in range(world)]
    pad = max(e - s for s, e in sizes)
    buf = torch.zeros((pad,) + shape, dtype=x.dtype, device=x.device)
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(world)] if dst is None or rank == dst else None
    if dst is None:
        dist.all_gather(parts, buf, group=group)
    else:
        dist.gather(buf, parts, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
        if rank != dst:
            return None
    return torch.cat([p[: e - s] for p, (s, e) in zip(parts, sizes, strict=True)])


def sample_distributed(model: Model, solver, n: int, shape, *, seed=0, group=None, batch_size: int | None = None,
                       gather=None, out_dir=None, shard_size: int | None = None, shard_format: str = "pt",
                       device=None, dtype: torch.dtype | None = None, run_config: dict | None = None,
                       return_info: bool = False, **sample_kwargs):
    """Draw ``n`` samples of per-sample shape ``shape`` over the ranks of a process group.

    Every rank of ``group`` (default: the initialised default group; without one, this process
    alone) must call this with the same arguments.  Rank r takes the contiguous global indices
    :func:`shard_range` (n, r, W) and samples them in chunks of ``batch_size`` (default: all at
    once) with :func:`samplers.sample` and ``sample_index`` set to the global indices, so the
    result has the noise and arithmetic of ``sample(model, solver, shape=(n, *shape), seed=seed, ...)``
    on one process, whatever W and ``batch_size`` are: bit-identical to it with a batch-invariant
    network, equal up to the network's own batch dependence otherwise (docs/noise.md).

    Parameters
    ----------
    model, solver:
        as for :func:`samplers.sample`; every solver works, the adaptive ones included.
    n, shape:
        the number of samples and the shape of one sample (no batch dimension).
    seed:
        an int (the same on every rank), or a sequence of ``n`` ints (one per sample).
    gather:
        ``True`` (default without ``out_dir``): every rank returns the full (n, *shape) tensor
        (padded ``all_gather``); an int: only that rank of the group gets it, the others ``None``
        (``gather``; a rank in [0, W), so 0 without a process group); ``False``: each rank returns
        its own piece (indices ``info.start ... info.end-1``).  With NCCL the tensors live on this
        rank's GPU.
    out_dir, shard_size, shard_format:
        write the samples instead, as global shards of ``shard_size`` indices (default 1024) in
        ``.pt`` or ``.npz`` files with a checksummed index (see the module docstring); rank r
        takes the contiguous shards :func:`shard_range` (n_shards, r, W).  Shards already done
        (checksum verified) are skipped, so rerunning a killed job finishes it.  Returns ``None``
        (read the result with :func:`load_shards`).  A directory this process cannot create or write
        in is refused before any work (:func:`check_out_dir`); the run records the network's
        :func:`network_fingerprint` and a rerun with other weights is refused.
    device, dtype:
        where to sample (default: the network's parameters' device when it is a ``torch.nn.Module``,
        else ``cuda:LOCAL_RANK`` under NCCL, else the CPU) and the samples' dtype (default: the
        parameters' dtype, else torch's default), as :func:`samplers.sample` takes them.
    run_config:
        extra settings recorded in the index and compared on a rerun (the CLI records the model).
    return_info:
        also return a :class:`DistributedInfo` (``info.ranks`` has every rank's counts).
    sample_kwargs:
        handed to :func:`samplers.sample`: ``steps``, ``grid``, ``grid_kind``, ``final_denoise``,
        ``cond`` (tensors with ``n`` rows are split per sample, the rest shared), ...

    Sizes are checked before any work (:func:`check_run_size`): ``n``, ``batch_size``, ``shard_size``
    and ``steps`` within :mod:`samplers.limits`, and the samples a process must hold within its
    device's available memory.
    """
    t0 = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a samplers.Model, got {type(model).__name__}")
    n = check_count("n", n)
    return_info = check_flag("return_info", return_info)
    try:  # sizes are ints, never truncated (2.5 is refused, not read as 2)
        sizes = tuple(map(as_integer, (shape,) if as_integer(shape) is not None else shape))
    except TypeError:
        sizes = ()
    if not sizes or any(s is None or s < 1 for s in sizes):
        raise ValueError(f"shape must be the shape of one sample (positive int sizes, no batch dimension), got "
                         f"{shape!r}")
    shape = sizes
    for bad in ("x_T", "sample_index", "shape", "return_info", "callback", "progress"):
        if bad in sample_kwargs:
            raise ValueError(f"{bad} is not supported by sample_distributed (it picks each rank's samples itself)")
    if seed is None:
        raise ValueError("seed must be an int (or one int per sample): every rank must use the same seed")
    # as sample() reads it (ints, 1-D integer arrays or tensors; a 0-d one is an int); one seed stays one
    # int (never a list of n, which for a huge n would be the allocation the size checks exist to refuse)
    if as_integer(seed) is not None or getattr(seed, "ndim", None) == 0:
        seed = per_sample_integers(seed, "seed", 1, 0, 2**64, broadcast=True)[0]
    else:
        seed = per_sample_integers(seed, "seed", n, 0, 2**64, broadcast=True)  # a sequence: one per sample
    if batch_size is None:
        batch_size = n
    batch_size = check_count("batch_size", batch_size)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if dtype is None:  # as sample() does without x_T: a module's parameters decide, else torch's default
        dtype = network_placement(model, "dtype") or torch.get_default_dtype()
    if out_dir is None:
        if shard_size is not None:
            raise ValueError("shard_size applies only with out_dir")
        gather = True if gather is None else gather
        if not isinstance(gather, int):  # True, False or a rank (bool is an int)
            raise ValueError(f"gather must be True, False or a rank (an int), got {gather!r}")
    else:
        if gather not in (None, False):
            raise ValueError("out_dir writes the samples to shard files: pass no gather (read them with load_shards)")
        shard_size = 1024 if shard_size is None else check_count("shard_size", shard_size)
        check_choice("shard_format", shard_format, _FORMATS)
        if shard_format == "npz" and dtype == torch.bfloat16:
            raise ValueError("shard_format='npz' cannot store bfloat16 (numpy has no bfloat16): use 'pt'")
    group, rank, world = _group_rank_world(group)
    if out_dir is None and not isinstance(gather, bool) and not 0 <= gather < world:
        alone = " (no process group: this process is the only rank, 0)" if world == 1 else ""
        raise ValueError(f"gather must be True, False or a rank in [0, {world}){alone}, got {gather!r}")
    if device is None:
        device = network_placement(model, "device") or (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if world > 1 and _uses_nccl(group)
            else torch.device("cpu"))
    device = torch.device(device)
    gathered_here = out_dir is None and world > 1 and (gather is True or (gather is not False and gather == rank))
    check_run_size(n, shape, batch_size=batch_size, shard_size=shard_size, steps=sample_kwargs.get("steps"),
                   dtype=dtype, device=device, world=world, gathered=gathered_here)

    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
        config = {"n": n, "shape": list(shape), "seed": seed if isinstance(seed, int) else _seed_digest(seed),
                  "solver": repr(solver), "sde": repr(model.sde), "predicts": model.predicts,
                  "network": network_fingerprint(model), "dtype": str(dtype),
                  "shard_size": shard_size, "format": shard_format, "sample_kwargs": _jsonable(sample_kwargs),
                  "run": _jsonable(run_config or {})}
        start, end, computed, nfe, written, skipped, index_path = _run_sharded(
            model, solver, n, shape, seed, batch_size, sample_kwargs, dtype, device, out_dir, shard_size,
            shard_format, config, group, rank, world)
        result = None
    else:
        start, end = shard_range(n, rank, world)
        x, nfe = _sample_range(model, solver, n, shape, start, end, seed, batch_size, sample_kwargs, dtype, device)
        computed, written, skipped, index_path = end - start, 0, 0, None
        if gather is False or world == 1:
            result = x
        else:
            result = _gather(x, n, shape, group, rank, world, None if gather is True else gather)
    if not return_info:
        return result
    info = DistributedInfo(rank=rank, world_size=world, start=start, end=end, samples=computed, nfe=nfe,
                           wall_time=time.perf_counter() - t0, shards_written=written, shards_skipped=skipped,
                           index_path=index_path)
    mine = {k: v for k, v in asdict(info).items() if k != "ranks"}
    info.ranks = _all_gather_object(mine, group, world)
    return result, info


def _seed_digest(seeds: list) -> str:
    return "sha256:" + hashlib.sha256(",".join(str(int(s)) for s in seeds).encode()).hexdigest()
