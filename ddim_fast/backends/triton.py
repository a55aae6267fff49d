"""backend="triton": the UNet with fused Triton ops (GroupNorm + time-embedding add + SiLU, flash
attention) and the fused step kernel, which draws its noise in-kernel (the stream of ddim_fast.rng),
launched eagerly. CUDA, or CPU under TRITON_INTERPRET=1 (for tests: very slow)."""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict

import torch

from ..conditioning import cast_cond
from ..plan import COL
from .base import Backend, net_input, plan_key, prepare_model, raise_if_flagged

TABLES_KEPT = 16  # plans whose device tables are kept (a captured CUDA graph holds its own: cuda_graph.py)


class TritonBackend(Backend):
    name = "triton"
    summary = "fused Triton kernels, eager launches"

    @classmethod
    def unavailable(cls, device):
        if importlib.util.find_spec("triton") is None:  # found, not imported: importing fixes interpreter mode
            return "Triton is not installed: pip install 'ddim-fast[gpu]' (Linux)"
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (f"the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set before import to run its "
                f"kernels in the (slow) interpreter on {device.type}")

    def __init__(self, model, plan, *, device, dtype, shape, channels_last=False, max_graphs=4):
        super().__init__(model, plan, device=device, dtype=dtype, shape=shape)
        from ..kernels import attention, ddim_step

        self.ddim_step, self.initial_noise = ddim_step.ddim_step, ddim_step.initial_noise
        self.max_batch = min(ddim_step.MAX_BATCH, attention.MAX_BATCH)  # the batch is a grid axis
        self.net = prepare_model(model, self.device, dtype, channels_last, "triton")
        self.channels_last = channels_last
        self._tables = OrderedDict()  # plan_key -> device tables, the last TABLES_KEPT plans

    def tables(self, plan):
        """Device copies of the plan's tables (coef, timesteps, step indices), made once per plan content."""
        key = plan_key(plan)
        if key not in self._tables:
            p = plan.to(self.device, torch.float32)
            steps = torch.arange(plan.steps, dtype=torch.int32, device=self.device)  # (S,) step indices
            self._tables[key] = (p.coef, p.timesteps, steps)
            while len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key]

    def loop(self, x, plan, seed_t, first_t, noise, flag, cond=None, w=None):
        """The S steps on the state x (updated in place): the body the cuda_graph backend captures.
        cond: the network's conditioning inputs (None: none), the doubled batch [uncond; cond] when w
        (a (1,) float32 device tensor, the guidance scale) is given."""
        coef, ts, steps = self.tables(plan)
        cond = cond or {}
        clip = plan.clip_x0
        threshold = (plan.threshold, plan.threshold_max) if plan.threshold is not None else None
        seeded = seed_t if noise is None and plan.needs_noise else None
        # a multistep plan's history (**): one preallocated (K, B, ...) buffer, zeroed (0 * garbage could be NaN);
        # inside a CUDA graph capture this allocation is the graph's own static memory
        hist = torch.zeros((plan.history, *x.shape), device=x.device) if plan.history else None
        for i in range(plan.steps):
            m = self.predict(x, ts[i : i + 1], cond, w)
            self.ddim_step(x, m, coef, steps[i : i + 1], seed=seeded, first_index=first_t, clip=clip,
                           threshold=threshold, flag=flag, hist=hist, guidance=w)
            if noise is not None and plan.needs_noise:
                x.add_(coef[i, COL["sigma"]] * noise[i])  # explicit z: sigma_i z_i on top of the noise-free step
        return x

    def predict(self, x, t1, cond, w):
        """The network's output for the state x at timestep t1 ((1,) device tensor): (B, ...), or with
        guidance (w given) the doubled batch's (2B, ...), which the step kernel combines as it reads it."""
        if w is not None:
            x = torch.cat([x, x])  # [uncond; cond] share the state
        t = t1.expand(x.shape[0])  # a view of device memory: no host work per step
        return self.net(net_input(x, self.dtype, self.channels_last), t, **cond).contiguous()

    def conditioning(self, cond):
        """(network inputs, guidance scale tensor) of a checked Conditioning (or None)."""
        if cond is None:
            return None, None
        inputs = cast_cond({k: v.to(self.device) for k, v in cond.network_inputs().items()}, self.dtype)
        w = torch.tensor([cond.guidance], dtype=torch.float32, device=self.device) if cond.guided else None
        return inputs, w

    def keys(self, seed, first_index):
        """(seed, first_index) as (1,) int64 device tensors, as the kernels read them."""
        return (torch.tensor([seed], dtype=torch.int64, device=self.device),
                torch.tensor([first_index], dtype=torch.int64, device=self.device))

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index, cond=None):
        x = x.clone().contiguous()
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.loop(x, plan, *self.keys(seed, first_index), noise, flag, *self.conditioning(cond))
        raise_if_flagged(flag, self.name)
        return x

    @torch.no_grad()
    def sample(self, batch, plan, *, seed, first_index, cond=None):
        """From the seed: x_T drawn in-kernel (the stream of rng.initial_noise)."""
        seed_t, first_t = self.keys(seed, first_index)
        x = self.initial_noise(torch.empty(batch, *self.shape, device=self.device), seed_t, first_t)
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.loop(x, plan, seed_t, first_t, None, flag, *self.conditioning(cond))
        raise_if_flagged(flag, self.name)
        return x
