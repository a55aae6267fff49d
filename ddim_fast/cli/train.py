"""`ddim-fast train`: TrainConfig's fields as options; Ctrl-C says where the last checkpoint is."""

from __future__ import annotations

import argparse
import dataclasses

from .. import distributed
from ..checks import require
from ..models.unet import PRESETS
from ..plan import PREDICTIONS
from ..train import (
    DEFAULT_CLASS_DROPOUT,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    check_run_folder,
    train,
)
from ..train_state import find_latest_checkpoint


class Train:
    """`ddim-fast train`: the DDPM objective on a dataset, checkpoints in the run folder (torchrun-aware)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        d = TrainConfig(out="")
        p.add_argument("--dataset", default=d.dataset, help="digits | synthetic[:N] | folder:PATH | cifar10:PATH")
        p.add_argument("--config", default=d.config,
                       help=f"UNet preset ({', '.join(PRESETS)}) or a JSON file of UNetConfig fields")
        p.add_argument("--out", required=True, help="run folder (checkpoints, latest, log.jsonl)")
        p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps to reach")
        p.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="global batch per optimizer step (split over processes and --accum)")
        p.add_argument("--lr", type=float, default=d.lr)
        p.add_argument("--warmup", type=int, default=d.warmup, help="linear lr warm-up steps")
        p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule)
        p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
        p.add_argument("--weight-decay", type=float, default=d.weight_decay)
        p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 disables")
        p.add_argument("--ema-decay", type=float, default=d.ema_decay)
        p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
        p.add_argument("--num-classes", type=int, default=None,
                       help="train a class-conditional model on the dataset's labels 0..N-1 (N+1 embeddings: N is "
                            "the null label)")
        p.add_argument("--class-dropout", type=float, default=None,
                       help=f"probability of replacing a label by the null label (default {DEFAULT_CLASS_DROPOUT} "
                            "for a class-conditional model)")
        p.add_argument("--prediction", choices=PREDICTIONS, default=d.prediction, help="regression target")
        p.add_argument("--no-flip", dest="flip", action="store_false",
                       help="no random horizontal flips (digits are never flipped)")
        p.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="autocast dtype (fp16: GPU)")
        p.add_argument("--accum", type=int, default=d.accum, help="gradient-accumulation micro-batches")
        p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period in steps")
        p.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep (0: all)")
        p.add_argument("--log-every", type=int, default=d.log_every)
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="noise schedule")
        p.add_argument("--timesteps", type=int, default=d.timesteps, help="T, training timesteps")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
        p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
        p.add_argument("--workers", type=int, default=None, help="data-loader processes (folder datasets)")
        p.add_argument("--grid-size", type=int, default=d.grid_size, help="images per checkpoint sample grid")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")

    @staticmethod
    def check(args) -> TrainConfig:
        """Every option (TrainConfig checks them all when it is made), the run folder and the extra, before
        any data or model."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
        check_run_folder(cfg.out)
        if cfg.dataset == "digits":  # the data comes with scikit-learn
            require("sklearn.datasets", "train", "the digits dataset (scikit-learn's)")
        return cfg

    @staticmethod
    def run(args) -> int:
        cfg = Train.check(args)
        dist_main = distributed.Dist.from_env().main
        say = print if dist_main else (lambda *a, **k: None)
        try:
            result = train(cfg, log=say)
        except KeyboardInterrupt:
            last = find_latest_checkpoint(cfg.out)
            if last is None:
                hint = (f"no checkpoint was saved yet (one every --save-every {cfg.save_every} steps); rerun the same "
                        "command to start again")
            else:
                hint = (f"the last checkpoint is {last}; continue from it with the same command"
                        + ("" if cfg.resume else " plus --resume"))
            raise KeyboardInterrupt(hint) from None
        finally:
            distributed.finish()
        if dist_main:
            where = result.checkpoint or find_latest_checkpoint(cfg.out)
            print(f"done: step {result.step}; latest checkpoint {where}")
        return 0


