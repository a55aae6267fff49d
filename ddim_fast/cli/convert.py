"""`ddim-fast convert SRC DST`: an official DDIM ckpt.pth or a diffusers folder to a ddim-fast checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import check_destination, convert


class Convert:
    """`ddim-fast convert`: what it loaded (weights, config, schedule, sampler settings) and where it wrote it."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("src", help="an official DDIM ckpt.pth, or a diffusers UNet2DModel / pipeline folder")
        parser.add_argument("dst", help="the ddim-fast checkpoint folder to write")
        parser.add_argument("--no-ema", action="store_true",
                            help="keep only the raw training weights of an official checkpoint "
                                 "(default: keep the EMA weights too)")
        parser.add_argument("--config", metavar="YAML", default=None,
                            help="the official config (e.g. configs/cifar10.yml); "
                                 "default: inferred from the weights, the image size guessed (and said)")
        parser.add_argument("--resolution", type=int, default=None, metavar="N",
                            help="the image size of an official checkpoint converted without --config "
                                 "(the weights do not determine it)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing ddim-fast checkpoint at DST")

    @staticmethod
    def check(args) -> None:
        """The arguments, before anything is read: the source exists, the destination can be created (or
        replaced with --overwrite), a given --resolution or --config is usable."""
        if not Path(args.src).exists():
            raise FileNotFoundError(f"no checkpoint at {args.src}: check the path")
        if args.config is not None and args.resolution is not None:
            raise ValueError("give the official config or a resolution, not both (the config has data.image_size)")
        if args.resolution is not None and args.resolution < 1:
            raise ValueError(f"--resolution must be >= 1 (the image size), got {args.resolution}")
        if args.config is not None and not Path(args.config).is_file():
            raise FileNotFoundError(f"no config file at {args.config}: give the official YAML, "
                                    "e.g. configs/cifar10.yml")
        check_destination(Path(args.dst), args.overwrite)

    @staticmethod
    def run(args) -> int:
        Convert.check(args)
        s = convert(args.src, args.dst, ema=not args.no_ema, config=args.config, overwrite=args.overwrite,
                    resolution=args.resolution)
        weights = "raw + EMA weights (EMA is loaded by default)" if s["ema"] else "one set of weights"
        print(f"loaded {s['format']} checkpoint {args.src}: {s['params'] / 1e6:.1f}M parameters, {weights}")
        print(f"  {s['config']}")
        print(f"  schedule {s['schedule']}, prediction {s['prediction']!r}")
        if s["sampler"]:  # a pipeline's scheduler settings, kept for SamplingPlan.for_model and the commands
            shown = ", ".join(f"{k}={v}" for k, v in s["sampler"].items() if k != "from")
            print(f"  sampler settings from its scheduler config: {shown}")
        print(f"wrote {s['dst']}")
        return 0


