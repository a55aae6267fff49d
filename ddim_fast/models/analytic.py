"""A model whose answer is known: the exact denoiser for Gaussian data.

If x_0 ~ N(mu, s^2 I) then x_t = sqrt(a) x_0 + sqrt(1-a) eps is Gaussian too, and the
minimum-MSE noise prediction is linear in x_t:

    E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).

The probability-flow ODE then has a closed-form solution: along a trajectory
x(a) = sqrt(a) mu + sqrt(a s^2 + 1 - a) xi with xi constant. That makes this model the
natural test bed for samplers (convergence order, inversion, prediction types) and a
stand-in network for exports and benchmarks before a trained model is at hand.
"""

from __future__ import annotations

import torch
from torch import nn

from ..plan import PREDICTIONS
from ..schedule import NoiseSchedule


class GaussianEps(nn.Module):
    """eps-, x0- or v-prediction of the exact denoiser for data N(mu, std^2 I)."""

    def __init__(self, schedule: NoiseSchedule, mu: float = 0.3, std: float = 0.5, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.schedule = schedule
        self.prediction = prediction
        self.mu, self.std = float(mu), float(std)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.std**2 + 1 - a)
        if self.prediction == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if self.prediction == "x0":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v

    def ode_solution(self, x_start: torch.Tensor, a_start: float, a_end: float) -> torch.Tensor:
        """The exact probability-flow ODE map from alpha_bar a_start to a_end."""
        s2 = self.std**2
        xi = (x_start - a_start**0.5 * self.mu) / (a_start * s2 + 1 - a_start) ** 0.5
        return a_end**0.5 * self.mu + (a_end * s2 + 1 - a_end) ** 0.5 * xi
