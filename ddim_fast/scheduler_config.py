"""diffusers scheduler configs read without diffusers: the noise schedule, the prediction type and the
SamplingPlan settings DDIMPipeline samples with.

    diffusers_schedule(cfg)        -> (NoiseSchedule, prediction) of a scheduler_config.json dict
    diffusers_sampler(cfg, sched)  -> the SamplingPlan.build settings of DDIMPipeline (spacing, clip, ...)
    read_scheduler_config(path)    -> (dict, file) from a pipeline folder, its scheduler/ folder or the file
    plan_source(x)                 -> what SamplingPlan.for_model reads (schedule, prediction,
                                      sampler_defaults) of a diffusers pipeline, scheduler, scheduler
                                      config dict or folder; anything else is returned as it is

The models' importers (models/convert.py) and SamplingPlan.for_model share these, so a pipeline folder
loaded with dd.load_model and the same folder, pipeline or scheduler given to for_model give one plan.
This module imports only schedule.py and checks.py (plan.py uses it), and never diffusers: a pipeline
or scheduler object is recognised by its class's module.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .checks import is_int, is_number
from .schedule import NoiseSchedule

DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SCHEDULER_FILE = "scheduler_config.json"

# DDIMScheduler's defaults for the settings DDIMPipeline samples with (DDIMPipeline turns any
# scheduler config into a DDIMScheduler, so a DDPMScheduler config missing a key gets these).
DDIM_SCHEDULER_DEFAULTS = {"set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0,
                           "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                           "timestep_spacing": "leading", "steps_offset": 0}


def _number(cfg: dict, key: str, default):
    value = cfg.get(key, default)
    if value is None:
        value = default
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"the scheduler config's {key} must be a number, got {value!r}")
    return value


def diffusers_schedule(sched_cfg: dict) -> tuple[NoiseSchedule, str]:
    """(NoiseSchedule, prediction) from a diffusers scheduler_config.json dict."""
    if not isinstance(sched_cfg, dict):
        raise ValueError(f"a scheduler config is a dict (scheduler_config.json), got {type(sched_cfg).__name__}")
    T = _number(sched_cfg, "num_train_timesteps", 1000)
    if not is_int(T) or T < 1:
        raise ValueError(f"the scheduler config's num_train_timesteps must be a positive int, got {T!r}")
    b0, b1 = float(_number(sched_cfg, "beta_start", 1e-4)), float(_number(sched_cfg, "beta_end", 0.02))
    kind = sched_cfg.get("beta_schedule", "linear")
    if sched_cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True is not supported; convert with that option off")
    if sched_cfg.get("trained_betas") is not None:
        schedule = NoiseSchedule.from_betas(sched_cfg["trained_betas"])
    elif kind == "linear":
        schedule = NoiseSchedule.linear(int(T), b0, b1)
    elif kind == "scaled_linear":
        schedule = NoiseSchedule.scaled_linear(int(T), b0, b1)
    elif kind == "squaredcos_cap_v2":
        schedule = NoiseSchedule.cosine(int(T))
    else:
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r}; expected linear, scaled_linear or "
                         "squaredcos_cap_v2 (or trained_betas)")
    pred = sched_cfg.get("prediction_type", "epsilon")
    if pred not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"unknown prediction_type {pred!r}; expected one of {sorted(DIFFUSERS_PREDICTIONS)}")
    return schedule, DIFFUSERS_PREDICTIONS[pred]


def diffusers_sampler(sched_cfg: dict, schedule: NoiseSchedule) -> dict:
    """The SamplingPlan.build settings with which DDIMPipeline samples, from a scheduler_config.json:
    timestep_spacing + steps_offset -> spacing (+ steps_offset), clip_sample + clip_sample_range ->
    clip_x0, thresholding + dynamic_thresholding_ratio + sample_max_value -> threshold (+ threshold_max),
    set_alpha_to_one=False -> final_alpha = alphas_cumprod[0]. prediction_type is the model's
    `prediction`. Every key is set, so a saved checkpoint records the whole choice."""
    c = {**DDIM_SCHEDULER_DEFAULTS, **{k: v for k, v in sched_cfg.items() if k in DDIM_SCHEDULER_DEFAULTS}}
    spacing = c["timestep_spacing"]
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"unknown diffusers timestep_spacing {spacing!r}; expected leading, trailing or linspace")
    if not is_int(c["steps_offset"]) or c["steps_offset"] < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {c['steps_offset']!r}")
    out = {"spacing": spacing, "steps_offset": int(c["steps_offset"]) if spacing == "leading" else 0,
           "clip_x0": None, "final_alpha": None if c["set_alpha_to_one"] else float(schedule.alphas_cumprod[0])}
    if c["thresholding"]:  # diffusers thresholds first and clips only without it
        out["threshold"] = float(_number(c, "dynamic_thresholding_ratio", 0.995))
        out["threshold_max"] = float(_number(c, "sample_max_value", 1.0))
    elif c["clip_sample"]:
        out["clip_x0"] = float(_number(c, "clip_sample_range", 1.0))
    return out


def read_scheduler_config(path) -> tuple[dict, Path]:
    """(the config, its file) of a diffusers pipeline folder (scheduler/scheduler_config.json), a
    scheduler folder (scheduler_config.json) or the file itself."""
    p = Path(path)
    if p.is_dir():
        found = [f for f in (p / SCHEDULER_FILE, p / "scheduler" / SCHEDULER_FILE) if f.is_file()]
        if not found:
            raise ValueError(f"{p} holds no diffusers scheduler config ({SCHEDULER_FILE}, or "
                             f"scheduler/{SCHEDULER_FILE}): give a pipeline folder, its scheduler/ folder or the file; "
                             "for a model folder, load "
                             "the model with dd.load_model(path) and pass the model")
        p = found[0]
    elif not p.is_file():
        raise FileNotFoundError(f"no folder or file at {p}: check the path")
    try:
        cfg = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not a readable JSON file ({e}); give the pipeline's scheduler_config.json") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} is not a scheduler config (a JSON object), got a {type(cfg).__name__}")
    name = str(cfg.get("_class_name", ""))
    if "block_out_channels" in cfg or (name and not name.endswith("Scheduler")):
        raise ValueError(f"{p} is the config of a {name or 'model'}, not of a scheduler: give the pipeline folder, "
                         f"its scheduler/ folder or scheduler/{SCHEDULER_FILE}")
    return cfg, p


@dataclass(frozen=True)
class SchedulerSettings:
    """What SamplingPlan.for_model reads of a model, taken from a diffusers scheduler config."""

    schedule: NoiseSchedule
    prediction: str
    sampler_defaults: dict = field(default_factory=dict)
    source: str = "a diffusers scheduler config"


def _from_diffusers(obj) -> bool:
    return any(c.__module__.split(".")[0] == "diffusers" for c in type(obj).__mro__)


def plan_source(x):
    """The SchedulerSettings of a diffusers pipeline (its .scheduler), scheduler, scheduler config dict
    or path (pipeline folder, scheduler/ folder or scheduler_config.json); `x` itself otherwise."""
    if isinstance(x, (str, os.PathLike)):
        cfg, where = read_scheduler_config(x)
        where = str(where)
    elif isinstance(x, dict):
        cfg, where = x, "the scheduler config"
    elif _from_diffusers(x) and hasattr(getattr(x, "scheduler", None), "config"):  # a pipeline
        cfg, where = dict(x.scheduler.config), f"the {type(x).__name__}'s {type(x.scheduler).__name__}"
    elif _from_diffusers(x) and hasattr(x, "config") and hasattr(x, "set_timesteps"):  # a scheduler
        cfg, where = dict(x.config), f"the {type(x).__name__}"
    else:
        return x
    schedule, prediction = diffusers_schedule(cfg)
    return SchedulerSettings(schedule, prediction, {"from": "diffusers", **diffusers_sampler(cfg, schedule)}, where)
