"""The `ddim-fast` command: one convention for every sub-command.

A sub-command is a class with two static methods,
    add_arguments(parser)   fill in its argparse sub-parser
    run(args) -> int        run it (returns the exit code)
in the file of its family (sample.py: sample, encode, decode, interpolate; export.py; tune.py; train.py;
convert.py; bench.py; metrics.py: eval-digits, train-digits-classifier; aot.py; serve.py), listed in COMMANDS.
Options several commands share (the model, the plan from arguments, device and dtype) are in
common.py, the torchrun setup in ddim_fast.distributed. Errors a user can fix (ValueError,
FileNotFoundError, ...; an OSError from the file system, e.g. a full disk; a mistyped or unknown
option) are printed as one line, without a traceback, and exit with status 2. Each sub-command checks
every argument it can before it loads a model, exports or samples (its `check(args)`; cli/checks.py).

    ddim-fast ...                    the console script (ddim_fast.cli:main)
    python -m ddim_fast.cli ...      the same (torchrun: -m ddim_fast.cli)
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from importlib import import_module

# name -> (module in this package, class, one-line help)
COMMANDS = {
    "sample": ("sample", "Sample", "sample images (grid PNG, folder of PNGs, or .npz); torchrun-aware"),
    "encode": ("sample", "Encode", "images -> x_T latents (.npz) by DDIM inversion"),
    "decode": ("sample", "Decode", "x_T latents (.npz) -> images"),
    "interpolate": ("sample", "Interpolate", "slerp between two seeds or latents, decoded to a strip PNG"),
    "export": ("export", "Export", "export the eps-model or the whole sampler to ONNX (checked in ONNX Runtime)"),
    "tune": ("tune", "Tune", "fit a plan's timesteps and table to a model (a plan file for sample --plan)"),
    "train": ("train", "Train", "train a UNet with the DDPM objective"),
    "convert": ("convert", "Convert", "import an official ckpt.pth or a diffusers folder"),
    "bench": ("bench", "Bench", "run a benchmark script from a source checkout (benchmarks/)"),
    "eval-digits": ("metrics", "EvalDigits", "judge a digits model's DDIM samples with the digits classifier "
                    "(FD-digits)"),
    "train-digits-classifier": ("metrics", "TrainDigitsClassifier", "train and save the classifier behind FD-digits"),
    "serve": ("serve", "Serve", "an HTTP server (POST /v1/images/generations) that merges requests into batches, "
              "each image exactly its solo result"),
    "aot": ("aot", "Aot", "compile every shipped Triton kernel for sm_80/sm_90 without a GPU: registers, spills"),
}


def command(name: str):
    """The class of sub-command `name` (its module imported on first use)."""
    module, cls, _ = COMMANDS[name]
    return getattr(import_module(f".{module}", __name__), cls)


EPILOG = """examples:
  ddim-fast sample --out samples.png                       # the bundled digits model, DDIM-20
  ddim-fast sample --model ckpt.pth --steps 50 --eta 0 --num 64 --out grid.png
  torchrun --nproc-per-node 2 -m ddim_fast.cli sample -n 50000 --out samples/   # not --num: see sample --help
  ddim-fast encode --input samples.npz --out latents.npz
  ddim-fast interpolate --seeds 1 2 --num 9 --out strip.png
  ddim-fast export --whole-sampler --steps 10 --out ddim10.onnx
  ddim-fast tune --steps 5 --out digits-5.json && ddim-fast sample --plan digits-5.json
  ddim-fast sample --plan tuned --steps 5 --out grid.png  # the tuned plan bundled with the model
  ddim-fast train --dataset digits --config digits --out runs/digits --steps 2000
  ddim-fast convert ckpt.pth my-model/
  ddim-fast bench speedup_vs_ddpm --quick
  ddim-fast serve --model digits --steps 10 --port 8000     # POST /v1/images/generations (the serve extra)
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option's default shown, unless its help already says it
    or it has none (None, or off for a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == argparse.SUPPRESS or action.nargs == 0:
            return text  # nargs 0: a flag (--overwrite, --no-progress), whose default is "not given"
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (no usage block) that point at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="ddim-fast",
        description="Fast, exact DDIM sampling (Song, Meng & Ermon, ICLR 2021).",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ddim-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        command(name).add_arguments(p)
        for action in p._actions:  # argparse prints nothing for an option without help: give it its default
            if action.help is None and action.option_strings and action.nargs != 0 and action.default is not None:
                action.help = "(default: %(default)s)"
    return parser


USER_ERRORS = (ValueError, OSError, KeyError)  # OSError: FileNotFoundError, PermissionError, a full disk...

# What to do about an OSError the file system raised (it carries an errno; ours carry a message).
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "something is already there: remove it or choose another path",
    errno.EISDIR: "that is a folder: give a file name",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOSPC: "free some disk space or choose another location",
    errno.EDQUOT: "free some disk space or choose another location",
}


def error_message(e: BaseException) -> str:
    """One line for a user error: the library's own message (its lines joined by '; '), or the
    file system's error with what to do about it."""
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    elif isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        fix = _OS_FIXES.get(e.errno, "check the path and the disk")
        msg = f"{e.strerror}{f': {where}' if where else ''}; {fix}"
    else:
        msg = str(e)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):  # re-raised from a DataLoader worker:
        lines = [lines[-1].partition(": ")[2] or lines[-1]]  # keep the worker's own message only
    return "; ".join(lines)


def check_environment() -> None:
    """The environment variables a command may read later, checked at start-up: DDIM_FAST_CACHE_MAX_MB."""
    from ..onnx.cache import cache_limit_bytes

    cache_limit_bytes()


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed on one line (2)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    prog = f"ddim-fast {args.command}"
    if extra:
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}; see `{prog} --help`", file=sys.stderr)
        return 2
    with warnings.catch_warnings():  # warnings print as one line each: "ddim-fast CMD: warning: ..."
        warnings.showwarning = lambda message, *_a, **_k: print(f"{prog}: warning: {message}", file=sys.stderr)
        try:
            from .common import export_progress

            check_environment()
            with export_progress(getattr(args, "progress", True)):
                return int(command(args.command).run(args) or 0)
        except USER_ERRORS as e:
            print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # a command may say how to resume: KeyboardInterrupt("rerun ...")
            print(f"{prog}: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
            return 130


