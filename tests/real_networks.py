"""Small real networks for tests: ``torch.nn.Module``s with parameters that require grad, a sinusoidal
time embedding, GroupNorm, a class label passed as a keyword, in any dtype.

Every other network of the suite is parameter-free (exact scores, stand-ins); these are what a user
hands over.  They are written the way real diffusion networks are (diffusers' ``UNet2DModel``,
score-SDE's NCSN++): the time embedding is computed in float32 from whatever time tensor comes in and
cast to the activations' dtype, so the same module runs in float32, float16 and bfloat16.  The
weights are random (seeded); the outputs are scaled down so that a few solver steps stay finite in
float16 on every SDE.

- :class:`ConvNet`: (B, C, H, W) -> (B, C, H, W), Conv2d -> GroupNorm -> SiLU -> Conv2d with the time
  (and label) embedding added between the convolutions.
- :class:`MLPNet`: (B, d) -> (B, d), or (B,) -> (B,) (a scalar per sample, run as (B, 1)).

Both take ``label`` (an int tensor of shape (B,)) and ``mu`` (the mean state of a mean-reverting SDE,
shaped like x; IR-SDE's networks see the degraded image) as optional keywords.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

EMBED_DIM = 16
CLASSES = 10


def sinusoidal_embedding(t: torch.Tensor, dim: int = EMBED_DIM) -> torch.Tensor:
    """(B,) times -> (B, dim) float32 sin/cos features over frequencies 1 ... 1/1000 (the transformer /
    DDPM embedding); log1p keeps EDM's sigma up to 80 and discrete timesteps up to 999 in range."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = torch.log1p(t.detach().float().abs())[:, None] * 100.0 * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _Conditioning(nn.Module):
    """time embedding (+ label embedding) -> (B, width) in the activations' dtype."""

    def __init__(self, width: int):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(EMBED_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(CLASSES, width)

    def forward(self, t, label, dtype):
        emb = self.time(sinusoidal_embedding(t).to(dtype))
        if label is not None:
            emb = emb + self.label(label)
        return emb


class ConvNet(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): Conv2d -> GroupNorm -> SiLU -> Conv2d, time/label embedding added."""

    def __init__(self, channels: int = 3, width: int = 8, groups: int = 4, scale: float = 0.3):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.cond = _Conditioning(width)
        self.scale = scale

    def forward(self, x, t, label=None, mu=None):
        h = self.conv_in(x if mu is None else x - mu)
        h = h + self.cond(t, label, h.dtype)[:, :, None, None]
        return self.scale * self.conv_out(F.silu(self.norm(h)))


class MLPNet(nn.Module):
    """(B, d) -> (B, d), or (B,) -> (B,): Linear -> GroupNorm -> SiLU -> Linear, time/label embedding added."""

    def __init__(self, dim: int = 1, width: int = 16, groups: int = 4, scale: float = 0.3):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.norm = nn.GroupNorm(groups, width)
        self.out = nn.Linear(width, dim)
        self.cond = _Conditioning(width)
        self.scale = scale

    def forward(self, x, t, label=None, mu=None):
        scalar = x.dim() == 1
        h = x[:, None] if scalar else x
        if mu is not None:
            h = h - (mu[:, None] if scalar else mu)
        h = self.inp(h) + self.cond(t, label, x.dtype)
        out = self.scale * self.out(F.silu(self.norm(h)))
        return out[:, 0] if scalar else out


def real_network(shape, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """The network for states of ``shape`` (B,), (B, d) or (B, C, H, W), with seeded random weights
    in ``dtype``; its parameters require grad, as a freshly built or loaded module's do."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if len(shape) == 4:
            net = ConvNet(channels=shape[1])
        elif len(shape) in (1, 2):
            net = MLPNet(dim=1 if len(shape) == 1 else shape[1])
        else:
            raise ValueError(f"real_network: shape must be (B,), (B, d) or (B, C, H, W), got {shape}")
    finally:
        torch.random.set_rng_state(gen_state)
    return net.to(dtype)
