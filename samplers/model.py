"""Model: the user's network, the SDE it was trained on, and what it predicts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sde import PREDICTIONS, SDE, GaussianSDE, conversion
from sde.validation import check_predicts

__all__ = ["Model", "compute_dtype", "network_placement"]

_TIME_INPUTS = ("sde", "discrete")
_SHIFTABLE = ("eps", "x0", "score")  # what a network may predict on an SDE with a state offset


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic and times use for states of ``dtype``: float64 stays, the rest use float32
    (float16/bfloat16 cannot even represent the timesteps of a 1000-step schedule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def network_module(net) -> torch.nn.Module | None:
    """The ``torch.nn.Module`` behind a network: the network itself, the one a :class:`Model` wraps, or
    the owner of a bound method such as ``net.forward``; None for any other callable."""
    if isinstance(net, Model):
        net = net.net
    owner = getattr(net, "__self__", None)
    if not isinstance(net, torch.nn.Module) and isinstance(owner, torch.nn.Module):
        net = owner
    return net if isinstance(net, torch.nn.Module) else None


def network_placement(model: Model, what: str):
    """The dtype (``what="dtype"``) or device (``what="device"``) of the floating parameters of
    ``model.net`` when it is a ``torch.nn.Module`` (or a bound method of one): the default of a run
    that is given neither that argument nor a starting state, since a module computes in its
    parameters' dtype and on their device (a float16 convolution refuses a float32 input).  None when
    ``net`` is not a module or has no floating parameters; a ValueError naming the argument to pass
    when the parameters disagree."""
    if what not in ("dtype", "device"):
        raise ValueError(f"what must be 'dtype' or 'device', got {what!r}")
    net = network_module(model.net)
    if net is None:
        return None
    found = {getattr(p, what) for p in net.parameters() if p.is_floating_point()}
    if len(found) > 1:
        raise ValueError(f"the network's parameters have the {what}s {sorted(map(str, found))}: pass {what}= "
                         f"(the {what} of the state handed to the network) or a starting state x_T of that {what}")
    return found.pop() if found else None


class Model:
    """Wraps ``net(x, t, **cond)`` and converts its output to any quantity a solver needs.

    Parameters
    ----------
    net:
        any callable (a ``torch.nn.Module`` or a function) taking the state ``x`` of shape
        (B, ...) and a time tensor of shape (B,), plus keyword conditioning.
    sde:
        the forward SDE the network was trained with.
    predicts:
        what ``net`` returns: ``"eps"`` (noise), ``"x0"`` (denoised data), ``"v"``
        (alpha eps - sigma x0), ``"score"`` or ``"velocity"`` (the probability-flow
        velocity alpha' x0 + sigma' eps, as in flow matching).
    time_input:
        the time handed to ``net``: ``"sde"`` (the SDE's own t, default), ``"discrete"``
        (the training timestep of a :class:`sde.DiscreteVPSDE`) or a callable t -> net time.
    """

    def __init__(self, net: Callable, sde: SDE, predicts: str = "eps", *, time_input="sde"):
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t, **cond), got {type(net).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sde.SDE instance, got {type(sde).__name__}")
        check_predicts(predicts, PREDICTIONS)
        if not isinstance(sde, GaussianSDE) and predicts != "score":
            raise ValueError(f"predicts={predicts!r} needs a Gaussian-marginal SDE; {sde!r} supports only 'score'")
        # an SDE with a state offset (sde.MeanRevertingSDE: y = x - mu) is integrated in y; the
        # network sees x = y + mu, and its x0 is shifted back (eps and score are the same in x and y)
        self._shifted = sde.mean_key is not None
        if self._shifted and predicts not in _SHIFTABLE:
            raise ValueError(f"predicts={predicts!r} is not supported on {sde!r}: use one of {_SHIFTABLE}")
        if callable(time_input):
            self._net_time = time_input
        elif time_input == "sde":
            self._net_time = None
        elif time_input == "discrete":
            if not hasattr(sde, "timestep"):
                raise ValueError(f"time_input='discrete' needs an SDE with discrete timesteps (DiscreteVPSDE), "
                                 f"got {sde!r}")
            self._net_time = sde.timestep
        else:
            raise ValueError(f"time_input must be one of {_TIME_INPUTS} or a callable, got {time_input!r}")
        self.net = net
        self.sde = sde
        self.predicts = predicts
        self.time_input = time_input

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time tensor handed to ``net`` for SDE times ``t``."""
        return t if self._net_time is None else self._net_time(t)

    def coefficients(self, quantity: str, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q) such that quantity = p x + q net(x, t); see :func:`sde.conversion`."""
        if not isinstance(self.sde, GaussianSDE):
            raise ValueError(f"linear conversions need a Gaussian-marginal SDE, got {self.sde!r}")
        return conversion(self.sde, self.predicts, quantity, t)

    def output(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Call the network at SDE times ``t`` and check what it returned (shape and dtype)."""
        return self.call_net(x, self.net_time(t), **cond)

    def call_net(self, x: torch.Tensor, net_t: torch.Tensor, **cond) -> torch.Tensor:
        """Call the network with times already in its own convention (see :meth:`net_time`).
        On an SDE with a state offset (mean-reverting) ``x`` is the shifted state y = x - mu and so is
        the result: the network is called at y + mu."""
        offset = self.sde.state_offset(cond) if self._shifted else None
        if offset is not None:
            offset = offset.to(device=x.device, dtype=x.dtype)
            x = x + offset
        out = self.net(x, net_t, **cond)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"net must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"net output has shape {tuple(out.shape)}, expected the state's shape {tuple(x.shape)} "
                f"(Model(predicts={self.predicts!r}))"
            )
        if not out.is_floating_point():
            raise TypeError(f"net output must be a floating tensor, got dtype {out.dtype}")
        if offset is not None and self.predicts == "x0":
            out = out - offset.to(out.dtype)
        return out

    def predict(self, quantity: str, x: torch.Tensor, t, output: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """quantity (``x0``, ``eps``, ``score``, ``v`` or ``velocity``) at (x, t)."""
        t64 = torch.as_tensor(t, dtype=torch.float64).to(x.device)
        if t64.dim() == 0:
            t64 = t64.expand(x.shape[0])
        if output is None:
            # the time convention is applied in float64, then cast (discrete timesteps stay integers)
            output = self.call_net(x, self.net_time(t64).to(compute_dtype(x.dtype)), **cond)
        p, q = self.coefficients(quantity, t64)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return p.to(x.dtype).reshape(shape) * x + q.to(x.dtype).reshape(shape) * output

    def denoise(self, x, t, **cond):
        return self.predict("x0", x, t, **cond)

    def eps(self, x, t, **cond):
        return self.predict("eps", x, t, **cond)

    def score(self, x, t, **cond):
        if self.predicts == "score":
            return self.output(x, torch.as_tensor(t, device=x.device).expand(x.shape[0]), **cond)
        return self.predict("score", x, t, **cond)

    def velocity(self, x, t, **cond):
        return self.predict("velocity", x, t, **cond)

    def __repr__(self):
        net_name = getattr(self.net, "__name__", type(self.net).__name__)
        return f"Model({net_name}, {self.sde!r}, predicts={self.predicts!r})"
