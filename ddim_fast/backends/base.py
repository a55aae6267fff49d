"""What the Engine needs of a backend (subclass Backend, or copy a backend file), and the helpers the
PyTorch-based backends share.

A backend runs the S steps of a plan on a batch. The Engine checks the inputs, splits batches
above `max_batch` into chunks, checks the result for NaN/inf and clamps it; a backend only samples.

    unavailable(device) -> str | None   classmethod: None when it can run on `device`, else what is
                                        missing (with the fix), for `auto` and for a clear error
    run(x, plan, *, seed, noise, first_index, cond=None)   the final state from x (x_T, or x0 for an
                                        inversion plan); seed keys the per-step noise of samples
                                        first_index.., noise (S, B, C, H, W) replaces it; cond a checked
                                        conditioning.Conditioning of this batch (or None)
    sample(batch, plan, *, seed, first_index, cond=None)   from the seed: by default x_T =
                                        rng.initial_noise, then run(); a backend that draws x_T itself
                                        overrides it
"""

from __future__ import annotations

import copy
import hashlib
import json

import torch

from .. import rng
from ..sampling import NonFiniteError


class Backend:
    name = ""  # the REGISTRY name
    summary = ""  # what it is, in a few words: `auto` says it when it picks this backend
    options: tuple = ()  # its own keyword arguments (Engine's onnx_options), beyond the common ones
    max_batch: int | None = None  # the largest batch one run takes (None: no limit); the Engine chunks above
    captures = 0  # CUDA graphs captured so far (0 for eager backends)

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """None when this backend can run on `device`, else what is missing and how to get it."""
        return None

    def __init__(self, model, plan, *, device, dtype, shape, channels_last: bool = False, max_graphs: int = 4):
        """model: the caller's model (a backend works on its own copy); plan: the sampling plan;
        device, dtype (the network's precision), shape (C, H, W) of one sample; channels_last: NHWC
        network inputs; max_graphs: CUDA graphs kept (graph backends only)."""
        self.device, self.dtype, self.shape = torch.device(device), dtype, tuple(shape)

    def run(self, x: torch.Tensor, plan, *, seed: int, noise: torch.Tensor | None, first_index: int,
            cond=None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, batch: int, plan, *, seed: int, first_index: int, cond=None) -> torch.Tensor:
        x_T = rng.initial_noise(seed, (batch, *self.shape), first_index=first_index, device=self.device)
        return self.run(x_T, plan, seed=seed, noise=None, first_index=first_index, cond=cond)


def plan_key(plan) -> str:
    """A content key of a plan (its record and its table): what a compiled program of it depends on. Plans
    are made per call (Engine.sample(plan=...)), so programs are keyed by content, never by id()."""
    h = hashlib.sha256(json.dumps(plan.describe(), sort_keys=True, default=str).encode())
    h.update(plan.coef.detach().to("cpu", torch.float64).contiguous().numpy())
    return h.hexdigest()


def prepare_model(model, device, dtype, channels_last: bool, ops: str):
    """A private eval copy of `model` on `device` in `dtype` (NHWC when channels_last), without
    gradients, with the UNet's fusable ops set to `ops` (other models keep their own)."""
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if hasattr(net, "set_ops"):
        net.set_ops(ops)
    if hasattr(net, "check_labels"):
        net.check_labels = False  # the Engine checked them once per call (conditioning.resolve)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def net_input(x, dtype, channels_last: bool):
    """The float32 state as the network's input: cast to its dtype, NHWC when channels_last."""
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def raise_if_flagged(flag, backend: str) -> None:
    """NonFiniteError when `flag` (a device tensor: the kernels' non-finite flag, or any() of a check)
    is set."""
    if int(flag.item()):
        raise NonFiniteError(
            f"the sampler state became NaN or inf ({backend} backend); run backend='reference' "
            "to find the step, and check the model's output and the schedule"
        )
