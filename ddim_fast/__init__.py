"""ddim-fast: the DDIM samplers of Song, Meng & Ermon (ICLR 2021), exact and fast.

    import ddim_fast as dd
    sched = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    plan = dd.SamplingPlan.build(sched, steps=50, eta=0.0)
    x0 = dd.sample(model, x_T, plan, seed=0)

Public names are imported lazily (PEP 562), so `import ddim_fast` does not pull in Triton or
ONNX until a name that needs them is used.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "schedule",
    "timesteps": "schedule",
    "SamplingPlan": "plan",
    "sample": "sampling",
    "invert": "sampling",
    "slerp": "sampling",
    "rng": None,  # the module itself
    "UNet": "models.unet",
    "UNetConfig": "models.unet",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "Engine": "engine",
    "Workload": "engine",
    "export_onnx": "onnx",
    "tune_plan": "tune",
    "Batcher": "batcher",
    "QueueFull": "batcher",
    "DeadlineExceeded": "batcher",
    "BatcherClosed": "batcher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddim_fast' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = import_module(f".{module or name}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
