"""backend="reference": ddim_fast.sampling (sample / invert) with the network in the Engine's dtype
and a float32 state, on any device. The single source of truth every fast path is tested against."""

from __future__ import annotations

import torch

from ..conditioning import cast_cond
from ..sampling import invert, sample
from .base import Backend, net_input, prepare_model


class ReferenceBackend(Backend):
    name = "reference"
    summary = "eager PyTorch"

    def __init__(self, model, plan, *, device, dtype, shape, channels_last=False, max_graphs=4):
        super().__init__(model, plan, device=device, dtype=dtype, shape=shape)
        self.net = prepare_model(model, self.device, dtype, channels_last, "reference")
        self.channels_last = channels_last

    def _model(self, x, t, **cond):
        return self.net(net_input(x, self.dtype, self.channels_last), t, **cast_cond(cond, self.dtype)).float()

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index, cond=None):
        kw = {} if cond is None else {"cond": cond.cond, "uncond": cond.uncond, "guidance": cond.guidance}
        if plan.direction == "invert":
            return invert(self._model, x, plan, **kw)
        if noise is not None or not plan.needs_noise:
            return sample(self._model, x, plan, noise=noise, **kw)
        return sample(self._model, x, plan, seed=seed, first_index=first_index, **kw)
