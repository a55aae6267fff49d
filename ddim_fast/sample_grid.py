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
    """n DDIM (eta = 0) samples of `model` with `steps` uniform steps, in [-1, 1]: (n, C, H, W).
    class_labels (n,): the label of each sample, for a class-conditional model (no guidance). The model is
    this project's UNet or a diffusers UNet as it is (its shape read by checks.sample_shape)."""
    from .checks import sample_shape

    size = sample_shape(model)  # (C, H, W)
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
        x_T = rng.initial_noise(seed, (b, *size), first_index=lo, device=dev)  # sample i keyed by (seed, i)
        cond = None if class_labels is None else {"class_labels": class_labels[lo:lo + b].to(dev)}
        out.append(sample(model, x_T, plan, cond=cond).clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def write_sample_grid(path, model, n: int = 64, *, steps: int = 20, seed: int = 0, scale: int = 1):
    """Sample n images with DDIM-`steps` and write them as one PNG at `path`, atomically. A
    class-conditional model draws class i % num_classes for sample i (no guidance)."""
    from PIL import Image

    from .conditioning import cond_spec
    from .models.diffusers_unet import adapt

    spec = (cond_spec(adapt(model)) or {}).get("class_labels")
    labels = None if spec is None else torch.arange(n) % spec["range"][1]  # labels 0..K-1 (K: the null label)
    im = image_grid(sample_images(model, n, steps=steps, seed=seed, class_labels=labels))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    atomic_write_bytes(path, png_bytes(im))
