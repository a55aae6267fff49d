"""A training run's state on disk: its checkpoints (save, restore, prune), the `latest` pointer, the
log, and exporting a checkpoint's EMA weights as a sampling-only model.

Layout of a run folder (`ddim-fast train --out`):
    latest                          the name of the newest complete checkpoint (written atomically)
    checkpoints/step-0004000/       a ddim-fast model folder (config.json, model.safetensors,
                                    ema.safetensors) plus trainer.safetensors (optimizer state,
                                    RNG states), trainer.json (step, run arguments) and samples.png
                                    (DDIM-20 with the EMA weights)
    log.jsonl                       one JSON object per logged step
A checkpoint folder is written under a temporary name and moved into place when complete, so a crash
mid-write never replaces or damages the last good checkpoint; trainer.json is written last, so its
presence marks a complete checkpoint (checkpoint.find_latest_checkpoint). Under torchrun, rank 0
alone writes. The functions here take the Trainer (ddim_fast.train) whose state they save or restore.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from .checkpoint import EMA_FILE, MODEL_FILE, TRAINER_JSON, find_latest_checkpoint, load_model, save_model
from .files import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    move_into_place,
    read_safetensors,
)
from .sample_grid import write_sample_grid

TRAINER_FILE = "trainer.safetensors"
GRID_FILE = "samples.png"


# -- saving ----------------------------------------------------------------------------------------
def save(trainer) -> Path:
    """Write checkpoints/step-NNNNNNN atomically, then point `latest` at it (rank 0 only)."""
    ckdir = trainer.out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step-{trainer.step:07d}"
    final = ckdir / name
    tmp = ckdir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        cfg = trainer.cfg
        extra = {"training": {"step": trainer.step, "dataset": cfg.dataset, "weights": "raw + ema",
                              **{k: v for k, v in cfg.run_fields().items() if k != "dataset"},
                              "flips_applied": trainer.flip}}  # --flip and the data allows it
        if trainer.class_dropout is not None:
            extra["training"].update(class_dropout_applied=trainer.class_dropout,
                                     classes=list(trainer.data.classes or range(trainer.model_config.num_classes)))
        save_model(tmp, trainer.model, ema_state_dict=trainer.ema, extra=extra)
        tensors, state = trainer_state(trainer)
        atomic_save_safetensors(tmp / TRAINER_FILE, tensors)
        if cfg.grid_size:
            trainer.say(f"step {trainer.step}: drawing the checkpoint's sample grid ({cfg.grid_size} images, "
                        "DDIM-20, EMA weights)...")
            write_sample_grid(tmp / GRID_FILE, trainer.ema_model(), cfg.grid_size, seed=cfg.seed)
        atomic_write_json(tmp / TRAINER_JSON, state)  # last: its presence marks a complete folder
        fsync_dir(tmp)
        move_into_place(tmp, final)  # a re-run of the same step sets the old folder aside first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(trainer.out / "latest", (name + "\n").encode())
    trainer.last_checkpoint = final
    prune(ckdir, cfg.keep, keep=final)
    return final


def prune(ckdir: Path, n: int, keep: Path) -> None:
    """Keep the newest `n` complete checkpoints (all when n is 0), and `keep` in any case."""
    if not n:
        return
    done = sorted(p for p in ckdir.glob("step-*") if (p / TRAINER_JSON).is_file())
    for p in done[:-n]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def trainer_state(trainer) -> tuple[dict, dict]:
    """(tensors, JSON) for everything but the weights: optimizer, scaler, RNG states, step."""
    sd = trainer.opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    state = {
        "step": trainer.step,
        "run": trainer.cfg.run_fields(),
        "model": trainer.model_config.to_dict(),
        "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "world_size": trainer.dist.world,
        "torch": torch.__version__,
    }
    return tensors, state


# -- resuming --------------------------------------------------------------------------------------
def restore(trainer, folder: Path, run_fields) -> None:
    """Resume `trainer` from a checkpoint folder: refused when a field of `run_fields` differs from
    the run that wrote it; a damaged checkpoint is one error naming it and the way out."""
    try:
        state = json.loads((folder / TRAINER_JSON).read_text())
        saved, now = state["run"], trainer.cfg.run_fields()
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise _damaged(folder, e) from None
    diff = {k: (saved.get(k), now.get(k)) for k in run_fields if saved.get(k) != now.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"--resume: the options differ from the run in {trainer.out} ({shown}); "
                         "give the same options (only --steps, --save-every, --log-every, --keep "
                         "may change) "
                         "or choose another --out")
    try:
        _restore(trainer, folder, state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _damaged(folder, e) from None
    if trainer.dist.main:
        trainer.log(f"resuming from step {trainer.step} ({folder})")


def _restore(trainer, folder: Path, state: dict):
    dev = str(trainer.device)
    trainer.model.load_state_dict(read_safetensors(folder / MODEL_FILE, dev))
    trainer.ema = {k: v.float() for k, v in read_safetensors(folder / EMA_FILE, dev).items()}
    tensors = read_safetensors(folder / TRAINER_FILE)
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, k = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[k] = v
    for key, v in state["optimizer"]["scalars"].items():
        pid, k = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[k] = v
    trainer.opt.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    if trainer.scaler and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    trainer.step = trainer.resumed_from = int(state["step"])
    trainer.last_checkpoint = folder


def _damaged(folder: Path, err: Exception) -> ValueError:
    return ValueError(f"--resume: the checkpoint {folder} is damaged ({type(err).__name__}: {err}); delete that "
                      "folder to resume from the checkpoint before it, or start over in another --out")


def trim_log(out: Path, resumed_from: int | None) -> None:
    """On resume, drop log lines past the resumed step (an interrupted run may have logged them)."""
    path = out / "log.jsonl"
    if resumed_from is None or not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resumed_from]
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def remove_debris(out: Path) -> None:
    """Delete half-written checkpoint folders a killed run (SIGKILL, power loss) left behind:
    they carry a leading dot and never a complete checkpoint's name."""
    ckdir = out / "checkpoints"
    if ckdir.is_dir():
        for p in ckdir.glob(".*step-*"):
            shutil.rmtree(p, ignore_errors=True)


# -- exporting ---------------------------------------------------------------------------------------
def export_ema(checkpoint, dst, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the EMA weights of a training checkpoint as a sampling-only model folder at `dst`
    (config.json + model.safetensors holding the EMA weights, no optimizer state): half the size,
    which is how the bundled model ships. `extra` adds keys to the "training" record."""
    src = Path(checkpoint)
    if (src / "checkpoints").is_dir():  # a run folder: take its latest checkpoint
        found = find_latest_checkpoint(src)
        if found is None:
            raise FileNotFoundError(f"{src} holds no complete checkpoint yet; train first")
        src = found
    model = load_model(src, ema=True)
    training = dict(model.checkpoint_info.get("training", {}))
    training.update({"weights": "ema", "source": src.name, **(extra or {})})
    return save_model(dst, model, extra={"training": training}, overwrite=overwrite)
