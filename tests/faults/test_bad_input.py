"""Bad input at every public entry point: each CLI sub-command, each file format, and the API
cases the per-module tests leave out (those are not repeated here).

Every case asserts its message: it names the problem and the fix. On the command line (through
ddim_fast.cli.main, plus one real run of the `ddim-fast` console script) a user error is exit
status 2, exactly one line on stderr, no traceback, and nothing written. The last section feeds
random bytes and random arguments to the readers and constructors: ValueError or a valid result,
never another exception and never a hang.
"""

import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import ddim_fast as dd
from ddim_fast import files, images
from ddim_fast.checkpoint import save_model
from ddim_fast.cli import error_message, main
from ddim_fast.models.analytic import GaussianEps
from tests.helpers import MarkerPayload

SCHED = dd.NoiseSchedule.linear(100, 1e-3, 0.05)  # T = 100: steps 101 is out of range
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """Every damaged or wrong file the cases below read, by name -> path (str)."""
    root = tmp_path_factory.mktemp("bad-files")
    torch.manual_seed(0)
    model = dd.UNet(dd.UNetConfig.tiny())
    model.schedule = SCHED
    tiny = save_model(root / "tiny", model)
    weights = (tiny / "model.safetensors").read_bytes()
    paths = {"tiny": tiny, "marker": root / "pickle-ran"}

    def damaged_copy(name, file, data):
        shutil.copytree(tiny, root / name)
        (root / name / file).write_bytes(data)
        paths[name] = root / name

    damaged_copy("truncated_ck", "model.safetensors", weights[: len(weights) // 2])
    damaged_copy("garbage_ck", "model.safetensors", b"\x00" * 64)
    damaged_copy("json_ck", "config.json", b'{"format": "ddim-fast", "vers')
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["model"]["ch_mult"] = [1, 2, 2]
    damaged_copy("arch_ck", "config.json", json.dumps(cfg).encode())

    paths["evil_pth"] = root / "evil.pth"
    paths["evil_pth"].write_bytes(pickle.dumps(MarkerPayload(paths["marker"])))
    torch.save(model.state_dict(), root / "whole.pth")
    paths["truncated_pth"] = root / "truncated.pth"
    paths["truncated_pth"].write_bytes((root / "whole.pth").read_bytes()[:5000])
    diffusers = root / "diffusers"
    diffusers.mkdir()
    (diffusers / "config.json").write_text(json.dumps({  # a DDPM UNet2DModel config (google/ddpm-* layout)
        "_class_name": "UNet2DModel", "attention_head_dim": None, "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "norm_num_groups": 8,
        "layers_per_block": 1, "sample_size": 16}))
    (diffusers / "diffusion_pytorch_model.safetensors").write_bytes(weights[:1000])
    paths["diffusers"] = diffusers

    good = np.zeros((2, 3, 16, 16), np.float32)
    for name, arrays in {"ok": dict(images=good, latents=good), "nan": dict(images=good * np.nan),
                         "ints": dict(latents=good.astype(np.int64)), "small": dict(images=good[:, :, :8, :8],
                                                                                    latents=good[:, :, :8, :8]),
                         "one": dict(latents=good[:1]), "objects": dict(latents=np.array([{"a": 1}], dtype=object))
                         }.items():
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], **arrays)
    paths["truncated_npz"] = root / "truncated.npz"
    paths["truncated_npz"].write_bytes(paths["ok"].read_bytes()[:300])
    paths["evil_npz"] = root / "evil.npz"  # a pickle under an .npz name
    paths["evil_npz"].write_bytes(pickle.dumps(MarkerPayload(paths["marker"])))

    paths["png"] = root / "good.png"
    noisy = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(paths["png"])
    paths["truncated_png"] = root / "truncated.png"
    paths["truncated_png"].write_bytes(paths["png"].read_bytes()[:400])
    paths["bomb_png"] = root / "bomb.png"  # a header claiming 60000 x 60000 pixels
    paths["bomb_png"].write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2,
                                                                                         0, 0, 0))
                                  + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    paths["no_images"] = root / "no-images"
    paths["no_images"].mkdir()
    (paths["no_images"] / "notes.txt").write_text("x")
    paths["bad_folder"] = root / "bad-folder"  # a training folder with one unreadable image
    paths["bad_folder"].mkdir()
    for i in range(3):
        shutil.copy(paths["png"], paths["bad_folder"] / f"{i}.png")
    (paths["bad_folder"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths["a_file"] = root / "a-file"
    paths["a_file"].write_text("not a folder")
    return {k: str(v) for k, v in paths.items()}


def _cli(capsys, argv, f):
    """Run the CLI in-process; return (exit status, stderr)."""
    capsys.readouterr()
    rc = main([str(a).format(**f) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, command, *fragments):
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
    assert err.startswith(f"ddim-fast {command}: error: ") if command else err.startswith("ddim-fast: error: "), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


M = ["--model", "{tiny}", "--backend", "reference", "--steps", "3", "--no-progress"]

# (argv, the fragments the one-line error must contain)
CASES = {
    # -- usage: unknown options, missing or malformed values; argparse's own errors, made one line
    "unknown option": (["sample", *M, "--frobnicate", "3"],
                       ["unrecognized arguments: --frobnicate 3", "see `ddim-fast sample --help`"]),
    "unknown train option": (["train", "--out", "run", "--learning-rate", "1"],
                             ["ddim-fast train: error: unrecognized arguments: --learning-rate 1"]),
    "unknown command": (["frobnicate"], ["invalid choice: 'frobnicate'", "see `ddim-fast --help`"]),
    "malformed int": (["sample", *M, "--num", "ten"], ["argument --num/-n/--num-images: invalid int value: 'ten'"]),
    "unknown choice": (["sample", *M, "--spacing", "cubic"], ["argument --spacing: invalid choice: 'cubic'"]),
    "missing required": (["decode", *M], ["the following arguments are required: --input"]),
    "missing value": (["encode", *M, "--input"], ["argument --input: expected one argument"]),
    "missing positional": (["convert", "only-src"], ["the following arguments are required: dst"]),
    "exclusive options": (["interpolate", *M, "--seeds", "1", "2", "--latents", "{ok}"],
                          ["argument --latents: not allowed with argument --seeds"]),
    "unknown benchmark": (["bench", "fastest"], ["argument name: invalid choice: 'fastest'"]),
    # -- values out of range (steps 0 and eta < 0 are in cli/test_cli_sample.py)
    "steps above T": (["sample", *M[:-3], "--steps", "101", "--out", "x.png"],
                      ["steps must be an int in [1, T=100], got 101", "steps=T for the full"]),
    "encode steps 0": (["encode", *M[:-3], "--steps", "0", "--input", "{ok}"], ["steps must be an int in [1, T]"]),
    "nan eta": (["sample", *M, "--eta", "nan", "--out", "x.png"], ["eta must be finite and >= 0"]),
    "batch size 0": (["sample", *M, "--batch-size", "0", "--out", "x.png"], ["--batch-size must be >= 1, got 0"]),
    "negative seed": (["sample", *M, "--seed", "-1", "--out", "x.png"], ["seed must be an int in [0, 2**63)"]),
    "empty clip range": (["sample", *M, "--clip-x0", "0", "--out", "x.png"],
                         ["argument --clip-x0: --clip-x0 takes C > 0 (clip x0 to [-C, C]) or 'none', got '0'"]),
    "negative clip": (["sample", *M, "--clip-x0", "-1", "--out", "x.png"], ["--clip-x0 takes C > 0", "got '-1'"]),
    "negative export clip": (["export", "--whole-sampler", "--clip-x0", "-1", "--out", "x.onnx"],
                             ["--clip-x0 takes C > 0"]),
    "sigma-hat with eta": (["sample", *M, "--variance", "large", "--eta", "0.5", "--out", "x.png"],
                           ["variance='large' (sigma-hat) fixes its own noise; leave eta at 0 or 1"]),
    "unknown device": (["sample", *M, "--device", "tpu9", "--out", "x.png"],
                       ["unknown --device 'tpu9'; use auto, cpu, cuda or cuda:N"]),
    "one frame": (["interpolate", *M, "--num", "1"], ["--num must be >= 2 (the two endpoints), got 1"]),
    "negative interpolation seed": (["interpolate", *M, "--seeds", "-1", "2"], ["seed must be an int in [0, 2**63)"]),
    "export opset": (["export", "--model", "{tiny}", "--out", "x.onnx", "--opset", "5"],
                     ["opset must be an int in [18, 23]"]),
    "export sampler option alone": (["export", "--model", "{tiny}", "--out", "x.onnx", "--eta", "0.5"],
                                    ["--eta only applies to --whole-sampler; add --whole-sampler or drop it"]),
    "train steps 0": (["train", "--out", "run", "--steps", "0"], ["steps must be >= 1; fix the training option"]),
    "train nan lr": (["train", "--out", "run", "--lr", "nan"], ["lr must be a positive number"]),
    "train T 1": (["train", "--out", "run", "--timesteps", "1"], ["timesteps must be >= 2"]),
    "train missing folder": (["train", "--out", "run", "--config", "tiny", "--dataset", "folder:no/such/dir"],
                             ["dataset folder 'no/such/dir' does not exist; check the path after 'folder:'"]),
    # -- checkpoints: damaged, foreign, unsafe
    "truncated safetensors": (["sample", *M[2:], "--model", "{truncated_ck}", "--out", "x.png"],
                              ["model.safetensors is not a readable safetensors file", "damaged or truncated",
                               "re-save or re-download it"]),
    "garbage safetensors": (["export", "--model", "{garbage_ck}", "--out", "x.onnx"],
                            ["model.safetensors is not a readable safetensors file"]),
    "damaged config.json": (["encode", *M[2:], "--model", "{json_ck}", "--input", "{ok}"],
                            ["config.json is not valid JSON", "re-save it"]),
    "another architecture": (["decode", *M[2:], "--model", "{arch_ck}", "--input", "{ok}"],
                             ["do not fit UNetConfig(", "; missing (", "that is UNetConfig.tiny()"]),
    "pickle checkpoint": (["sample", *M[2:], "--model", "{evil_pth}", "--out", "x.png"],
                          ["refusing to load", "weights_only=True", "convert it to safetensors"]),
    "truncated .pth": (["convert", "{truncated_pth}", "out"], ["cannot read", "is it the right file, and complete?"]),
    "damaged diffusers weights": (["convert", "{diffusers}", "out"],
                                  ["diffusion_pytorch_model.safetensors is not a readable safetensors file"]),
    "not a checkpoint": (["sample", *M[2:], "--model", "{ok}", "--out", "x.png"],
                         ["cannot tell the format of", "expected a folder (ddim-fast or diffusers)"]),
    "already converted": (["convert", "{tiny}", "out"], ["is already a ddim-fast checkpoint; nothing to convert"]),
    # -- images and arrays
    "corrupt png": (["encode", *M, "--input", "{truncated_png}"],
                    ["is not a readable image", "damaged or not an image"]),
    "decompression bomb": (["encode", *M, "--input", "{bomb_png}"], ["bomb.png is refused", "ordinary size"]),
    "folder without images": (["encode", *M, "--input", "{no_images}"], ["holds no images (.png"]),
    "images of another shape": (["encode", *M, "--input", "{small}"], ["holds images of shape (3, 8, 8); the model "
                                                                       "wants (3, 16, 16)"]),
    "nan images": (["encode", *M, "--input", "{nan}"], ["nan.npz: 'images' holds NaN or inf values", "recreate"]),
    "truncated npz": (["decode", *M, "--input", "{truncated_npz}"], ["truncated.npz is not an .npz archive",
                                                                     "recreate it with numpy.savez"]),
    "png as npz": (["decode", *M, "--input", "{png}"], ["good.png is not an .npz archive"]),
    "pickle as npz": (["decode", *M, "--input", "{evil_npz}"], ["evil.npz is a pickle, which is never loaded",
                                                                "save plain arrays"]),
    "object array": (["decode", *M, "--input", "{objects}"], ["holds pickled objects, which are never loaded"]),
    "integer latents": (["decode", *M, "--input", "{ints}"], ["'latents' must be a float array, got int64"]),
    "no latents array": (["decode", *M, "--input", "{nan}"], ["has no 'latents' array (it has ['images'])"]),
    "missing npz": (["decode", *M, "--input", "no-such.npz"], ["no .npz file at no-such.npz: check the path"]),
    "latents of another shape": (["interpolate", *M, "--latents", "{small}"],
                                 ["small.npz holds latents of shape (3, 8, 8); the model wants (3, 16, 16)"]),
    "a single latent": (["interpolate", *M, "--latents", "{one}"], ["holds 1 latent(s); interpolation needs two"]),
    "unreadable training image": (["train", "--out", "run", "--config", "tiny", "--dataset", "folder:{bad_folder}",
                                   "--steps", "1", "--batch-size", "4", "--workers", "1", "--grid-size", "0",
                                   "--no-progress"],
                                  ["broken.png is not a readable image", "remove or replace it"]),
    # -- outputs
    "output kind": (["encode", *M, "--input", "{ok}", "--out", "z.png"], ["encode writes latents to an .npz file"]),
    "output under a file": (["sample", *M, "--out", "{a_file}/x.png"], ["a-file is a file, not a folder",
                                                                        "choose another output path"]),
    "folder output is a file": (["sample", *M, "--out", "{a_file}"], ["a-file is a file, not a folder; remove it"]),
    "train under a file": (["train", "--out", "{a_file}/run", "--config", "tiny", "--dataset", "synthetic:8",
                            "--steps", "1", "--batch-size", "4", "--grid-size", "0", "--no-progress"],
                           ["a-file is a file, not a folder", "choose another output path"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_input_is_one_line(name, f, tmp_path, monkeypatch, capsys):
    argv, fragments = CASES[name]
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(capsys, argv, f)
    command = argv[0] if argv[0] in ("sample", "encode", "decode", "interpolate", "export", "train", "convert",
                                     "bench") else None
    assert_one_line_error(rc, err, command, *fragments)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "run"]), list(tmp_path.iterdir())  # nothing written
    assert not os.path.exists(f["marker"]), "a pickle was executed"


# -- every argument is checked before the model loads ----------------------------------------------------
# (argv, the fragments of the one-line error). Each would otherwise surface only after the work: a seed after
# an ONNX export, a latents shape after the graph, an unwritable output after sampling, a label after the
# backend's timing probe. The model's config.json is read (no weights) for T, the labels and the shape.
EARLY = {
    "seed after an export": (["sample", *M[:-5], "--backend", "onnxruntime", "--seed", "-1"],
                             ["--seed: a seed must be an int in [0, 2**63), got -1"]),
    "latents shape after a graph": (["interpolate", *M, "--latents", "{small}"],
                                    ["small.npz holds latents of shape (3, 8, 8); the model wants (3, 16, 16)"]),
    "/proc after sampling": (["sample", *M, "--out", "/proc/x.png"],
                             ["cannot write under /proc: the folder is not writable"]),
    "nan guidance": (["sample", *M[2:], "--model", "digits-cond", "--class", "1", "--guidance", "nan"],
                     ["--guidance must be a finite number (e.g. 2), got nan"]),
    "class above the labels": (["sample", *M[2:], "--model", "digits-cond", "--class", "3", "12"],
                               ["--class 12 is not a label of digits-cond: it takes 0..9, and 10 (the null label"]),
    "class of an unconditional model": (["decode", *M, "--input", "{ok}", "--class", "1"],
                                        ["--class applies to a class-conditional model", "takes no class labels"]),
    "negative class": (["sample", *M, "--class", "-1"], ["--class takes labels >= 0, got -1"]),
    "guidance without class": (["sample", *M, "--guidance", "2"], ["--guidance needs --class"]),
    "num 0": (["sample", *M, "--num", "0"], ["--num must be >= 1, got 0"]),
    "batch size 0": (["sample", *M, "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    "steps 0": (["sample", *M[:-3], "--steps", "0"], ["steps must be an int in [1, T]"]),
    "steps above T": (["sample", *M[:-3], "--steps", "101"], ["steps must be an int in [1, T=100], got 101"]),
    "nan eta": (["sample", *M, "--eta", "nan"], ["eta must be finite and >= 0"]),
    "sigma-hat with eta": (["sample", *M, "--variance", "large", "--eta", "0.5"], ["variance='large' (sigma-hat)"]),
    "order": (["sample", *M, "--sampler", "dpmpp_2m", "--order", "3"], ["sampler 'dpmpp_2m' takes order 1..2"]),
    "plms clip": (["sample", *M, "--sampler", "plms", "--clip-x0", "1"], ["plms combines model outputs"]),
    "device": (["sample", *M, "--device", "tpu9"], ["unknown --device 'tpu9'"]),
    "scale": (["sample", *M, "--scale", "0"], ["--scale must be in [1, 64], got 0"]),
    "output kind": (["sample", *M, "--out", "x.txt"], ["cannot write x.txt: use a grid image"]),
    "missing output folder": (["sample", *M, "--out", "no/such/x.png"],
                              ["the folder no/such does not exist; create it first"]),
    "cache limit": (["sample", *M, "--env", "DDIM_FAST_CACHE_MAX_MB=abc"],
                    ["DDIM_FAST_CACHE_MAX_MB must be a number of megabytes, got 'abc'", "or unset it"]),
    "encode input": (["encode", *M, "--input", "missing.npz"], ["no images at missing.npz"]),
    "encode images shape": (["encode", *M, "--input", "{small}"],
                            ["small.npz holds images of shape (3, 8, 8); the model wants (3, 16, 16)"]),
    "encode output kind": (["encode", *M, "--input", "{ok}", "--out", "z.png"], ["encode writes latents to an .npz"]),
    "decode integer latents": (["decode", *M, "--input", "{ints}"], ["'latents' must be a float array"]),
    "decode latents shape": (["decode", *M, "--input", "{small}"], ["holds latents of shape (3, 8, 8)"]),
    "interpolation seed": (["interpolate", *M, "--seeds", "-1", "2"], ["--seeds: a seed must be an int"]),
    "one frame": (["interpolate", *M, "--num", "1"], ["--num must be >= 2 (the two endpoints), got 1"]),
    "one latent": (["interpolate", *M, "--latents", "{one}"], ["holds 1 latent(s); interpolation needs two"]),
    "export suffix": (["export", "--model", "{tiny}", "--out", "x.txt"], ["the output must name an .onnx file"]),
    "export folder": (["export", "--model", "{tiny}", "--out", "no/x.onnx"], ["the folder no does not exist"]),
    "export opset": (["export", "--model", "{tiny}", "--out", "x.onnx", "--opset", "5"], ["opset must be an int"]),
    "export table alone": (["export", "--model", "{tiny}", "--out", "x.onnx", "--graph", "table"],
                           ["--graph table only applies to --whole-sampler"]),
    "export steps above T": (["export", "--model", "{tiny}", "--out", "x.onnx", "--whole-sampler", "--steps", "101"],
                             ["steps must be an int in [1, T=100], got 101"]),
    "export threshold": (["export", "--model", "{tiny}", "--out", "x.onnx", "--whole-sampler", "--threshold", "2"],
                         ["threshold is a quantile in (0, 1]"]),
    "export inverted multistep": (["export", "--model", "{tiny}", "--out", "x.onnx", "--whole-sampler", "--invert",
                                   "--sampler", "unipc"], ["--invert exports the DDIM encoder"]),
    "train folder": (["train", "--out", "no/run", "--config", "tiny", "--dataset", "synthetic:8"],
                     ["the folder no does not exist; create it first"]),
    "train seed": (["train", "--out", "run", "--seed", "-1"], ["seed must be in [0, 2**63)"]),
    "eval steps above T": (["eval-digits", "--steps", "2000"], ["steps must be an int in [1, T=1000], got 2000"]),
    "eval grid folder": (["eval-digits", "--grid", "no/grid.png"], ["the folder no does not exist"]),
    "eval n": (["eval-digits", "--n", "0"], ["--n must be >= 1, got 0"]),
    "convert destination": (["convert", "{tiny}", "no/out"], ["the folder no does not exist"]),
    "convert resolution": (["convert", "{tiny}", "out", "--resolution", "0"], ["--resolution must be >= 1"]),
    "classifier folder": (["train-digits-classifier", "no/out"], ["the folder no does not exist"]),
}


def _loud(what):
    def refuse(*a, **k):
        raise AssertionError(what)
    return refuse


@pytest.mark.parametrize("name", list(EARLY))
def test_every_argument_is_checked_before_the_model_loads(name, f, tmp_path, monkeypatch, capsys):
    """The model loader, the Engine (an export, a graph), the backend's probe, the exporter and the trainers
    fail loudly here: each bad argument must be refused, as one line, before any of them runs."""
    from ddim_fast import checkpoint, engine
    from ddim_fast.cli import common
    from ddim_fast.cli import convert as cli_convert
    from ddim_fast.cli import export as cli_export
    from ddim_fast.cli import metrics as cli_metrics
    from ddim_fast.cli import sample as cli_sample
    from ddim_fast.cli import train as cli_train

    if name.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    for module in (checkpoint, common, cli_sample):
        monkeypatch.setattr(module, "load_model", _loud("loaded the model"))
    monkeypatch.setattr(engine.Engine, "__init__", _loud("built an Engine"))
    monkeypatch.setattr(engine, "choose_backend", _loud("chose a backend"))
    monkeypatch.setattr(engine, "probe_per_sample_s", _loud("ran the backend's probe"))
    monkeypatch.setattr(cli_export, "export_onnx", _loud("exported"))
    monkeypatch.setattr(cli_train, "train", _loud("trained"))
    monkeypatch.setattr(cli_convert, "convert", _loud("converted"))
    monkeypatch.setattr(cli_metrics, "evaluate_digits_model", _loud("sampled"))
    monkeypatch.setattr(cli_metrics, "train_digits_classifier", _loud("trained"))
    monkeypatch.chdir(tmp_path)
    argv, fragments = EARLY[name]
    if "--env" in argv:
        k = argv.index("--env")
        monkeypatch.setenv(*argv[k + 1].split("=", 1))
        argv = argv[:k] + argv[k + 2:]
    rc, err = _cli(capsys, argv, f)
    assert_one_line_error(rc, err, argv[0], *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a folder


# -- an output that already exists: every command refuses (or asks for --overwrite) -------------------
EXISTING = {
    "sample": (["sample", *M, "--num", "1", "--out", "out.npz"], "out.npz", "--overwrite"),
    "encode": (["encode", *M, "--input", "{ok}", "--out", "out.npz"], "out.npz", "--overwrite"),
    "decode": (["decode", *M, "--input", "{ok}", "--out", "out.png"], "out.png", "--overwrite"),
    "interpolate": (["interpolate", *M, "--num", "3", "--out", "out.png"], "out.png", "--overwrite"),
    "export": (["export", "--model", "{tiny}", "--out", "out.onnx"], "out.onnx", "--overwrite"),
    "convert": (["convert", "{whole_pth}", "out"], "out", "overwrite=True (CLI: --overwrite)"),
    "train": (["train", "--out", "out", "--config", "tiny", "--dataset", "synthetic:8", "--steps", "1"], "out",
              "pass --resume to continue it"),
}


@pytest.mark.parametrize("command", list(EXISTING))
def test_existing_outputs_are_refused(command, f, tmp_path, monkeypatch, capsys):
    argv, out, fix = EXISTING[command]
    monkeypatch.chdir(tmp_path)
    if command == "train":  # a run folder holding a checkpoint
        (tmp_path / "out" / "checkpoints" / "step-0000001").mkdir(parents=True)
        (tmp_path / "out" / "checkpoints" / "step-0000001" / "trainer.json").write_text("{}")
    elif command == "convert":
        shutil.copytree(f["tiny"], tmp_path / "out")
    else:
        (tmp_path / out).write_bytes(b"precious")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, err = _cli(capsys, argv, {**f, "whole_pth": str(Path(f["tiny"]).parent / "whole.pth")})
    assert_one_line_error(rc, err, command, "already", fix)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resume_from_a_damaged_checkpoint_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--out", "run", "--config", "tiny", "--dataset", "synthetic:8", "--batch-size", "4",
            "--grid-size", "0", "--no-progress", "--save-every", "1"]
    assert main([*args, "--steps", "1"]) == 0
    (tmp_path / "run/checkpoints/step-0000001/trainer.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    rc, err = _cli(capsys, [*args, "--steps", "2", "--resume"], {})
    assert_one_line_error(rc, err, "train", "the checkpoint run/checkpoints/step-0000001 is damaged",
                          "trainer.safetensors is not a readable safetensors file", "delete that folder")


# -- the file system says no ---------------------------------------------------------------------------
def test_unwritable_output_folder(f, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files, "writable", lambda path: False)  # as a read-only folder looks (we run as root)
    rc, err = _cli(capsys, ["sample", *M, "--out", "x.png"], f)
    assert_one_line_error(rc, err, "sample", "cannot write under", "choose an output path in a writable folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free some disk space"), (errno.EACCES, "fix its permissions"),
                                       (errno.EROFS, "read-only: choose a writable location")])
def test_os_errors_while_writing(code, fix, f, tmp_path, monkeypatch, capsys):
    """The OS refuses the write itself (disk full, no permission, read-only): one line, no debris."""
    import ddim_fast.checkpoint as ck

    def refuse(self, data):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ck.Path, "write_bytes", refuse)
    rc, err = _cli(capsys, ["sample", *M, "--num", "1", "--out", "x.png"], f)
    assert_one_line_error(rc, err, "sample", os.strerror(code), fix)
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed


def test_error_message_formats():
    assert error_message(OSError(errno.ENOSPC, "No space left on device", "a.png")) == \
        "No space left on device: a.png; free some disk space or choose another location"
    assert error_message(KeyError("no such key")) == "no such key"
    assert error_message(ValueError("weights do not fit:\n  missing (1): x\n")) == "weights do not fit:; missing (1): x"
    dataloader = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                            "last):\n  File \"x.py\", line 1\nValueError: a.png is not a readable image")
    assert error_message(dataloader) == "a.png is not a readable image"


def test_help_exits_zero_and_no_command_prints_help(capsys):
    assert main(["sample", "--help"]) == 0
    assert "--steps" in capsys.readouterr().out
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_console_script_prints_no_traceback(f, tmp_path):
    """The installed `ddim-fast` entry point, in a real process: one line, status 2."""
    exe = Path(sys.executable).with_name("ddim-fast")
    assert exe.is_file(), f"the console script is not installed next to {sys.executable}: pip install -e ."
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv, fragment in ((["sample", "--model", f["truncated_ck"], "--out", "x.png", "--no-progress"],
                            "is not a readable safetensors file"),
                           (["sample", "--steps", "ten"], "argument --steps: invalid int value: 'ten'")):
        proc = subprocess.run([str(exe), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


# -- the API and the command line agree -----------------------------------------------------------------
def test_the_api_refuses_what_the_command_line_refuses(f, tmp_path, monkeypatch, capsys):
    """The same rule and the same words on both sides: an export path that is not .onnx, an output in a
    missing folder (export_onnx, save_images, save_model alike); load_model of something that is not a path."""
    from ddim_fast.onnx import export as ex

    monkeypatch.setattr(ex, "_prepare", lambda *a, **k: pytest.fail("started the export"))
    monkeypatch.chdir(tmp_path)
    cases = [(lambda: dd.export_onnx(GaussianEps(SCHED), "x.txt"), ["export", "--model", "{tiny}", "--out", "x.txt"]),
             (lambda: dd.export_onnx(GaussianEps(SCHED), "no/x.onnx"), ["export", "--model", "{tiny}", "--out",
                                                                           "no/x.onnx"]),
             (lambda: images.save_images(torch.zeros(1, 3, 4, 4), "no/x.png"), ["sample", *M, "--out", "no/x.png"]),
             (lambda: save_model("no/ck", dd.load_model(f["tiny"])), ["convert", "{tiny}/../whole.pth", "no/ck"])]
    messages = []
    for api, argv in cases:
        with pytest.raises((ValueError, OSError)) as e:
            api()
        rc, err = _cli(capsys, argv, f)
        assert_one_line_error(rc, err, argv[0])
        assert err == f"ddim-fast {argv[0]}: error: {e.value}\n"
        messages.append(str(e.value))
    assert messages[0] == "the output must name an .onnx file, got x.txt: give a path ending in .onnx, e.g. x.onnx"
    assert messages[1:] == ["the folder no does not exist; create it first (ddim-fast creates only the output folder "
                            "itself)"] * 3
    assert list(tmp_path.iterdir()) == []
    for bad in (None, 3, b"digits", "", ["digits"]):
        with pytest.raises(ValueError, match=r"^load_model takes a path \(a str or pathlib.Path\) to a checkpoint "
                                             r"folder, .* or a bundled model name \(digits, digits-cond\); got "):
            dd.load_model(bad)


def test_a_bad_cache_limit_is_refused_at_the_first_use_of_the_cache(tmp_path, monkeypatch, capsys):
    """DDIM_FAST_CACHE_MAX_MB=abc used to pass unnoticed until a write pruned the cache, and for ever when the
    export was cached: now the first look-up refuses it, before any export (the CLI: at start-up)."""
    from ddim_fast.onnx import cache as oc
    from ddim_fast.onnx import export as ex

    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    monkeypatch.setenv("DDIM_FAST_CACHE_MAX_MB", "abc")
    monkeypatch.setattr(ex, "torch_export", lambda *a, **k: pytest.fail("exported"))
    message = (r"^DDIM_FAST_CACHE_MAX_MB must be a number of megabytes, got 'abc'; set it to a number of megabytes "
               r">= 0 \(e.g. 2048, the default\) or unset it$")
    for use in (lambda: oc.lookup(tmp_path / "onnx" / "x.onnx"), lambda: oc.store(tmp_path / "onnx" / "x.onnx", b"x"),
                lambda: ex.export_cached(GaussianEps(SCHED), shape=(1, 4, 4))):
        with pytest.raises(ValueError, match=message):
            use()
    assert main(["sample", "--no-progress", "--out", str(tmp_path / "x.png")]) == 2  # the command line: at start-up
    assert capsys.readouterr().err == f"ddim-fast sample: error: {message[1:-1]}\n".replace("\\", "")
    assert list(tmp_path.iterdir()) == []


# -- API entry points the module tests leave out -------------------------------------------------------
def test_load_model_damaged_weights(f):
    with pytest.raises(ValueError, match=r"truncated_ck/model\.safetensors is not a readable safetensors file.*"
                                         r"re-save or re-download"):
        dd.load_model(f["truncated_ck"])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors is not a readable safetensors"):
        dd.load_model(f["diffusers"])


@pytest.mark.parametrize("change, message", [
    (lambda c: c["schedule"].update(beta_stXrt=1), r"cannot build a 'linear' noise schedule .*unexpected keyword"),
    (lambda c: c["schedule"].update(kind="betas", betas="x"), r"cannot build a 'betas' noise schedule"),
    (lambda c: c.update(schedule=[1, 2]), r"a noise schedule is read from a dict .* got list"),
    (lambda c: c["schedule"].update(T="100"), r"T \(the number of training timesteps\) must be a positive int"),
    (lambda c: c.update(model="x"), r"a UNetConfig is read from a dict, got str"),
    (lambda c: c["model"].update(ch="32"), r"ch must be a positive int, got '32'"),
    (lambda c: c.pop("schedule"), r"config.json has no 'schedule' entry; the checkpoint is damaged: re-save it"),
])
def test_damaged_config_entries(f, tmp_path, change, message):
    """A config.json that parses but holds wrong entries: ValueError, never a TypeError or KeyError."""
    shutil.copytree(f["tiny"], tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    change(cfg)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        dd.load_model(tmp_path / "ck")


def test_bounds_beyond_float32():
    with pytest.raises(ValueError, match=r"within the float32 range .* clip_x0=None for no clipping"):
        dd.SamplingPlan.build(SCHED, 3, clip_x0=1e39)
    plan = dd.SamplingPlan.build(SCHED, 3, threshold=0.9, threshold_max=1e39)  # above float32: no cap at all
    assert plan.threshold_max == float("inf")
    assert torch.isfinite(dd.sample(GaussianEps(SCHED), dd.rng.initial_noise(0, (2, 1, 4, 4)), plan)).all()


def test_slerp_degenerate_latents():
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dd.slerp(torch.zeros_like(z), z, 0.25), 0.25 * z)  # no angle: linear, not NaN
    with pytest.raises(ValueError, match="z0 has NaN or inf values"):
        dd.slerp(torch.full_like(z, float("nan")), z, 0.5)
    with pytest.raises(ValueError, match=r"z1 is torch.int64: pass z1.float\(\)"):
        dd.slerp(z, z.long(), 0.5)


def test_engine_refuses_integer_starts():
    eng = dd.Engine(GaussianEps(SCHED), dd.SamplingPlan.build(SCHED, 2), backend="reference", device="cpu",
                    shape=(1, 4, 4))
    with pytest.raises(ValueError, match="x_T must be a floating-point tensor, got torch.int64"):
        eng(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x0 must have shape"):
        eng.invert(torch.zeros(1, 4, 4))


# -- random input: ValueError or a valid result, nothing else ------------------------------------------
def _mutate(data: bytes, edits, cut):
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[: max(1, int(len(b) * cut))])


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)
CUT = st.one_of(st.just(1.0), st.floats(0.0, 1.0))


@FUZZ
@given(EDITS, CUT)
def test_fuzzed_checkpoints_load_or_raise_value_error(f, tmp_path_factory, edits, cut):
    folder = tmp_path_factory.mktemp("fuzz-ck")
    shutil.copytree(f["tiny"], folder, dirs_exist_ok=True)
    which = "config.json" if edits[0][1] % 3 == 0 else "model.safetensors"
    (folder / which).write_bytes(_mutate((folder / which).read_bytes(), edits, cut))
    try:
        model = dd.load_model(folder)
    except ValueError:
        return
    assert isinstance(model, dd.UNet)  # a change inside the tensor data still loads


@FUZZ
@given(EDITS, CUT)
def test_fuzzed_npz_and_png_read_or_raise_value_error(f, tmp_path_factory, edits, cut):
    folder = tmp_path_factory.mktemp("fuzz-files")
    for src, name in ((f["ok"], "a.npz"), (f["png"], "a.png")):
        path = folder / name
        path.write_bytes(_mutate(Path(src).read_bytes(), edits, cut))
        try:
            x, _ = images.load_images(path, 3, 16)
        except ValueError:
            continue
        assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all()


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_are_never_unpickled(f, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz-bytes") / "x.npz"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        images.load_npz(path, "latents")


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 2000))


@FUZZ
@given(st.integers(-3, 50), NUMBERS, NUMBERS, st.sampled_from(["linear", "scaled_linear", "cosine"]))
def test_random_schedules(T, a, b, kind):
    try:
        sched = getattr(dd.NoiseSchedule, kind)(T, a, b)
    except ValueError:
        return
    assert torch.isfinite(sched.alphas_cumprod).all() and (sched.alphas_cumprod > 0).all()
    assert ((sched.betas > 0) & (sched.betas < 1)).all()


@FUZZ
@given(st.one_of(st.none(), NUMBERS, st.tuples(NUMBERS, NUMBERS)), st.one_of(st.none(), NUMBERS), NUMBERS)
def test_random_clip_and_threshold(clip_x0, threshold, threshold_max):
    try:
        plan = dd.SamplingPlan.build(SCHED, 5, clip_x0=clip_x0, threshold=threshold, threshold_max=threshold_max)
    except ValueError:
        return
    assert torch.isfinite(plan.coef).all()
    x = dd.sample(GaussianEps(SCHED), dd.rng.initial_noise(0, (2, 1, 4, 4)), plan)
    assert torch.isfinite(x).all()


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=4),
                 st.lists(st.integers(-2, 40), max_size=4))


@FUZZ
@given(st.sampled_from(["in_channels", "resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                        "dropout", "num_groups", "norm_eps", "resamp_with_conv"]), JUNK)
def test_random_unet_configs(field, value):
    d = {**dd.UNetConfig.tiny().to_dict(), field: value}
    try:
        cfg = dd.UNetConfig.from_dict(d)
    except ValueError:
        return
    with torch.device("meta"):
        dd.UNet(cfg)  # an accepted config builds


@FUZZ
@given(JUNK, JUNK, JUNK)
def test_random_engine_sample_arguments(batch_size, seed, first_index):
    eng = dd.Engine(GaussianEps(SCHED), dd.SamplingPlan.build(SCHED, 2, eta=0.5), backend="reference",
                    device="cpu", shape=(1, 2, 2))
    try:
        out = eng.sample(batch_size, seed=seed, first_index=first_index)
    except ValueError:
        return
    assert out.shape == (batch_size, 1, 2, 2) and torch.isfinite(out).all()


def test_export_checks_its_output_before_exporting(tmp_path, capsys):
    from ddim_fast.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    assert main(["export", "--out", str(blocker / "x.onnx")]) == 2
    assert "a-file is a file, not a folder" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "x.txt")]) == 2
    assert "must name an .onnx file" in capsys.readouterr().err
    assert main(["export", "--whole-sampler", "--steps", "0", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "steps must be an int" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
