"""A model's DDIM samples from a seed, and a PNG grid of them: the trainer's checkpoint grids
(train_state.py), the digits evaluation (metrics.evaluate_digits_model) and the docs' figures.

It sits above sampling and images: images.py is file I/O and samples nothing.
"""

from __future__ import annotations

import torch

from . import rng
from .files import atomic_write_bytes
from .images import image_grid, png_bytes
from .plan import SamplingPlan
from .sampling import sample


@torch.no_grad()
def sample_images(model, n: int, *, steps: int = 20, seed: int = 0,
                  batch_size: int = 256, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """n DDIM (eta = 0) samples of `model` with `steps` uniform steps, in [-1, 1]: (n, C, R, R).
    class_labels (n,): the label of each sample, for a class-conditional model (no guidance)."""
    c = model.config
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels)
        if class_labels.shape != (n,):
            raise ValueError(f"class_labels must have shape ({n},), one label per sample, "
                             f"got {tuple(class_labels.shape)}")
    plan = SamplingPlan.build(model.schedule, steps=steps, eta=0.0, prediction=model.prediction)
    dev = next(model.parameters()).device
    out = []
    for lo in range(0, n, batch_size):
        b = min(batch_size, n - lo)
        shape = (b, c.in_channels, c.resolution, c.resolution)
        x_T = rng.initial_noise(seed, shape, first_index=lo, device=dev)  # sample i keyed by (seed, i)
        net = model
        if class_labels is not None:
            y = class_labels[lo:lo + b].to(dev)
            net = lambda x, t, y=y: model(x, t, class_labels=y)
        out.append(sample(net, x_T, plan).clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def write_sample_grid(path, model, n: int = 64, *, steps: int = 20, seed: int = 0, scale: int = 1):
    """Sample n images with DDIM-`steps` and write them as one PNG at `path`, atomically. A
    class-conditional model draws class i % num_classes for sample i (no guidance)."""
    from PIL import Image

    k = model.config.num_classes
    labels = None if k is None else torch.arange(n) % k
    im = image_grid(sample_images(model, n, steps=steps, seed=seed, class_labels=labels))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    atomic_write_bytes(path, png_bytes(im))
