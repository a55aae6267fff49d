"""The reference trainer: the DDPM objective, checkpoints in the ddim-fast format, exact resume.

    ddim-fast train --dataset digits --config digits --out runs/digits --steps 4000
    torchrun --nproc-per-node 2 -m ddim_fast.cli train ...        # DistributedDataParallel

Objective (Ho et al. 2020; Eq. 10 of the DDIM paper's review of DDPM): for data x0, t ~ U{0..T-1}
and eps ~ N(0, I),
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,     loss = || target - f_theta(x_t, t) ||^2
with target eps (default), x0, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022); the
choice is recorded as the checkpoint's `prediction`, which the samplers read.

Class-conditional models (--num-classes N, or num_classes in a --config JSON) learn
f_theta(x_t, t, y) on the dataset's labels y; each label is replaced by the null label N with
probability --class-dropout (default 0.1), so the same network also learns the unconditional
model that classifier-free guidance needs (Ho & Salimans 2022).

Randomness. Every random draw of step s is a pure function of (seed, s): the data order is a
permutation per epoch keyed by (seed, epoch); t, eps and the flips of the whole global batch come
from a generator keyed by (seed, s); the class-dropout decisions of the global batch from another
keyed by (seed, s); dropout re-seeds the global generator with (seed, s, rank).
So a resumed run (step s restored from a checkpoint) draws exactly what the uninterrupted run
drew, and 1 or N processes see the same global batch. The global RNG states are also saved in
each checkpoint and restored, for any other code that draws from them.

The run folder (--out: checkpoints, `latest`, log.jsonl) and saving / resuming / exporting a
checkpoint are train_state.py; the checkpoints' sample grids are sample_grid.write_sample_grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed, rng, train_state
from .checkpoint import find_latest_checkpoint
from .data import TensorImages, load_dataset, num_workers_default
from .files import check_creatable
from .models.unet import PRESETS, UNet, UNetConfig
from .models.weights import build_model
from .plan import PREDICTIONS
from .precision import DTYPES
from .sample_grid import sample_images, write_sample_grid  # noqa: F401  (re-exported: docs/bundled-model.md)
from .schedule import NoiseSchedule
from .train_state import export_ema  # noqa: F401  (re-exported: docs/bundled-model.md)

OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")  # names of precision.DTYPES
SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("constant", "cosine")
# Fields that must match between a run and its resume (the others may change, e.g. --steps).
RUN_FIELDS = ("dataset", "config", "batch_size", "lr", "warmup", "lr_schedule", "optimizer", "weight_decay",
              "grad_clip", "ema_decay", "dropout", "prediction", "flip", "precision", "accum", "seed",
              "schedule", "timesteps", "num_classes", "class_dropout")
DEFAULT_CLASS_DROPOUT = 0.1  # classifier-free guidance paper's p_uncond = 0.1 or 0.2; 0.1 keeps more conditional steps


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The CLI fills it from flags of the same names."""

    out: str  # the run folder: checkpoints, latest, log.jsonl
    dataset: str = "digits"  # digits | synthetic[:N] | folder:PATH | cifar10:PATH (see data.py)
    config: str = "digits"  # a UNet preset name or a JSON file of UNetConfig fields
    steps: int = 2000  # total optimizer steps to reach (a resumed run continues up to it)
    batch_size: int = 128  # GLOBAL batch per optimizer step (all processes x accumulation); DDPM: 128
    lr: float = 2e-4  # DDPM CIFAR-10
    warmup: int = 500  # linear lr warm-up steps (DDPM: 5000 for 800k steps; shorter runs need less)
    lr_schedule: str = "constant"  # after warm-up: constant (DDPM) or cosine decay to 0 at --steps
    optimizer: str = "adam"  # adam (DDPM) or adamw
    weight_decay: float = 0.0  # DDPM uses none
    grad_clip: float = 1.0  # max global gradient norm (DDPM: 1.0); 0 disables clipping
    ema_decay: float = 0.9999  # DDPM; warmed up as min(decay, (1+n)/(10+n)) so short runs work
    dropout: float | None = None  # None: the preset's own dropout
    num_classes: int | None = None  # class-conditional on the dataset's labels 0..N-1; None: the config's own
    class_dropout: float | None = None  # P(label -> null label); None: DEFAULT_CLASS_DROPOUT if conditional
    prediction: str = "eps"  # the regression target: eps (Eq. 10), x0 or v
    flip: bool = True  # random horizontal flips where the dataset allows them (never for digits)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler, GPU only)
    accum: int = 1  # micro-batches per optimizer step and process (gradient accumulation)
    save_every: int = 1000  # checkpoint every K steps (and always at the last step)
    keep: int = 3  # newest checkpoints kept; older ones are deleted (0 keeps all)
    log_every: int = 10  # JSON-lines log period in steps
    seed: int = 0  # keys every random draw (see the module docstring)
    schedule: str = "linear"  # noise schedule: linear 1e-4..0.02 (every DDIM-paper model) or cosine
    timesteps: int = 1000  # T
    resume: bool = False  # continue from the latest checkpoint in `out`
    device: str = "auto"  # auto: cuda:LOCAL_RANK if CUDA is available, else cpu
    workers: int | None = None  # data-loader processes; None: 0 for in-memory data, 4 for folders
    grid_size: int = 64  # images in each checkpoint's samples.png (0: no grid)
    progress: bool = True  # the tqdm bar (rank 0)

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr-schedule must be one of {LR_SCHEDULES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.weight_decay >= 0, "weight-decay must be >= 0"),
            (self.grad_clip >= 0, "grad-clip must be >= 0 (0 disables it)"),
            (0.0 <= self.ema_decay < 1.0, "ema-decay must be in [0, 1)"),
            (self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.num_classes is None or (isinstance(self.num_classes, int) and self.num_classes >= 1),
             "num-classes must be a positive int"),
            (self.class_dropout is None or 0.0 <= self.class_dropout <= 1.0, "class-dropout must be in [0, 1]"),
            (self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.accum >= 1, "accum must be >= 1"),
            (self.save_every >= 1, "save-every must be >= 1"),
            (self.keep >= 0, "keep must be >= 0"),
            (self.log_every >= 1, "log-every must be >= 1"),
            (0 <= self.seed <= rng.SEED_MAX, "seed must be in [0, 2**63)"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.timesteps >= 2, "timesteps must be >= 2"),
            (self.grid_size >= 0, "grid-size must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg}; fix the training option")

    def run_fields(self) -> dict:
        d = {k: getattr(self, k) for k in RUN_FIELDS}
        for k in ("num_classes", "class_dropout"):  # left out when unset: unconditional runs record what they did
            if d[k] is None:
                del d[k]
        return d


@dataclass
class TrainResult:
    step: int  # the step reached
    losses: dict = field(default_factory=dict)  # step (1-based) -> global mean loss, steps run here
    resumed_from: int | None = None
    checkpoint: Path | None = None  # the newest checkpoint written (rank 0) or None


# -- randomness: every draw keyed by (seed, step) (rng.derived_seed) -----------------------------------
def class_dropout_mask(seed: int, step: int, batch_size: int, p: float, device="cpu") -> torch.Tensor:
    """(B,) bool: which labels of optimizer step `step`'s global batch become the null label, each
    independently with probability p. A pure function of its arguments, like batch_indices."""
    g = torch.Generator(device).manual_seed(rng.derived_seed(seed, step, rng.PURPOSE_CLASS))
    return torch.rand(batch_size, generator=g, device=device) < p  # (B,)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of optimizer step `step` (0-based): positions
    [step*B, (step+1)*B) of the endless stream perm_0 + perm_1 + ..., perm_e a permutation of
    range(n) keyed by (seed, epoch). Pure function of its arguments: resume needs no loader state."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        g = torch.Generator().manual_seed(rng.derived_seed(seed, e, rng.PURPOSE_EPOCH))
        perm = torch.randperm(n, generator=g)
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out  # (B,)


# -- the trainer -----------------------------------------------------------------------------------
def _model_config(cfg: TrainConfig) -> UNetConfig:
    if cfg.config in PRESETS:
        mc = UNetConfig.preset(cfg.config)
    elif cfg.config.endswith(".json"):
        p = Path(cfg.config)
        if not p.is_file():
            raise FileNotFoundError(f"model config file {cfg.config!r} does not exist; give a preset "
                                    f"({', '.join(PRESETS)}) or a JSON file of UNetConfig fields")
        mc = UNetConfig.from_dict(json.loads(p.read_text()))
    else:
        raise ValueError(f"unknown --config {cfg.config!r}; use a preset ({', '.join(PRESETS)}) "
                         "or a .json file of UNetConfig fields")
    if cfg.dropout is not None:
        mc = dataclasses.replace(mc, dropout=float(cfg.dropout))
    if cfg.num_classes is not None:
        mc = dataclasses.replace(mc, num_classes=cfg.num_classes)
    return mc


def _schedule(cfg: TrainConfig) -> NoiseSchedule:
    if cfg.schedule == "linear":
        return NoiseSchedule.linear(cfg.timesteps, 1e-4, 0.02)
    return NoiseSchedule.cosine(cfg.timesteps)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, updates: int) -> float:
    """EMA decay for update number `updates` (0-based): min(decay, (1+n)/(10+n)), so the average
    is not dominated by the random initialisation in short runs."""
    return min(cfg.ema_decay, (1 + updates) / (10 + updates))


def training_targets(x0, eps, t, alphas_cumprod, prediction):
    """(x_t, target) for data x0 (B, C, H, W), noise eps and timesteps t (B,)."""
    a = alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    x_t = sa * x0 + s1a * eps  # the forward process q(x_t | x0)
    if prediction == "eps":
        return x_t, eps
    if prediction == "x0":
        return x_t, x0
    return x_t, sa * eps - s1a * x0  # v


class Trainer:
    """State and steps of one run; `train(cfg)` is the function to call."""

    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        check_run_folder(cfg.out)  # before any work: the run folder is created, never the folders above it
        auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist, self.device = distributed.setup(auto if cfg.device == "auto" else torch.device(cfg.device))
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        micro, rem = divmod(cfg.batch_size, self.dist.world * cfg.accum)
        if rem or micro < 1:
            raise ValueError(
                f"batch-size {cfg.batch_size} must be a multiple of processes x accum = "
                f"{self.dist.world} x {cfg.accum}; change --batch-size or --accum"
            )
        self.micro = micro
        self.out = Path(cfg.out)
        self.model_config = _model_config(cfg)
        self.schedule = _schedule(cfg)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device, torch.float32)  # (T,)
        mc = self.model_config
        self.data = load_dataset(cfg.dataset, mc.resolution, mc.in_channels)
        self.flip = cfg.flip and self.data.flip_ok
        self.class_dropout = _class_dropout(cfg, mc, self.data)  # None: an unconditional model

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = UNet(mc).to(self.device)
        self.model.schedule, self.model.prediction = self.schedule, cfg.prediction
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.step = 0
        self.resumed_from = None
        self.last_checkpoint = None

        latest = find_latest_checkpoint(self.out)
        if latest is not None and not cfg.resume:
            raise FileExistsError(
                f"{self.out} already holds a run (checkpoint {latest.name}); pass --resume to continue it, "
                "or choose another --out"
            )
        if latest is not None:
            train_state.restore(self, latest, RUN_FIELDS)
        elif cfg.resume and self.dist.main:
            self.log(f"--resume: no checkpoint in {self.out}; starting from step 0")

        self.net = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # -- one optimizer step ----------------------------------------------------------------------
    def _share(self) -> slice:
        """This rank's contiguous part of every global batch."""
        share = self.micro * self.cfg.accum
        return slice(self.dist.rank * share, (self.dist.rank + 1) * share)

    def _step_indices(self, step: int) -> torch.Tensor:
        return batch_indices(step, self.cfg.batch_size, len(self.data), self.cfg.seed)[self._share()]

    def _loader(self):
        """Yields this rank's images (share, C, H, W) for steps self.step, self.step + 1, ...
        In-memory data is indexed directly; files are decoded by a DataLoader's workers."""
        if isinstance(self.data, TensorImages):
            step = self.step
            while True:
                yield self.data.images[self._step_indices(step)]
                step += 1
        workers = num_workers_default(self.data) if self.cfg.workers is None else self.cfg.workers
        batches = _StepBatches(self, self.step, self.cfg.steps)
        yield from torch.utils.data.DataLoader(self.data, batch_sampler=batches, num_workers=workers,
                                               collate_fn=torch.stack, pin_memory=self.device.type == "cuda")

    def _global_batch(self):
        """x0, eps, t, y for this rank's share of step `self.step`'s global batch; y (the labels,
        some replaced by the null label) is None for an unconditional model."""
        cfg, mc, B = self.cfg, self.model_config, self.cfg.batch_size
        x0 = next(self._batches).to(self.device, non_blocking=True)  # (share, C, H, W)
        lo, hi = self._share().start, self._share().stop
        g = torch.Generator(self.device).manual_seed(rng.derived_seed(cfg.seed, self.step, rng.PURPOSE_BATCH))
        shape = (B, mc.in_channels, mc.resolution, mc.resolution)
        t = torch.randint(0, self.schedule.T, (B,), generator=g, device=self.device)[lo:hi]
        eps = torch.randn(shape, generator=g, device=self.device)[lo:hi]
        flip = (torch.rand(B, generator=g, device=self.device) < 0.5)[lo:hi]
        if self.flip:
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        y = None
        if self.class_dropout is not None:
            y = self.data.labels[self._step_indices(self.step)].to(self.device)  # (share,)
            drop = class_dropout_mask(cfg.seed, self.step, B, self.class_dropout, self.device)[lo:hi]
            y = torch.where(drop, mc.num_classes, y)  # the null label
        return x0, eps, t, y

    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(rng.derived_seed(cfg.seed, self.step, rng.PURPOSE_DROPOUT, self.dist.rank))  # dropout
        self.model.train()
        x0, eps, t, y = self._global_batch()
        amp_dtype = None if cfg.precision == "fp32" else DTYPES[cfg.precision]  # autocast's
        total = torch.zeros((), device=self.device)
        for k in range(cfg.accum):
            s = slice(k * self.micro, (k + 1) * self.micro)
            x_t, target = training_targets(x0[s], eps[s], t[s], self.alphas_cumprod, cfg.prediction)
            last = k == cfg.accum - 1
            with (self.net.no_sync() if self.dist.world > 1 and not last else contextlib.nullcontext()):
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = self.net(x_t, t[s]) if y is None else self.net(x_t, t[s], class_labels=y[s])
                loss = F.mse_loss(pred.float(), target)  # Eq. 10, averaged over pixels and batch
                (self.scaler.scale(loss / cfg.accum) if self.scaler else loss / cfg.accum).backward()
            total += loss.detach() / cfg.accum
        if self.scaler:
            self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        return float(distributed.all_mean(total, self.dist)), grad_norm

    @torch.no_grad()
    def _update_ema(self):
        d = ema_decay_at(self.cfg, self.step)
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].mul_(d).add_(v.float(), alpha=1 - d)
            else:
                self.ema[k].copy_(v)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.main
        result = TrainResult(step=self.step, resumed_from=self.resumed_from)
        if main:
            self.out.mkdir(exist_ok=True)  # the run folder itself (check_run_folder: its parent exists)
            train_state.trim_log(self.out, self.resumed_from)
            train_state.remove_debris(self.out)
            self.log(f"training {self.model_config} ({self.model.num_parameters():,} params) on "
                     f"{self.data.name} ({len(self.data)} images, flips {'on' if self.flip else 'off'}), "
                     f"{self.dist.world} process(es) on {self.device}, global batch {cfg.batch_size} = "
                     f"{self.dist.world} x {cfg.accum} x {self.micro}")
        self._batches = self._loader()
        bar = None
        if main and cfg.progress and self.step < cfg.steps:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        self._bar = bar
        window, t0, t_log = [], time.perf_counter(), time.perf_counter()
        while self.step < cfg.steps:
            loss, gnorm = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at step {self.step}; lower --lr, keep --grad-clip on, "
                    "or use fp32"
                )
            result.losses[self.step] = loss
            window.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.opt.param_groups[0]['lr']:.2e}", refresh=False)
            if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                now = time.perf_counter()
                self._log_line({"step": self.step, "loss": sum(window) / len(window), "last_loss": loss,
                                "lr": self.opt.param_groups[0]["lr"], "grad_norm": gnorm,
                                "it_per_s": len(window) / max(now - t_log, 1e-9), "elapsed_s": now - t0,
                                "world_size": self.dist.world})
                window, t_log = [], now
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                if main:
                    result.checkpoint = train_state.save(self)
                    if bar is not None:
                        bar.write(f"saved {result.checkpoint}")
        if bar is not None:
            bar.close()
        result.step = self.step
        result.checkpoint = result.checkpoint or self.last_checkpoint
        return result

    def say(self, msg: str):
        """A progress note on the console, above the bar when there is one."""
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.write(msg)
        else:
            self.log(msg)

    def _log_line(self, obj: dict):
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(obj) + "\n")

    def ema_model(self) -> UNet:
        """A UNet holding the current EMA weights (for the checkpoint's sample grid)."""
        return build_model(self.model_config, self.ema, schedule=self.schedule,
                           prediction=self.cfg.prediction, device=self.device, what="the EMA weights")

def _class_dropout(cfg: TrainConfig, mc: UNetConfig, data) -> float | None:
    """The class-dropout probability of a conditional run (None for an unconditional one), after
    checking that the dataset has labels, all of them below num_classes."""
    n = mc.num_classes
    if n is None:
        if cfg.class_dropout is not None:
            raise ValueError("--class-dropout needs a class-conditional model; add --num-classes N "
                             "(or num_classes in the --config JSON), or drop --class-dropout")
        return None
    labels = getattr(data, "labels", None)
    if labels is None:
        raise ValueError(f"a class-conditional model (num_classes={n}) needs labels, and {data.name} has none; "
                         "use digits, cifar10:PATH or folder:PATH with one sub-folder per class "
                         "(PATH/CLASS/image.png), or train without --num-classes")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{data.name} has labels {lo}..{hi}, outside 0..{n - 1} of num_classes={n}; "
                         f"use --num-classes {max(hi + 1, 1)} (or more)")
    return DEFAULT_CLASS_DROPOUT if cfg.class_dropout is None else float(cfg.class_dropout)


class _StepBatches:
    """A batch sampler: this rank's dataset indices for each step in [start, stop)."""

    def __init__(self, trainer: Trainer, start: int, stop: int):
        self.trainer, self.start, self.stop = trainer, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.trainer._step_indices(step).tolist()


def check_run_folder(out) -> Path:
    """The run folder `out`: an existing folder, or one that can be created in an existing, writable folder
    (like mkdir without -p: the trainer creates the run folder, never the folders above it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a run folder; choose another --out")
    if not out.exists():
        check_creatable(out)
    return out


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Run (or resume) the training run `cfg` up to cfg.steps; see the module docstring."""
    return Trainer(cfg, log=log).run()
