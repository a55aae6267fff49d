"""Faults: processes killed with SIGKILL (training, a checkpoint write, one rank of distributed
sampling) and NaN appearing mid-sampling. Real processes, polled (never fixed sleeps alone); tiny
models, few steps.

After a kill: the last good checkpoint loads, `--resume` continues to the target step and gives the
uninterrupted run's losses, no half-written folder is visible under a final name, and a rerun of a
distributed sampling command leaves exactly N images, each equal to a clean run's. A NaN is reported
(with its step on the reference path) and never written out as an image.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast import train as T
from ddim_fast.checkpoint import TRAINER_JSON, save_model
from ddim_fast.cli import main
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.sampling import NonFiniteError
from tests.helpers import ROOT

SCHED = dd.NoiseSchedule.linear(100, 1e-3, 0.05)


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # as the test process runs: the same arithmetic, bit for bit
    return env


def _wait_for(condition, proc, what, timeout=180.0):
    """Poll `condition` until it holds; fail early (with its output) if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = dd.UNet(dd.UNetConfig.tiny())
    m.schedule = SCHED
    return m


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- SIGKILL during training -------------------------------------------------------------------------
TRAIN_ARGS = ["train", "--dataset", "synthetic:32", "--config", "tiny", "--batch-size", "8", "--lr", "1e-3",
              "--warmup", "2", "--save-every", "2", "--log-every", "1", "--grid-size", "0", "--no-progress",
              "--dropout", "0.1", "--keep", "0"]


def test_sigkill_during_training_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TRAIN_ARGS, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "ddim_fast.cli", *args, "--steps", "100000"], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: T.find_latest_checkpoint(out) is not None, proc, "the first checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    last = T.find_latest_checkpoint(out)  # the last good checkpoint
    k = json.loads((last / TRAINER_JSON).read_text())["step"]
    assert k >= 2 and k % 2 == 0
    model = dd.load_model(last)
    assert model.checkpoint_info["training"]["step"] == k
    assert model.config == dataclasses.replace(dd.UNetConfig.tiny(), dropout=0.1)

    target = k + 3
    capsys.readouterr()
    assert main([*args, "--steps", str(target), "--resume"]) == 0
    assert f"resuming from step {k}" in capsys.readouterr().out
    assert T.find_latest_checkpoint(out).name == f"step-{target:07d}"
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # debris removed
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, target + 1))  # no duplicated or missing step

    # the killed-and-resumed run is the uninterrupted run, bit for bit (its log holds both processes' losses)
    cfg = T.TrainConfig(out=str(tmp_path / "straight"), dataset="synthetic:32", config="tiny", steps=target,
                        batch_size=8, lr=1e-3, warmup=2, save_every=target, log_every=1, grid_size=0,
                        progress=False, dropout=0.1)
    straight = T.train(cfg, log=lambda *a: None)
    assert [r["loss"] for r in log] == [straight.losses[s] for s in range(1, target + 1)]


# -- SIGKILL during a checkpoint write -----------------------------------------------------------------
CHILD = """
import os, sys, time, torch
from pathlib import Path
import ddim_fast as dd
import ddim_fast.checkpoint as ck
path, marker, where = sys.argv[1:4]
torch.manual_seed(1)
m = dd.UNet(dd.UNetConfig.tiny())
m.schedule = dd.NoiseSchedule.linear(100, 1e-3, 0.05)

def stall():
    Path(marker).touch()
    time.sleep(600)  # the parent kills us here

real_save, real_replace = ck.atomic_save_safetensors, os.replace
def slow_save(p, tensors, metadata=None):
    if where == "write" and Path(p).name == "ema.safetensors":  # config and weights written; half of this
        Path(p).write_bytes(b"half a file")
        stall()
    return real_save(p, tensors, metadata)
def slow_replace(src, dst):
    real_replace(src, dst)
    if where == "swap" and str(src) == path:  # the old folder is set aside, the new one not yet in place
        stall()
ck.atomic_save_safetensors, os.replace = slow_save, slow_replace
ck.save_model(path, m, ema_state_dict=m.state_dict(), overwrite=True)
"""


def _kill_mid_save(tmp_path, where):
    path, marker = tmp_path / "ckpt", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(marker), where], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker.exists, proc, f"the child to stall mid-save ({where})")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return path


def test_sigkill_mid_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    good = save_model(tmp_path / "ckpt", _tiny(0))
    before = dd.load_model(good).state_dict()
    _kill_mid_save(tmp_path, "write")
    assert _same_weights(dd.load_model(good).state_dict(), before)  # the old checkpoint, intact
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "stalled")
    assert names[-1] == "ckpt" and len(names) == 2  # plus the dead writer's hidden folder, never the final name
    debris = tmp_path / names[0]
    assert names[0].startswith(".ckpt.") and names[0].endswith(".tmp")
    assert (debris / "ema.safetensors").read_bytes() == b"half a file"  # killed mid-write, really
    save_model(good, _tiny(2), overwrite=True)  # the debris does not block the next save
    assert _same_weights(dd.load_model(good).state_dict(), _tiny(2).state_dict())


def test_sigkill_between_the_two_renames_names_the_intact_folder(tmp_path):
    save_model(tmp_path / "ckpt", _tiny(0))
    before = dd.load_model(tmp_path / "ckpt").state_dict()
    path = _kill_mid_save(tmp_path, "swap")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.old-")]
    assert not path.exists() and len(aside) == 1
    with pytest.raises(FileNotFoundError, match=r"a save there was interrupted, and the previous checkpoint is intact "
                                                r"at .*\.ckpt\.old-.*; rename that folder back to ckpt"):
        dd.load_model(path)
    os.replace(aside[0], path)  # the fix the message gives
    assert _same_weights(dd.load_model(path).state_dict(), before)


# -- SIGKILL of one rank during distributed sampling -------------------------------------------------
def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_pid(agent_pid, rank):
    for pid in _children(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
def test_sigkill_one_rank_then_rerun_fills_the_folder(tmp_path):
    model_dir = save_model(tmp_path / "tiny", _tiny(0))
    out, N = tmp_path / "samples", 24
    sample = ["sample", "--model", str(model_dir), "--backend", "reference", "--steps", "8", "-n", str(N),
              "--batch-size", "1", "--seed", "3", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ddim_fast.cli", *sample, "--out", str(out)]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (out / "000001.png").exists(), agent, "rank 1's first image")  # rank 1: odd indices
        victim = _rank_pid(agent.pid, 1)
        assert victim is not None, "no worker with RANK=1 under torchrun"
        os.kill(victim, signal.SIGKILL)
        agent.wait(timeout=120)  # torchrun stops the other rank and fails
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode != 0
    first = sorted(p.name for p in out.glob("*.png"))
    assert 0 < len(first) < N, first
    assert json.loads((out / "manifest.json").read_text())["complete"] is False  # the settings, recorded up front
    (out / ".000005.png.k1ll3d.tmp").write_bytes(b"half a png")  # what a kill mid-write leaves (if it lands there)

    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:06d}.png" for i in range(N)] + ["manifest.json"])  # none missing, no extra, no debris
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num"] == N and manifest["world_size"] == 2 and manifest["seed"] == 3

    assert main([*sample, "--out", str(tmp_path / "clean")]) == 0  # one process, never interrupted
    for i in range(N):  # refilled or not, every image is the clean run's (the PNG bytes themselves)
        assert (out / f"{i:06d}.png").read_bytes() == (tmp_path / "clean" / f"{i:06d}.png").read_bytes(), i


# -- NaN mid-sampling ------------------------------------------------------------------------------------
class NaNBelow(GaussianEps):
    """The exact Gaussian denoiser, except NaN at timesteps below `t_bad`: a model that fails mid-run."""

    def __init__(self, schedule, t_bad):
        super().__init__(schedule)
        self.t_bad = t_bad

    def forward(self, x, t):
        eps = super().forward(x, t)
        return torch.where((t < self.t_bad).view(-1, 1, 1, 1), torch.full_like(eps, float("nan")), eps)


def test_engine_reference_reports_the_step():
    plan = dd.SamplingPlan.build(SCHED, 10)  # timesteps 90, 80, ..., 0: t < 45 first at step 5 (t = 40)
    eng = dd.Engine(NaNBelow(SCHED, 45), plan, backend="reference", device="cpu", shape=(1, 4, 4))
    with pytest.raises(NonFiniteError, match=r"non-finite at step 5 \(timestep 40\)"):
        eng.sample(2, seed=0)
    with pytest.raises(NonFiniteError, match=r"step 5 \(timestep 40\)"):
        eng(dd.rng.initial_noise(0, (2, 1, 4, 4)))
    assert torch.isfinite(dd.Engine(NaNBelow(SCHED, 0), plan, backend="reference", device="cpu",
                                    shape=(1, 4, 4)).sample(2)).all()  # the same model without the fault


@pytest.mark.parametrize("entry", ["sample", "call", "invert"])
def test_engine_triton_flags_nan(entry):
    """The fused step kernel sets a device flag; the Engine raises (interpreter on CPU)."""
    pytest.importorskip("triton")
    plan = dd.SamplingPlan.build(SCHED, 10, eta=0.5 if entry != "invert" else 0.0)
    eng = dd.Engine(NaNBelow(SCHED, 45), plan, backend="triton", device="cpu", shape=(1, 4, 4))
    run = {"sample": lambda: eng.sample(2, seed=1), "call": lambda: eng(dd.rng.initial_noise(1, (2, 1, 4, 4))),
           "invert": lambda: eng.invert(torch.zeros(2, 1, 4, 4))}[entry]
    with pytest.raises(NonFiniteError, match=r"NaN or inf \(triton backend\); run backend='reference' to find"):
        run()


@pytest.fixture(scope="module")
def shared(shared_tiny_unet):
    return shared_tiny_unet


def test_engine_onnxruntime_reports_nan(shared):
    """On a CPU the onnxruntime backend runs the reference loop, which names the step; a finite but huge start
    overflows the network to NaN (before the Engine checked results, it was returned silently)."""
    pytest.importorskip("onnxruntime")
    eng = dd.Engine(dd.load_model(shared), dd.SamplingPlan.build(SCHED, 4), backend="onnxruntime", device="cpu")
    assert torch.isfinite(eng.sample(1, seed=0)).all()
    with pytest.raises(NonFiniteError, match=r"became non-finite at step 0 \(timestep 75\)"):
        eng(torch.full((1, 3, 16, 16), 3e38))


def test_cli_never_writes_a_nan_image(shared, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    broken = dd.load_model(shared)
    with torch.no_grad():
        broken.conv_out.bias.fill_(float("nan"))
    save_model(tmp_path / "broken", broken)
    common = ["--model", "broken", "--backend", "reference", "--steps", "4", "--num", "2", "--no-progress"]
    for out in ("x.png", "x.npz", "folder"):  # the reference backend names the step
        capsys.readouterr()
        assert main(["sample", *common, "--out", out]) == 2
        err = capsys.readouterr().err
        assert "ddim-fast sample: error: the sampler state became non-finite at step 0 (timestep 75)" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "folder"]
    # no image; only the manifest written before the first image, which records a run not complete
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["manifest.json"]
    assert json.loads((tmp_path / "folder" / "manifest.json").read_text())["complete"] is False
    # ONNX Runtime (the export is cached by `shared`): latents that overflow the network
    np.savez(tmp_path / "huge.npz", latents=np.full((2, 3, 16, 16), 3e38, np.float32))
    capsys.readouterr()
    assert main(["decode", "--model", str(shared), "--backend", "onnxruntime", "--steps", "4", "--no-progress",
                 "--input", "huge.npz", "--out", "decoded.png"]) == 2
    err = capsys.readouterr().err
    assert "ddim-fast decode: error: the sampler state became non-finite at step 0 (timestep 75)" in err
    assert not (tmp_path / "decoded.png").exists()
