"""EDM's (Karras et al. 2022) noise-level spacing, shared by ``samplers.grid`` and Restart's sub-grids.

The noise levels s = sigma/alpha are spaced equally in s^(1/rho): with rho = 7 the steps crowd at
low noise, where the denoiser's output changes fastest.  Callers get the rho-th roots and take
-rho log(.) (a log-SNR) or (.)^rho (a noise level) of them, whichever their grid is built from.
"""

from __future__ import annotations

__all__ = ["KARRAS_RHO", "karras_roots"]

#: EDM's rho: the default of ``grid(kind="karras")`` and the spacing of Restart's backward passes
KARRAS_RHO = 7.0


def karras_roots(s_max, s_min, u, rho: float = KARRAS_RHO):
    """s(u)^(1/rho) = s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)) for fractions ``u`` in [0, 1]
    (floats or tensors, broadcast): the rho-th roots of the noise levels from s_max (u = 0) down to
    s_min (u = 1)."""
    root_max, root_min = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
    return root_max + u * (root_min - root_max)
