"""A virtual Brownian tree: W(t) at any per-sample time from keyed draws, with nothing stored.

Adaptive SDE solvers reject steps and retry shorter ones; reversible solvers replay a path
backwards.  Both need W(s) - W(t) at arbitrary times that is consistent with every earlier
answer.  The tree bisects [t0, t1]: the value at the midpoint of an interval [a, b] with known
ends is the Brownian-bridge draw (W(a) + W(b))/2 + sqrt((b - a)/4) z, with z keyed by the
node's id, so every query recomputes the same path.  Below the finest level (``depth``
bisections, resolution (t1 - t0) / 2^depth) the path is interpolated linearly.
"""

from __future__ import annotations

import bisect
import math

import torch

from sde.validation import check_count, check_number

from .noise import STREAM_PATHS, STREAM_TREE, NoiseSource

__all__ = ["VirtualBrownianTree", "BrownianPath", "PathIncrements", "path_stream", "DEFAULT_DEPTH"]

#: bisections of the tree: exact in law down to (t1 - t0) / 2^24, 6e-8 of the interval
DEFAULT_DEPTH = 24


class VirtualBrownianTree:
    """Brownian motion W on [t0, t1] with W(t0) = 0, one independent path per sample.

    Parameters
    ----------
    noise:
        the run's :class:`NoiseSource` (its seeds and sample indices key the path).
    shape:
        the per-sample shape of W (the state's shape without the batch dimension).
    t0, t1:
        the time interval, t0 < t1 (queries may go in either direction).
    depth:
        number of bisections; the path is exact in law at the 2^depth dyadic points and
        linear in between.  Default 24 (resolution 6e-8 of the interval).
    """

    def __init__(self, noise: NoiseSource, shape, t0: float, t1: float, *, depth: int = DEFAULT_DEPTH,
                 stream: int = STREAM_TREE, dtype=torch.float64, device="cpu"):
        t0, t1 = check_number("t0", t0, "VirtualBrownianTree"), check_number("t1", t1, "VirtualBrownianTree")
        if not t0 < t1:
            raise ValueError(f"VirtualBrownianTree: expected finite t0 < t1, got t0={t0}, t1={t1}")
        self.depth = check_count("depth", depth, "VirtualBrownianTree", maximum=30)
        self.noise = noise
        self.shape = tuple(shape)
        self.t0, self.t1 = t0, t1
        self.stream = stream
        self.dtype = dtype
        self.device = torch.device(device)

    def _normal(self, node: torch.Tensor) -> torch.Tensor:
        return self.noise.normal(self.shape, counter=node, stream=self.stream, dtype=self.dtype, device=self.device)

    def _times(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        if t.dim() == 0:
            t = t.expand(self.noise.batch_size)
        if t.shape != (self.noise.batch_size,):
            raise ValueError(f"VirtualBrownianTree: expected a time or {self.noise.batch_size} times, "
                             f"got shape {tuple(t.shape)}")
        if bool(((t < self.t0) | (t > self.t1)).any()):
            raise ValueError(f"VirtualBrownianTree: times must lie in [{self.t0:g}, {self.t1:g}], got {t.tolist()}")
        return t

    def value(self, t) -> torch.Tensor:
        """W(t) for a time (or one time per sample), shape (B, *shape)."""
        t = self._times(t)
        batch = t.shape[0]
        col = (-1,) + (1,) * len(self.shape)
        a = torch.full((batch,), self.t0, dtype=torch.float64)
        b = torch.full((batch,), self.t1, dtype=torch.float64)
        node = torch.ones(batch, dtype=torch.int64)
        w_a = torch.zeros((batch, *self.shape), dtype=self.dtype, device=self.device)
        w_b = math.sqrt(self.t1 - self.t0) * self._normal(torch.zeros(batch, dtype=torch.int64))
        for _ in range(self.depth):
            mid = 0.5 * (a + b)
            std = torch.sqrt(0.25 * (b - a)).to(self.device, self.dtype).reshape(col)
            w_mid = 0.5 * (w_a + w_b) + std * self._normal(node)
            left = t < mid
            left_x = left.to(self.device).reshape(col)
            w_a = torch.where(left_x, w_a, w_mid)
            w_b = torch.where(left_x, w_mid, w_b)
            a = torch.where(left, a, mid)
            b = torch.where(left, mid, b)
            node = 2 * node + (~left).to(torch.int64)
        frac = ((t - a) / (b - a)).to(self.device, self.dtype).reshape(col)
        return w_a + frac * (w_b - w_a)

    def increment(self, s, t, index=None) -> torch.Tensor:
        """W(t) - W(s), per sample; with ``index`` (int64 rows), for those rows only, with s and t
        one time (or one per row) each.  Both ends are found in one descent of the tree."""
        rows = torch.arange(self.noise.batch_size) if index is None else torch.as_tensor(index, dtype=torch.int64)
        n = int(rows.numel())
        ends = torch.cat([torch.as_tensor(s, dtype=torch.float64).cpu().expand(n),
                          torch.as_tensor(t, dtype=torch.float64).cpu().expand(n)])
        both = VirtualBrownianTree(self.noise.subset(torch.cat([rows, rows])), self.shape, self.t0, self.t1,
                                   depth=self.depth, stream=self.stream, dtype=self.dtype, device=self.device)
        w = both.value(ends)
        return w[n:] - w[:n]


class BrownianPath:
    """One keyed Brownian path per sample in a solver's *clock*, read at the times of a fixed grid.

    A stochastic fixed-grid solver's noise over a step is a Brownian increment in its own clock tau(t)
    (the variance of its noise term is a coefficient times |tau(t_{k+1}) - tau(t_k)|): t itself for
    Euler-Maruyama, e^{2 eta lambda} for SDE-DPM-Solver++, (sigma/alpha)^2 for a forward jump, ...
    The path W lives on the same bisection tree as :class:`VirtualBrownianTree` (nodes bisect
    [t0, t1] in t; node n has children 2n, 2n + 1; its normal is keyed (seed, sample index, node n,
    ``stream``)), with the Brownian-bridge variances taken in the clock, so the path is exact in law at
    every node whatever the clock.  W = 0 at the end of [t0, t1] where the clock is smaller.

    A query time q goes down the tree through at least ``min_depth`` levels and then until it is alone
    among the ``queries`` in a node's open interval (or is a node); there it is the bridge value between
    the node's ends with the node's own normal.  So the values at *all* query times are jointly exactly
    Brownian (every increment between them N(0, |delta tau|), independent), at any times, not only
    dyadic ones.  It is one function of t for every set of queries that are alone at depth
    ``min_depth`` (N- and 2N-step grids with 2N below about 2^min_depth): the grids then integrate
    one path.  Queries closer than (t1 - t0)/2^min_depth go further down, exactly in law, but the fine
    structure there depends on the query set.  Only queries closer than (t1 - t0)/2^``max_depth``
    share a node (``shared_leaves`` counts them): the second one's increment then reuses the node's
    normal (wrong in law), which a grid with steps longer than 1e-9 of its interval never meets.

    Cost: each query draws the normals of the nodes on its way down that the previous one did not
    visit: for a grid walked in order about min_depth - log2(N) + 1 state-sized draws a step (2 when
    min_depth = 0); memory: W at the nodes above the current query (one state-sized buffer per level
    where the way down turns), from a pool reused for the whole run.
    """

    def __init__(self, noise: NoiseSource, shape, queries, t0: float, t1: float, clock=None, *,
                 stream: int = STREAM_TREE, dtype=torch.float32, device="cpu", max_depth: int = 30,
                 min_depth: int = 0):
        t0, t1 = check_number("t0", t0, "BrownianPath"), check_number("t1", t1, "BrownianPath")
        if not t0 < t1:
            raise ValueError(f"BrownianPath: expected finite t0 < t1, got t0={t0}, t1={t1}")
        self.max_depth = check_count("max_depth", max_depth, "BrownianPath", maximum=30)
        self.min_depth = check_count("min_depth", min_depth, "BrownianPath", minimum=0, maximum=self.max_depth)
        self.noise, self.shape, self.t0, self.t1 = noise, tuple(shape), t0, t1
        self.stream, self.dtype, self.device = stream, dtype, torch.device(device)
        self._clock_fn = clock if clock is not None else (lambda t: t)
        self.queries = sorted(set(float(q) for q in queries))
        if any(not t0 <= q <= t1 for q in self.queries):
            raise ValueError(f"BrownianPath: query times must lie in [{t0:g}, {t1:g}], got {self.queries}")
        self._taus: dict[float, float] = {}
        self._descents: dict[float, list] = {}
        self._plan_clock()
        self._cache: dict[int, torch.Tensor] = {}  # node -> W at its midpoint (node 0: W at the far end)
        self._held: list[torch.Tensor | None] = []  # the last values handed out
        self._pool: list[torch.Tensor] = []  # state-sized buffers no value uses any more
        self._z: torch.Tensor | None = None

    # -- host-side plan: the clock at every node time the queries reach ------------------------

    def _descent(self, q: float) -> list[tuple[int, float, float, float | None]]:
        """The nodes on q's way down, (node, a, b, mid), until q is a midpoint (the last entry's mid) or
        alone in a node's open interval (the last entry, with mid None: q is bridged there)."""
        a, b, node = self.t0, self.t1, 1
        out: list[tuple[int, float, float, float | None]] = []
        if q == a or q == b:
            return out
        for depth in range(self.max_depth + 1):
            inside = bisect.bisect_left(self.queries, b) - bisect.bisect_right(self.queries, a)
            if (inside <= 1 and depth >= self.min_depth) or depth == self.max_depth:
                self.shared_leaves += inside > 1
                out.append((node, a, b, None))
                return out
            mid = 0.5 * (a + b)
            out.append((node, a, b, mid))
            if q == mid:
                return out
            right = q > mid
            a, b = (mid, b) if right else (a, mid)
            node = 2 * node + int(right)
        return out

    def _plan_clock(self) -> None:
        #: query times that share their finest node with another (see the class notes); 0 for any sensible grid
        self.shared_leaves = 0
        self._descents = {q: self._descent(q) for q in self.queries}
        times = {self.t0, self.t1, *self.queries}
        times.update(mid for way in self._descents.values() for _, _, _, mid in way if mid is not None)
        ordered = sorted(times)
        tau = torch.as_tensor(self._clock_fn(torch.tensor(ordered, dtype=torch.float64)), dtype=torch.float64)
        tau = tau.reshape(-1)
        if tau.numel() != len(ordered) or not bool(torch.isfinite(tau).all()):
            raise ValueError("BrownianPath: the clock must be finite at every time of the path")
        # a clock is monotone; rounding may break that between times a few ulp apart (a grid time next to a
        # node): up to 1e-9 of its range that is rounding, made monotone; more is a wrong clock
        increasing = bool(tau[-1] >= tau[0])
        monotone = torch.cummax(tau, 0).values if increasing else -torch.cummax(-tau, 0).values
        if bool(((monotone - tau).abs() > 1e-9 * (tau[-1] - tau[0]).abs()).any()):
            raise ValueError("BrownianPath: the clock must be monotone in t")
        self._taus = dict(zip(ordered, monotone.tolist(), strict=True))

    def clock(self, t: float) -> float:
        """The clock at one of the path's times."""
        return self._taus[t]

    # -- values --------------------------------------------------------------------------------

    def _buffer(self) -> torch.Tensor:
        if self._pool:
            return self._pool.pop()
        return torch.empty((self.noise.batch_size, *self.shape), dtype=self.dtype, device=self.device)

    def _release(self, w: torch.Tensor | None) -> None:
        """Back to the pool, unless the cache or a caller (the last two values) still holds it."""
        if w is None or any(w is other for other in (*self._held, *self._cache.values(), *self._pool)):
            return
        self._pool.append(w)

    def _normal(self, node: int) -> torch.Tensor:
        if self._z is None:
            self._z = torch.empty((self.noise.batch_size, *self.shape), dtype=self.dtype, device=self.device)
        return self.noise.normal(self.shape, counter=node, stream=self.stream, out=self._z)

    def _bridge(self, w_a, w_b, a: float, b: float, u: float, node: int) -> torch.Tensor:
        """W(u) given W(a), W(b) (None: 0), the bridge normal keyed by ``node``."""
        ta, tb, tu = self._taus[a], self._taus[b], self._taus[u]
        theta = (tu - ta) / (tb - ta) if tb != ta else 0.0
        std = math.sqrt(abs((tu - ta) * (tb - tu) / (tb - ta))) if tb != ta else 0.0
        z = self._normal(node)
        out = self._buffer()
        if w_a is None and w_b is None:
            torch.mul(z, std, out=out)
            return out
        if w_a is None:
            torch.mul(w_b, theta, out=out)
        elif w_b is None:
            torch.mul(w_a, 1.0 - theta, out=out)
        else:
            torch.lerp(w_a, w_b, theta, out=out)
        return out.add_(z, alpha=std)

    def _ends(self):
        """(W(t0), W(t1)): 0 at the end with the smaller clock, a keyed draw (node 0) at the other."""
        far = self._cache.get(0)
        if far is None:
            far = self._cache[0] = self._buffer()
            torch.mul(self._normal(0), math.sqrt(abs(self._taus[self.t1] - self._taus[self.t0])), out=far)
        return (None, far) if abs(self._taus[self.t0]) <= abs(self._taus[self.t1]) else (far, None)

    def value(self, q: float) -> torch.Tensor | None:
        """W(q) at one of the query times, shape (B, *shape); None where it is 0.  Valid until the
        second call after this one (its buffer is then reused).  The midpoint values on q's way down
        are kept for the next query (those off its way are dropped)."""
        q = float(q)
        way = self._descents.get(q)
        if way is None:
            raise ValueError(f"BrownianPath: {q} is not one of the planned query times")
        w_a, w_b = self._ends()
        if not way:
            out = w_a if q == self.t0 else w_b
        keep = {0}
        for node, a, b, mid in way:
            if mid is None:
                out = self._bridge(w_a, w_b, a, b, q, node)
                break
            keep.add(node)
            w_mid = self._cache.get(node)
            if w_mid is None:
                w_mid = self._cache[node] = self._bridge(w_a, w_b, a, b, mid, node)
            if q == mid:
                out = w_mid
                break
            w_a, w_b = (w_mid, w_b) if q > mid else (w_a, w_mid)
        self._held.append(out)
        released = self._held.pop(0) if len(self._held) > 2 else None
        for node in [n for n in self._cache if n not in keep]:
            self._release(self._cache.pop(node))
        self._release(released)
        return out


def path_stream(path: int) -> int:
    """The stream of Brownian path ``path`` of a sample: path 0 is the tree the adaptive solvers query
    (``STREAM_TREE``); paths 1, 2, ... (Restart's jumps) have streams of their own."""
    path = check_count("path", path, minimum=0, maximum=STREAM_PATHS - 1)
    return STREAM_TREE if path == 0 else STREAM_PATHS + path


class PathIncrements:
    """The normalised increments of one :class:`BrownianPath` over given steps: for draw j of step k with
    ``steps[(k, j)] = (start, end)``, (W(end) - W(start)) / sqrt(|tau(end) - tau(start)|), a standard normal
    (0 for a step of zero length).  Steps may be asked for in any order (a replay backwards
    re-descends the tree); in grid order each costs the draws of the nodes the previous step did not
    visit (see :class:`BrownianPath`)."""

    def __init__(self, path: BrownianPath, steps: dict[tuple[int, int], tuple[float, float]]):
        self.path, self.steps = path, steps
        self._last: tuple[float, torch.Tensor | None] | None = None

    def _value(self, t: float):
        if self._last is not None and self._last[0] == t:
            return self._last[1]
        w = self.path.value(t)
        self._last = (t, w)
        return w

    def increment(self, key: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
        """Into ``out``: the increment of (step, draw) ``key``."""
        start, end = self.steps[key]
        w_start = self._value(start)
        w_end = self._value(end)
        delta = abs(self.path.clock(end) - self.path.clock(start))
        if delta == 0.0 or (w_start is None and w_end is None):
            return out.zero_()
        scale = 1.0 / math.sqrt(delta)
        if w_start is None:
            return torch.mul(w_end, scale, out=out) if w_end.dtype == out.dtype else out.copy_(w_end * scale)
        if w_end is None:
            return out.copy_(w_start * -scale)
        if out.dtype == w_end.dtype:
            return torch.sub(w_end, w_start, out=out).mul_(scale)
        return out.copy_((w_end - w_start).mul_(scale))


#: the depth down to which a fixed grid's path is one function of t (BrownianPath's min_depth): N- and
#: 2N-step grids with 2N up to a few thousand steps then integrate one path.  Measured (Euler-Maruyama,
#: 64-D mixture, docs/noise.md): slope of |x_N - x_2N| in N -1.27 at 12 (-1.25 at 16, -0.45 at 0)
GRID_MIN_DEPTH = 12


def grid_path_draws(draws, noise: NoiseSource, like: torch.Tensor, table_times: torch.Tensor,
                    interval: tuple[float, float] | None = None) -> dict[tuple[int, int], PathIncrements]:
    """(step, draw) -> its increments, for a solver's :meth:`solvers.Solver.brownian_draws` on a run's grid.

    Each path lives on ``interval`` (the SDE's [t_min, t_max]) widened to the times it is queried at, each
    end dropped where the clock is not finite there: so every grid inside the interval (N or 2N steps, a
    grid that starts below t_max) reads one tree.  A step with an end where the clock is not finite (the
    step into sigma = 0 of an exponential integrator, whose noise coefficient is 0 there) keeps the
    per-step draw."""
    if not draws:
        return {}
    if table_times.shape[1] > 1:
        raise ValueError("noise='path' needs one grid for the batch (shape (N+1,)); per-sample grids "
                         f"({table_times.shape[1]} columns) take noise='step'")
    by_path: dict[int, list] = {}
    for d in draws:
        by_path.setdefault(d.path, []).append(d)
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    out: dict[tuple[int, int], PathIncrements] = {}
    for path_id, path_draws in by_path.items():
        clock = path_draws[0].clock
        ends = sorted({t for d in path_draws for pair in d.steps.values() for t in pair})
        tau = torch.as_tensor(clock(torch.tensor(ends, dtype=torch.float64)), dtype=torch.float64).reshape(-1)
        finite = {t for t, v in zip(ends, tau.tolist(), strict=True) if math.isfinite(v)}
        steps = {(k, d.draw): pair for d in path_draws for k, pair in d.steps.items()
                 if pair[0] in finite and pair[1] in finite}
        queries = sorted({t for pair in steps.values() for t in pair})
        if len(queries) < 2:
            continue
        lo, hi = queries[0], queries[-1]
        if interval is not None:
            t_min, t_max = float(interval[0]), float(interval[1])
            tau_ends = clock(torch.tensor([t_min, t_max], dtype=torch.float64))
            finite_lo, finite_hi = (math.isfinite(v) for v in torch.as_tensor(tau_ends).reshape(-1).tolist())
            lo = min(lo, t_min) if finite_lo else lo
            hi = max(hi, t_max) if finite_hi else hi
        path = BrownianPath(noise, like.shape[1:], queries, lo, hi, clock,
                            stream=path_stream(path_id), dtype=dtype, device=like.device, min_depth=GRID_MIN_DEPTH)
        walker = PathIncrements(path, steps)
        out.update(dict.fromkeys(steps, walker))
    return out
