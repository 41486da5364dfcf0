"""A virtual Brownian tree: W(t) at any per-sample time from keyed draws, with nothing stored.

Adaptive SDE solvers reject steps and retry shorter ones; reversible solvers replay a path
backwards.  Both need W(s) - W(t) at arbitrary times that is consistent with every earlier
answer.  The tree bisects [t0, t1]: the value at the midpoint of an interval [a, b] with known
ends is the Brownian-bridge draw (W(a) + W(b))/2 + sqrt((b - a)/4) z, with z keyed by the
node's id, so every query recomputes the same path.  Below the finest level (``depth``
bisections, resolution (t1 - t0) / 2^depth) the path is interpolated linearly.
"""

from __future__ import annotations

import math

import torch

from sde.validation import check_count, check_number

from .noise import STREAM_TREE, NoiseSource

__all__ = ["VirtualBrownianTree", "DEFAULT_DEPTH"]

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
