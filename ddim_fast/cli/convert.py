"""`ddim-fast convert SRC DST`: an official DDIM ckpt.pth or a diffusers folder to a ddim-fast checkpoint."""

from __future__ import annotations

from ..checkpoint import convert


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
    def run(args) -> int:
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


